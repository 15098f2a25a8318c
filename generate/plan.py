"""Planning: tokenize the corpus once, cut records into windows, pack windows into work units.

The plan is written (atomically) before any work starts: `.softlabels/plan.parquet` holds every
window's row_id and token ids, one row group per unit, and `.softlabels/plan.json` the units'
names and sizes. A unit's name derives from the job's identity and its index, so a rerun of the
same command finds the shards it already committed.

Window policy: a record of n tokens becomes ceil(n / max_length) windows of consecutive tokens
(the last may be shorter). Windows do not overlap, so every token lands in exactly one; the first
tokens of a later window are scored without the earlier window as context.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from data.atomic import atomic_path, write_text
from data.errors import UserError
from data.format import row_id

STATE_DIR = ".softlabels"
PLAN_SCHEMA = pa.schema([("row_id", pa.string()), ("input_ids", pa.list_(pa.int32()))])


@dataclass(frozen=True)
class Job:
    """Everything that changes the output: two runs with equal Jobs produce the same dataset."""

    teacher_hash: str
    input_fingerprint: str
    k: int
    max_length: int
    unit_tokens: int
    logprob_step: float

    def id(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


@dataclass
class Unit:
    index: int
    name: str  # the shard file it produces
    rows: int
    tokens: int


@dataclass
class Plan:
    job_id: str
    units: list[Unit]
    records: int
    empty_records: int
    tokens: int

    @classmethod
    def load(cls, out: Path) -> Plan | None:
        path = out / STATE_DIR / "plan.json"
        if not path.is_file():
            return None
        d = json.loads(path.read_text())
        d["units"] = [Unit(**u) for u in d["units"]]
        return cls(**d)


def plan_path(out: Path) -> Path:
    return out / STATE_DIR / "plan.parquet"


def windows(tokens: list[int], max_length: int) -> list[list[int]]:
    return [tokens[i : i + max_length] for i in range(0, len(tokens), max_length)]


def make_plan(corpus, tokenizer, job: Job, out: Path, batch: int = 256) -> Plan:
    """Tokenize `corpus`, write the plan files under `out`, return the plan."""
    jid = job.id()
    units: list[Unit] = []
    records = empty = total = 0
    pending: list[tuple[str, list[int]]] = []
    pending_tokens = 0

    def close_unit(w: pq.ParquetWriter) -> None:
        nonlocal pending, pending_tokens
        i = len(units)
        name = f"shard-{i:05d}-{jid[:8]}.parquet"
        w.write_table(
            pa.table(
                {"row_id": [r for r, _ in pending], "input_ids": [t for _, t in pending]},
                schema=PLAN_SCHEMA,
            ),
            row_group_size=len(pending),
        )
        units.append(Unit(i, name, len(pending), pending_tokens))
        pending, pending_tokens = [], 0

    bar = tqdm(desc="planning", unit=" records", leave=False)
    with atomic_path(plan_path(out)) as tmp, pq.ParquetWriter(tmp, PLAN_SCHEMA) as w:
        texts: list[str] = []

        def flush_texts() -> None:
            nonlocal records, empty, total, pending_tokens
            encoded = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
            for text, ids in zip(texts, encoded):
                if not text.strip() or not ids:
                    empty += 1
                else:
                    for wi, win in enumerate(windows(ids, job.max_length)):
                        if pending and pending_tokens + len(win) > job.unit_tokens:
                            close_unit(w)
                        pending.append((row_id(records, wi), win))
                        pending_tokens += len(win)
                        total += len(win)
                records += 1
            bar.update(len(texts))
            texts.clear()

        for text in corpus.texts():
            texts.append(text)
            if len(texts) == batch:
                flush_texts()
        flush_texts()
        if pending:
            close_unit(w)
    bar.close()
    if total == 0:
        plan_path(out).unlink(missing_ok=True)
        raise UserError(
            f"input has no text ({records} records, all empty): check the input path and "
            "--text-column"
        )
    plan = Plan(jid, units, records, empty, total)
    write_text(out / STATE_DIR / "plan.json", json.dumps(asdict(plan)) + "\n")
    return plan


def read_unit(out: Path, unit: Unit) -> tuple[list[str], list[list[int]]]:
    t = pq.ParquetFile(plan_path(out)).read_row_group(unit.index)
    return t.column("row_id").to_pylist(), t.column("input_ids").to_pylist()
