"""The soft-label format on its own: round trip, pinned values, atomicity, reader, verify, HF."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from softlabels.data.card import publish
from softlabels.data.checks import bad_rows, check_rows
from softlabels.data.format import (
    DEFAULT_LOGPROB_STEP,
    FLAGS,
    FORMAT_VERSION,
    LABEL_STEP,
    TAIL_STEP,
    Encoding,
    FormatError,
    Row,
    decode,
    decode_tail,
    dequantise,
    encode,
    encode_tail,
    quantise,
)
from softlabels.data.manifest import Manifest
from softlabels.data.reader import SoftLabelReader
from softlabels.data.shard import write_shard
from softlabels.data.verify import verify
from tests.helpers import REPO, assert_same_targets, corpus_texts, reference_rows

K = 8
ENC = Encoding(K, DEFAULT_LOGPROB_STEP)


@pytest.fixture(scope="module")
def real_rows(tiny_teacher):
    """Rows whose targets are those of a real forward pass of the tiny teacher (top-k, exact tail,
    label log-probs)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    token_lists = [tok(t).input_ids[: 40 + 17 * i] for i, t in enumerate(corpus_texts(6))]
    token_lists.append(token_lists[0][:1])  # a one-token row
    masks = [np.arange(len(ids)) >= (5 if i == 2 else 0)  # row 2: a context-only prefix
             for i, ids in enumerate(token_lists)]
    return reference_rows(tiny_teacher, token_lists, K, masks), len(tok)


def make_dataset(path, rows, vocab, shards=2, draws=0, **kw):
    enc = Encoding(K, DEFAULT_LOGPROB_STEP, draws)
    infos = [
        write_shard(path / f"shard-{s:05d}.parquet", rows[s::shards], enc, **kw)
        for s in range(shards)
    ]
    m = Manifest(k=K, logprob_step=DEFAULT_LOGPROB_STEP, vocab_size=vocab, shards=infos,
                 draws=draws)
    publish(path, m)
    return m


def test_pinned_encoding_of_one_position():
    # ids 7, 3, 12 with logprobs -0.1, -1.0, -0.0 (not in rank order, to show re-sorting):
    # stored by ascending id 3, 7, 12 -> gaps 3, 4, 5; q = round(-lp * 16) -> 16, 2, 0.
    # Tails: log 0.01 -> round(4.605 * 32) = 147; 0.9 (>= 1/2: the top-k's 0.1 is coded) ->
    # 2**15 + round(2.303 * 32) = 32842. Labels at 1/16: -0.5 -> 8; none at the last position.
    row = Row("0:0", np.array([5, 3], np.int32), np.array([[7, 3, 12], [1, 2, 4]], np.int32),
              np.array([[-0.1, -1.0, -0.0], [-3.0, -3.1, -3.2]], np.float32),
              np.array([True, True]), tail_logprob=np.log([0.01, 0.9]).astype(np.float32),
              label_logprob=np.array([-0.5, np.nan], np.float32))
    b = encode([row], Encoding(3, 1 / 16))
    assert b.column("topk_id_gaps").to_pylist() == [[[3, 4, 5], [1, 1, 2]]]
    assert b.column("topk_logprobs_q").to_pylist() == [[[16, 2, 0], [48, 50, 51]]]
    assert b.column("tail_mass_q").to_pylist() == [[147, 32842]]
    assert b.column("label_logprob_q").to_pylist() == [[8, 0]]
    (got,) = decode(b, Encoding(3, 1 / 16))
    np.testing.assert_array_equal(got.topk_ids[0], [12, 7, 3])  # rank order again
    np.testing.assert_allclose(got.topk_logprobs[0], [0.0, -0.125, -1.0])
    np.testing.assert_allclose(np.exp(got.tail_logprob), [np.exp(-147 / 32),
                                                          1 - np.exp(-74 / 32)], rtol=1e-6)
    np.testing.assert_allclose(got.label_logprob, [-0.5, np.nan])
    # -inf and NaN clip to the floor instead of wrapping around
    q = quantise(np.array([[-1.0, -np.inf, np.nan]]), 1 / 16)
    np.testing.assert_allclose(dequantise(q, 1 / 16), [[-1.0, -1000.0, -1000.0]])


