"""What a Dask worker runs: one unit in, one committed shard out, a small summary back.

The engine is built in the first task a worker process runs and cached for the process's life
(WorkerPlugin.setup would block the worker's event loop for the minute an engine takes to start).
It runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so standard, daemonic `dask worker`
processes can host it with no extra configuration.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from softlabels.data.atomic import write_text
from softlabels.data.format import Row
from softlabels.data.writer import ShardInfo, sha256_file, write_shard
from softlabels.generate.engine import EngineConfig, Sampling, Teacher, on_cpu
from softlabels.generate.plan import STATE_DIR, Unit, read_unit

_TEACHER: list[Teacher] = []  # this worker process's engine (one at a time)


@dataclass(frozen=True)
class UnitTask:
    out: str
    unit: Unit
    engine: EngineConfig
    logprob_step: float
    # per local worker (by worker name): its CPU cores, or its GPUs (CUDA_VISIBLE_DEVICES), so
    # two engines never share a core or a GPU; empty for workers the user started
    cpu_binds: tuple[str, ...] = ()
    gpu_binds: tuple[str, ...] = ()
    sampling: Sampling | None = None  # set: the teacher writes the responses


def done_path(out: Path, unit: Unit) -> Path:
    return out / STATE_DIR / "done" / f"{unit.name}.json"


def _identity(path: Path) -> list[int]:
    """What names one version of a file without reading it: size, mtime and inode. A rename of
    another attempt's file, or a rewrite in place, changes it."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def is_done(out: Path, unit: Unit, rehash: bool = False) -> bool:
    """Committed and intact: the unit's record describes the shard now on disk.

    The record names the exact file its attempt committed (size, mtime, inode), so a rerun
    trusts it after one stat, whatever the dataset's size; only when they differ (the file was
    changed, copied, or replaced by another attempt of the same unit) is the shard hashed and
    compared with the record's sha256. `rehash` always hashes."""
    rec, shard = done_path(out, unit), out / unit.name
    if not (rec.is_file() and shard.is_file()):
        return False
    try:
        d = json.loads(rec.read_text())
        if not rehash and d.get("identity") == _identity(shard):
            return True
        return d["sha256"] == sha256_file(shard)
    except (OSError, ValueError, KeyError):
        return False


def shard_info(out: Path, unit: Unit) -> ShardInfo:
    d = json.loads(done_path(out, unit).read_text())
    return ShardInfo(**{k: d[k] for k in ShardInfo.__dataclass_fields__})


def _drop_teacher() -> None:
    if _TEACHER:
        import gc

        _TEACHER.clear()
        gc.collect()


def _teacher(task: UnitTask) -> Teacher:
    """The process's engine for this task's config; a different config replaces the old engine
    (two engines would hold two KV caches, and a long-lived worker serves one job at a time)."""
    if _TEACHER and _TEACHER[0].cfg == task.engine:
        return _TEACHER[0]
    if task.engine.tensor_parallel_size > 1:  # refuse before dropping a working engine
        _check_tensor_parallel(task.engine.tensor_parallel_size)
    _drop_teacher()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if task.gpu_binds:  # before anything initialises CUDA in this process
        from distributed import get_worker

        gpus = task.gpu_binds[int(get_worker().name) % len(task.gpu_binds)]
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus
    if task.cpu_binds:
        import torch
        from distributed import get_worker

        cores = task.cpu_binds[int(get_worker().name) % len(task.cpu_binds)]
        cpus = {int(c) for c in cores.split(",")}
        os.sched_setaffinity(0, cpus)  # two local engines never share a core
        # the nanny starts workers with one OMP thread; vLLM freezes the count at start
        torch.set_num_threads(len(cpus))
    if task.engine.tensor_parallel_size > 1:
        _bind_ranks(task.engine.tensor_parallel_size)
    _TEACHER.append(Teacher(task.engine))
    return _TEACHER[0]


