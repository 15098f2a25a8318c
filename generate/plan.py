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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from softlabels.data.atomic import atomic_path, write_text
from softlabels.data.errors import UserError
from softlabels.data.format import row_id

STATE_DIR = ".softlabels"
PLAN_SCHEMA = pa.schema([("row_id", pa.string()), ("input_ids", pa.list_(pa.int32())),
                         ("target_mask", pa.list_(pa.bool_()))])


@dataclass(frozen=True)
class Job:
    """Everything that changes the output: two runs with equal Jobs produce the same dataset."""

    teacher_hash: str
    input_fingerprint: str
    k: int
    max_length: int
    unit_tokens: int
    logprob_step: float
    fields: str = "text"  # which columns mean what (records.Fields)
    sampling: str = ""  # teacher-written responses: the sampling settings, else ""
    engine: str = ""  # what else changes the numbers: dtype, engine args, vLLM version, code

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
    too_long: list = field(default_factory=list)  # prompts that leave no room to respond

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


def make_plan(corpus, tokenizer, job: Job, out: Path, fields, response_budget: int = 0,
              batch: int = 256) -> Plan:
    """Tokenize `corpus`, write the plan files under `out`, return the plan.

    With a `response_budget` (max new tokens x samples), rows hold prompts (one window each,
    mask empty) for the teacher to answer, and each costs its prompt plus that budget.
    """
    from softlabels.generate.records import prompt_ids, tokenize

    jid = job.id()
    units: list[Unit] = []
    records = empty = total = 0
    too_long: list[int] = []
    pending: list[tuple[str, list[int], list[bool]]] = []
    pending_tokens = 0

    def close_unit(w: pq.ParquetWriter) -> None:
        nonlocal pending, pending_tokens
        i = len(units)
        name = f"shard-{i:05d}-{jid[:8]}.parquet"
        cols = list(zip(*pending))
        w.write_table(
            pa.table({"row_id": cols[0], "input_ids": cols[1], "target_mask": cols[2]},
                     schema=PLAN_SCHEMA),
            row_group_size=len(pending),
        )
        units.append(Unit(i, name, len(pending), pending_tokens))
        pending, pending_tokens = [], 0

    def add(w, rid: str, ids: list[int], mask: list[bool], cost: int) -> None:
        nonlocal pending_tokens, total
        if pending and pending_tokens + cost > job.unit_tokens:
            close_unit(w)
        pending.append((rid, ids, mask))
        pending_tokens += cost
        total += len(ids)

    def encode_batch(values: list[tuple]) -> list[tuple[list[int], list[bool]]]:
        if not fields.chat:  # plain text: the tokenizer's fast batch path
            bad = [i for i, v in enumerate(values) if not isinstance(v[0], str | None)]
            if bad:
                raise UserError(f"record {records + bad[0]}: column {fields.text!r} is "
                                f"{type(values[bad[0]][0]).__name__}, not text")
            texts = [v[0] or "" for v in values]  # a null cell is an empty record (counted)
            enc = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
            return [(ids, [True] * len(ids)) if t.strip() else ([], [])
                    for t, ids in zip(texts, enc)]
        return [tokenize(v, fields, tokenizer, records + i) for i, v in enumerate(values)]

    bar = tqdm(desc="planning", unit=" records", leave=False)
    with atomic_path(plan_path(out)) as tmp, pq.ParquetWriter(tmp, PLAN_SCHEMA) as w:
        values: list[tuple] = []

        def flush() -> None:
            nonlocal records, empty
            if response_budget:
                for v in values:
                    ids = prompt_ids(v, fields, tokenizer, records)
                    if not ids:
                        empty += 1
                    elif len(ids) >= job.max_length:
                        too_long.append(records)
                    else:
                        add(w, row_id(records, 0), ids, [], len(ids) + response_budget)
                    records += 1
            else:
                for ids, mask in encode_batch(values):
                    if not ids:
                        empty += 1
                    for wi, a in enumerate(range(0, len(ids), job.max_length)):
                        b = a + job.max_length
                        add(w, row_id(records, wi), ids[a:b], mask[a:b], len(ids[a:b]))
                    records += 1
            bar.update(len(values))
            values.clear()

        for v in corpus.records():
            values.append(v)
            if len(values) == batch:
                flush()
        flush()
        if pending:
            close_unit(w)
    bar.close()
    if total == 0:
        plan_path(out).unlink(missing_ok=True)
        raise UserError(
            f"input has no usable records ({records} records, {empty} empty, {len(too_long)} "
            "prompts too long): check the input path, the column options and --max-length"
        )
    plan = Plan(jid, units, records, empty, total, too_long)
    write_text(out / STATE_DIR / "plan.json", json.dumps(asdict(plan)) + "\n")
    return plan


def read_unit(out: Path, unit: Unit) -> tuple[list[str], list[list[int]], list[list[bool]]]:
    t = pq.ParquetFile(plan_path(out)).read_row_group(unit.index)
    return (t.column("row_id").to_pylist(), t.column("input_ids").to_pylist(),
            t.column("target_mask").to_pylist())