def test_duplicate_ids_are_refused():
    row = Row("4:1", np.array([5], np.int32), np.array([[7, 7]], np.int32),
              np.array([[-0.1, -1.0]], np.float32), np.array([True]),
              tail_logprob=np.array([-3.0], np.float32), label_logprob=np.array([np.nan]))
    with pytest.raises(FormatError, match="row 4:1: .*same token id twice"):
        encode([row], Encoding(2, DEFAULT_LOGPROB_STEP))


@pytest.mark.parametrize("row_group_tokens", [1, 50, 100000])
def test_round_trip(tmp_path, real_rows, row_group_tokens):
    rows, vocab = real_rows
    make_dataset(tmp_path, rows, vocab, row_group_tokens=row_group_tokens)
    got = sorted(SoftLabelReader(tmp_path), key=lambda r: r.record)
    assert [r.row_id for r in got] == [r.row_id for r in rows]
    for a, b in zip(rows, got):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.target_mask, b.target_mask)
        m = a.target_mask
        assert_same_targets(a.topk_ids[m], a.topk_logprobs[m], b.topk_ids[m],
                            b.topk_logprobs[m], DEFAULT_LOGPROB_STEP / 2 + 1e-6)
        assert (b.topk_logprobs[~m] == 0).all() and (b.topk_ids[~m] == 0).all()
    assert verify(tmp_path) == []


def test_read_shard_gives_back_what_write_shard_wrote(tmp_path, real_rows):
    """The symmetric pair: rows and their encoding in, the same rows and encoding out (values
    within half a quantisation step), and a value check against a vocabulary on request."""
    from softlabels.data.checks import BadRows
    from softlabels.data.shard import read_shard

    rows, vocab = real_rows
    path = tmp_path / "shard-00000.parquet"
    write_shard(path, rows, ENC, row_group_tokens=50)
    got, enc = read_shard(path, vocab_size=vocab)
    assert enc == ENC
    assert [r.row_id for r in got] == [r.row_id for r in rows]
    for a, b in zip(rows, got):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        m = a.target_mask
        assert_same_targets(a.topk_ids[m], a.topk_logprobs[m], b.topk_ids[m],
                            b.topk_logprobs[m], DEFAULT_LOGPROB_STEP / 2 + 1e-6)
    with pytest.raises(BadRows, match="outside"):
        read_shard(path, vocab_size=int(max(r.input_ids.max() for r in rows)))


def test_encode_sorts_positions_by_probability(real_rows):
    rows, _ = real_rows
    r = rows[0]
    perm = np.random.default_rng(0).permutation(K)
    shuffled = replace(r, topk_ids=r.topk_ids[:, perm], topk_logprobs=r.topk_logprobs[:, perm])

    a = decode(encode([r], ENC), ENC)[0]
    b = decode(encode([shuffled], ENC), ENC)[0]
    np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
    np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)


def test_parquet_encodings_and_metadata(tmp_path, real_rows):
    rows, vocab = real_rows
    make_dataset(tmp_path, rows, vocab, shards=1)
    md = pq.read_metadata(tmp_path / "shard-00000.parquet")
    cols = {md.row_group(0).column(i).path_in_schema: md.row_group(0).column(i)
            for i in range(md.num_columns)}
    for leaf in ["topk_id_gaps.list.element.list.element",
                 "topk_logprobs_q.list.element.list.element"]:
        assert "BYTE_STREAM_SPLIT" in cols[leaf].encodings
        assert cols[leaf].compression == "ZSTD"
    meta = pq.read_schema(tmp_path / "shard-00000.parquet").metadata
    assert meta[b"softlabels.format_version"] == str(FORMAT_VERSION).encode()
    assert b"cumsum" in meta[b"softlabels.decoding"]


def test_reader_shuffle_parts_and_start(tmp_path, real_rows):
    rows, vocab = real_rows
    make_dataset(tmp_path, rows, vocab, shards=3, row_group_tokens=60)
    ids = [r.row_id for r in SoftLabelReader(tmp_path)]
    assert sorted(ids) == sorted(r.row_id for r in rows) and len(set(ids)) == len(rows)
    assert ids == [r.row_id for r in SoftLabelReader(tmp_path)]  # deterministic
    s1 = [r.row_id for r in SoftLabelReader(tmp_path, shuffle=True, seed=1)]
    s2 = [r.row_id for r in SoftLabelReader(tmp_path, shuffle=True, seed=1)]
    s3 = [r.row_id for r in SoftLabelReader(tmp_path, shuffle=True, seed=2)]
    assert s1 == s2 and sorted(s1) == sorted(ids) and s1 != s3
    for n in (2, 3):
        readers = [SoftLabelReader(tmp_path, shuffle=True, seed=1, part=p, num_parts=n)
                   for p in range(n)]
        parts = [list(r.rows()) for r in readers]
        assert [len(p) for p in parts] == [len(r) for r in readers]
        merged = sorted((gi, r.row_id) for p in parts for gi, r in p)
        assert [rid for _, rid in merged] == s1  # together: the global order, each row once
    tail = [r.row_id for _, r in SoftLabelReader(tmp_path, shuffle=True, seed=1).rows(start=4)]
    assert tail == s1[4:]


