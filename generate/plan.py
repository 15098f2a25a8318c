"""Planning: tokenize the corpus, cut records into windows, pack windows into work units.

The corpus is planned piece by piece (inputs.Piece), each piece by one Dask task: it writes
`plan/piece-NNNNN.parquet` in the state folder (state.py: its windows' row_id, token ids and
target mask, one row group per unit) and then `piece-NNNNN.json` (its units and counts), both
atomically. A unit's windows never span pieces, so the teacher can start on a piece's units
while later pieces are still being tokenized, and a rerun plans only the pieces that have no
record yet. When every
piece is planned, `plan.json` lists all units and how they are grouped into published shards
(`--shard-tokens`: many units per file, so 10B tokens make a few thousand files, not 76k).

Names derive from the job's identity and the unit's place, so a rerun of the same command finds
the units it already committed.

Window policy (`windows`): a record of n tokens is cut into windows of at most max_length tokens,
and every position carries its target in exactly one window. Without a stride the windows do not
overlap (the first tokens of a later window are scored with no context); with `--stride S` each
later window starts with the max_length - S tokens before it as context only (mask false), then
S new positions, so the teacher scores max_length / S times the tokens.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from softlabels.data.atomic import atomic_path, write_text
from softlabels.data.errors import UserError
from softlabels.data.format import FORMAT_VERSION, Encoding, row_id
from softlabels.generate.state import job_path, piece_path, plan_path

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
    draws: int = 0  # --samples
    sample_temperature: float = 1.0
    seed: int = 0  # of the samples and of teacher-written responses
    shard_tokens: int = 0  # units are concatenated into shards of up to this many tokens
    stride: int = 0  # new positions per later window; 0: max_length (no overlap)
    piece_bytes: int = 0  # how the corpus is cut for planning (inputs.PIECE_BYTES)
    fields: str = "text"  # which columns mean what (records.Fields)
    sampling: str = ""  # written responses: the sampling settings, else ""
    response_model: str = ""  # --response-model: the checkpoint that writes them, by content
    engine: str = ""  # what else changes the numbers: dtype, engine args, vLLM version
    # the code that writes the numbers: a job resumed by another version would mix two formats
    format_version: int = FORMAT_VERSION
    softlabels: str = field(default_factory=lambda: softlabels_version())

    @property
    def encoding(self) -> Encoding:
        """How the job's shards store the teacher's numbers."""
        return Encoding(self.k, self.logprob_step, self.draws, self.sample_temperature)

    def id(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


def softlabels_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("softlabels")
    except PackageNotFoundError:  # run from a checkout without installing it
        return "unknown"


@dataclass
class Unit:
    piece: int
    group: int  # row group of the piece's plan file
    name: str  # the file it commits, under .softlabels/units/
    rows: int
    tokens: int


@dataclass
class PiecePlan:
    """What planning one piece found: its units, and the counts the final report sums."""

    piece: int
    records: int
    empty_records: int
    tokens: int
    too_long: list[int]
    units: list[Unit]
    context_windows: int = 0  # windows with no target position: never sent to the teacher
    untargeted: list[int] = field(default_factory=list)  # records with no target at all

    @classmethod
    def load(cls, out: Path, piece: int) -> PiecePlan | None:
        try:
            d = json.loads(piece_path(out, piece, ".json").read_text())
        except (OSError, ValueError):
            return None
        d["units"] = [Unit(**u) for u in d["units"]]
        return cls(**d)


@dataclass
class Shard:
    """A published file: consecutive units concatenated."""

    name: str
    units: list[str]
    tokens: int


@dataclass
class Plan:
    job_id: str
    units: list[Unit]
    shards: list[Shard]
    records: int
    empty_records: int
    tokens: int
    too_long: list = field(default_factory=list)  # prompts that leave no room to respond
    context_windows: int = 0  # windows with no target position (never scored)
    untargeted: list = field(default_factory=list)  # records none of whose tokens has a target

    @classmethod
    def load(cls, out: Path) -> Plan | None:
        path = plan_path(out)
        return cls.from_dict(json.loads(path.read_text())) if path.is_file() else None

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        d["units"] = [Unit(**u) for u in d["units"]]
        d["shards"] = [Shard(**s) for s in d["shards"]]
        return cls(**d)


def claim(out: Path, job: Job) -> None:
    """Record which job `out` holds; refuse a different one (teacher, input or settings)."""
    path = job_path(out)
    if not path.is_file() and plan_path(out).is_file():
        raise UserError(f"{out} holds a job planned by an older softlabels; finish it with that "
                        "version, or use a new --output folder")
    if path.is_file():
        held = json.loads(path.read_text())
        if held.get("id") == job.id():
            return
        old = held.get("job", {})
        made_by = (old.get("softlabels", "before 0.3"), old.get("format_version", "3 or older"))
        if made_by != (job.softlabels, job.format_version):
            raise UserError(
                f"{out} holds a job started by softlabels {made_by[0]} (format {made_by[1]}); "
                f"this is softlabels {job.softlabels} (format {job.format_version}), whose units "
                "would not mix with it: finish it with that version, or use a new --output "
                "folder (or delete this one to start over)")
        raise UserError(f"{out} holds a different job (teacher, input or settings differ); "
                        "use a new --output folder, or delete this one to start over")
    write_text(path, json.dumps({"id": job.id(), "job": asdict(job)}, indent=1) + "\n")


def windows(n: int, max_length: int, stride: int = 0) -> list[tuple[int, int, int]]:
    """[(start, first target, end)] of a record's windows: tokens [start, end), targets on
    positions [first target, end); the targets tile [0, n) exactly once."""
    step = stride or max_length
    out = [(0, 0, min(n, max_length))] if n else []
    while out and out[-1][2] < n:
        t = out[-1][2]
        out.append((t - (max_length - step), t, min(n, t + step)))
    return out


def plan_piece(corpus, piece, tokenizer, job: Job, out: Path, fields,
               response_budget: int = 0, batch: int = 256) -> PiecePlan:
    """Tokenize one piece of the corpus and write its plan files; return its summary.

    With a `response_budget` (max new tokens x samples), rows hold prompts (one window each,
    mask empty) for the teacher to answer, and each costs its prompt plus that budget.
    """
    from softlabels.generate.records import prompt_ids, tokenize

    jid = job.id()[:8]
    result = PiecePlan(piece.index, 0, 0, 0, [], [])
    pending: list[tuple[str, list[int], list[bool]]] = []
    pending_tokens = 0
    record = piece.first_record

    def close_unit(w: pq.ParquetWriter) -> None:
        nonlocal pending, pending_tokens
        j = len(result.units)
        cols = list(zip(*pending))
        w.write_table(
            pa.table({"row_id": cols[0], "input_ids": cols[1], "target_mask": cols[2]},
                     schema=PLAN_SCHEMA),
            row_group_size=len(pending),
        )
        result.units.append(Unit(piece.index, j, f"unit-{piece.index:05d}-{j:05d}-{jid}.parquet",
                                 len(pending), pending_tokens))
        pending, pending_tokens = [], 0

    def add(w, rid: str, ids: list[int], mask: list[bool], cost: int) -> None:
        nonlocal pending_tokens
        if pending and pending_tokens + cost > job.unit_tokens:
            close_unit(w)
        pending.append((rid, ids, mask))
        pending_tokens += cost
        result.tokens += len(ids)

    def encode_batch(values: list[tuple]) -> list[tuple[list[int], list[bool]]]:
        if not fields.chat:  # plain text: the tokenizer's fast batch path
            bad = [i for i, v in enumerate(values) if not isinstance(v[0], str | None)]
            if bad:
                raise UserError(f"record {record + bad[0]}: column {fields.text!r} is "
                                f"{type(values[bad[0]][0]).__name__}, not text")
            texts = [v[0] or "" for v in values]  # a null cell is an empty record (counted)
            enc = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
            return [(ids, [True] * len(ids)) if t.strip() else ([], [])
                    for t, ids in zip(texts, enc)]
        return [tokenize(v, fields, tokenizer, record + i) for i, v in enumerate(values)]

    def flush(w, values: list[tuple]) -> None:
        nonlocal record
        if response_budget:
            for v in values:
                ids = prompt_ids(v, fields, tokenizer, record)
                if not ids:
                    result.empty_records += 1
                elif len(ids) >= job.max_length:
                    result.too_long.append(record)
                else:
                    add(w, row_id(record, 0), ids, [], len(ids) + response_budget)
                record += 1
        else:
            for ids, mask in encode_batch(values):
                if not ids:
                    result.empty_records += 1
                elif not any(mask):  # e.g. a chat whose assistant turns are empty
                    result.untargeted.append(record)
                for wi, (a, t, b) in enumerate(windows(len(ids), job.max_length, job.stride)):
                    m = [False] * (t - a) + mask[t:b]
                    if any(m):
                        add(w, row_id(record, wi), ids[a:b], m, b - a)
                    else:  # context only (a long prompt): nothing for the teacher to score
                        result.context_windows += 1
                record += 1

    with atomic_path(piece_path(out, piece.index, ".parquet")) as tmp, \
            pq.ParquetWriter(tmp, PLAN_SCHEMA) as w:
        values: list[tuple] = []
        for v in corpus.records(piece):
            values.append(v)
            if len(values) == batch:
                flush(w, values)
                values = []
        flush(w, values)
        if pending:
            close_unit(w)
    result.records = record - piece.first_record
    if result.records != piece.records:  # the input changed since it was cut into pieces
        raise UserError(f"input piece {piece.index} ({piece.files[0]}) has {result.records} "
                        f"records, {piece.records} when planning began: is the input being "
                        "written? Rerun when it is complete")
    write_text(piece_path(out, piece.index, ".json"), json.dumps(asdict(result)) + "\n")
    return result


def finish_plan(out: Path, job: Job, pieces: list[PiecePlan]) -> Plan:
    """All pieces planned: group the units into shards, write plan.json, return the plan."""
    units = [u for p in pieces for u in p.units]
    records = sum(p.records for p in pieces)
    empty = sum(p.empty_records for p in pieces)
    too_long = [r for p in pieces for r in p.too_long]
    untargeted = [r for p in pieces for r in p.untargeted]
    tokens = sum(p.tokens for p in pieces)
    if tokens == 0:
        raise UserError(
            f"input has no usable records ({records} records, {empty} empty, {len(too_long)} "
            f"prompts too long, {len(untargeted)} with no target position): check the input "
            "path, the column options and --max-length"
        )
    shards: list[Shard] = []
    for u in units:  # consecutive units, up to shard_tokens per shard (at least one unit)
        if not shards or shards[-1].tokens + u.tokens > job.shard_tokens:
            shards.append(Shard(f"shard-{len(shards):05d}-{job.id()[:8]}.parquet", [], 0))
        shards[-1].units.append(u.name)
        shards[-1].tokens += u.tokens
    plan = Plan(job.id(), units, shards, records, empty, tokens, too_long,
                sum(p.context_windows for p in pieces), untargeted)
    write_text(plan_path(out), json.dumps(asdict(plan)) + "\n")
    return plan


def make_plan(corpus, tokenizer, job: Job, out: Path, fields, response_budget: int = 0
              ) -> Plan:
    """Plan every piece in this process (what the Dask tasks do, one after another)."""
    from softlabels.generate.inputs import PIECE_BYTES

    claim(out, job)
    pieces = [PiecePlan.load(out, p.index) or
              plan_piece(corpus, p, tokenizer, job, out, fields, response_budget)
              for p in corpus.pieces(job.piece_bytes or PIECE_BYTES)]
    return finish_plan(out, job, pieces)


def read_unit(out: Path, unit: Unit) -> tuple[list[str], list[list[int]], list[list[bool]]]:
    t = pq.ParquetFile(piece_path(out, unit.piece, ".parquet")).read_row_group(unit.group)
    return (t.column("row_id").to_pylist(), t.column("input_ids").to_pylist(),
            t.column("target_mask").to_pylist())
