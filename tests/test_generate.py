"""Teacher side end to end: real vLLM inside real Dask worker processes, real Parquet."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from softlabels.data.format import DEFAULT_LOGPROB_STEP, LABEL_STEP, TAIL_STEP
from softlabels.data.manifest import Manifest
from softlabels.data.verify import verify
from softlabels.generate.plan import Plan
from tests.helpers import (
    REPO,
    assert_same_targets,
    corpus_texts,
    dask_env,
    read_dataset,
    reference_targets,
    reference_topk,
    softlabels,
)

K = 8
MAXLEN = 96
SIZES = ["--unit-tokens", 700, "--shard-tokens", 1400]  # two units per published shard


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    texts = corpus_texts(10, offset=300)
    texts.insert(3, "")  # an empty record: skipped and counted, never a row
    pq.write_table(pa.table({"text": texts, "n": list(range(len(texts)))}), d / "in.parquet")
    return d / "in.parquet", texts


@pytest.fixture(scope="module")
def generated(tmp_path_factory, tiny_teacher, corpus, dask_cluster):
    out = tmp_path_factory.mktemp("gen") / "ds"
    softlabels("generate", "--teacher", tiny_teacher, "--input", corpus[0], "--output", out,
               "--top-k", K, "--max-length", MAXLEN, *SIZES, "--scheduler", dask_cluster)
    return out


def test_every_token_once_and_verified(generated, corpus, tiny_teacher):
    from transformers import AutoTokenizer

    assert verify(generated) == []
    m = Manifest.load(generated)
    assert len(m.shards) > 2 and m.provenance["empty_records_skipped"] == 1
    rows = read_dataset(generated)
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    _, texts = corpus
    for rec, text in enumerate(texts):
        wins = sorted((r for r in rows.values() if r.record == rec), key=lambda r: r.window)
        assert [r.window for r in wins] == list(range(len(wins)))
        joined = np.concatenate([r.input_ids for r in wins]).tolist() if wins else []
        assert joined == (tok(text).input_ids if text else [])
        assert all(len(r.input_ids) <= MAXLEN and r.target_mask.all() for r in wins)
    assert m.tokens == sum(len(r.input_ids) for r in rows.values())


def test_targets_match_transformers_reference(generated, tiny_teacher):
    """vLLM's stored targets vs an independent transformers fp32 forward: the same top-k ids
    wherever the reference's k-th and (k+1)-th log-probs are not a near-tie, values within the
    encoding error; the exact tail (here: flat positions, the top-k's own mass small) and the
    label's log-prob within theirs."""
    rows = sorted(read_dataset(generated).values(), key=lambda r: (r.record, r.window))[:8]
    ref = reference_topk(tiny_teacher, [r.input_ids.tolist() for r in rows], K + 1)
    tol = DEFAULT_LOGPROB_STEP / 2 + 1e-4
    checked = 0
    for r, (ref_ids, ref_lp) in zip(rows, ref):
        clear = ref_lp[:, K - 1] - ref_lp[:, K] > 1e-4  # top-k set well defined
        assert_same_targets(ref_ids[clear, :K], ref_lp[clear, :K], r.topk_ids[clear],
                            r.topk_logprobs[clear], tol)
        checked += clear.sum()
    assert checked > 0.9 * sum(len(r.input_ids) for r in rows)
    _assert_exact_columns(rows, tiny_teacher)


def _assert_exact_columns(rows, teacher) -> np.ndarray:
    """The stored tail (and the top-k's mass, 1 - tail) and label log-probs against a
    transformers forward, within their rounding; -> the reference's top-1 probabilities."""
    refs = reference_targets(teacher, [r.input_ids.tolist() for r in rows], K)
    rtol = np.expm1(TAIL_STEP / 2) + 1e-4
    top1 = []
    for r, (_, lp, tail, label) in zip(rows, refs):
        got = r.tail_logprob.astype(np.float64)
        np.testing.assert_allclose(np.exp(got), np.exp(tail.astype(np.float64)), rtol=rtol)
        np.testing.assert_allclose(-np.expm1(got), -np.expm1(tail.astype(np.float64)), rtol=rtol)
        np.testing.assert_allclose(r.label_logprob[:-1], label[:-1],
                                   atol=LABEL_STEP / 2 + 1e-4)
        assert np.isnan(r.label_logprob[-1])
        top1.append(np.exp(lp[:, 0]))
    return np.concatenate(top1)


DRAWS = 64


@pytest.fixture(scope="module")
def sharp_teacher(tmp_path_factory, tiny_teacher):
    """The tiny teacher with its head scaled x50: a peaked distribution in which many ids have
    next to no mass (log-prob below -30), so drawing one of them would show."""
    import shutil

    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("sharp")
    shutil.copytree(tiny_teacher, path, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(50)
    model.save_pretrained(path)
    return path


def _full_logprobs(model_dir, token_lists) -> list[np.ndarray]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).numpy()
                for ids in token_lists]


