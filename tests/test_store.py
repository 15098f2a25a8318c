"""Datasets at URLs: a real S3 API server (moto's, over HTTP), s3fs as users configure it.

Push/pull round trips, streaming reads that fetch only checked byte ranges, a changed byte in an
object refused before it reaches a model, a student trained from the store equal to one trained
from the folder, and the store's failures in one line.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import s3fs

from softlabels.data.dataset import hashes
from softlabels.data.errors import UserError
from softlabels.data.format import FormatError
from softlabels.data.manifest import Manifest
from softlabels.data.reader import SoftLabelReader
from softlabels.data.share import pull, push
from softlabels.data.store import RangeCache
from softlabels.data.verify import verify
from tests.helpers import softlabels, synthetic_rows, write_dataset

K, VOCAB = 4, 512
STUDENT = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1,
           "head_dim": 32, "max_position_embeddings": 256, "tie_word_embeddings": False}


def _fs():
    return s3fs.S3FileSystem(skip_instance_cache=True)


@pytest.fixture(scope="module")
def local(tmp_path_factory, tiny_teacher):
    """3 shards of synthetic rows (several row groups each) with the teacher's tokenizer."""
    d = tmp_path_factory.mktemp("local") / "ds"
    rows = synthetic_rows(36, VOCAB, K, seed=5, lengths=(20, 48))
    write_dataset(d, rows, k=K, vocab=VOCAB, tokenizer=tiny_teacher, shards=3)
    (d.parent / "student.json").write_text(json.dumps(STUDENT))
    assert verify(d) == []
    return d


def _rows(reader) -> dict:
    return {r.row_id: r for r in reader}


def _same_rows(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) == 36
    for rid, r in a.items():
        for name in ("input_ids", "topk_ids", "topk_logprobs", "target_mask", "tail_logprob",
                     "label_logprob"):
            np.testing.assert_array_equal(getattr(r, name), getattr(b[rid], name), err_msg=name)


def _flip(url: str, offset: int) -> None:
    """Change one byte of an object in place (a new object under the same name)."""
    fs = _fs()
    path = url.split("://", 1)[1]
    data = bytearray(fs.cat_file(path))
    data[offset] ^= 0x40
    fs.pipe_file(path, bytes(data))


def test_pushed_dataset_reads_verifies_and_pulls_back_the_same(local, bucket, tmp_path):
    url = f"{bucket}/datasets/ds"
    # 3 shards, index.parquet, the card and the tokenizer's files (the manifest is not counted)
    assert push(local, url, log=lambda *_: None) == 3 + 2 + len(list(
        (local / "tokenizer").iterdir()))
    assert _fs().cat_file(url[5:] + "/manifest.json") == (local / "manifest.json").read_bytes()
    assert verify(url) == []
    _same_rows(_rows(SoftLabelReader(url)), _rows(SoftLabelReader(local)))
    # a rerun copies nothing; the destination is the same dataset
    assert push(local, url, log=lambda *_: None) == 0
    back = tmp_path / "back"
    pull(url, back, log=lambda *_: None)
    for f in local.rglob("*"):
        if f.is_file() and ".softlabels" not in f.parts:
            assert (back / f.relative_to(local)).read_bytes() == f.read_bytes(), f
    assert verify(back) == []
    # inspect reads a row from the store as from the folder
    a = softlabels("inspect", url, "--row", 7, "--json").stdout
    assert a == softlabels("inspect", local, "--row", 7, "--json").stdout


def test_a_student_reads_only_the_row_groups_it_needs(local, bucket):
    url = f"{bucket}/ds"
    push(local, url, log=lambda *_: None)
    m = Manifest.load(local)
    assert all(len(s.row_groups) >= 2 for s in m.shards)  # several per shard
    reader = SoftLabelReader(url)
    planned = reader.index(0)  # planning: one object, the index
    assert reader.fetched == m.index["bytes"] and len(planned.tokens) == m.rows
    rows = reader.read(0, np.array([0]))  # then a shard's footer and one of its row groups
    first = m.shards[0].footer[1] + m.shards[0].row_groups[0][1]
    assert reader.fetched == m.index["bytes"] + first
    assert rows[0].row_id == list(_rows(SoftLabelReader(local)))[0]
    # every row, once: each stored byte range is fetched once
    list(reader)
    assert reader.fetched == m.index["bytes"] + sum(
        s.footer[1] + sum(g[1] for g in s.row_groups) for s in m.shards)


