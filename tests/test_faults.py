"""Faults with real processes: a worker machine dies, the disk fills up."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from softlabels.data.manifest import Manifest
from softlabels.data.verify import verify
from softlabels.generate.plan import Plan
from softlabels.generate.state import done_path
from softlabels.generate.work import is_done
from tests.helpers import (
    REPO,
    corpus_texts,
    dask_env,
    read_dataset,
    softlabels,
    start_dask,
    stop_dask,
)

K = 8


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    pq.write_table(pa.table({"text": corpus_texts(12, offset=700)}), d / "in.parquet")
    return d / "in.parquet"


def test_worker_killed_job_completes_on_survivor(tmp_path, tiny_teacher, corpus):
    """Two `dask worker`s; kill -9 one (nanny and worker: the machine dies) while it holds a
    unit. The job finishes on the other; every record's windows appear exactly once."""
    from distributed import Client

    procs = start_dask(tmp_path, n_workers=2, worker_names=["a", "b"])
    try:
        out = tmp_path / "ds"
        cmd = [sys.executable, "-m", "softlabels", "generate", "--teacher", str(tiny_teacher),
               "--input", str(corpus), "--output", str(out), "--top-k", str(K),
               "--max-length", "64", "--unit-tokens", "150", "--scheduler", procs["address"]]
        gen = subprocess.Popen(cmd, cwd=REPO, env=dask_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
        victim = procs["workers"][0]
        with Client(procs["address"]) as c:
            deadline = time.time() + 300
            while time.time() < deadline:  # both engines up and worker "a" holding a unit
                info = c.scheduler_info()["workers"]
                addr = {w["name"]: a for a, w in info.items()}
                held = c.processing(workers=[addr["a"]]).get(addr["a"], []) if "a" in addr \
                    else []
                done = out / ".softlabels" / "done"
                if held and done.is_dir() and len(list(done.iterdir())) >= 4:
                    break
                time.sleep(0.02)
            assert held, "worker a never held a unit"
        os.killpg(victim.pid, signal.SIGKILL)
        _, err = gen.communicate(timeout=600)
        assert gen.returncode == 0, err[-3000:]
    finally:
        stop_dask(procs)
    assert verify(out) == []
    plan = Plan.load(out)
    rows = read_dataset(out)
    assert len(rows) == sum(u.rows for u in plan.units)  # no row twice (dict keys), none lost
    texts = corpus_texts(12, offset=700)
    assert {r.record for r in rows.values()} == set(range(len(texts)))


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_disk_full_then_rerun_after_freeing_space(tmp_path, tiny_teacher, corpus,
                                                   dask_cluster):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)], check=True)
    try:
        out = mnt / "ds"
        args = ["generate", "--teacher", tiny_teacher, "--input", corpus, "--output", out,
                "--top-k", K, "--max-length", 64, "--unit-tokens", 600, "--retries", 0,
                "--scheduler", dask_cluster]
        p = softlabels(*args, check=False)
        assert p.returncode == 2, p.stderr[-2000:]
        last = p.stderr.strip().splitlines()[-1]
        assert "No space left on device" in last and "rerun" in last, last
        assert "Traceback" not in p.stderr
        assert not (out / "manifest.json").exists()
        plan = Plan.load(out)
        units = out / ".softlabels" / "units"
        visible = [f for f in os.listdir(units) if f.startswith("unit-")]
        assert visible, "the disk should have held some units"
        by_name = {u.name: u for u in plan.units}
        for f in visible:  # only complete units are visible (some may lack their done record)
            assert pq.read_table(units / f).num_rows == by_name[f].rows
        assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
        assert not [f for f in os.listdir(units) if f.endswith(".tmp")]
        committed = {f: done_path(out, by_name[f]).stat().st_mtime_ns for f in visible
                     if is_done(out, by_name[f])}
        subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True)
        softlabels(*args)
        assert verify(out) == []  # committed units were not redone:
        assert {f: done_path(out, by_name[f]).stat().st_mtime_ns for f in committed} == committed
        assert Manifest.load(out).rows == sum(u.rows for u in plan.units)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        shutil.rmtree(mnt, ignore_errors=True)