def test_samples_follow_the_teacher_and_not_the_units_or_batching(tmp_path, sharp_teacher,
                                                                  corpus, dask_cluster):
    """--samples N: the drawn ids agree with an independent transformers forward (counts sum to
    N, nothing the teacher gives ~0 mass, and the mean log-prob of the draws equals its expected
    value within sampling error): alone, from the whole distribution; with --top-k, from the
    distribution outside the top-k (format 3), never one of its ids. The draws do not depend on
    the unit size or on how vLLM batches the windows (byte-identical shards)."""
    def gen(out, *extra):
        softlabels("generate", "--teacher", sharp_teacher, "--input", corpus[0], "--output",
                   out, "--samples", DRAWS, "--max-length", MAXLEN, "--scheduler",
                   dask_cluster, *extra)
        assert verify(out) == []
        return read_dataset(out)

    both = gen(tmp_path / "a", "--top-k", K, *SIZES)
    other_units = gen(tmp_path / "b", "--top-k", K, "--unit-tokens", 300)
    assert both.keys() == other_units.keys()
    for rid, r in both.items():
        o = other_units[rid]
        assert np.array_equal(r.sample_ids[r.sample_counts > 0], o.sample_ids[o.sample_counts > 0])
        assert np.array_equal(r.sample_counts[r.sample_counts > 0],
                              o.sample_counts[o.sample_counts > 0])
    gen(tmp_path / "c", "--top-k", K, *SIZES, "--max-num-batched-tokens", 512)
    assert [s.sha256 for s in Manifest.load(tmp_path / "c").shards] == \
        [s.sha256 for s in Manifest.load(tmp_path / "a").shards]
    alone = gen(tmp_path / "d")  # samples only
    assert Manifest.load(tmp_path / "d").k == 0 and Manifest.load(tmp_path / "d").draws == DRAWS
    assert Manifest.load(tmp_path / "a").tail_draws and not Manifest.load(tmp_path / "d").tail_draws

    for data, outside_topk in ((alone, False), (both, True)):
        rows = sorted(data.values(), key=lambda r: (r.record, r.window))[:8]
        refs = _full_logprobs(sharp_teacher, [r.input_ids.tolist() for r in rows])
        got = want = var = 0.0
        for r, lp in zip(rows, refs):
            assert (lp.min(-1) < -30).all()  # the test can see a draw of a ~0-mass id
            counts = r.sample_counts.astype(np.float64)
            assert (counts.sum(-1) == DRAWS).all()
            drawn = np.take_along_axis(lp, r.sample_ids.astype(np.int64), -1)
            p = np.exp(lp)
            if outside_topk:  # the teacher's distribution without its top-k, renormalised
                top = np.argsort(-lp, -1)[:, :K]
                assert not ((r.sample_ids[:, :, None] == top[:, None, :]).any(-1)
                            & (counts > 0)).any()
                np.put_along_axis(p, top, 0.0, -1)
                p /= p.sum(-1, keepdims=True)
            with np.errstate(divide="ignore"):  # nothing with ~0 mass where it was drawn from
                assert (np.log(np.take_along_axis(p, r.sample_ids.astype(np.int64), -1))
                        [counts > 0] > -20).all()
            mean = (p * lp).sum(-1)  # the expected log-prob of one draw
            got += (counts / DRAWS * drawn).sum()
            want += mean.sum()
            var += (((p * lp**2).sum(-1) - mean**2) / DRAWS).sum()
        assert abs(got - want) < 4 * var**0.5, (outside_topk, got, want, var**0.5)