def test_failed_write_leaves_nothing(tmp_path, real_rows):
    rows, _ = real_rows
    bad = replace(rows[0], row_id="9:0", topk_ids=rows[0].topk_ids[:, :3],
                  topk_logprobs=rows[0].topk_logprobs[:, :3])
    with pytest.raises(FormatError, match="row 9:0"):
        write_shard(tmp_path / "shard-00000.parquet", [rows[1], bad], ENC,
                    row_group_tokens=1)
    assert os.listdir(tmp_path) == []


def test_killed_writer_leaves_no_partial_shard(tmp_path):
    """SIGKILL a process while it writes a large shard: no shard, or a complete one."""
    code = f"""
import numpy as np, sys
sys.path.insert(0, {str(REPO)!r})
from softlabels.data.format import Encoding, Row
from softlabels.data.shard import write_shard
rng = np.random.default_rng(0)
rows = [Row(f"{{i}}:0", rng.integers(0, 30000, 2048, dtype=np.int32),
            (np.arange(64) * 400 + rng.integers(0, 400, (2048, 1))).astype(np.int32),
            -np.sort(rng.exponential(3, (2048, 64)), -1).astype(np.float32) - 0.1,
            np.ones(2048, bool), tail_logprob=np.full(2048, -5, np.float32),
            label_logprob=np.full(2048, -1, np.float32)) for i in range(60)]
print("ready", flush=True)
write_shard({str(tmp_path / "shard-00000.parquet")!r}, rows, Encoding(64, 1 / 16),
            row_group_tokens=2048)
"""
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    p.send_signal(signal.SIGKILL)
    p.wait()
    visible = [f for f in os.listdir(tmp_path) if not f.startswith(".")]
    assert visible == [] or pq.read_metadata(tmp_path / "shard-00000.parquet").num_rows == 60


def _flip_bytes(path, at):
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(16)
        f.seek(at)
        f.write(bytes(x ^ 0xFF for x in b))


