"""A job whose --output is a URL: its state as write-once objects in the store, so that Dask
workers sharing no filesystem with the client (a cloud cluster's) write the dataset themselves.

A store has no rename, lock or append. It has whole objects and a conditional write (S3's
If-None-Match: *, `Store.create`): an object appears whole or not at all, and of two writers of one
name only the first succeeds. So every commit is one write-once object, named by the plan:

    .softlabels/job.json              the Job (a different job at this URL is refused)
    .softlabels/plan/piece-NNNNN.*    the plan's pieces, each planned by a worker (the .json last)
                                      or, when only the client can read the input, by the client
    .softlabels/plan.json             written after every piece
    <shard>.parquet                   a shard of one unit: that unit's commit itself
    .softlabels/units/<unit>          a unit of a shard of several units: its commit
    .softlabels/done/<unit>.json      what a committed unit holds and cost (written after it)
    .softlabels/attempts/<unit>.<host>.<pid>.<time>  one empty object per teacher attempt
    <shard>.parquet                   a shard of several units, concatenated by a worker
    .softlabels/shards/<shard>.json   the shard's manifest entry
    tokenizer/, index.parquet, README.md, then manifest.json last

Exactly once: the first attempt to write a unit's name commits it; a later one (a retried task,
a rerun, a worker presumed dead) finds the name taken and drops its rows. Everything after a unit
is made from committed objects, which never change, so a step redone after an interruption makes
the same object or finds it made. Two runs at once are safe for the same reason (no lock needed).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from softlabels.data.dataset import MANIFEST, ShardInfo, hashes
from softlabels.data.errors import UserError
from softlabels.data.store import Store, store

STATE = ".softlabels"
JOB = f"{STATE}/job.json"
PLAN = f"{STATE}/plan.json"


def read_json(st: Store, name: str) -> dict | None:
    try:
        return json.loads(st.cat(name))
    except (FileNotFoundError, UserError):  # (a store's not-found is a UserError)
        if st.exists(name):
            raise
        return None


def check_output(url: str) -> None:
    """Before any engine starts: a store whose conditional writes we know (S3 and S3 APIs, a
    file:// folder); it answers, with credentials; the bucket exists."""
    scheme = url.split("://", 1)[0]
    if scheme not in ("s3", "s3a", "file"):
        raise UserError(f"--output {url}: workers commit units by conditional writes, which "
                        f"softlabels uses on s3:// (AWS or any S3 API) and file:// only; generate "
                        f"into a folder, then `softlabels push FOLDER {url}`")
    if bucket := store(url).bucket_missing():
        raise UserError(f"--output {url}: bucket '{bucket}' does not exist (or these "
                        "credentials cannot see it); create it first")


def claim(st: Store, job) -> None:
    """Record which job the URL holds (first writer wins); refuse a different one."""
    held = read_json(st, JOB)
    if held is None:
        if st.exists(MANIFEST):
            raise UserError(f"--output {st.url} holds a dataset this job did not write; use a new "
                            "URL")
        if st.create(JOB, json.dumps({"id": job.id(), "job": asdict(job)}, indent=1).encode()):
            return
        held = read_json(st, JOB)
    if held.get("id") != job.id():
        raise UserError(f"--output {st.url} holds a different job (teacher, input, settings or "
                        "softlabels version differ); use a new URL, or delete that one to start "
                        "over")


def load_plan(st: Store):
    from softlabels.generate.plan import Plan

    d = read_json(st, PLAN)
    return None if d is None else Plan.from_dict(d)


def load_piece(st: Store, piece: int):
    from softlabels.generate.plan import PiecePlan, Unit

    d = read_json(st, f"{STATE}/plan/piece-{piece:05d}.json")
    if d is None:
        return None
    d["units"] = [Unit(**u) for u in d["units"]]
    return PiecePlan(**d)


def _upload_pieces(st: Store, folder: Path) -> None:
    """A temp folder's plan pieces to the store, each piece's .json after its .parquet."""
    from softlabels.generate.state import state_dir

    files = sorted((state_dir(folder) / "plan").iterdir())
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda f: st.create(f"{STATE}/plan/{f.name}", f),
                      [f for f in files if f.suffix == ".parquet"]))
        list(pool.map(lambda f: st.create(f"{STATE}/plan/{f.name}", f),
                      [f for f in files if f.suffix == ".json"]))