def test_exact_tail_and_label_at_confident_positions(tmp_path, sharp_teacher, corpus,
                                                     dask_cluster):
    """Format 4 through real vLLM at one-hot positions (top-1 above 0.999, where 1 - sum of the
    rounded top-k decodes to no tail at all): the stored tail keeps its relative precision."""
    out = tmp_path / "ds"
    softlabels("generate", "--teacher", sharp_teacher, "--input", corpus[0], "--output", out,
               "--top-k", K, "--max-length", MAXLEN, "--scheduler", dask_cluster)
    rows = sorted(read_dataset(out).values(), key=lambda r: (r.record, r.window))[:8]
    top1 = _assert_exact_columns(rows, sharp_teacher)
    assert (top1 > 0.99).mean() > 0.05 and (top1 > 0.999).sum() >= 5, np.quantile(top1, [.5, .9])
    decoded = np.concatenate([np.exp(r.topk_logprobs.astype(np.float64)).sum(-1) for r in rows])
    assert (decoded[top1 > 0.999] >= 1).mean() > 0.5  # what 1 - sum would have left: nothing


def test_embedded_cluster_gives_the_same_dataset(tmp_path, tiny_teacher, corpus, generated):
    """The default path: an embedded LocalCluster with its own engine, no --scheduler."""
    out = tmp_path / "ds"
    p = softlabels("generate", "--teacher", tiny_teacher, "--input", corpus[0], "--output", out,
                   "--top-k", K, "--max-length", MAXLEN, *SIZES)
    assert "Dask dashboard: http://127.0.0.1:" in p.stderr
    a, b = Manifest.load(out), Manifest.load(generated)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]


def test_shards_are_their_units_concatenated(tmp_path, tiny_teacher, corpus, generated,
                                             dask_cluster):
    """--shard-tokens packs consecutive units into one published file: the same rows, values and
    order as one file per unit, fewer files, units gone from the state folder, and
    datasets.load_dataset reads it."""
    import datasets

    one = tmp_path / "one"
    softlabels("generate", "--teacher", tiny_teacher, "--input", corpus[0], "--output", one,
               "--top-k", K, "--max-length", MAXLEN, "--unit-tokens", 700, "--shard-tokens", 1,
               "--scheduler", dask_cluster)
    plan, m = Plan.load(generated), Manifest.load(generated)
    assert len(Manifest.load(one).shards) == len(plan.units) > 2
    assert len(m.shards) == (len(plan.units) + 1) // 2
    a, b = read_dataset(generated), read_dataset(one)
    assert list(a) == list(b)  # same rows in the same order
    for rid in a:
        assert np.array_equal(a[rid].topk_ids, b[rid].topk_ids)
        assert np.array_equal(a[rid].topk_logprobs, b[rid].topk_logprobs)
    assert not list((generated / ".softlabels" / "units").iterdir())
    ds = datasets.load_dataset(str(generated), split="train", cache_dir=str(tmp_path / ".hf"))
    assert ds["row_id"] == list(a)


