"""Teacher jobs on a real Slurm (single node, loopback): `generate --cluster slurm` through
dask-jobqueue, worker jobs lost to scancel and to their walltime, a queue that never starts one,
and the dry run. Skipped, with the reason, only where Slurm cannot run (not root, no packages)."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from softlabels.data.manifest import Manifest
from softlabels.data.verify import verify
from softlabels.generate.plan import Plan
from tests import slurm as slurm_helper
from tests.helpers import corpus_texts, read_dataset, softlabels

K = 8
BATCH = ["--cluster", "slurm", "--scheduler-host", "127.0.0.1", "--worker-memory", "2GB"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    try:
        s = slurm_helper.start(tmp_path_factory.mktemp("slurm"))
    except slurm_helper.Unavailable as e:
        pytest.skip(f"no Slurm here: {e}")
    yield s
    slurm_helper.stop(s)


def squeue(slurm, name: str) -> list[tuple[str, str]]:
    p = subprocess.run(["squeue", "-h", "-o", "%i %T", "-n", name], capture_output=True,
                       text=True, env=slurm["env"])
    return [tuple(line.split()) for line in p.stdout.splitlines()]


def gen(slurm, teacher, inp, out, *extra, check=True):
    return softlabels("generate", "--teacher", teacher, "--input", inp, "--output", out,
                      "--top-k", K, "--max-length", 96, *extra, env=slurm["env"], check=check)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm-in")
    pq.write_table(pa.table({"text": corpus_texts(12, offset=300)}), d / "in.parquet")
    return d / "in.parquet"


def test_worker_jobs_give_the_embedded_clusters_dataset(tmp_path, slurm, tiny_teacher, small,
                                                        bucket):
    """The same job through Slurm's worker jobs and the embedded cluster: byte-identical shards;
    the worker job script (printed without submitting) carries mutual TLS, the teacher resource
    and the malloc settings; no job of ours is left in the queue after. Worker jobs writing to
    an s3:// output themselves (objects.py) give the same shards too."""
    script = gen(slurm, tiny_teacher, small, tmp_path / "s", *BATCH, "--print-job-script").stdout
    assert "#SBATCH" in script and "--resources teacher=1" in script
    assert "tls://127.0.0.1:" in script and "--tls-key" in script
    assert "MALLOC_TRIM_THRESHOLD_" in script and "--no-nanny" in script
    assert not squeue(slurm, "softlabels-s") and not (tmp_path / "s" / "manifest.json").exists()
    p = gen(slurm, tiny_teacher, small, tmp_path / "s", *BATCH, "--unit-tokens", 500)
    assert "workers: 1 running, 0 queued" in p.stderr
    gen(slurm, tiny_teacher, small, tmp_path / "e", "--unit-tokens", 500)  # embedded cluster
    a, b = Manifest.load(tmp_path / "s"), Manifest.load(tmp_path / "e")
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    assert not squeue(slurm, "softlabels-s")
    p = softlabels("generate", "--teacher", tiny_teacher, "--input", small, "--output",
                   f"{bucket}/s3", "--top-k", K, "--max-length", 96, *BATCH, "--unit-tokens",
                   500, env={**slurm["env"], "HOME": str(tmp_path)})
    assert "workers: 1 running" in p.stderr
    c = Manifest.load(f"{bucket}/s3")
    assert [s.sha256 for s in c.shards] == [s.sha256 for s in b.shards]
    assert verify(f"{bucket}/s3") == []
    assert any((tmp_path / ".cache/softlabels/jobs").glob("s3-*/.softlabels/tls"))  # client side


def _killer(slurm, name: str, out: Path, log: list) -> None:
    """scancel one running worker job once a few units are committed, and again later."""
    done = out / ".softlabels" / "done"
    for threshold in (5, 60):
        deadline = time.time() + 300
        while time.time() < deadline and not (done.is_dir() and
                                              len(list(done.iterdir())) >= threshold):
            time.sleep(0.2)
        running = [i for i, st in squeue(slurm, name) if st == "RUNNING"]
        if running:
            subprocess.run(["scancel", running[0]], env=slurm["env"], check=True)
            log.append(running[0])


