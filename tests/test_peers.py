"""The field's other layouts: DistillKit's and axolotl's datasets in (`softlabels import`),
axolotl's columns out (`softlabels export`), checked against what those tools' own code made and
computed (tests/fixtures/peers: made once by make.py with their code; VERSIONS.md says which).

Real runs: the `softlabels` command in a subprocess, an embedded Dask cluster, real Parquet,
`softlabels train` for the losses, moto's S3 server for a source at a URL.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from softlabels.data.format import DEFAULT_LOGPROB_STEP, TAIL_STEP
from tests.helpers import read_dataset, softlabels

FIX = Path(__file__).resolve().parent / "fixtures" / "peers"
EXPECTED = json.loads((FIX / "expected.json").read_text())
STEP = DEFAULT_LOGPROB_STEP


def expected_distillkit(name: str) -> list[dict]:
    """Per source row, what DistillKit's trainer sees (made by its own code)."""
    z = np.load(FIX / "expected-distillkit.npz")
    lens = z[f"{name}/lengths"]
    off = np.r_[0, np.cumsum(lens)]
    return [{k: z[f"{name}/{k}"][a:b] for k in ("input_ids", "attention_mask", "ids", "values")}
            for a, b in zip(off[:-1], off[1:])]


def import_(src, out, *flags, check=True):
    workers = [] if "--workers" in flags else ["--workers", "1"]
    return softlabels("import", src, out, *flags, *workers, check=check)


def by_source_row(rows: dict) -> dict[int, list]:
    out: dict[int, list] = {}
    for rid in sorted(rows, key=lambda r: tuple(map(int, r.split(":")))):
        out.setdefault(int(rid.split(":")[0]), []).append(rows[rid])
    return out


@pytest.mark.parametrize("name,flags", [
    ("distillkit-raw", ["--tokenizer", FIX / "tokenizer"]),
    ("distillkit-bins", ["--tokenizer", FIX / "tokenizer"]),
    ("distillkit-packed", ["--tokenizer", FIX / "tokenizer", "--compression-config",
                           FIX / "distillkit-raw" / "compression_config.yaml"]),
    ("distillkit-packed-disk", ["--tokenizer", FIX / "tokenizer", "--compression-config",
                                FIX / "distillkit-raw" / "compression_config.yaml"]),
])
def test_distillkit_import_holds_what_its_trainer_sees(tmp_path, name, flags):
    """Every source row, trimmed as DistillKit's trainer trims it and split into its packed
    documents: the same input ids, at each position the same ids with log-probs within half
    our step of DistillKit's own decompression, and the mass outside them 1 - their sum (within
    the tail's rounding); `verify` passes; the manifest and card say what the source lacks."""
    out = tmp_path / "out"
    p = import_(FIX / name, out, "--from", "distillkit", *flags)
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert softlabels("verify", out).returncode == 0
    want = expected_distillkit(name.removesuffix("-disk"))
    got = by_source_row(read_dataset(out))
    assert sorted(got) == list(range(len(want)))  # every source row, exactly once
    for r, w in enumerate(want):
        parts = got[r]
        ids = np.concatenate([x.input_ids for x in parts])
        np.testing.assert_array_equal(ids, w["input_ids"])
        cuts = np.cumsum([len(x.input_ids) for x in parts])[:-1]
        np.testing.assert_array_equal(cuts, np.flatnonzero(np.diff(w["attention_mask"])) + 1)
        top = np.concatenate([x.topk_ids for x in parts])
        lp = np.concatenate([x.topk_logprobs for x in parts])
        tail = np.concatenate([x.tail_logprob for x in parts]).astype(np.float64)
        for t in range(len(ids)):
            mine = dict(zip(top[t].tolist(), lp[t].tolist()))
            theirs = dict(zip(w["ids"][t].tolist(), w["values"][t].tolist()))
            assert mine.keys() == theirs.keys(), (r, t)
            total = np.exp(np.float64(w["values"][t])).sum()
            scale = min(1.0, 1 / total)  # a sum past 1 is scaled to 1 (counted in the manifest)
            assert max(abs(mine[i] - theirs[i] - np.log(scale)) for i in mine) <= STEP / 2 + 1e-5
            if total < 1:
                assert abs(np.exp(tail[t]) / (1 - total) - 1) <= np.expm1(TAIL_STEP / 2) + 1e-4
    m = json.loads((out / "manifest.json").read_text())
    assert (m["format_version"], m["exact_tail"], m["label_logprobs"],
            m["topk_renormalised"]) == (5, False, False, False)
    prov = m["provenance"]
    assert prov["imported_from"] == "distillkit" and prov["source_rows"] == len(want)
    assert prov["rows_trimmed"] == (0 if "packed" in name else len(want))
    assert (prov["rows_packed"] > 0) == ("packed" in name)
    assert summary["rows"] == m["shards"][0]["rows"] + sum(s["rows"] for s in m["shards"][1:])
    card = (out / "README.md").read_text()
    assert "did not store" in card and "polynomial fit" in card