def test_stride_gives_later_windows_context(tmp_path, tiny_teacher, corpus, dask_cluster):
    """--stride: each later window starts with context positions (no target); the targets still
    cover every token of every record exactly once, and equal a transformers forward over the
    window with its context."""
    from transformers import AutoTokenizer

    out, L, S = tmp_path / "ds", 64, 24
    softlabels("generate", "--teacher", tiny_teacher, "--input", corpus[0], "--output", out,
               "--top-k", K, "--max-length", L, "--stride", S, "--scheduler", dask_cluster)
    assert verify(out) == []
    rows = read_dataset(out)
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    later = []
    for rec, text in enumerate(corpus[1]):
        ids = tok(text).input_ids if text else []
        wins = sorted((r for r in rows.values() if r.record == rec), key=lambda r: r.window)
        assert [int(i) for r in wins for i in r.input_ids[r.target_mask]] == ids
        for r in wins[1:]:
            assert len(r.input_ids) <= L and not r.target_mask[: L - S].any()
            assert r.target_mask[L - S:].all()
            later.append(r)
    assert len(later) > 10
    refs = reference_topk(tiny_teacher, [r.input_ids.tolist() for r in later[:6]], K + 1)
    for r, (ref_ids, ref_lp) in zip(later, refs):
        m = r.target_mask & (ref_lp[:, K - 1] - ref_lp[:, K] > 1e-4)
        assert_same_targets(ref_ids[m, :K], ref_lp[m, :K], r.topk_ids[m], r.topk_logprobs[m],
                            DEFAULT_LOGPROB_STEP / 2 + 1e-4)


def test_client_killed_then_rerun_equals_uninterrupted(tmp_path, tiny_teacher, corpus,
                                                         dask_cluster):
    def cmd(out):
        return ["generate", "--teacher", tiny_teacher, "--input", corpus[0], "--output", out,
                "--top-k", K, "--max-length", MAXLEN, "--unit-tokens", 100,
                "--scheduler", dask_cluster]

    softlabels(*cmd(tmp_path / "whole"))
    out = tmp_path / "ds"
    p = subprocess.Popen([sys.executable, "-m", "softlabels", *map(str, cmd(out))], cwd=REPO,
                         env=dask_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = out / ".softlabels" / "done"
    deadline = time.time() + 300
    while time.time() < deadline and not (done.is_dir() and len(list(done.iterdir())) >= 3):
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "manifest.json").exists()  # killed before it could finish
    committed = len(list(done.iterdir()))
    rerun = softlabels(*cmd(out))
    ran = int(rerun.stderr.split(" to run")[0].rsplit(";", 1)[1])
    n_units = len(Plan.load(out).units)
    assert committed >= 3 and ran <= n_units - committed  # committed units were not redone
    a, b = Manifest.load(out), Manifest.load(tmp_path / "whole")
    assert [(s.file, s.sha256) for s in a.shards] == [(s.file, s.sha256) for s in b.shards]
    assert read_dataset(out).keys() == read_dataset(tmp_path / "whole").keys()


def test_damaged_shards_are_regenerated_and_nothing_else(tmp_path, generated, tiny_teacher,
                                                         corpus, dask_cluster):
    import shutil

    out = tmp_path / "ds"
    shutil.copytree(generated, out)
    m = Manifest.load(out)
    s0, s1 = out / m.shards[0].file, out / m.shards[1].file
    s0.write_bytes(s0.read_bytes()[:-100])
    raw = bytearray(s1.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    s1.write_bytes(bytes(raw))
    untouched = {s.file: (out / s.file).stat().st_mtime_ns for s in m.shards[2:]}
    p = softlabels("verify", out, check=False)
    assert p.returncode == 1 and s0.name in p.stdout and s1.name in p.stdout
    p = softlabels("generate", "--teacher", tiny_teacher, "--input", corpus[0], "--output", out,
                   "--top-k", K, "--max-length", MAXLEN, *SIZES, "--scheduler", dask_cluster)
    assert "; 4 to run" in p.stderr  # the two units of each damaged shard
    assert verify(out) == []
    assert {f: (out / f).stat().st_mtime_ns for f in untouched} == untouched
    assert json.loads((out / "manifest.json").read_text())["shards"] == \
        json.loads((generated / "manifest.json").read_text())["shards"]


def test_trained_student_loads_in_vllm(tmp_path, generated, corpus, dask_cluster):
    """What `softlabels train` saves is a model vLLM serves: use it as a teacher."""
    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
           "head_dim": 32, "max_position_embeddings": 256}
    (tmp_path / "student.json").write_text(json.dumps(cfg))
    softlabels("train", "--student", tmp_path / "student.json", "--data", generated,
               "--output", tmp_path / "st", "--max-steps", 3)
    out = tmp_path / "ds"
    softlabels("generate", "--teacher", tmp_path / "st", "--input", corpus[0], "--output", out,
               "--top-k", K, "--max-length", MAXLEN, "--scheduler", dask_cluster)
    assert verify(out) == []
    row = read_dataset(out)["0:0"]
    ((ref_ids, ref_lp),) = reference_topk(tmp_path / "st", [row.input_ids.tolist()], K + 1)
    clear = ref_lp[:, K - 1] - ref_lp[:, K] > 1e-4
    assert_same_targets(ref_ids[clear, :K], ref_lp[clear, :K], row.topk_ids[clear],
                        row.topk_logprobs[clear], DEFAULT_LOGPROB_STEP / 2 + 1e-4)