def test_lost_worker_jobs_are_replaced_and_every_record_is_kept(tmp_path, slurm, tiny_teacher):
    """Two worker jobs with a 1-minute walltime, two of them also cancelled mid-run: every job
    that ends, queued or running, is replaced, and the dataset holds every record's tokens
    exactly once (verify passes, row ids distinct), the units run counted against those
    planned."""
    inp = tmp_path / "in.parquet"
    # long enough that a replacement job outlives its walltime (Slurm ends it 60-90 s in) on a
    # fast machine too (330 records were too few on CI's)
    texts = corpus_texts(660, offset=600)
    pq.write_table(pa.table({"text": texts}), inp)
    out = tmp_path / "ds"
    cancelled: list = []
    t = threading.Thread(target=_killer, args=(slurm, "softlabels-ds", out, cancelled))
    t.start()
    t0 = time.time()
    p = gen(slurm, tiny_teacher, inp, out, *BATCH, "--workers", 2, "--walltime", "00:01:00",
            "--unit-tokens", 200, "--samples", 32, "--retries", 5)
    t.join()
    assert len(cancelled) == 2, cancelled
    report = p.stderr.strip().splitlines()[-1]
    m = re.match(r"worker jobs replaced: (\d+) \((.*)\); units run (\d+) for (\d+) planned",
                 report)
    assert m, report
    how = dict(x.split() for x in m.group(2).split(", "))
    runs, planned = int(m.group(3)), int(m.group(4))
    assert int(how.get("CANCELLED", 0)) == len(cancelled) and int(how.get("TIMEOUT", 0)) >= 1, \
        (report, f"{time.time() - t0:.0f} s")
    assert int(m.group(1)) == sum(map(int, how.values()))
    assert planned == len(Plan.load(out).units) and runs >= planned
    assert verify(out) == []
    rows = read_dataset(out)
    assert len(rows) == sum(s.rows for s in Manifest.load(out).shards)  # no duplicates
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    for rec, text in enumerate(texts[:30]):
        wins = sorted((r for r in rows.values() if r.record == rec), key=lambda r: r.window)
        assert np.concatenate([r.input_ids for r in wins]).tolist() == tok(text).input_ids
    assert not squeue(slurm, "softlabels-ds")
    (tmp_path / "report.json").write_text(json.dumps({"report": report, "wall": time.time() - t0}))


def test_no_worker_ever_starting_is_one_line_and_resumable(tmp_path, slurm, tiny_teacher, small):
    """A queue that never starts the job: one line with Slurm's reason, no job left, and the
    same command finishes the job once the queue has room."""
    out = tmp_path / "ds"
    p = gen(slurm, tiny_teacher, small, out, *BATCH, "--job-extra=--begin=now+1hour",
            "--worker-timeout", 15, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert "no worker job started within 15 s (slurm: BeginTime)" in last, last
    assert "rerun the same command" in last
    assert not squeue(slurm, "softlabels-ds")
    gen(slurm, tiny_teacher, small, out, *BATCH)
    assert verify(out) == []


def test_dry_run_plans_on_the_cluster_and_the_real_run_reuses_it(tmp_path, slurm, tiny_teacher,
                                                                  small):
    """--dry-run plans (on a worker job) without scoring anything; --calibrate scores one unit
    and predicts size and time; the real run reuses the plan and that unit."""
    out = tmp_path / "ds"
    p = gen(slurm, tiny_teacher, small, out, *BATCH, "--unit-tokens", 500, "--dry-run")
    assert "plan: 12 records" in p.stdout and "expected size: ~" in p.stdout
    plan = Plan.load(out)
    assert len(plan.units) > 2 and not (out / ".softlabels" / "attempts.log").exists()
    assert not (out / "manifest.json").exists()
    pieces = {f: f.stat().st_mtime_ns for f in (out / ".softlabels" / "plan").iterdir()}
    p = gen(slurm, tiny_teacher, small, out, *BATCH, "--unit-tokens", 500, "--dry-run",
            "--calibrate")
    assert "calibration: unit" in p.stdout and "worker-hours" in p.stdout
    assert len((out / ".softlabels" / "attempts.log").read_text().splitlines()) == 1
    p = gen(slurm, tiny_teacher, small, out, *BATCH, "--unit-tokens", 500)
    assert f"{len(plan.units) - 1} to run" in p.stderr  # the calibrated unit is kept
    assert {f: f.stat().st_mtime_ns for f in (out / ".softlabels" / "plan").iterdir()} == pieces
    assert verify(out) == []


def test_a_job_slurm_refuses_is_one_line_at_once(tmp_path, slurm, tiny_teacher, small):
    """More memory than any node has: sbatch refused every worker job inside dask-jobqueue (a
    logged traceback) and the run waited the whole --worker-timeout, then blamed the queue."""
    t0 = time.time()
    p = gen(slurm, tiny_teacher, small, tmp_path / "ds", *BATCH, "--worker-memory", "4000GiB",
            "--worker-timeout", 300, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert "sbatch refuses the worker job" in last and "--worker-memory" in last, last
    assert time.time() - t0 < 120
    assert not squeue(slurm, "softlabels-ds")