def test_axolotl_import_is_what_its_trainer_trains(tmp_path):
    """axolotl's prepared rows (Parquet and save_to_disk, from its own data path): our decoded
    targets equal its target rows (renormalised over K) within our rounding where its mask is
    1; and `softlabels train` (its default residual resolves to none there) has, on the first
    step, axolotl's own KD loss summed over the same rows with the same student (computed by its
    loss module), within what that rounding moves it."""
    src = pq.read_table(FIX / "axolotl" / "train.parquet").to_pylist()
    for name in ("axolotl", "axolotl-disk"):
        out = tmp_path / name
        import_(FIX / name, out, "--from", "axolotl", "--tokenizer", FIX / "tokenizer")
        got = read_dataset(out)
        assert softlabels("verify", out).returncode == 0
        assert set(got) == {f"{i}:0" for i in range(len(src))}
        for i, row in enumerate(src):
            r = got[f"{i}:0"]
            mask = np.array(row["target_mask"]).all(-1)
            np.testing.assert_array_equal(r.input_ids, row["input_ids"])
            np.testing.assert_array_equal(r.target_mask, mask)
            for t in np.flatnonzero(mask):
                theirs = dict(zip(row["target_token_ids"][t], row["target_logprobs"][t]))
                mine = dict(zip(r.topk_ids[t].tolist(), r.topk_logprobs[t].tolist()))
                assert mine.keys() == theirs.keys()
                assert max(abs(mine[j] - theirs[j]) for j in mine) <= STEP / 2 + 1e-5
            assert (np.exp(r.tail_logprob[mask].astype(np.float64)) == 0).all()  # no tail
        m = json.loads((out / "manifest.json").read_text())
        assert (m["exact_tail"], m["label_logprobs"], m["topk_renormalised"]) == (
            False, False, True)
    kd = first_step_kd(tmp_path / "axolotl", tmp_path / "s")
    want = EXPECTED["axolotl_import"]
    assert kd["positions"] == want["positions"]
    # our stored log-probs are theirs rounded to 1/16 nats (checked above): 1.0e-4 measured
    assert kd["kd_sum"] == pytest.approx(want["kd_sum"], rel=1e-3)


def first_step_kd(data, out, *flags) -> dict:
    """`softlabels train` on `data` with the fixture student, one step holding every row: its
    logged KD loss (normalised by target positions, before the update) as a sum."""
    from softlabels.data.reader import SoftLabelReader

    softlabels("train", "--student", FIX / "student", "--data", data, "--output", out,
               "--max-steps", "1", "--ce-weight", "0", "--batch-tokens", "100000", *flags)
    log = json.loads((out / "train_log.json").read_text())
    assert log["history"][0]["tokens"] == log["tokens"]  # one step held every target
    positions = int(SoftLabelReader(data).index().kd_positions.sum())
    assert log["tokens"] == positions
    return {"kd_sum": log["history"][0]["kd"] * positions, "positions": positions}


