"""What a Dask worker runs: plan a piece of the corpus; score a unit with the teacher and commit
its file; concatenate committed units into a published shard. With a response model
(--response-model) a unit takes two tasks: the model writes its responses (`write_responses`,
committed under written/), then the teacher scores them (`run_unit`, phase "score").

The engine is built in the first task a worker process runs and cached for the process's life
(WorkerPlugin.setup would block the worker's event loop for the minute an engine takes to start).
It runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so standard, daemonic `dask worker`
processes can host it with no extra configuration. A worker keeps a scorer and a writer side by
side where both fit, and a writer given another checkpoint of its own shape takes the new weights
in place: `softlabels on-policy` alternates them every round, and on long-lived workers a round
then starts no engine at all.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from softlabels.data.atomic import atomic_path, fsync_dir, write_text
from softlabels.data.dataset import ShardInfo, sha256_file
from softlabels.data.errors import UserError
from softlabels.data.format import Encoding, Row
from softlabels.data.shard import concat_shards, write_shard
from softlabels.data.store import is_url
from softlabels.generate.engine import EngineConfig, Responder, Sampling, Teacher, on_cpu
from softlabels.generate.plan import Job, PiecePlan, Shard, Unit, plan_piece, read_unit
from softlabels.generate.state import (
    attempts_path,
    done_path,
    shard_record_path,
    unit_path,
    written_path,
)

# this worker process's engines: at most one scorer (Teacher) and one writer (Responder)
_ENGINES: dict[type, Teacher | Responder] = {}
_TOKENIZER: dict = {}  # this worker process's tokenizer, by teacher path


@dataclass(frozen=True)
class PlanTask:
    out: str
    corpus: object  # inputs.Corpus
    piece: object  # inputs.Piece
    job: Job
    fields: object  # records.Fields
    teacher: str
    trust_remote_code: bool = False
    response_budget: int = 0


def plan_task(task: PlanTask) -> PiecePlan | UserError:
    """Tokenize one piece of the corpus on this worker (inputs and teacher folder are read where
    the worker runs, as the engine reads the teacher). Bad input is returned, not raised: it is
    the user's one-line message, not a worker failure to log with a traceback."""
    from transformers import AutoTokenizer

    key = (task.teacher, task.trust_remote_code)
    if key not in _TOKENIZER:
        _TOKENIZER.clear()
        _TOKENIZER[key] = AutoTokenizer.from_pretrained(
            task.teacher, trust_remote_code=task.trust_remote_code)
    try:
        if is_url(task.out):  # an --output URL's job: the piece's files go to the store
            from softlabels.generate import objects

            return objects.plan_piece(task.out, task.corpus, task.piece, _TOKENIZER[key],
                                      task.job, task.fields, task.response_budget)
        return plan_piece(task.corpus, task.piece, _TOKENIZER[key], task.job, Path(task.out),
                          task.fields, task.response_budget)
    except UserError as e:
        return e


@dataclass(frozen=True)
class UnitTask:
    out: str
    unit: Unit
    engine: EngineConfig
    encoding: Encoding  # how the unit's shard stores the numbers (the Job's)
    # per local worker (by worker name): its CPU cores, or its GPUs (CUDA_VISIBLE_DEVICES), so
    # two engines never share a core or a GPU; empty for workers the user started
    cpu_binds: tuple[str, ...] = ()
    gpu_binds: tuple[str, ...] = ()
    sampling: Sampling | None = None  # set: the engine writes the responses
    commit: str = ""  # an --output URL's job: the write-once object the unit commits (objects)
    # "": the teacher scores the unit (and writes its responses, with `sampling`); "write": the
    # response model (`engine`) writes them; "score": the teacher scores what it wrote
    phase: str = ""


def _identity(path: Path | int) -> list[int]:
    """What names one version of a file without reading it: size, mtime and inode. A rename of
    another attempt's file, or a rewrite in place, changes it. `path` may be an open fd."""
    st = os.fstat(path) if isinstance(path, int) else path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _matches(record: Path, path: Path, rehash: bool = False) -> bool:
    """The commit record describes the file now at `path`.

    The record names the exact file its attempt committed (size, mtime, inode), so a rerun
    trusts it after one stat, whatever the dataset's size; only when they differ (the file was
    changed, copied, or replaced by another attempt) is the file hashed and compared with the
    record's sha256. `rehash` always hashes."""
    if not (record.is_file() and path.is_file()):
        return False
    try:
        d = json.loads(record.read_text())
        if not rehash and d.get("identity") == _identity(path):
            return True
        return d["sha256"] == sha256_file(path)
    except (OSError, ValueError, KeyError):
        return False