def test_a_writer_takes_new_weights_only_from_a_checkpoint_of_its_shape(tmp_path):
    """In place (vLLM's reload_weights) only another checkpoint with the same config and
    generation config under the same engine settings; anything else builds a new engine. A
    second engine is kept beside the first only where both fit."""
    import dataclasses

    from softlabels.demo import make_model
    from softlabels.generate.engine import EngineConfig
    from softlabels.generate.work import _fits_beside, _reloadable, _same_build

    for name, hidden in (("a", 64), ("b", 64), ("wide", 128)):
        make_model(tmp_path / name, vocab_size=300, hidden=hidden, layers=1, heads=2, seed=1)
    a = EngineConfig(teacher=str(tmp_path / "a"), k=0, max_length=64, seed=1)
    b = dataclasses.replace(a, teacher=str(tmp_path / "b"), seed=2)
    assert _reloadable(a, b) and _same_build(a, dataclasses.replace(a, seed=5))
    assert not _reloadable(a, a)  # the same checkpoint: kept as it is
    assert not _reloadable(a, dataclasses.replace(b, teacher=str(tmp_path / "wide")))
    assert not _reloadable(a, dataclasses.replace(b, max_length=32))
    assert not _reloadable(a, dataclasses.replace(b, teacher=str(tmp_path / "missing")))
    (tmp_path / "b" / "generation_config.json").write_text('{"temperature": 0.5}')
    assert not _reloadable(a, b)
    assert _fits_beside(a, b) and not _fits_beside(a, dataclasses.replace(b, kv_cache_gib=10**6))


def _leave_a_stale_request_then_run(task):
    """Runs on the Dask worker: a request left queued in the engine, as after an exception in
    the middle of a generate call, then the unit."""
    from vllm import PoolingParams
    from vllm.inputs import TokensPrompt

    from softlabels.generate import work

    teacher, _ = work._teacher(task)
    teacher.llm.llm_engine.add_request("-1", TokensPrompt(prompt_token_ids=[5, 6, 7]),
                                       PoolingParams(task="token_embed"))
    try:
        work.run_unit(task)
        return "no error", len(work._ENGINES)
    except Exception as e:
        return f"{type(e).__name__}: {e}", len(work._ENGINES)


def test_stale_engine_results_are_refused_and_the_engine_dropped(tmp_path, tiny_teacher, corpus,
                                                                  generated, dask_cluster):
    """Results are paired with windows by position; a stale request in the engine would shift
    them all silently. Each result is checked against its prompt, the unit fails, the engine is
    dropped, and the next job gets a fresh engine and correct targets."""
    import shutil

    from distributed import Client

    from softlabels.data.format import Encoding
    from softlabels.generate.engine import EngineConfig
    from softlabels.generate.state import done_path
    from softlabels.generate.work import UnitTask

    out = tmp_path / "ds"
    shutil.copytree(generated, out)
    unit = Plan.load(out).units[0]
    record = done_path(out, unit).read_text()
    engine = EngineConfig(teacher=str(tiny_teacher.resolve()), k=K, max_length=MAXLEN)
    task = UnitTask(str(out), unit, engine, Encoding(K, DEFAULT_LOGPROB_STEP))
    with Client(dask_cluster) as c:
        msg, engines_left = c.submit(_leave_a_stale_request_then_run, task,
                                     resources={"teacher": 1}, pure=False).result()
    assert msg.startswith("EngineMismatch"), msg
    assert engines_left == 0
    assert done_path(out, unit).read_text() == record  # nothing committed by the failed attempt
    again = tmp_path / "again"
    softlabels("generate", "--teacher", tiny_teacher, "--input", corpus[0], "--output", again,
               "--top-k", K, "--max-length", MAXLEN, *SIZES, "--scheduler", dask_cluster)
    assert [s["sha256"] for s in json.loads((again / "manifest.json").read_text())["shards"]] \
        == [s["sha256"] for s in json.loads((generated / "manifest.json").read_text())["shards"]]