def plan_piece(url: str, corpus, piece, tokenizer, job, fields, response_budget: int):
    """One piece planned on a worker (which reads the input: a URL, or the embedded cluster's
    disk), its files written once to the store."""
    from softlabels.generate import plan as planning

    with tempfile.TemporaryDirectory(prefix="softlabels-plan-") as tmp:
        result = planning.plan_piece(corpus, piece, tokenizer, job, Path(tmp), fields,
                                     response_budget)
        _upload_pieces(store(url), Path(tmp))
    return result


def finish_plan(st: Store, job, pieces):
    """Every piece planned: plan.json, written once."""
    from softlabels.generate import plan as planning
    from softlabels.generate.state import plan_path

    with tempfile.TemporaryDirectory(prefix="softlabels-plan-") as tmp:
        plan = planning.finish_plan(Path(tmp), job, pieces)
        st.create(PLAN, plan_path(Path(tmp)).read_bytes())
    return plan


def make_plan(st: Store, corpus, job, fields, teacher: str, trust_remote_code: bool,
              response_budget: int):
    """Plan on the client, when only it can read the input (a local input, workers elsewhere):
    in a temp folder, then the pieces and plan.json to the store."""
    from transformers import AutoTokenizer

    from softlabels.generate import plan as planning
    from softlabels.generate.state import plan_path

    tok = AutoTokenizer.from_pretrained(teacher, trust_remote_code=trust_remote_code)
    with tempfile.TemporaryDirectory(prefix="softlabels-plan-") as tmp:
        plan = planning.make_plan(corpus, tok, job, Path(tmp), fields, response_budget)
        _upload_pieces(st, Path(tmp))
        st.create(PLAN, plan_path(Path(tmp)).read_bytes())
    return plan


def commit_names(plan) -> dict[str, str]:
    """unit -> the object its commit writes: a shard of one unit is that unit's file itself."""
    return {name: s.name if len(s.units) == 1 else f"{STATE}/units/{name}"
            for s in plan.shards for name in s.units}


def committed(st: Store, plan) -> set[str]:
    """The units whose commit objects exist: two listings, whatever the number of units."""
    st.fs.invalidate_cache()  # another process wrote them: no listing from before
    there = set(st.files("")) | set(st.files(f"{STATE}/units"))
    return {u for u, name in commit_names(plan).items() if name in there}


def recorded(st: Store, plan) -> set[str]:
    """The shards whose manifest entries are written."""
    st.fs.invalidate_cache()
    there = set(st.files(f"{STATE}/shards"))
    return {s.name for s in plan.shards if f"{STATE}/shards/{s.name}.json" in there}


_PIECE: dict = {}  # this worker process's last plan piece read: (url, piece) -> bytes


def read_unit(url: str, unit) -> tuple[list[str], list[list[int]], list[list[bool]]]:
    """A unit's windows from its plan piece in the store (one download per piece and process:
    a worker's units come mostly in plan order)."""
    key = (url, unit.piece)
    if key not in _PIECE:
        _PIECE.clear()
        _PIECE[key] = store(url).cat(f"{STATE}/plan/piece-{unit.piece:05d}.parquet")
    t = pq.ParquetFile(pa.BufferReader(_PIECE[key])).read_row_group(unit.group)
    return (t.column("row_id").to_pylist(), t.column("input_ids").to_pylist(),
            t.column("target_mask").to_pylist())


def log_attempt(url: str, unit) -> None:
    """One empty object per time a unit reaches the teacher (a store has no append)."""
    store(url).create(f"{STATE}/attempts/{unit.name}.{socket.gethostname()}.{os.getpid()}."
                      f"{time.time():.6f}", b"")


def attempts(st: Store) -> int:
    st.fs.invalidate_cache()
    return len(st.files(f"{STATE}/attempts"))


def commit_unit(url: str, name: str, unit, rows, encoding, summary: dict) -> dict:
    """Write the unit's shard file as the write-once object `name`; then its done record. If the
    name is taken, another attempt committed this unit first: its object stays, these rows go."""
    from softlabels.data.shard import write_shard

    st = store(url)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="softlabels-unit-") as tmp:
        info = write_shard(Path(tmp) / "unit.parquet", rows, encoding)
        won = st.create(name, Path(tmp) / "unit.parquet")
    summary = {**summary, **asdict(info), "file": Path(name).name,
               "write_s": time.perf_counter() - t}
    if won:
        st.create(f"{STATE}/done/{unit.name}.json", json.dumps(summary).encode())
    return {**summary, "committed": won}