def test_a_changed_byte_in_a_store_object_is_refused_naming_it(local, bucket):
    url = f"{bucket}/ds"
    push(local, url, log=lambda *_: None)
    m = Manifest.load(local)
    victim = m.shards[1]
    g = victim.row_groups[1]
    _flip(f"{url}/{victim.file}", g[0] + g[1] // 2)  # the middle of a row group
    reader = SoftLabelReader(url)
    reader.index(0)  # the footers are intact: planning works
    with pytest.raises(FormatError) as e:
        list(reader)
    msg = str(e.value)
    assert f"{url}/{victim.file}" in msg and "sha256 differs" in msg and "\n" not in msg
    assert any(victim.file in p and "sha256" in p for p in verify(url))
    # the rows of the intact shards still stream (the check is per range, not per dataset)
    ok = SoftLabelReader(url)
    idx = ok.index(0)
    assert len(ok.read(0, np.flatnonzero(idx.shard == 0))) == m.shards[0].rows
    # a changed footer is refused before its shard's first row is read
    _flip(f"{url}/{m.shards[2].file}", m.shards[2].bytes - 12)
    r = SoftLabelReader(url)
    idx = r.index(0)
    with pytest.raises(FormatError, match=f"{m.shards[2].file}: sha256 differs"):
        r.read(0, np.flatnonzero(idx.shard == 2)[:1])
    # and a changed index before planning
    _flip(f"{url}/index.parquet", 10)
    with pytest.raises(FormatError, match="index.parquet: sha256 differs"):
        SoftLabelReader(url).index(0)


def test_cache_serves_a_second_reader_and_refuses_a_damaged_entry(local, bucket, tmp_path):
    url = f"{bucket}/ds"
    push(local, url, log=lambda *_: None)
    cache = RangeCache(tmp_path / "cache", limit=10**9)
    first = SoftLabelReader(url, cache=cache)
    want = _rows(first)
    assert first.fetched > 0
    second = SoftLabelReader(url, cache=RangeCache(tmp_path / "cache", limit=10**9))
    _same_rows(_rows(second), want)
    assert second.fetched == 0
    # a damaged cache file is fetched again, not used
    victim = sorted((tmp_path / "cache").iterdir())[0]
    victim.write_bytes(b"x" + victim.read_bytes()[1:])
    third = SoftLabelReader(url, cache=RangeCache(tmp_path / "cache", limit=10**9))
    _same_rows(_rows(third), want)
    assert 0 < third.fetched < first.fetched
    # the limit holds: a small cache keeps at most its size
    small = RangeCache(tmp_path / "small", limit=20_000)
    list(SoftLabelReader(url, cache=small))
    assert 0 < sum(f.stat().st_size for f in (tmp_path / "small").iterdir()) <= 20_000


def test_dataset_without_range_hashes_reads_from_a_store(local, bucket, tmp_path):
    """Datasets written before the range hashes: each shard is checked whole (downloaded)."""
    old = tmp_path / "old"
    shutil.copytree(local, old)
    d = json.loads((old / "manifest.json").read_text())
    for s in d["shards"]:
        del s["footer"], s["row_groups"]
    (old / "manifest.json").write_text(json.dumps(d))
    url = f"{bucket}/old"
    push(old, url, log=lambda *_: None)
    reader = SoftLabelReader(url)
    _same_rows(_rows(reader), _rows(SoftLabelReader(local)))
    assert reader.fetched >= sum(s["bytes"] for s in d["shards"])
    _flip(f"{url}/{d['shards'][0]['file']}", 100)
    with pytest.raises(FormatError, match="sha256 differs"):
        list(SoftLabelReader(url))


def test_push_resumes_and_the_manifest_comes_last(local, bucket):
    url = f"{bucket}/ds"
    push(local, url, log=lambda *_: None)
    fs = _fs()
    fs.rm(url[5:] + "/manifest.json")
    fs.rm(url[5:] + f"/{Manifest.load(local).shards[1].file}")
    with pytest.raises(FormatError, match="has no manifest.json"):
        SoftLabelReader(url)  # without the manifest there is no dataset to read, half or whole
    assert push(local, url, log=lambda *_: None) == 1  # only the missing shard
    assert verify(url) == []
    # a destination holding another dataset is refused
    other = json.loads((local / "manifest.json").read_text())
    other["provenance"] = {"x": 1}
    fs.pipe_file(url[5:] + "/manifest.json", json.dumps(other).encode())
    with pytest.raises(UserError, match="holds another dataset"):
        push(local, url, log=lambda *_: None)


def test_pull_refuses_a_changed_object(local, bucket, tmp_path):
    url = f"{bucket}/ds"
    push(local, url, log=lambda *_: None)
    m = Manifest.load(local)
    _flip(f"{url}/{m.shards[0].file}", 50)
    with pytest.raises(UserError, match=f"{m.shards[0].file}: sha256 differs"):
        pull(url, tmp_path / "p", log=lambda *_: None)
    assert not (tmp_path / "p" / "manifest.json").exists()
    assert not (tmp_path / "p" / m.shards[0].file).exists()


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_student_trained_from_the_store_equals_one_trained_from_the_folder(local, bucket,
                                                                           tmp_path):
    url = f"{bucket}/ds"
    push(local, url, log=lambda *_: None)
    shutil.copy(local.parent / "student.json", tmp_path / "student.json")
    a = softlabels("train", "--student", tmp_path / "student.json", "--data", local, "--output",
                   tmp_path / "a", "--max-steps", 3, "--batch-tokens", 200, "--lr", "3e-3",
                   "--warmup", 1)
    b = softlabels("train", "--student", tmp_path / "student.json", "--data", url, "--output",
                   tmp_path / "b", "--max-steps", 3, "--batch-tokens", 200, "--lr", "3e-3",
                   "--warmup", 1, "--cache-dir", tmp_path / "cache")
    assert a.returncode == b.returncode == 0
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    assert any((tmp_path / "cache").iterdir())  # what it read is kept for the next run
    # a changed byte in an object: refused in one line naming it, no model written
    m = Manifest.load(local)
    g = m.shards[0].row_groups[0]
    _flip(f"{url}/{m.shards[0].file}", g[0] + 5)
    p = softlabels("train", "--student", tmp_path / "student.json", "--data", url, "--output",
                   tmp_path / "c", "--max-steps", 3, "--batch-tokens", 200, check=False)
    err = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert f"{url}/{m.shards[0].file}" in err and "sha256 differs" in err, err
    assert not (tmp_path / "c" / "model.safetensors").exists()


def test_store_failures_are_one_line(bucket, tmp_path, s3):
    import os
    import subprocess
    import sys

    from tests.helpers import REPO, dask_env

    p = softlabels("verify", "s3://no-such-bucket-here/ds", check=False)
    assert p.returncode != 0 and "bucket 'no-such-bucket-here' does not exist" in p.stderr + \
        p.stdout and "Traceback" not in p.stderr
    p = softlabels("train", "--student", tmp_path / "s.json", "--data", f"{bucket}/nothing",
                   "--output", tmp_path / "o", "--max-steps", 1, check=False)
    assert p.returncode == 2 and "has no manifest.json" in p.stderr.strip().splitlines()[-1]
    env = {k: v for k, v in {**os.environ, **dask_env()}.items()
           if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env["HOME"] = str(tmp_path)  # no ~/.aws either
    p = subprocess.run([sys.executable, "-m", "softlabels", "verify", f"{bucket}/ds"],
                       capture_output=True, text=True, cwd=REPO, env=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "no credentials for s3://" in p.stderr and "AWS_ACCESS_KEY_ID" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_range_hashes_are_plain_sha256_of_the_file_bytes(local):
    """FORMAT.md's recipe, in a few lines that use nothing of this package."""
    import hashlib

    m = json.loads((local / "manifest.json").read_text())
    for s in m["shards"]:
        data = (local / s["file"]).read_bytes()
        n = int.from_bytes(data[-8:-4], "little") + 8
        assert s["footer"] == [len(data) - n, n, hashlib.sha256(data[-n:]).hexdigest()]
        spans = s["row_groups"]
        assert spans[0][0] == 4 and all(a[0] + a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert spans[-1][0] + spans[-1][1] == len(data) - n  # together: the whole file
        for off, length, digest in spans:
            assert hashlib.sha256(data[off:off + length]).hexdigest() == digest
    assert hashes(local / m["shards"][0]["file"])["row_groups"] == m["shards"][0]["row_groups"]


def test_student_trained_through_a_faulty_network_equals_one_from_the_folder(local, bucket,
                                                                             tmp_path, s3):
    """20 ms a request, every 4th read answered 503 SlowDown, every 5th cut off mid-body: the
    student reads the same checked bytes and ends with the same weights."""
    from tests.proxy import start

    url = f"{bucket}/ds"
    push(local, url, log=lambda *_: None)
    upstream = int(s3["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    server, port = start(upstream, latency=0.02, slow_down=4, cut=5)
    try:
        flags = ("--student", local.parent / "student.json", "--max-steps", 4,
                 "--batch-tokens", 200, "--lr", "3e-3", "--warmup", 1)
        softlabels("train", "--data", local, "--output", tmp_path / "a", *flags)
        softlabels("train", "--data", url, "--output", tmp_path / "b", *flags,
                   env={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"})
    finally:
        server.shutdown()
    assert server.stats["slow_down"] >= 2 and server.stats["cut"] >= 2, server.stats
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all((wa[k] == wb[k]).all() for k in wa)


def test_datasets_trainer_and_eval_read_a_store_as_the_folder(local, bucket, tmp_path):
    """`datasets.load_dataset` (the card's Parquet, at a URL), `soft_label_dataset` (the
    DistillationTrainer's input) and `softlabels eval` give the folder's rows and numbers."""
    import datasets

    from softlabels.train_student.hf import soft_label_dataset

    url = f"{bucket}/ds"
    push(local, url, log=lambda *_: None)
    hub = datasets.load_dataset("parquet", data_files=f"{url}/shard-*.parquet", split="train",
                                cache_dir=str(tmp_path / "hf"))
    assert sorted(hub["row_id"]) == sorted(_rows(SoftLabelReader(local)))

    def first(ds, n=36):
        return [(e["input_ids"].tolist(), e["topk_logprobs"].tolist())
                for _, e in zip(range(n), ds)]

    assert first(soft_label_dataset(url, seed=2)) == first(soft_label_dataset(local, seed=2))
    softlabels("train", "--student", local.parent / "student.json", "--data", local,
               "--output", tmp_path / "m", "--max-steps", 1, "--batch-tokens", 200)
    a = json.loads(softlabels("eval", "--model", tmp_path / "m", "--data", local,
                              "--json").stdout)
    b = json.loads(softlabels("eval", "--model", tmp_path / "m", "--data", url,
                              "--json").stdout)
    assert a.pop("data") == str(local) and b.pop("data") == url
    assert a == b and a["tokens"] > 0


def test_published_files_have_the_mode_open_would_give(local):
    """Temp-file commits (mkstemp: 0600) must not hide a dataset from the other users of a
    shared filesystem: every file has the mode a plain open() would give under this umask."""
    import os
    import stat

    mask = os.umask(0o022)
    os.umask(mask)
    files = [f for f in local.iterdir() if f.is_file()]
    assert len(files) >= 5
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f


def test_an_index_that_disagrees_with_a_shard_is_refused(local, tmp_path):
    """A shard rewritten with other row groups, the manifest's shard hashes fixed but the index
    left as it was: the reader refuses the shard before decoding it, verify names the index."""
    import pyarrow.parquet as pq

    d = tmp_path / "d"
    shutil.copytree(local, d)
    m = Manifest.load(d)
    f = d / m.shards[1].file
    t = pq.read_table(f)
    pq.write_table(t, f, row_group_size=5)  # same rows, other row groups
    vars(m.shards[1]).update(hashes(f))
    m.save(d)
    r = SoftLabelReader(d)
    with pytest.raises(FormatError, match=f"{m.shards[1].file}: its row groups differ from "
                                          "index.parquet's"):
        r.read(0, np.flatnonzero(r.index(0).shard == 1)[:1])
    assert any("index.parquet: the rows of " + m.shards[1].file in p for p in verify(d))


def test_push_recopies_a_same_size_object_that_is_another_file(local, bucket, tmp_path):
    """A leftover object of the right size but other bytes (another run's shard) is copied over,
    not trusted by its size."""
    url = f"{bucket}/ds"
    m = Manifest.load(local)
    victim = m.shards[0]
    data = bytearray((local / victim.file).read_bytes())
    data[victim.footer[0] + 20] ^= 0x01  # same size, another footer
    _fs().pipe_file(f"{url[5:]}/{victim.file}", bytes(data))
    assert push(local, url, log=lambda *_: None) == 3 + 2 + len(list(
        (local / "tokenizer").iterdir()))
    assert verify(url) == []


@pytest.mark.parametrize("where", ["s3", "folder"])
def test_a_unit_is_committed_once_whoever_writes_it_second(where, bucket, tmp_path):
    """Two attempts of one unit (a retried task, a worker presumed dead): the first write of its
    name commits it; the second finds the name taken, keeps nothing of its own, and says so
    (`committed`). On S3 this is the conditional write (If-None-Match: *), in a folder a link."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    from softlabels.data.format import DEFAULT_LOGPROB_STEP, Encoding
    from softlabels.data.store import store
    from softlabels.generate import objects
    from softlabels.generate.plan import Unit

    url = f"{bucket}/job" if where == "s3" else f"file://{tmp_path}/job"
    unit = Unit(0, 0, "unit-00000-00000-x.parquet", 2, 40)
    enc = Encoding(k=K, logprob_step=DEFAULT_LOGPROB_STEP)
    first, second = (synthetic_rows(2, VOCAB, K, seed=s, lengths=(20, 21)) for s in (1, 2))
    a = objects.commit_unit(url, "shard-00000-x.parquet", unit, first, enc, {})
    b = objects.commit_unit(url, "shard-00000-x.parquet", unit, second, enc, {})
    assert a["committed"] and not b["committed"]
    st = store(url)
    data = st.cat("shard-00000-x.parquet")
    assert hashlib.sha256(data).hexdigest() == a["sha256"] != b["sha256"]
    ids = pq.read_table(pa.BufferReader(data)).column("input_ids").to_pylist()
    assert ids == [r.input_ids.tolist() for r in first]
    done = json.loads(st.cat(".softlabels/done/unit-00000-00000-x.parquet.json"))
    assert done["sha256"] == a["sha256"]  # the record is the first attempt's, not rewritten


def test_generate_to_a_missing_bucket_or_without_credentials_is_one_line(tiny_teacher, s3,
                                                                         tmp_path):
    """Before any engine or cluster starts; and a store without conditional writes (the Hub)."""
    import os
    import time

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a b c"]}), tmp_path / "in.parquet")
    args = ["generate", "--teacher", tiny_teacher, "--input", tmp_path / "in.parquet"]
    t = time.time()
    p = softlabels(*args, "--output", "s3://no-such-bucket-here/ds", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].endswith(
        "bucket 'no-such-bucket-here' does not exist (or these credentials cannot see it); "
        "create it first")
    p = softlabels(*args, "--output", "hf://datasets/you/run1", check=False)
    assert p.returncode == 2 and "conditional writes" in p.stderr.strip().splitlines()[-1]
    assert "softlabels push FOLDER hf://datasets/you/run1" in p.stderr
    import subprocess
    import sys

    from tests.helpers import REPO, dask_env

    env = {k: v for k, v in {**os.environ, **dask_env()}.items()
           if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env["HOME"] = str(tmp_path)  # no ~/.aws either
    p = subprocess.run([sys.executable, "-m", "softlabels", *map(str, args), "--output",
                        "s3://any-bucket/ds"], capture_output=True, text=True, cwd=REPO, env=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "no credentials for s3://" in p.stderr.strip().splitlines()[-1]
    assert time.time() - t < 60 and "Dask dashboard" not in p.stderr