def test_axolotl_export_is_what_axolotls_loss_trained_on(tmp_path):
    """`export --to axolotl` writes the rows make.py handed to axolotl's KD loss (same values),
    and that loss, summed, equals `softlabels train --residual none` on the source dataset's
    first step with the same student."""
    out = tmp_path / "ax"
    softlabels("export", FIX / "softlabels", out, "--to", "axolotl")
    files = sorted((out / "data").glob("*.parquet"))
    rows = pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()
    from tests.fixtures.peers.make import columns_sha256

    want = EXPECTED["axolotl_export"]
    assert columns_sha256(rows) == want["columns_sha256"]
    kd = first_step_kd(FIX / "softlabels", tmp_path / "s", "--residual", "none")
    assert kd["positions"] == want["positions"]
    assert kd["kd_sum"] == pytest.approx(want["kd_sum"], rel=2e-5)
    card = (out / "README.md").read_text()
    assert "Dropped" in card and "mass outside the top-k" in card
    for r in rows:  # the masks and labels as axolotl's trainer pairs them
        mask = np.array(r["target_mask"]).all(-1)
        labels = np.array(r["labels"])
        np.testing.assert_array_equal(labels[1:] != -100, mask[:-1])
        assert labels[0] == -100


def test_import_runs_on_several_workers_and_resumes_piece_by_piece(tmp_path):
    """Three source files are three pieces: two workers give the shards one worker gives, byte
    for byte; a piece whose shard and record are gone is converted again by a rerun, alone, and
    the dataset is the same; a rerun with other settings is refused in one line."""
    flags = ["--from", "distillkit", "--tokenizer", FIX / "tokenizer"]
    one, two = tmp_path / "one", tmp_path / "two"
    import_(FIX / "distillkit-raw", one, *flags)
    softlabels("import", FIX / "distillkit-raw", two, *flags, "--workers", "2")
    m1 = json.loads((one / "manifest.json").read_text())
    m2 = json.loads((two / "manifest.json").read_text())
    assert len(m1["shards"]) == 3
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]
    # an interrupted run: one piece's shard and record gone, no manifest yet
    (two / "manifest.json").unlink()
    (two / m2["shards"][1]["file"]).unlink()
    (two / ".softlabels" / "import" / "00001.json").unlink()
    p = softlabels("import", FIX / "distillkit-raw", two, *flags, "--workers", "2")
    assert "3 pieces" in p.stdout and "2 already converted" in p.stdout
    assert [s["sha256"] for s in json.loads((two / "manifest.json").read_text())["shards"]] == [
        s["sha256"] for s in m1["shards"]]
    p = import_(FIX / "distillkit-raw", two, *flags, "--logprob-step", "0.125", check=False)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0
    assert "logprob_step" in p.stderr and "Traceback" not in p.stderr