def _info_of(st: Store, name: str) -> dict:
    """A stored shard's manifest entry, from the object itself (its done record was lost)."""
    from softlabels.data.counts import read_row_counts

    with tempfile.TemporaryDirectory(prefix="softlabels-shard-") as tmp:
        path = Path(tmp) / "shard.parquet"
        st.download(name, path)
        md = pq.read_metadata(path)
        tokens = int(read_row_counts(md.metadata, md.num_rows)[0].sum())
        return asdict(ShardInfo(file=name, rows=md.num_rows, tokens=tokens, **hashes(path)))


def merge_shard(url: str, shard) -> dict:
    """Make the shard's manifest entry: a one-unit shard is its unit's commit (the entry is the
    unit's done record); a shard of several is concatenated here from its committed units and
    written once. Runs on a worker: the units go from the store to the store, not the client."""
    from softlabels.data.shard import concat_shards

    st = store(url)
    if len(shard.units) == 1:
        done = read_json(st, f"{STATE}/done/{shard.units[0]}.json")
        info = {k: done[k] for k in ShardInfo.__dataclass_fields__} if done else \
            _info_of(st, shard.name)
    elif st.exists(shard.name):  # an earlier merge wrote it, then stopped before its record
        info = _info_of(st, shard.name)
    else:
        with tempfile.TemporaryDirectory(prefix="softlabels-merge-") as tmp:
            paths = [Path(tmp) / f"{i}.parquet" for i in range(len(shard.units))]
            for u, p in zip(shard.units, paths):
                st.download(f"{STATE}/units/{u}", p)
            handles = [open(p, "rb") for p in paths]
            try:
                info = asdict(concat_shards(Path(tmp) / shard.name, handles))
            finally:
                for fh in handles:
                    fh.close()
            if not st.create(shard.name, Path(tmp) / shard.name):  # a merge at the same time
                info = _info_of(st, shard.name)
    info["file"] = shard.name
    st.create(f"{STATE}/shards/{shard.name}.json", json.dumps(info).encode())
    return info


def shard_infos(st: Store, plan) -> list[ShardInfo]:
    with ThreadPoolExecutor(16) as pool:
        records = list(pool.map(lambda s: read_json(st, f"{STATE}/shards/{s.name}.json"),
                                plan.shards))
    return [ShardInfo(**{k: d[k] for k in ShardInfo.__dataclass_fields__}) for d in records]


def _index(st: Store, shards) -> pa.Table:
    """index.parquet's table from the stored shards' footers (ranged reads, hashes checked)."""
    from softlabels.data.counts import footer_rows, rows_table

    def rows(si_s):
        si, s = si_s
        off, n, digest = s.footer
        data = st.cat(s.file, off, off + n)
        if hashlib.sha256(data).hexdigest() != digest:
            raise UserError(f"{st.where(s.file)}: its footer differs from its record; the object "
                            "was changed after it was written: delete it and rerun")
        return footer_rows(si, pq.read_metadata(pa.BufferReader(b"PAR1" + data)), None)

    with ThreadPoolExecutor(16) as pool:
        return rows_table(list(pool.map(rows, enumerate(shards))))


def publish(st: Store, m, tokenizer) -> None:
    """Tokenizer, index and card, then the manifest last; then the units the shards replaced."""
    from softlabels.data.card import publish as publish_folder
    from softlabels.data.dataset import save_tokenizer

    with tempfile.TemporaryDirectory(prefix="softlabels-publish-") as tmp:
        save_tokenizer(tokenizer, tmp)
        publish_folder(tmp, m, index=_index(st, m.shards))
        files = sorted(p for p in Path(tmp).rglob("*") if p.is_file() and p.name != MANIFEST)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda p: st.upload(p.relative_to(tmp).as_posix(), p), files))
        st.put(MANIFEST, (Path(tmp) / MANIFEST).read_bytes())
    st.delete(st.files(f"{STATE}/units"))