def _rewrite_keeping_stat(path, data: bytes) -> None:
    """New bytes, same size, same mtime, same inode: what a stat cannot tell apart."""
    st = path.stat()
    assert len(data) == st.st_size
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_rerun_trusts_unchanged_files_without_reading_them(tmp_path, tiny_teacher, corpus,
                                                           dask_cluster):
    """A rerun identifies the teacher and the committed shards by stat, not by reading them
    (a 140 GB teacher is not re-hashed on every resume); --rehash reads everything."""
    import shutil

    teacher, out = tmp_path / "teacher", tmp_path / "ds"
    shutil.copytree(tiny_teacher, teacher)
    args = ["generate", "--teacher", teacher, "--input", corpus[0], "--output", out, "--top-k",
            K, "--max-length", MAXLEN, "--unit-tokens", 700, "--shard-tokens", 1,
            "--scheduler", dask_cluster]
    softlabels(*args)
    weights = teacher / "model.safetensors"
    _rewrite_keeping_stat(weights, bytes(b ^ 1 for b in weights.read_bytes()))
    shard = out / Manifest.load(out).shards[0].file
    good = shard.read_bytes()
    _rewrite_keeping_stat(shard, good[:100] + bytes(b ^ 0xFF for b in good[100:116]) + good[116:])
    p = softlabels(*args)
    assert "0 to run" in p.stderr  # neither the weights nor the shard were read
    p = softlabels(*args, "--rehash", check=False)
    assert p.returncode == 2 and "holds a different job" in p.stderr  # the weights were read
    _rewrite_keeping_stat(weights, bytes(b ^ 1 for b in weights.read_bytes()))  # restore them
    p = softlabels(*args, "--rehash")
    assert "1 to run" in p.stderr and shard.read_bytes() == good  # the shard was read: redone
    assert verify(out) == []


def _assert_matches_reference(out, teacher):
    assert verify(out) == []
    rows = read_dataset(out)
    for rid in ("0:0", "2:0"):
        row = rows[rid]
        ((ref_ids, ref_lp),) = reference_topk(teacher, [row.input_ids.tolist()], K + 1)
        clear = ref_lp[:, K - 1] - ref_lp[:, K] > 1e-4
        assert_same_targets(ref_ids[clear, :K], ref_lp[clear, :K], row.topk_ids[clear],
                            row.topk_logprobs[clear], DEFAULT_LOGPROB_STEP / 2 + 1e-4)


def test_tensor_parallel_2_embedded_and_on_a_dask_worker(tmp_path, tiny_teacher, corpus,
                                                        dask_cluster):
    """A teacher split over two devices (here two CPU cores, one vLLM rank each): under the
    embedded cluster, and on a `dask worker` started non-daemonic as the README says; targets
    equal a transformers fp32 forward. A daemonic worker refuses with the fix, in one line."""
    from tests.helpers import start_dask, stop_dask

    args = ["--teacher", tiny_teacher, "--input", corpus[0], "--top-k", K, "--max-length",
            MAXLEN, "--tensor-parallel-size", 2]
    softlabels("generate", *args, "--output", tmp_path / "embedded")
    _assert_matches_reference(tmp_path / "embedded", tiny_teacher)

    p = softlabels("generate", *args, "--output", tmp_path / "daemonic", "--scheduler",
                   dask_cluster, "--retries", 0, check=False)
    assert p.returncode == 2 and "DASK_DISTRIBUTED__WORKER__DAEMON=False" in p.stderr, p.stderr

    d = tmp_path / "dask"
    d.mkdir()
    procs = start_dask(d, 1, worker_env={"DASK_DISTRIBUTED__WORKER__DAEMON": "False"})
    try:
        softlabels("generate", *args, "--output", tmp_path / "external", "--scheduler",
                   procs["address"])
    finally:
        stop_dask(procs)
    _assert_matches_reference(tmp_path / "external", tiny_teacher)