def is_done(out: Path, unit: Unit, rehash: bool = False) -> bool:
    """The unit's file is committed and intact (before it is concatenated into its shard)."""
    return _matches(done_path(out, unit), unit_path(out, unit), rehash)


def is_written(out: Path, unit: Unit, rehash: bool = False) -> bool:
    """The response model's responses to the unit's prompts are committed and intact."""
    return _matches(written_path(out, unit, ".json"), written_path(out, unit), rehash)


def is_published(out: Path, shard: Shard, rehash: bool = False) -> bool:
    """The shard was made from committed units and is intact."""
    return _matches(shard_record_path(out, shard), out / shard.name, rehash)


def shard_info(out: Path, shard: Shard) -> ShardInfo:
    d = json.loads(shard_record_path(out, shard).read_text())
    return ShardInfo(**{k: d[k] for k in ShardInfo.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class MergeTask:
    out: str
    shard: Shard


def merge_shard(task: MergeTask) -> dict:
    """Concatenate a shard's committed units into the published file and record it.

    Each unit file is opened, then checked against its commit record through the open handle,
    so a late attempt that replaces a unit file meanwhile cannot mix into the shard. A shard of
    one unit is a hard link to it: nothing is rewritten."""
    out = Path(task.out)
    units = [Unit(0, 0, name, 0, 0) for name in task.shard.units]
    handles = [open(unit_path(out, u), "rb") for u in units]
    try:
        for u, fh in zip(units, handles):
            rec = json.loads(done_path(out, u).read_text())
            if rec.get("identity") != _identity(fh.fileno()) and \
                    rec["sha256"] != sha256_file(f"/proc/self/fd/{fh.fileno()}"):
                raise RuntimeError(f"unit {u.name} no longer matches its commit record")
        path = out / task.shard.name
        if len(handles) == 1:
            rec = json.loads(done_path(out, units[0]).read_text())
            tmp = path.with_name(f".{path.name}.link")
            tmp.unlink(missing_ok=True)
            os.link(unit_path(out, units[0]), tmp)
            if _identity(tmp) != _identity(handles[0].fileno()):  # replaced since it was checked
                tmp.unlink()
                raise RuntimeError(f"unit {units[0].name} was replaced while it was published")
            os.replace(tmp, path)
            fsync_dir(path.parent)
            info = ShardInfo(**{**{k: rec[k] for k in ShardInfo.__dataclass_fields__
                                   if k in rec}, "file": path.name})
        else:
            info = concat_shards(path, handles)
    finally:
        for fh in handles:
            fh.close()
    record = {**asdict(info), "identity": _identity(path), "units": task.shard.units}
    write_text(shard_record_path(out, task.shard), json.dumps(record))
    return asdict(info)


def drop_engines() -> None:
    import gc

    _ENGINES.clear()
    gc.collect()


def _same_build(a: EngineConfig, b: EngineConfig) -> bool:
    """Whether one engine serves both configs: the seed only seeds what the job draws itself
    (every request carries its own seed, and `cfg.seed` is read per call), not the engine."""
    return replace(a, seed=0) == replace(b, seed=0)


def _shape(model: str) -> list | None:
    """What an engine reads of a checkpoint besides its weights: config.json and
    generation_config.json, less their bookkeeping; None if unreadable."""
    out = []
    for name in ("config.json", "generation_config.json"):
        try:
            c = json.loads((Path(model) / name).read_text())
        except FileNotFoundError:
            c = None
        except (OSError, ValueError):
            return None
        out.append(c and {k: v for k, v in c.items()
                          if k not in ("_name_or_path", "transformers_version")})
    return out


def _reloadable(have: EngineConfig, want: EngineConfig) -> bool:
    """Another checkpoint of the same shape, under the same engine settings: vLLM loads its
    weights into the running engine (`reload_weights`) as they would load into a new one."""
    shape = _shape(have.teacher)
    return (have.teacher != want.teacher and shape is not None and shape == _shape(want.teacher)
            and _same_build(replace(have, teacher=want.teacher), want))


def _fits_beside(other: EngineConfig, new: EngineConfig) -> bool:
    """Whether a second engine fits beside `other`. On a CPU each holds its KV cache
    (`kv_cache_gib`) and weights in RAM. On a GPU vLLM gives each engine its
    `gpu_memory_utilization` of the device (0.9 unless given), so two fit only when the user
    split it (--engine-arg gpu_memory_utilization=0.45)."""
    if not on_cpu():
        share = [dict(c.extra).get("gpu_memory_utilization") for c in (other, new)]
        return None not in share and sum(share) <= 0.9
    import psutil

    weights = sum(f.stat().st_size for f in Path(new.teacher).glob("*.safetensors"))
    return psutil.virtual_memory().available > 2 * (new.kv_cache_gib * 2**30 + weights)


def _reuse(kind: type, task: UnitTask) -> tuple[Teacher | Responder, str] | None:
    """This process's engine of `kind`, if it serves the task as it is ("kept") or with the new
    checkpoint's weights loaded in place ("reloaded", writers only); else None. Apart from
    _teacher so that no reference to an engine about to be replaced stays in its frame."""
    have = _ENGINES.get(kind)
    if have is not None and _same_build(have.cfg, task.engine):
        have.cfg = task.engine
        return have, "kept"
    if have is not None and kind is Responder and _reloadable(have.cfg, task.engine):
        have.llm.collective_rpc("reload_weights", kwargs={"weights_path": task.engine.teacher})
        have.cfg = task.engine
        return have, "reloaded"
    return None


def _teacher(task: UnitTask) -> tuple[Teacher | Responder, str]:
    """The process's engine for this task, and how it came: "kept" (built for an earlier task),
    "reloaded" (a writer given its new checkpoint's weights in place) or "built"."""
    kind = Responder if task.sampling else Teacher
    reused = _reuse(kind, task)
    if reused is not None:
        return reused
    if task.engine.tensor_parallel_size > 1:  # refuse before dropping a working engine
        _check_tensor_parallel(task.engine.tensor_parallel_size)
    # vLLM keeps some engine state per process, and an engine's teardown takes it down: an
    # engine is never dropped beside another, nor finalised after the next one is built (so no
    # reference to it may outlive drop_engines). Measured safe: building one beside another,
    # reloading one, using both.
    if kind in _ENGINES or any(not _fits_beside(e.cfg, task.engine) for e in _ENGINES.values()):
        drop_engines()
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
    _ENGINES[kind] = kind(task.engine)
    return _ENGINES[kind], "built"


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
        for i, (resp, ids, lps, tail, label) in enumerate(samples):
            P, R = len(prompt), len(resp)
            topk_ids = np.zeros((P + R, k), np.int32)
            topk_lps = np.zeros((P + R, k), np.float32)
            tails = np.zeros(P + R, np.float32)
            labels = np.full(P + R, np.nan, np.float32)
            mask = np.zeros(P + R, bool)
            at = slice(P - 1, P + R - 1)  # position t predicts token t + 1: the response
            topk_ids[at], topk_lps[at], tails[at], labels[at] = ids, lps, tail, label
            mask[at] = True
            rows.append(Row(f"{rec}:{i}", np.asarray(prompt + resp, np.int32), topk_ids,
                            topk_lps, mask, tok.decode(resp, skip_special_tokens=True),
                            tail_logprob=tails, label_logprob=labels))
    return rows


WRITTEN_SCHEMA = pa.schema([("row_id", pa.string()), ("response", pa.list_(pa.int32())),
                            ("writer_logprob", pa.list_(pa.float32()))])


def write_responses(task: UnitTask) -> dict:
    """The response model answers the unit's prompts; its tokens and its own log-prob of each
    are committed (written/<unit>), for the teacher's pass. Ids only: no text round trip, so the
    teacher scores exactly the tokens the model sampled."""
    out = Path(task.out)
    t0 = time.perf_counter()
    writer, how = _teacher(task)
    t1 = time.perf_counter()
    row_ids, prompts, _ = read_unit(out, task.unit)
    records = [int(r.split(":")[0]) for r in row_ids]
    try:
        answers = writer.respond(prompts, records, task.sampling)
    except BaseException:
        drop_engines()
        raise
    t2 = time.perf_counter()
    ids, resps, lps = [], [], []
    for rec, samples in zip(records, answers):
        for i, (resp, _, _, _, lp) in enumerate(samples):
            ids.append(f"{rec}:{i}")
            resps.append(resp)
            lps.append(np.minimum(np.asarray(lp, np.float32), 0.0))
    path = written_path(out, task.unit)
    with atomic_path(path) as tmp:
        pq.write_table(pa.table([ids, resps, lps], schema=WRITTEN_SCHEMA), tmp)
    summary = {"rows": len(ids), "tokens": int(sum(map(len, resps))),
               "unit_tokens": task.unit.tokens, "engine_start_s": t1 - t0, "engine": how,
               "teacher_s": t2 - t1, "write_s": time.perf_counter() - t2, "pid": os.getpid()}
    write_text(written_path(out, task.unit, ".json"), json.dumps(
        {**summary, "sha256": sha256_file(path), "identity": _identity(path)}))
    return summary


def _score_written(task: UnitTask, teacher: Teacher, row_ids, prompts) -> list[Row]:
    """Rows of prompt + the response model's response, scored by the teacher: targets, exact
    tail and label log-prob on the response positions (aligned as `_responses`), with the
    writer's log-prob of each written token beside the label."""
    from transformers import AutoTokenizer

    out = Path(task.out)
    if not is_written(out, task.unit):
        raise RuntimeError(f"unit {task.unit.name}: its written responses no longer match their "
                           "record; rerun the same command to write them again")
    written = pq.read_table(written_path(out, task.unit)).to_pydict()
    prompt_of = {int(r.split(":")[0]): p for r, p in zip(row_ids, prompts)}
    rids = written["row_id"]
    windows = [prompt_of[int(r.split(":")[0])] + resp
               for r, resp in zip(rids, written["response"])]
    tok = AutoTokenizer.from_pretrained(task.engine.teacher,
                                        trust_remote_code=task.engine.trust_remote_code)
    rows = []
    for rid, w, resp, wlp, t in zip(rids, windows, written["response"],
                                    written["writer_logprob"], teacher.outputs(windows, rids)):
        P, R = len(w) - len(resp), len(resp)
        mask = np.zeros(P + R, bool)
        mask[P - 1:P + R - 1] = True  # position t predicts token t + 1: the response
        writer = np.full(P + R, np.nan, np.float32)
        writer[P - 1:P + R - 1] = wlp
        label = np.where(mask, t.label_logprob, np.nan).astype(np.float32)
        rows.append(Row(rid, np.asarray(w, np.int32), t.topk_ids, t.topk_logprobs, mask,
                        tok.decode(resp, skip_special_tokens=True), tail_logprob=t.tail_logprob,
                        label_logprob=label, writer_logprob=writer))
    return rows


def _log_attempt(out: Path, unit: Unit) -> None:
    """One line per time a unit reaches the teacher: how much teacher work lost workers cost
    (lines beyond the number of units). An append of one short line is atomic on POSIX."""
    with open(attempts_path(out), "a") as f:
        f.write(f"{unit.name} {os.getpid()} {time.time():.3f}\n")


def run_unit(task: UnitTask) -> dict:
    """Score one unit's windows with the teacher and commit its shard; return a summary."""
    from softlabels.generate import objects

    out = Path(task.out)
    t0 = time.perf_counter()
    teacher, how = _teacher(task)
    t1 = time.perf_counter()
    if task.commit:
        objects.log_attempt(task.out, task.unit)
        row_ids, windows, masks = objects.read_unit(task.out, task.unit)
    else:
        _log_attempt(out, task.unit)
        row_ids, windows, masks = read_unit(out, task.unit)
    try:
        if task.phase == "score":
            rows = _score_written(task, teacher, row_ids, windows)
        elif task.sampling:
            rows = _responses(task, teacher, row_ids, windows)
        else:
            rows = [
                Row(rid, np.asarray(w, np.int32), t.topk_ids, t.topk_logprobs,
                    np.asarray(m, bool), sample_ids=t.sample_ids, sample_counts=t.sample_counts,
                    tail_logprob=t.tail_logprob, label_logprob=t.label_logprob)
                for rid, w, m, t in zip(row_ids, windows, masks,
                                        teacher.outputs(windows, row_ids))
            ]
            if task.engine.draws:  # positions without a target store no samples
                for r in rows:
                    r.sample_counts[~r.target_mask] = 0
    except BaseException:
        # An engine that raised may still hold this unit's requests, whose results would come
        # back paired with the next unit's windows: never reuse it.
        drop_engines()
        raise
    t2 = time.perf_counter()
    if task.commit:
        return objects.commit_unit(task.out, task.commit, task.unit, rows, task.encoding, {
            "engine_start_s": t1 - t0, "engine": how, "teacher_s": t2 - t1,
            "pid": os.getpid()})
    path = unit_path(out, task.unit)
    info = write_shard(path, rows, task.encoding)
    summary = {
        **asdict(info),
        "engine_start_s": t1 - t0,
        "engine": how,  # built, kept or reloaded
        "teacher_s": t2 - t1,  # reading the unit + vLLM + arrays
        "write_s": time.perf_counter() - t2,  # encoding, compression, hashing, commit
        "pid": os.getpid(),
    }
    # The record names the file this attempt committed (see _matches), and what it cost.
    write_text(done_path(out, task.unit), json.dumps({**summary, "identity": _identity(path)}))
    return summary