def test_verify_catches_each_kind_of_damage(tmp_path, real_rows):
    rows, vocab = real_rows
    m = make_dataset(tmp_path, rows, vocab, shards=4)
    assert verify(tmp_path) == []
    # truncated shard, flipped bytes, missing shard
    s0, s1, s2 = (tmp_path / m.shards[i].file for i in range(3))
    s0.write_bytes(s0.read_bytes()[: s0.stat().st_size // 2])
    _flip_bytes(s1, s1.stat().st_size // 3)
    s2.unlink()
    problems = verify(tmp_path)
    for s in (s0, s1, s2):
        assert any(p.startswith(s.name) for p in problems), (s.name, problems)
    assert not any(p.startswith(m.shards[3].file) for p in problems)


def test_verify_catches_bad_values_and_counts(tmp_path, real_rows):
    rows, vocab = real_rows
    r = rows[0]
    too_much = replace(r, row_id="0:0", topk_logprobs=np.zeros_like(r.topk_logprobs))
    out_of_vocab = replace(r, row_id="1:0", topk_ids=r.topk_ids + vocab)
    info = write_shard(tmp_path / "shard-00000.parquet", [too_much, out_of_vocab, rows[1]], ENC)
    info.rows += 1  # the manifest lies about the count
    publish(tmp_path, Manifest(k=K, logprob_step=DEFAULT_LOGPROB_STEP, vocab_size=vocab,
                               shards=[info]))
    problems = "\n".join(verify(tmp_path))
    assert "row 0:0: probabilities sum to more than 1" in problems
    assert "row 1:0: target id outside" in problems
    assert "manifest says 4/" in problems


def test_other_format_version_is_refused(tmp_path, real_rows):
    rows, vocab = real_rows
    make_dataset(tmp_path, rows, vocab)
    d = json.loads((tmp_path / "manifest.json").read_text())
    d["format_version"] = FORMAT_VERSION + 1
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(FormatError, match="format version"):
        SoftLabelReader(tmp_path)
    assert "format version" in verify(tmp_path)[0]
    p = subprocess.run([sys.executable, "-m", "softlabels", "verify", str(tmp_path)],
                       capture_output=True, text=True, cwd=REPO)
    assert p.returncode != 0 and "format version" in p.stdout + p.stderr
    assert "Traceback" not in p.stderr


def test_datasets_load_dataset_reads_the_folder(tmp_path, real_rows):
    import datasets

    rows, vocab = real_rows
    m = make_dataset(tmp_path, rows, vocab)
    (tmp_path / ".shard-99999.parquet.x.tmp").write_bytes(b"junk from a crashed writer")
    ds = datasets.load_dataset(str(tmp_path), split="train", cache_dir=str(tmp_path / ".hf"))
    assert ds.num_rows == m.rows
    by_id = {r.row_id: r for r in rows}
    for ex in ds:
        r = by_id[ex["row_id"]]
        assert ex["input_ids"] == r.input_ids.tolist()
        # decoded by hand from the documented rule, without this package
        ids = np.cumsum(np.array(ex["topk_id_gaps"]), -1)
        lp = -DEFAULT_LOGPROB_STEP * np.array(ex["topk_logprobs_q"], np.float64)
        mk = r.target_mask
        for t in np.flatnonzero(mk):
            want = dict(zip(r.topk_ids[t].tolist(), r.topk_logprobs[t].tolist()))
            got = dict(zip(ids[t].tolist(), lp[t].tolist()))
            assert want.keys() == got.keys()
            assert max(abs(want[i] - got[i]) for i in want) <= DEFAULT_LOGPROB_STEP / 2 + 1e-6
        q = np.array(ex["tail_mass_q"], np.int64)  # the tail by the card's rule
        tail = np.where(q < 32768, np.exp(-TAIL_STEP * q),
                        -np.expm1(-TAIL_STEP * np.maximum(q - 32768, 0)))
        np.testing.assert_allclose(tail[mk], np.exp(r.tail_logprob[mk].astype(np.float64)),
                                   rtol=np.expm1(TAIL_STEP / 2) + 1e-6)
        label = -LABEL_STEP * np.array(ex["label_logprob_q"], np.float64)
        has = mk & (np.arange(len(mk)) < len(mk) - 1)
        np.testing.assert_allclose(label[has], r.label_logprob[has], atol=LABEL_STEP / 2 + 1e-6)


def test_inspect_json(tmp_path, real_rows):
    rows, vocab = real_rows
    make_dataset(tmp_path, rows, vocab, shards=1)
    p = subprocess.run([sys.executable, "-m", "softlabels", "inspect", str(tmp_path),
                        "--row", "2", "--json"], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    r = rows[2]
    assert got["row_id"] == r.row_id and got["input_ids"] == r.input_ids.tolist()
    assert got["mask"] == r.target_mask.tolist()
    assert got["targets"][0] is None  # masked prefix
    t = 7
    pairs = np.array(got["targets"][t])
    assert_same_targets(r.topk_ids[t:t + 1], r.topk_logprobs[t:t + 1], pairs[None, :, 0],
                        pairs[None, :, 1], DEFAULT_LOGPROB_STEP / 2 + 1e-6)
    # version 4: the exact tail and the label's log-prob per position, null where none
    assert got["tail_mass"][:5] == [None] * 5 and got["label_logprob"][:5] == [None] * 5
    assert got["label_logprob"][-1] is None  # no next token in the row
    tail = np.array(got["tail_mass"][5:])
    np.testing.assert_allclose(tail, np.exp(r.tail_logprob[5:].astype(np.float64)),
                               rtol=np.expm1(TAIL_STEP / 2) + 1e-6)
    np.testing.assert_allclose(got["label_logprob"][5:-1], r.label_logprob[5:-1],
                               atol=LABEL_STEP / 2 + 1e-6)
    p = subprocess.run([sys.executable, "-m", "softlabels", "inspect", str(tmp_path),
                        "--row", "99"], capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 2 and "out of range" in p.stderr and "Traceback" not in p.stderr


def _tamper_first_id(shard, vocab):
    """Rewrite the shard with row 0's first target id pushed out of the vocabulary, re-hashed:
    what a dataset's publisher can do, since they also write manifest.json."""
    import pyarrow as pa

    t = pq.read_table(shard)
    gaps = t.column("topk_id_gaps").combine_chunks()
    flat = gaps.values.values.to_numpy().copy()
    flat[0] += vocab
    inner = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.int32()), K)
    t = t.set_column(t.schema.get_field_index("topk_id_gaps"), t.schema.field("topk_id_gaps"),
                     pa.ListArray.from_arrays(gaps.offsets, inner))
    pq.write_table(t, shard)
    from softlabels.data.dataset import hashes

    return hashes(shard)


def test_reader_refuses_what_verify_rejects(tmp_path, real_rows):
    rows, vocab = real_rows
    m = make_dataset(tmp_path, rows, vocab, shards=2)
    vars(m.shards[0]).update(_tamper_first_id(tmp_path / m.shards[0].file, vocab))
    publish(tmp_path, m)
    assert any("target id outside" in p for p in verify(tmp_path))
    with pytest.raises(FormatError, match=rf"{m.shards[0].file} row 0:0: target id outside"):
        list(SoftLabelReader(tmp_path))
    # a shard changed after publishing (manifest not rewritten) is refused by its hash
    m2 = make_dataset(tmp_path / "b", rows, vocab, shards=2)
    _flip_bytes(tmp_path / "b" / m2.shards[1].file, 200)
    with pytest.raises(FormatError, match="sha256 differs"):
        list(SoftLabelReader(tmp_path / "b"))


@pytest.mark.parametrize("name", ["../outside.parquet", "ABSOLUTE", "sub/x.parquet", "..", ""])
def test_shard_names_stay_inside_their_dataset(tmp_path, real_rows, name):
    """A manifest that names a file outside its folder (with a matching hash, as a publisher
    can) is refused by verify and by every reader, before anything is opened."""
    import shutil

    rows, vocab = real_rows
    d = tmp_path / "ds"
    m = make_dataset(d, rows, vocab, shards=1)
    name = str(tmp_path / "abs.parquet") if name == "ABSOLUTE" else name
    outside = (d / name) if name not in ("", "..") else d
    if name.endswith(".parquet"):
        outside.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(d / m.shards[0].file, outside)
    raw = json.loads((d / "manifest.json").read_text())
    raw["shards"][0]["file"] = name
    (d / "manifest.json").write_text(json.dumps(raw))
    problems = verify(d)
    assert len(problems) == 1 and "not a file of the dataset's own folder" in problems[0]
    with pytest.raises(FormatError, match="dataset's own folder"):
        SoftLabelReader(d)


def test_bad_rows_flags_each_rule(real_rows):
    rows, vocab = real_rows
    r = rows[1]
    enc = Encoding(K, DEFAULT_LOGPROB_STEP)
    dup = r.topk_ids.copy()
    dup[3, 1] = dup[3, 0]
    cases = {
        "ok": replace(r, row_id="0:0"),
        "mass": replace(r, row_id="1:0", topk_logprobs=np.full_like(r.topk_logprobs, -0.5)),
        "input": replace(r, row_id="2:0",
                         input_ids=np.where(np.arange(len(r.input_ids)) == 4, vocab, r.input_ids)),
        # version 4: the tail must complete the top-k to 1, the label agree with both
        "tail": replace(r, row_id="4:0", tail_logprob=np.where(np.arange(len(r.input_ids)) == 6,
                                                               np.log(0.9), r.tail_logprob)),
        # the next token is the top-1, whose stored log-prob the label's must equal
        "label": replace(r, row_id="5:0", input_ids=np.where(
            np.arange(len(r.input_ids)) == 7, r.topk_ids[6, 0], r.input_ids),
            label_logprob=np.where(np.arange(len(r.input_ids)) == 6, r.topk_logprobs[6, 0] - 0.5,
                                   r.label_logprob)),
    }
    # a written response's writer log-probs: finite and <= 0 where a written token follows
    T = len(r.input_ids)
    for i, bad in enumerate([0.5, np.inf]):
        cases[f"writer {bad}"] = replace(r, row_id=f"{6 + i}:0", writer_logprob=np.where(
            np.arange(T) == 2, bad, -1.0).astype(np.float32))
    cases["writer ok"] = replace(r, row_id="8:0", writer_logprob=np.full(T, -1.0, np.float32))
    cases["ok"].writer_logprob = np.full(T, np.nan, np.float32)  # decoded NaN: stored 0
    batch = encode(list(cases.values()), enc)
    got = dict(bad_rows(batch, enc, vocab))
    assert set(got) == {"1:0", "2:0", "4:0", "5:0", "6:0", "7:0"}
    assert "writer log-prob not a finite number" in got["6:0"] == got["7:0"]
    assert "sum to more than 1" in got["1:0"] and "input id outside" in got["2:0"]
    assert "do not sum to 1" in got["4:0"] and "label's log-prob disagrees" in got["5:0"]
    with pytest.raises(FormatError, match="same token id twice"):  # encode refuses duplicates
        encode([replace(r, row_id="3:0", topk_ids=dup)], enc)
    # the same rows checked one by one agree with the batch
    for rid, row in cases.items():
        one = dict(bad_rows(encode([row], enc), enc, vocab))
        assert bool(one) == (row.row_id in got), rid
    # the writer refuses what encode would hide: NaN is stored as 0, -inf as float32's minimum
    t = int(np.flatnonzero(r.target_mask[:-1])[0])
    for bad in [np.nan, -np.inf, np.inf, 0.5]:
        w = np.where(np.arange(T) == t, bad, -1.0).astype(np.float32)
        with pytest.raises(FormatError, match="writer_logprob not a finite number"):
            check_rows([replace(r, writer_logprob=w)], enc)
    # ... but not where no written token follows (the last position, masked-out ones)
    w = np.where(~r.target_mask.astype(bool) | (np.arange(T) == T - 1), np.nan, -1.0)
    check_rows([replace(r, writer_logprob=w.astype(np.float32))], enc)


def test_footer_counts_that_lie_are_caught(tmp_path, real_rows):
    """The per-row counts plan batches and weigh the loss: a footer whose target count differs
    from the row's mask, republished (index and manifest made from it, hashes matching), fails
    verify and the reader."""
    import base64

    from softlabels.data.dataset import hashes

    rows, vocab = real_rows
    m = make_dataset(tmp_path, rows, vocab, shards=1)
    path = tmp_path / m.shards[0].file
    t = pq.read_table(path)
    meta = {**t.schema.metadata, **pq.ParquetFile(path).metadata.metadata}  # (counts: the file's)
    del meta[b"ARROW:schema"]
    targets = np.frombuffer(base64.b64decode(meta[b"softlabels.row_targets"]), "<u4").copy()
    targets[1] += 1
    meta[b"softlabels.row_targets"] = base64.b64encode(targets.tobytes())
    pq.write_table(t.replace_schema_metadata(meta), path)
    vars(m.shards[0]).update(hashes(path))
    publish(tmp_path, m)
    assert any("footer row counts differ" in p for p in verify(tmp_path))
    assert any("index.parquet: the rows of" in p for p in verify(tmp_path))
    with pytest.raises(FormatError, match=rf"row {rows[1].row_id}: tokens/targets"):
        list(SoftLabelReader(tmp_path))


def _with_samples(rows, draws, seed=0):
    """The rows with `draws` draws per target position from ids outside their top-k (as format 3
    stores them beside a top-k), Zipf-weighted so that some repeat."""
    from softlabels.generate.head import unique_counts

    rng = np.random.default_rng(seed)
    out = []

    def outside(top):
        ids = np.setdiff1d(np.arange(4 * K), top)
        w = 1 / np.arange(1, len(ids) + 1)
        return ids[rng.choice(len(ids), draws, p=w / w.sum())]

    for r in rows:
        drawn = np.stack([outside(top) for top in r.topk_ids])
        ids, counts = unique_counts(drawn)
        counts[~r.target_mask] = 0
        out.append(replace(r, sample_ids=ids, sample_counts=counts))
    return out


@pytest.mark.parametrize("k", [0, K])
def test_samples_round_trip_verify_inspect_and_load_dataset(tmp_path, real_rows, k):
    """Draws (alone, k = 0, or with the top-k) come back exactly through the reader, pass verify,
    show in `inspect --json` as [[id, count], ...], and decode by the documented rule from
    `datasets.load_dataset` without this package."""
    import datasets

    rows, vocab = real_rows
    rows = _with_samples(rows, 20)
    enc = Encoding(k, DEFAULT_LOGPROB_STEP, 20)
    info = write_shard(tmp_path / "shard-00000.parquet", rows, enc, row_group_tokens=100)
    publish(tmp_path, Manifest(k=k, logprob_step=DEFAULT_LOGPROB_STEP, vocab_size=vocab,
                               draws=20, shards=[info]))
    assert verify(tmp_path) == []
    described = Manifest.load(tmp_path).targets
    assert "samples" in described and ("missing_mass" in described) == (k > 0)
    assert Manifest.load(tmp_path).tail_draws == (k > 0)

    def pairs(ids, counts):
        return sorted((int(i), int(c)) for i, c in zip(ids, counts) if c)

    back = {r.row_id: r for r in SoftLabelReader(tmp_path)}
    for r in rows:
        b = back[r.row_id]
        for t in range(len(r.input_ids)):
            assert pairs(b.sample_ids[t], b.sample_counts[t]) == pairs(r.sample_ids[t],
                                                                         r.sample_counts[t])
        assert b.topk_ids.shape == (len(r.input_ids), k)
    p = subprocess.run([sys.executable, "-m", "softlabels", "inspect", str(tmp_path),
                        "--row", "2", "--json"], capture_output=True, text=True, cwd=REPO)
    got = json.loads(p.stdout)
    r = next(x for x in rows if x.row_id == got["row_id"])
    assert got["draws"] == 20
    assert [s and sorted(map(tuple, s)) for s in got["sampled"]] == \
        [pairs(i, c) if m else None for i, c, m in zip(r.sample_ids, r.sample_counts,
                                                        r.target_mask)]
    ds = datasets.load_dataset(str(tmp_path), split="train", cache_dir=str(tmp_path / ".hf"))
    for ex in ds:
        r = next(x for x in rows if x.row_id == ex["row_id"])
        for t, (g, c) in enumerate(zip(ex["sample_id_gaps"], ex["sample_counts"])):
            assert pairs(np.cumsum(g), c) == (pairs(r.sample_ids[t], r.sample_counts[t])
                                              if r.target_mask[t] else [])


def test_bad_samples_are_flagged(real_rows):
    rows, vocab = real_rows
    good = _with_samples(rows[:1], 20)[0]
    enc = Encoding(K, DEFAULT_LOGPROB_STEP, draws=20)
    assert bad_rows(encode([good], enc), enc, vocab) == []
    short = replace(good, row_id="1:0", sample_counts=good.sample_counts.copy())
    short.sample_counts[0, np.flatnonzero(short.sample_counts[0])[0]] -= 1
    with pytest.raises(FormatError, match="sum to 20"):
        check_rows([short], enc)  # the writer refuses it ...
    batch = encode([good], enc)
    assert "sum to 21" in bad_rows(batch, Encoding(K, DEFAULT_LOGPROB_STEP, draws=21), vocab)[0][1]
    top = int(good.sample_ids[good.sample_counts > 0].max())
    alone_enc = Encoding(0, DEFAULT_LOGPROB_STEP, 20)
    alone = replace(good, row_id="2:0", input_ids=np.zeros_like(good.input_ids),
                    topk_ids=np.zeros((len(good.input_ids), 0)),
                    topk_logprobs=np.zeros((len(good.input_ids), 0)),
                    label_logprob=np.where(np.isnan(good.label_logprob), np.nan, -1.0))
    assert bad_rows(encode([alone], alone_enc), alone_enc, top) \
        == [("2:0", f"sampled id outside [0, {top})")]
    # beside a top-k (format 3) a draw of a top-k id is refused; format 2 drew from everything
    inside = replace(good, row_id="3:0", sample_ids=good.sample_ids.copy(),
                     sample_counts=good.sample_counts.copy())
    t = int(np.flatnonzero(good.target_mask)[0])
    n = int((good.sample_counts[t] > 0).sum())  # unique_counts puts the padding last
    ids = good.sample_ids[t, :n].copy()
    ids[0] = good.topk_ids[t, 0]
    order = np.argsort(ids)
    inside.sample_ids[t, :n], inside.sample_counts[t, :n] = ids[order], \
        good.sample_counts[t, :n][order]
    with pytest.raises(FormatError, match="in the top-k"):
        check_rows([inside], enc)
    # ... and the reader too: good's top-k columns beside inside's sample columns
    no_k = np.zeros((len(good.input_ids), 0))
    top_k, samples = encode([good], enc), encode([replace(
        inside, topk_ids=no_k, topk_logprobs=no_k)], alone_enc)
    spliced = pa.RecordBatch.from_arrays(
        [samples.column(c) if c.startswith("sample") else top_k.column(c)
         for c in top_k.schema.names], schema=top_k.schema)
    assert bad_rows(spliced, enc, vocab) == [
        (good.row_id, "a draw is in the top-k (with a top-k, draws come from outside it)")]
    assert bad_rows(spliced, Encoding(K, DEFAULT_LOGPROB_STEP, draws=20, version=2), vocab) == []


def as_version(path: Path, version: int) -> None:
    """Rewrite a dataset written by this package as an older format version: without version
    5's flags, without version 4's columns and steps, without version 2's draws keys for
    version 1."""
    from softlabels.data.dataset import hashes

    d = json.loads((path / "manifest.json").read_text())
    flags = [f"softlabels.{f}".encode() for f in FLAGS]
    for shard in d["shards"]:
        f = path / shard["file"]
        t = pq.read_table(f)
        if version < 4:
            t = t.drop_columns(["tail_mass_q", "label_logprob_q"])
        meta = {k: v for k, v in t.schema.metadata.items() if k not in flags and (
            version >= 4 or not k.endswith(b"_step") or k == b"softlabels.logprob_step")}
        if version == 1:
            meta = {k: v for k, v in meta.items() if b"draws" not in k and b"sample" not in k}
        meta[b"softlabels.format_version"] = str(version).encode()
        pq.write_table(pa.Table.from_batches(t.to_batches(), t.schema.with_metadata(meta)), f)
        shard.update(hashes(f))
    d["format_version"] = version
    for key in (FLAGS + ("tail_step", "label_step") * (version < 4)
                + ("draws", "sample_temperature") * (version == 1)):
        d.pop(key)
    (path / "manifest.json").write_text(json.dumps(d))


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_older_versions_are_still_read(tmp_path, real_rows, version):
    """Version 1: top-k only, no draws keys. Version 2: draws beside a top-k came from the whole
    distribution (version 3's from outside the top-k), which the manifest tells the trainer.
    Versions 1-3 have no exact tail or label log-prob: the rows say so (None). Version 4 has
    both, with no flags saying so (version 5 states them)."""
    rows, vocab = real_rows
    draws = 20 if version > 1 else 0
    if draws:
        rows = _with_samples(rows, draws)
    make_dataset(tmp_path, rows, vocab, shards=1, draws=draws)
    as_version(tmp_path, version)
    assert verify(tmp_path) == []
    back = {r.row_id: r for r in SoftLabelReader(tmp_path)}
    assert back.keys() == {r.row_id for r in rows}
    assert all((back[r.row_id].sample_ids is None) == (version == 1) for r in rows)
    assert all((r.tail_logprob is None and r.label_logprob is None) == (version < 4)
               for r in back.values())
    m = Manifest.load(tmp_path)
    assert m.tail_draws == (version >= 3) and m.exact == (version == 4)  # (train allows
    # --targets samples on 2)
    assert (m.exact_tail, m.label_logprobs, m.topk_renormalised) == (version == 4,) * 2 + (False,)


def test_tail_code_is_exact_from_one_hot_to_flat():
    """The smaller of tail and 1 - tail is log-coded: both keep a relative error of at most
    exp(step / 2) - 1, from a one-hot position (tail 1e-30) to a flat one (top-k mass 1e-30),
    where 1 - sum(rounded top-k) loses one or the other."""
    tail = np.array([0.0, 1e-30, 1e-9, 1e-4, 0.01, 0.3, 0.4999, 0.5, 0.7, 0.99, 1 - 1e-6,
                     1.0])
    with np.errstate(divide="ignore"):
        back = np.exp(decode_tail(encode_tail(np.log(tail), TAIL_STEP), TAIL_STEP)
                      .astype(np.float64))
    bound = np.expm1(TAIL_STEP / 2) + 1e-6
    assert back[0] == 0.0  # no mass outside: the largest code, decoded as 0
    np.testing.assert_array_less(np.abs(back[1:7] / tail[1:7] - 1), bound)
    top = 1 - tail  # the top-k's own mass where the tail is large
    np.testing.assert_array_less(np.abs((1 - back[7:11]) / top[7:11] - 1), bound)
    assert back[-1] == 1.0  # (a top-k holds at least k / vocab of the mass: never 1)
