"""The codec of soft targets: `encode(rows, enc)` and `decode(batch, enc)`, one symmetric pair
around an `Encoding` (k, the quantisation steps, the draws), which every shard's schema
metadata carries.

The layout and the decoding rule are written once, in data/FORMAT.md ("Decoding the values");
every shard repeats the rule in its schema metadata (`softlabels.decoding`) so any Parquet reader
can decode without this package. Why the encoding is what it is (ascending gap-coded ids, values
rounded in log space, the tail log-coded from its smaller side) is said there too.

What values are valid is checks.py's; per-row counts in the footer are counts.py's; files are
shard.py's. The codec checks nothing it does not need to encode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from softlabels.data.errors import UserError

FORMAT_NAME = "softlabels"
FORMAT_VERSION = 5
# version 1: top-k only; 2: with top-k, the draws come from the whole distribution; 3: no exact
# tail mass or label log-prob; 4: both; 5: what the tail and label columns hold is stated per
# dataset (imports from other tools lack one or both)
READS_VERSIONS = (1, 2, 3, 4, 5)
DEFAULT_LOGPROB_STEP = 1 / 16
# Steps of the two version-4 columns, chosen by measurement (BENCHMARKS.md, "Confident teachers"):
# relative error of the tail mass and of the label's probability at most exp(step / 2) - 1.
TAIL_STEP = 1 / 32
LABEL_STEP = 1 / 16
# Log-probabilities below this are clipped (vLLM can return -inf for impossible tokens).
MIN_LOGPROB = -1000.0

DECODING_RULE = (
    "per position t: ids = cumsum(topk_id_gaps[t]) (ascending token ids); "
    "logprobs = -logprob_step * topk_logprobs_q[t] (natural-log probabilities at temperature 1, "
    "normalised over the full vocabulary, same order as ids); sort by descending logprob for "
    "rank order. Positions where target_mask[t] is false carry no target (zeros). targets[t] "
    "predicts the token after input_ids[0..t]. Samples (if softlabels.draws > 0): per position "
    "ids = cumsum(sample_id_gaps[t]), drawn sample_counts[t] times each out of draws draws from "
    "the teacher's distribution at softlabels.sample_temperature; empty where target_mask is "
    "false. With top-k (k > 0, format version 3) the draws are from the distribution outside "
    "the top-k, renormalised, and empty where the top-k holds all the mass. Version 4: "
    "tail[t] = exp(-tail_step * q) if q < 32768 else 1 - exp(-tail_step * (q - 32768)), q = "
    "tail_mass_q[t], is the teacher's exact mass outside the top-k (with k > 0); "
    "label_logprob[t] = -label_step * label_logprob_q[t] is its log-prob of "
    "input_ids[t+1] (0 stored where the mask is false and at the last position). Version 5 "
    "states what these hold: softlabels.exact_tail (false: 1 - the sum of the source's "
    "unrounded top-k, not the teacher's mass outside it), softlabels.label_logprobs (false: no "
    "label_logprob_q column) and softlabels.topk_renormalised (true: the top-k log-probs are "
    "normalised over the k, the tail is 0). Optional column writer_logprob[t] (float32): when "
    "another model wrote the responses, its own log-prob of input_ids[t+1] where that token is "
    "written (0 elsewhere)."
)
# Version 5's flags (schema metadata and manifest keys): what the columns hold, per dataset.
FLAGS = ("exact_tail", "label_logprobs", "topk_renormalised")


def implied_flags(version: int) -> tuple[bool, bool, bool]:
    """The flags a version before 5 implies (and version 5's for a `generate` dataset)."""
    return version >= 4, version >= 4, False


class FormatError(UserError):
    """A dataset or row does not match the format this package reads and writes."""


@dataclass
class Row:
    """One stored window. T positions, k targets each. Arrays are numpy.

    row_id: "<record>:<window>" — the input record's index and the window's index within it.
    """

    row_id: str
    input_ids: np.ndarray  # (T,) int32
    topk_ids: np.ndarray  # (T, k) int32, rank order
    topk_logprobs: np.ndarray  # (T, k) float32, descending
    target_mask: np.ndarray  # (T,) bool
    response: str | None = None  # teacher-written response text (--generate-responses)
    sample_ids: np.ndarray | None = None  # (T, U) int32 distinct drawn ids, ascending
    sample_counts: np.ndarray | None = None  # (T, U) uint16 their counts; 0 pads a position
    # version 4 (None when read from older versions, or from a version 5 dataset without them):
    tail_logprob: np.ndarray | None = None  # (T,) float32 log of the mass outside the top-k
    label_logprob: np.ndarray | None = None  # (T,) float32 log p(input_ids[t+1]); NaN: none
    # responses written by another model (--response-model): its own log-prob of each token it
    # wrote, aligned as the label's; NaN where no written token follows
    writer_logprob: np.ndarray | None = None

    @property
    def record(self) -> int:
        return int(self.row_id.split(":")[0])

    @property
    def window(self) -> int:
        return int(self.row_id.split(":")[1])


def row_id(record: int, window: int) -> str:
    return f"{record}:{window}"


LEAF_COLUMNS = {
    "input_ids": "input_ids.list.element",
    "topk_id_gaps": "topk_id_gaps.list.element.list.element",
    "topk_logprobs_q": "topk_logprobs_q.list.element.list.element",
    "tail_mass_q": "tail_mass_q.list.element",
    "sample_id_gaps": "sample_id_gaps.list.element.list.element",
    "sample_counts": "sample_counts.list.element.list.element",
    "label_logprob_q": "label_logprob_q.list.element",
}


@dataclass(frozen=True)
class Encoding:
    """What a reader needs to decode a file, read back from its schema metadata."""

    k: int
    logprob_step: float
    draws: int = 0
    sample_temperature: float = 1.0
    version: int = FORMAT_VERSION
    tail_step: float = TAIL_STEP  # version 4
    label_step: float = LABEL_STEP  # version 4
    # Version 5 states these; before it they follow from the version (None: that default).
    # exact_tail: the tail column is the teacher's mass outside the top-k from its logits (False:
    # 1 - the source's unrounded top-k, in a dataset imported from another tool).
    exact_tail: bool | None = None
    label_logprobs: bool | None = None  # the label_logprob_q column is stored
    topk_renormalised: bool | None = None  # the top-k log-probs are normalised over the k

    def __post_init__(self):
        """Numbers only a damaged or hand-made file holds are refused here, where every reader
        and the writer build their Encoding: a step of inf or 0 decodes every log-prob to -inf or
        0 (targets that are no distribution, found by no other check)."""
        implied = implied_flags(self.version)
        for name, default in zip(FLAGS, implied):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
            elif not isinstance(getattr(self, name), bool):
                raise FormatError(f"{name} {getattr(self, name)!r} is not true or false: a "
                                  "damaged or hand-edited dataset")
        if self.version < 5 and tuple(getattr(self, name) for name in FLAGS) != implied:
            raise FormatError(f"format {self.version} cannot state exact_tail, label_logprobs "
                              "or topk_renormalised (version 5 can)")
        if self.topk_renormalised and (self.exact_tail or not self.k):
            raise FormatError("topk_renormalised with an exact tail (or without a top-k): a "
                              "renormalised top-k has no tail; a damaged or hand-edited dataset")
        for name in ("logprob_step", "tail_step", "label_step"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v)
                    and -MIN_LOGPROB / 65535 <= v <= 1.0):
                raise FormatError(f"{name} {v!r} is outside what softlabels writes "
                                  f"([{-MIN_LOGPROB / 65535:.4g}, 1] nats): a damaged or "
                                  "hand-edited dataset; regenerate it")
        t = self.sample_temperature
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise FormatError(f"sample_temperature {t!r} is not a positive finite number: a "
                              "damaged or hand-edited dataset; regenerate it")
        for name in ("k", "draws"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << 16:
                raise FormatError(f"{name} {v!r} is not a count softlabels writes (an integer "
                                  "in [0, 65535]): a damaged or hand-edited dataset")
        if not self.k and not self.draws:
            raise FormatError("k and draws are both 0: the dataset stores no targets")

    @property
    def tail_draws(self) -> bool:
        """Whether the draws come from outside the top-k (see the module docstring)."""
        return tail_draws(self.version, self.k, self.draws)

    @property
    def exact(self) -> bool:
        """Whether the file stores the teacher's exact tail mass (with a top-k) and the label's
        log-prob: every dataset `generate` writes since version 4, no import."""
        return self.version >= 4 and self.label_logprobs and (self.exact_tail or not self.k)

    @property
    def tail_column(self) -> bool:
        """Whether shards have `tail_mass_q` (version 4 on, with a top-k)."""
        return self.version >= 4 and self.k > 0

    @property
    def list_columns(self) -> tuple[str, ...]:
        """The per-position list columns a row of this encoding has, each with T entries."""
        topk = ("topk_id_gaps", "topk_logprobs_q") + ("tail_mass_q",) * self.tail_column
        return (("input_ids", "target_mask") + topk * bool(self.k)
                + ("sample_id_gaps", "sample_counts") * bool(self.draws)
                + ("label_logprob_q",) * self.label_logprobs)

    def matches(self, m) -> bool:
        """Whether a manifest (or another Encoding) describes the same numbers: k, the steps,
        the draws, and what the columns mean (format 3's draws, version 4's exact columns,
        version 5's flags)."""
        steps = (("k", "logprob_step", "draws") + ("tail_step", "label_step") *
                 (self.version >= 4) + FLAGS)
        return (all(getattr(self, a) == getattr(m, a) for a in steps)
                and (self.tail_draws, self.exact) == (m.tail_draws, m.exact))

    @classmethod
    def from_schema(cls, s: pa.Schema) -> Encoding:
        meta = {k.decode(): v.decode() for k, v in (s.metadata or {}).items()}
        if meta.get("softlabels.format") != FORMAT_NAME:
            raise FormatError("not a softlabels shard (schema metadata has no softlabels.format)")
        try:
            version = int(meta.get("softlabels.format_version", -1))
        except ValueError:
            version = -1
        if version not in READS_VERSIONS:
            raise FormatError(
                f"format version {version}, this softlabels reads versions "
                f"{', '.join(map(str, READS_VERSIONS))}: use the softlabels release that wrote "
                "it, or regenerate the dataset"
            )
        flags = {}
        if version >= 5:
            for name in FLAGS:
                v = meta.get(f"softlabels.{name}")
                if v not in ("true", "false"):
                    raise FormatError(f"schema metadata: softlabels.{name} is {v!r}, expected "
                                      "true or false")
                flags[name] = v == "true"
        try:
            return cls(k=int(meta["softlabels.k"]),
                       logprob_step=float(meta["softlabels.logprob_step"]),
                       draws=int(meta.get("softlabels.draws", 0)),
                       sample_temperature=float(meta.get("softlabels.sample_temperature", 1.0)),
                       version=version,
                       tail_step=float(meta.get("softlabels.tail_step", TAIL_STEP)),
                       label_step=float(meta.get("softlabels.label_step", LABEL_STEP)), **flags)
        except (KeyError, ValueError) as e:
            raise FormatError(f"schema metadata: {type(e).__name__} {e} (a key missing or not "
                              "a number)") from None


def check_logprob_step(step: float) -> None:
    """`--logprob-step`'s check, for every writer (generate, import): a step whose uint16 codes
    reach MIN_LOGPROB, at most 1 nat."""
    low = -MIN_LOGPROB / 65535
    if not (isinstance(step, (int, float)) and math.isfinite(step) and low <= step <= 1.0):
        raise UserError(f"--logprob-step {step:g} must be between {low:.4g} (uint16 codes reach "
                        f"log-prob {MIN_LOGPROB:g}) and 1 nat; the default is 1/16")


def tail_draws(version: int, k: int, draws: int) -> bool:
    return version >= 3 and k > 0 and draws > 0



# Optional columns, present when the rows carry them (`optional_columns`): `response`, the text of
# a written response (the dataset doubles as an ordinary SFT dataset), and `writer_logprob`, the
# writing model's float32 log-prob of each token it wrote (what on-policy objectives weigh a
# stale sample by). Neither changes how the targets decode, so neither needs a format version.
OPTIONAL = ("response", "writer_logprob")


def optional_columns(rows: list[Row]) -> tuple[str, ...]:
    return tuple(c for c in OPTIONAL if any(getattr(r, c) is not None for r in rows))


def schema(enc: Encoding, optional: tuple[str, ...] = ()) -> pa.Schema:
    """Arrow schema of a shard of this encoding, with the `optional` columns named (OPTIONAL);
    its metadata carries the decoding rule and parameters (what `Encoding.from_schema` reads
    back)."""
    k, draws = enc.k, enc.draws
    meta = {
        "softlabels.format": FORMAT_NAME,
        "softlabels.format_version": str(FORMAT_VERSION),
        "softlabels.k": str(k),
        "softlabels.logprob_step": repr(float(enc.logprob_step)),
        "softlabels.draws": str(draws),
        "softlabels.sample_temperature": repr(float(enc.sample_temperature)),
        "softlabels.tail_step": repr(float(enc.tail_step)),
        "softlabels.label_step": repr(float(enc.label_step)),
        **{f"softlabels.{name}": str(getattr(enc, name)).lower() for name in FLAGS},
        "softlabels.decoding": DECODING_RULE,
    }
    topk = [
        pa.field("topk_id_gaps", pa.list_(pa.list_(pa.int32(), k)), nullable=False),
        pa.field("topk_logprobs_q", pa.list_(pa.list_(pa.uint16(), k)), nullable=False),
        pa.field("tail_mass_q", pa.list_(pa.uint16()), nullable=False),
    ] if k else []
    samples = [
        pa.field("sample_id_gaps", pa.list_(pa.list_(pa.int32())), nullable=False),
        pa.field("sample_counts", pa.list_(pa.list_(pa.uint16())), nullable=False),
    ] if draws else []
    return pa.schema(
        [
            pa.field("row_id", pa.string(), nullable=False),
            pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("target_mask", pa.list_(pa.bool_()), nullable=False),
        ]
        + topk + samples
        + [pa.field("label_logprob_q", pa.list_(pa.uint16()), nullable=False)]
        * enc.label_logprobs
        + ([pa.field("response", pa.string())] if "response" in optional else [])
        + ([pa.field("writer_logprob", pa.list_(pa.float32()), nullable=False)]
           if "writer_logprob" in optional else []),
        metadata=meta,
    )


# Parquet leaf paths of the nested columns: encodings must name the leaf, or they are ignored.

def quantise(logprobs: np.ndarray, step: float) -> np.ndarray:
    """float logprobs -> uint16 round(-lp / step), clipped at MIN_LOGPROB."""
    lp = np.clip(np.nan_to_num(logprobs, nan=MIN_LOGPROB, neginf=MIN_LOGPROB), MIN_LOGPROB, 0.0)
    q = np.rint(-lp.astype(np.float64) / step)
    if q.size and q.max() > np.iinfo(np.uint16).max:
        raise FormatError(f"logprob_step {step} cannot reach {MIN_LOGPROB} in uint16; raise it")
    return q.astype(np.uint16)


def dequantise(q: np.ndarray, step: float) -> np.ndarray:
    return (-step * q.astype(np.float64)).astype(np.float32)


TAIL_FLAG = 1 << 15  # tail_mass_q: set when the code is the top-k's mass (the tail is >= 1/2)


def log1mexp(x: np.ndarray) -> np.ndarray:
    """log(1 - exp(x)) for x <= 0, stable at both ends (-inf at 0). The one numpy form; the
    losses have the torch one (train_student/losses.py)."""
    x = np.asarray(x, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(x < -np.log(2), np.log1p(-np.exp(x)), np.log(-np.expm1(x)))


def encode_tail(log_tail: np.ndarray, step: float) -> np.ndarray:
    """(P,) log of the mass outside the top-k -> uint16: the smaller of tail and 1 - tail,
    log-coded (15 bits, clipped at -(2**15 - 1) steps), the top bit set for 1 - tail."""
    lt = np.minimum(np.asarray(log_tail, np.float64), 0.0)
    flat = lt >= np.log(0.5)
    small = np.where(flat, log1mexp(lt), lt)  # log of the smaller mass, <= log 1/2
    q = np.minimum(np.rint(-small / step), TAIL_FLAG - 1)  # -inf (no mass) -> the largest code
    return np.where(flat, TAIL_FLAG + q, q).astype(np.uint16)


def decode_tail(q: np.ndarray, step: float) -> np.ndarray:
    """uint16 codes -> float32 log of the mass outside the top-k (see encode_tail)."""
    q = np.asarray(q)
    small = -step * (q & (TAIL_FLAG - 1)).astype(np.float64)
    # the top-k's mass coded as 1 (small = 0): no tail, log 0
    return np.where(q & TAIL_FLAG, log1mexp(small), small).astype(np.float32)


def to_rank_order(ids: np.ndarray, lps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T, k) with ids ascending (as decoded) -> (T, k) by descending logprob; the stable sort
    keeps ties in ascending id order."""
    order = np.argsort(-lps, axis=-1, kind="stable")
    return np.take_along_axis(ids, order, -1), np.take_along_axis(lps, order, -1)


def encode(rows: list[Row], enc: Encoding) -> pa.RecordBatch:
    """Rows -> one Arrow record batch in the shard schema (each position re-sorted by id).

    The rows must have the shapes `enc` asks for (checks.check_rows says which does not)."""
    k, logprob_step, draws = enc.k, enc.logprob_step, enc.draws
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum([len(r.input_ids) for r in rows])
    mask = [r.target_mask.astype(bool) for r in rows]
    toks = [r.input_ids.astype(np.int32) for r in rows]
    m = np.concatenate(mask)
    # all rows' positions at once: each sorted by id (ids distinct where the mask is true)
    ids = np.where(m[:, None], np.concatenate([r.topk_ids for r in rows]), 0).astype(np.int64)
    by_id = np.argsort(ids, axis=-1)
    ids = np.take_along_axis(ids, by_id, -1)
    lp = np.where(m[:, None], np.take_along_axis(np.concatenate([r.topk_logprobs for r in rows]),
                                                 by_id, -1), 0.0)
    gap = np.diff(ids, axis=-1, prepend=0).astype(np.int32)
    twice = m & (gap[:, 1:] == 0).any(-1)
    if twice.any():
        r = rows[int(np.searchsorted(offsets, np.flatnonzero(twice)[0], side="right")) - 1]
        raise FormatError(f"row {r.row_id}: a position lists the same token id twice")
    gaps, qs = [gap], [quantise(lp, logprob_step)]
    pa_offsets = pa.array(offsets)

    def nested(chunks, typ):
        flat = pa.array(np.concatenate(chunks).reshape(-1), type=typ)
        return pa.ListArray.from_arrays(pa_offsets, pa.FixedSizeListArray.from_arrays(flat, k))

    def flat(chunks):
        return pa.ListArray.from_arrays(pa_offsets, pa.array(np.concatenate(chunks), pa.uint16()))

    # one value per position; 0 where there is none (no target; no next token for the label)
    tails = [np.where(m, encode_tail(r.tail_logprob, enc.tail_step), 0)
             for r, m in zip(rows, mask)] if k else []
    labels = [quantise(np.where(_has_label(m), r.label_logprob, 0.0), enc.label_step)
              for r, m in zip(rows, mask)] if enc.label_logprobs else []
    optional = optional_columns(rows)
    s = schema(enc, optional)
    return pa.RecordBatch.from_arrays(
        [
            pa.array([r.row_id for r in rows], pa.string()),
            pa.ListArray.from_arrays(pa_offsets, pa.array(np.concatenate(toks), pa.int32())),
            pa.ListArray.from_arrays(pa_offsets, pa.array(np.concatenate(mask), pa.bool_())),
        ]
        + ([nested(gaps, pa.int32()), nested(qs, pa.uint16()), flat(tails)] if k else [])
        + (_encode_samples(rows, pa_offsets) if draws else [])
        + ([flat(labels)] if enc.label_logprobs else [])
        + ([pa.array([r.response for r in rows], pa.string())] if "response" in optional else [])
        + ([pa.ListArray.from_arrays(pa_offsets, pa.array(np.concatenate(
            [np.where(_has_label(m), np.nan_to_num(r.writer_logprob, nan=0.0), 0.0)
             for r, m in zip(rows, mask)]).astype(np.float32)))]
           if "writer_logprob" in optional else []),
        schema=s,
    )


def _has_label(mask: np.ndarray) -> np.ndarray:
    """(T,) positions of one row that carry the label's log-prob: a target and a next token."""
    out = mask.astype(bool).copy()
    if len(out):
        out[-1] = False
    return out


def _encode_samples(rows: list[Row], offsets: pa.Array) -> list[pa.Array]:
    """sample_id_gaps and sample_counts: per position the entries with a count, ids ascending
    and gap-coded; positions without a target are empty."""
    gaps, counts, lens = [], [], []
    for r in rows:
        keep = (r.sample_counts > 0) & r.target_mask.astype(bool)[:, None]
        ids = r.sample_ids.astype(np.int64)[keep]
        pos = np.nonzero(keep)[0]
        first = np.r_[True, pos[1:] != pos[:-1]]  # first kept entry of its position
        gap = np.diff(ids, prepend=0)
        gap[first] = ids[first]
        if (gap[~first] <= 0).any():
            raise FormatError(f"row {r.row_id}: sampled ids of a position not ascending and "
                              "distinct")
        gaps.append(gap)
        counts.append(r.sample_counts[keep])
        lens.append(keep.sum(-1))
    inner = np.zeros(sum(map(len, lens)) + 1, np.int32)
    inner[1:] = np.cumsum(np.concatenate(lens))

    def nested(chunks, typ):
        return pa.ListArray.from_arrays(offsets, pa.ListArray.from_arrays(
            pa.array(inner), pa.array(np.concatenate(chunks), typ)))

    return [nested(gaps, pa.int32()), nested(counts, pa.uint16())]


# Per-row counts in each shard's footer (file metadata), so a trainer can plan an epoch from
# the footers alone: tokens, positions with a target (KD) and positions with a target and a known
# next token (CE), each a little-endian uint32 array in row order, base64. Optional: shards
# without them are counted from their input_ids and target_mask columns.
def one_batch(batch: pa.RecordBatch | pa.Table) -> pa.RecordBatch | None:
    if isinstance(batch, pa.Table):
        return batch.combine_chunks().to_batches()[0] if batch.num_rows else None
    return batch


@dataclass
class Flat:
    """A batch's per-position arrays, flattened over its rows (P positions, S sampled ids)."""

    tokens: np.ndarray  # (P,)
    mask: np.ndarray  # (P,) bool
    row_of: np.ndarray  # (P,) the row of each position
    gaps: np.ndarray  # (P, k) top-k id gaps
    q: np.ndarray  # (P, k) quantised log-probs
    s_lens: np.ndarray | None = None  # (P,) sampled ids per position
    s_gaps: np.ndarray | None = None  # (S,)
    s_counts: np.ndarray | None = None  # (S,)
    tail_q: np.ndarray | None = None  # (P,) version 4, with a top-k
    label_q: np.ndarray | None = None  # (P,) version 4

    @property
    def has_label(self) -> np.ndarray:
        """(P,) positions with a target and a next token in their row (not a row's last)."""
        last = np.ones(len(self.row_of), bool)
        last[:-1] = self.row_of[1:] != self.row_of[:-1]
        return self.mask & ~last


def flatten(batch: pa.RecordBatch, enc: Encoding) -> Flat | None:
    """The flattened arrays of one record batch (what decode and the checks read), or None if
    the list columns disagree in length (then nothing per position can be checked or decoded)."""
    lens = [np.diff(batch.column(c).offsets.to_numpy()) for c in enc.list_columns]
    if any((x != lens[0]).any() for x in lens[1:]):
        return None
    k, n = enc.k, batch.num_rows
    tokens = batch.column("input_ids").flatten().to_numpy(zero_copy_only=False)
    f = Flat(tokens,
              batch.column("target_mask").flatten().to_numpy(zero_copy_only=False).astype(bool),
              np.repeat(np.arange(n), lens[0]),
              *(batch.column(c).flatten().flatten().to_numpy().reshape(-1, k) if k else
                np.zeros((len(tokens), 0), np.int64)
                for c in ("topk_id_gaps", "topk_logprobs_q")))
    if enc.draws:
        ids = batch.column("sample_id_gaps").flatten()
        counts = batch.column("sample_counts").flatten()
        f.s_lens = np.diff(ids.offsets.to_numpy())
        if (np.diff(counts.offsets.to_numpy()) != f.s_lens).any():
            return None
        f.s_gaps = ids.flatten().to_numpy()
        f.s_counts = counts.flatten().to_numpy()
    if enc.label_logprobs:
        f.label_q = batch.column("label_logprob_q").flatten().to_numpy()
    if enc.tail_column:
        f.tail_q = batch.column("tail_mass_q").flatten().to_numpy()
    return f


def list_column(col: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """(offsets from 0, values) of a list column, slicing honoured: how the layout readers
    (distillkit.py, axolotl.py) walk another tool's nested columns without a Python loop."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    off = col.offsets.to_numpy().astype(np.int64)
    return off - off[0], col.flatten()


def row_at(offsets: np.ndarray, p: int) -> int:
    """The row holding flat position p, given the rows' offsets."""
    return int(np.searchsorted(offsets, p, side="right") - 1)


def padded_samples(f: Flat) -> tuple[np.ndarray, np.ndarray]:
    """(P, U) sampled ids and counts (count 0 pads) from the flattened ragged columns."""
    P = len(f.mask)
    pos = np.repeat(np.arange(P), f.s_lens)
    starts = np.zeros(P + 1, np.int64)
    np.cumsum(f.s_lens, out=starts[1:])
    cum = np.cumsum(f.s_gaps, dtype=np.int64)
    base = np.where(starts[:-1] > 0, cum[np.maximum(starts[:-1] - 1, 0)] if len(cum) else 0, 0)
    slot = np.arange(len(pos)) - starts[:-1][pos]
    U = int(f.s_lens.max()) if P else 0
    ids = np.zeros((P, U), np.int32)
    counts = np.zeros((P, U), np.uint16)
    ids[pos, slot] = cum - base[pos]
    counts[pos, slot] = f.s_counts
    return ids, counts


def decode(batch: pa.RecordBatch | pa.Table, enc: Encoding, flat: Flat | None = None
           ) -> list[Row]:
    """One record batch (or table) -> rows, zero-copy reshapes to (T, k) where possible.

    `flat`: the batch's `flatten`, when the caller has it (the reader checks it first)."""
    batch = one_batch(batch)
    if batch is None:
        return []
    cols = {name: batch.column(name) for name in batch.schema.names}
    offsets = cols["input_ids"].offsets.to_numpy()
    offsets = offsets - offsets[0]
    f = flat if flat is not None else flatten(batch, enc)  # flatten() honours slicing
    if f is None:
        raise FormatError("the list columns of a row differ in length; `softlabels verify` "
                          "names the rows")
    ids, lps = to_rank_order(np.cumsum(f.gaps, axis=-1, dtype=np.int64).astype(np.int32),
                             dequantise(f.q, enc.logprob_step))
    s_ids, s_counts = padded_samples(f) if enc.draws else (None, None)
    tail = label = None
    if enc.label_logprobs:
        label = np.where(f.has_label, dequantise(f.label_q, enc.label_step), np.nan)
    if enc.tail_column:
        tail = decode_tail(f.tail_q, enc.tail_step)
    responses = cols["response"].to_pylist() if "response" in cols else None
    writer = None
    if "writer_logprob" in cols:
        w = cols["writer_logprob"].flatten().to_numpy(zero_copy_only=False)
        writer = np.where(f.has_label, w, np.nan).astype(np.float32)
    rows = []
    for i, rid in enumerate(cols["row_id"].to_pylist()):
        a, b = offsets[i], offsets[i + 1]
        rows.append(
            Row(
                row_id=rid,
                input_ids=f.tokens[a:b],
                topk_ids=ids[a:b],
                topk_logprobs=lps[a:b],
                target_mask=f.mask[a:b],
                response=responses[i] if responses else None,
                sample_ids=s_ids[a:b] if enc.draws else None,
                sample_counts=s_counts[a:b] if enc.draws else None,
                tail_logprob=tail[a:b] if tail is not None else None,
                label_logprob=label[a:b] if label is not None else None,
                writer_logprob=writer[a:b] if writer is not None else None,
            )
        )
    return rows