def test_workers_write_to_a_store_killed_then_rerun_on_a_worker_of_its_own(
        tmp_path, tiny_teacher, corpus, generated, s3, bucket):
    """--output s3://: the embedded cluster's worker commits its units as write-once objects
    through a slow, throttling network (the proxy: 20 ms a request, every 5th read 503
    SlowDown); the client is killed mid-run; the rerun goes to a `dask worker` of its own, which
    finds the plan and the committed units in the store, not in any folder, and redoes none of
    them. The dataset is the local run's byte for byte, and it verifies from the store."""
    import s3fs

    from softlabels.data.store import store
    from softlabels.generate import objects
    from tests.helpers import start_dask, stop_dask
    from tests.proxy import start

    url = f"{bucket}/ds"
    root = url.split("://", 1)[1]
    fs = s3fs.S3FileSystem(skip_instance_cache=True)

    def listed(prefix):
        try:
            return fs.ls(f"{root}/.softlabels/{prefix}", refresh=True)
        except FileNotFoundError:
            return []

    args = ["generate", "--teacher", tiny_teacher, "--input", corpus[0], "--output", url,
            "--top-k", K, "--max-length", MAXLEN, *SIZES]
    server, port = start(int(s3["AWS_ENDPOINT_URL"].rsplit(":", 1)[1]), latency=0.02,
                         slow_down=5)
    slow = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        with open(tmp_path / "first.log", "wb") as log:
            p = subprocess.Popen([sys.executable, "-m", "softlabels", *map(str, args)],
                                 cwd=tmp_path, env={**dask_env(), **slow}, stdout=log,
                                 stderr=log, start_new_session=True)
            deadline = time.time() + 300
            while time.time() < deadline and len(listed("done")) < 3 and p.poll() is None:
                time.sleep(0.05)
            os.killpg(p.pid, signal.SIGKILL)  # the client and its embedded worker
            p.wait()
        assert not fs.exists(f"{root}/manifest.json")  # killed before it could finish
        committed = len(listed("done"))
        assert committed >= 3, (tmp_path / "first.log").read_text()[-3000:]
        d = tmp_path / "dask"
        d.mkdir()
        procs = start_dask(d, n_workers=1, worker_env=slow)
        try:
            rerun = softlabels(*args, "--scheduler", procs["address"], env=slow)
            # --input a URL too: the worker plans from the store's copy of the input
            fs.put(str(corpus[0]), f"{root}-input/in.parquet")
            softlabels(*args[:3], "--input", f"{url}-input/in.parquet", *args[7:], "--output",
                       tmp_path / "from-url", "--scheduler", procs["address"], env=slow)
        finally:
            stop_dask(procs)
    finally:
        server.shutdown()
    ran = int(rerun.stderr.split(" to run")[0].rsplit(";", 1)[1])
    plan = objects.load_plan(store(url))
    assert ran <= len(plan.units) - committed  # committed units were not redone
    assert len(listed("attempts")) >= len(plan.units)
    a, b = Manifest.load(url), Manifest.load(generated)
    assert [(s.file, s.sha256) for s in a.shards] == [(s.file, s.sha256) for s in b.shards]
    assert a.index == b.index and a.tokens == b.tokens
    assert verify(url) == []
    assert listed("units") == []  # the units the shards replaced are gone
    assert server.stats["slow_down"] >= 1, server.stats
    c = Manifest.load(tmp_path / "from-url")
    assert [s.sha256 for s in c.shards] == [s.sha256 for s in b.shards]  # same job, by content
    assert c.provenance["input"] == f"{url}-input/in.parquet"