def _check_tensor_parallel(tp: int) -> None:
    """A teacher split over `tp` devices runs vLLM's multiprocess executor: its rank processes
    are children of this worker, which therefore must not be daemonic."""
    import multiprocessing

    if multiprocessing.current_process().daemon:
        raise RuntimeError(
            f"--tensor-parallel-size {tp} needs non-daemonic Dask workers (vLLM starts one "
            "process per rank): start them with DASK_DISTRIBUTED__WORKER__DAEMON=False")
    if len(os.sched_getaffinity(0)) < tp and on_cpu():
        raise RuntimeError(f"--tensor-parallel-size {tp} needs {tp} cores; this worker has "
                           f"{len(os.sched_getaffinity(0))}")


def _bind_ranks(tp: int) -> None:
    """On a CPU each rank gets its own cores of this worker's (vLLM's automatic binding wants one
    NUMA node per rank), unless the user bound them (VLLM_CPU_OMP_THREADS_BIND)."""
    if on_cpu() and os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") == "auto":
        cores = sorted(os.sched_getaffinity(0))
        per = len(cores) // tp
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
            ",".join(map(str, cores[r * per:(r + 1) * per])) for r in range(tp))


def _responses(task: UnitTask, teacher: Teacher, row_ids, prompts) -> list[Row]:
    """Rows of prompt + teacher-written response; targets on the response positions only.

    Sample i of record r is row "r:i". Position t's target predicts token t+1, so the last
    prompt position predicts the first response token; the last response token has none.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(task.engine.teacher,
                                        trust_remote_code=task.engine.trust_remote_code)
    records = [int(r.split(":")[0]) for r in row_ids]
    k = task.engine.k
    rows = []
    for rec, prompt, samples in zip(records, prompts,
                                    teacher.respond(prompts, records, task.sampling)):
        for i, (resp, ids, lps) in enumerate(samples):
            P, R = len(prompt), len(resp)
            topk_ids = np.zeros((P + R, k), np.int32)
            topk_lps = np.zeros((P + R, k), np.float32)
            mask = np.zeros(P + R, bool)
            topk_ids[P - 1 : P + R - 1], topk_lps[P - 1 : P + R - 1] = ids, lps
            mask[P - 1 : P + R - 1] = True
            rows.append(Row(f"{rec}:{i}", np.asarray(prompt + resp, np.int32), topk_ids,
                            topk_lps, mask, tok.decode(resp, skip_special_tokens=True)))
    return rows


def run_unit(task: UnitTask) -> dict:
    """Score one unit's windows with the teacher and commit its shard; return a summary."""
    out = Path(task.out)
    t0 = time.perf_counter()
    teacher = _teacher(task)
    t1 = time.perf_counter()
    row_ids, windows, masks = read_unit(out, task.unit)
    try:
        if task.sampling:
            rows = _responses(task, teacher, row_ids, windows)
        else:
            rows = [
                Row(rid, np.asarray(w, np.int32), ids, lps, np.asarray(m, bool))
                for rid, w, m, (ids, lps) in zip(row_ids, windows, masks, teacher.topk(windows))
            ]
    except BaseException:
        # An engine that raised may still hold this unit's requests, whose results would come
        # back paired with the next unit's windows: never reuse it.
        _drop_teacher()
        raise
    t2 = time.perf_counter()
    info = write_shard(out / task.unit.name, rows, task.engine.k, task.logprob_step)
    # The record names the file this attempt committed (see is_done).
    record = {**asdict(info), "identity": _identity(out / task.unit.name)}
    write_text(done_path(out, task.unit), json.dumps(record))
    return {
        **asdict(info),
        "engine_start_s": t1 - t0,
        "teacher_s": t2 - t1,  # reading the unit + vLLM + arrays
        "write_s": time.perf_counter() - t2,  # encoding, compression, hashing, commit
        "pid": os.getpid(),
    }