def test_import_from_a_store_streams_the_same_dataset(tmp_path, bucket):
    """A source at an s3:// URL (moto's S3 server) gives the shards a folder gives."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.put(str(FIX / "distillkit-raw"), f"{bucket}/dk", recursive=True)
    fs.put(str(FIX / "tokenizer"), f"{bucket}/dk/tokenizer", recursive=True)
    a, b = tmp_path / "a", tmp_path / "b"
    import_(f"{bucket}/dk", a, "--from", "distillkit")  # its tokenizer comes with it
    import_(FIX / "distillkit-raw", b, "--from", "distillkit", "--tokenizer", FIX / "tokenizer")
    ma = json.loads((a / "manifest.json").read_text())
    mb = json.loads((b / "manifest.json").read_text())
    assert [s["sha256"] for s in ma["shards"]] == [s["sha256"] for s in mb["shards"]]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(folder: Path, change) -> None:
    """Rewrite the first Parquet file of a folder with change(list of row dicts)."""
    f = sorted(folder.glob("*.parquet"))[0]
    t = pq.read_table(f)
    rows = t.to_pylist()
    change(rows)
    pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), f)


def test_bad_sources_are_refused_in_one_line(tmp_path):
    """Each is refused before or while converting, in one line naming the file and row, with no
    traceback and no manifest."""
    tok = ["--tokenizer", FIX / "tokenizer"]
    dk = ["--from", "distillkit", *tok]
    cases = []
    src = _copy(FIX / "distillkit-raw", tmp_path / "wrongcfg")
    (src / "compression_config.yaml").write_text(
        (src / "compression_config.yaml").read_text().replace("exact_k: 8", "exact_k: 6"))
    cases.append((src, dk, "value bytes"))
    src = _copy(FIX / "distillkit-raw", tmp_path / "bigid")

    def big_id(rows):
        rows[1]["bytepacked_indices"][3][0] = 255  # id 1020 or more at row 1, position 3

    _rewrite(src, big_id)
    cases.append((src, dk, "row 1: target id"))
    src = _copy(FIX / "distillkit-raw", tmp_path / "lengths")

    def short(rows):
        rows[2]["input_ids"] = rows[2]["input_ids"][:-5]

    _rewrite(src, short)
    cases.append((src, dk, "row 2:"))
    cases.append((FIX / "distillkit-packed", dk, "compression_config.yaml"))
    cases.append((FIX / "distillkit-raw", ["--from", "distillkit"], "carries no tokenizer"))
    cases.append((FIX / "distillkit-raw", ["--from", "axolotl", *tok], "not axolotl's layout"))
    src = _copy(FIX / "axolotl", tmp_path / "ragged")

    def ragged(rows):
        rows[3]["target_token_ids"][10] = rows[3]["target_token_ids"][10][:-1]

    _rewrite(src, ragged)
    cases.append((src, ["--from", "axolotl", *tok], "row 3: target_token_ids has 15 entries"))
    src = _copy(FIX / "axolotl", tmp_path / "notrenorm")

    def halved(rows):
        r = rows[0]
        t = int(np.flatnonzero(np.array(r["target_mask"]).all(-1))[0])
        r["target_logprobs"][t] = [v - 0.7 for v in r["target_logprobs"][t]]

    _rewrite(src, halved)
    cases.append((src, ["--from", "axolotl", *tok], "row 0: target probabilities sum to"))
    src = _copy(FIX / "distillkit-packed", tmp_path / "badpack")

    def unpacked(rows):
        rows[0]["attention_mask"] = [2, *rows[0]["attention_mask"][1:]]

    _rewrite(src, unpacked)
    cases.append((src, [*dk, "--compression-config",
                        FIX / "distillkit-raw" / "compression_config.yaml"],
                  "cannot be split into documents"))
    cases.append((FIX / "distillkit-raw", [*dk, "--vocab-size", "100"], "--vocab-size 100"))
    cases.append((FIX / "distillkit-raw", [*dk, "--logprob-step", "nan"], "--logprob-step nan"))
    cases.append((FIX / "distillkit-raw", [*dk, "--workers", "-3"], "--workers -3"))
    cases.append((FIX / "distillkit-raw", [*dk, "--compression-config", "/nope.yaml"],
                  "/nope.yaml does not exist"))
    for i, (src, flags, needle) in enumerate(cases):
        out = tmp_path / f"out{i}"
        p = import_(src, out, *flags, check=False)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2, (needle, p.stderr[-2000:])
        assert "Traceback" not in p.stderr and needle in lines[-1], (needle, p.stderr[-2000:])
        assert not (out / "manifest.json").exists()


def test_recipes_that_need_what_an_import_lacks_are_refused(tmp_path):
    """A DistillKit import trains with the defaults (the rest onto the real next token) and
    refuses the exact label residual, draws and a student with its own tokenizer; an axolotl
    import trains with the defaults (renormalised) and refuses a residual that needs the mass
    outside its top-k. Each in one line naming the dataset."""
    dk, ax = tmp_path / "dk", tmp_path / "ax"
    import_(FIX / "distillkit-raw", dk, "--from", "distillkit", "--tokenizer", FIX / "tokenizer")
    import_(FIX / "axolotl", ax, "--from", "axolotl", "--tokenizer", FIX / "tokenizer")
    base = ["--student", FIX / "student", "--max-steps", "1", "--batch-tokens", "2048"]
    p = softlabels("train", *base, "--data", dk, "--output", tmp_path / "ok1")
    assert "the rest onto the real next token" in p.stdout + p.stderr
    p = softlabels("train", *base, "--data", ax, "--output", tmp_path / "ok2")
    assert "renormalised by its source" in p.stdout + p.stderr
    for data, flags, needle in (
            (dk, ["--residual", "label"], "has no label log-probs"),
            (dk, ["--targets", "samples"], "has no sampled targets"),
            (dk, ["--loss", "reverse_kl", "--residual", "tail"], "has no exact tail"),
            (ax, ["--residual", "tail"], "renormalised over the k"),
            (ax, ["--residual", "ground_truth"], "renormalised over the k")):
        p = softlabels("train", *base, "--data", data, "--output", tmp_path / "x", *flags,
                       check=False)
        last = p.stderr.strip().splitlines()[-1]
        assert p.returncode == 2 and needle in last and str(data) in last, p.stderr[-1500:]
        assert "imported from" in last
    # a student with its own tokenizer: the cross-tokenizer losses need the label log-probs
    from softlabels.demo import make_tokenizer
    from tests.helpers import corpus_texts

    make_tokenizer(corpus_texts(100), 300, tmp_path / "tok300")
    cfg = json.loads((FIX / "student" / "config.json").read_text())
    (tmp_path / "fresh.json").write_text(json.dumps({**cfg, "vocab_size": 300}))
    p = softlabels("train", "--student", tmp_path / "fresh.json", "--student-tokenizer",
                   tmp_path / "tok300", "--data", dk, "--output", tmp_path / "y",
                   "--max-steps", "1", check=False)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and "has no label log-probs" in last and str(dk) in last, p.stderr


def _mutate(rows: list[dict], kind: str, rng) -> None:
    """One seeded change to one row: a value changed, a position dropped from one column, or a
    value out of range (each kept representable in the column's type)."""
    r = rows[int(rng.integers(len(rows)))]
    col = str(rng.choice(["compressed_logprobs", "bytepacked_indices", "input_ids"]
                         if kind == "distillkit" else
                         ["target_token_ids", "target_logprobs", "target_mask", "input_ids"]))
    t = int(rng.integers(len(r[col])))
    what = int(rng.integers(3))
    byte = col in ("compressed_logprobs", "bytepacked_indices")
    if what == 0 and isinstance(r[col][t], list) and r[col][t]:
        j = int(rng.integers(len(r[col][t])))
        v = r[col][t][j]
        r[col][t][j] = (int(rng.integers(256)) if byte else int(rng.integers(2))
                        if col == "target_mask" else float(v + rng.normal(0, 3))
                        if isinstance(v, float) else int(rng.integers(10**6)))
    elif what == 1:
        del r[col][t]
    else:
        big = 255 if byte else 3.0 if col == "target_logprobs" else 10**6
        r[col][t] = [big] * len(r[col][t]) if isinstance(r[col][t], list) else big


@pytest.mark.parametrize("seed", range(3))
def test_mutated_sources_import_intact_or_are_refused_in_one_line(tmp_path, seed):
    """Seeded mutations of DistillKit and axolotl sources (bytes of the packed columns, list
    lengths, masks, values): each import either gives a dataset `verify` passes, or stops with
    one line (a UserError without a newline) before a manifest is written."""
    from softlabels.data.convert import _import_piece as import_piece
    from softlabels.data.convert import plan_import, publish_import, tasks
    from softlabels.data.errors import UserError
    from softlabels.data.verify import verify

    rng = np.random.default_rng(seed)
    outcomes = {"ok": 0, "refused": 0}
    for i in range(12):
        kind = ["distillkit", "axolotl"][i % 2]
        src = _copy(FIX / ("distillkit-raw" if kind == "distillkit" else "axolotl"),
                    tmp_path / f"src{i}")
        _rewrite(src, lambda rows, kind=kind: _mutate(rows, kind, rng))
        out = tmp_path / f"out{i}"
        try:
            job = plan_import(str(src), str(out), kind, str(FIX / "tokenizer"))
            for task in tasks(job, str(out)):
                import_piece(task)
            publish_import(job, str(out))
        except UserError as e:
            assert "\n" not in str(e) and str(e), str(e)
            assert not (out / "manifest.json").exists()
            outcomes["refused"] += 1
            continue
        assert verify(out) == [], (seed, i)
        outcomes["ok"] += 1
    assert outcomes["refused"] > 0, outcomes  # (the mutations are not all harmless)
