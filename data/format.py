"""The on-disk encoding of soft targets: one symmetric pair, `encode` and `decode`.

A row is one window of one input record. Per position t the teacher's top-k next-token
distribution is stored *in ascending id order*, ids gap-coded and log-probabilities quantised:

    stored order:  ids ascending                 id[t, 0] < id[t, 1] < ... < id[t, k-1]
    topk_id_gaps:  gap[t, 0] = id[t, 0];  gap[t, j] = id[t, j] - id[t, j-1]      (int32)
    topk_logprobs_q:  q[t, j] = round(-logprob[t, j] / step)                       (uint16)

    decode:  id = cumsum(gap);  logprob = -step * q;  then sort each position by descending
             logprob (ties by ascending id) to get rank order.

Why: measured on real teacher outputs, the top-k *sets* of neighbouring positions overlap a lot,
so ascending gaps repeat and zstd (after BYTE_STREAM_SPLIT) packs them ~6x smaller than ids in
rank order; that saving is far larger than what delta-coding the sorted values would give.
Round-to-nearest in log space bounds the error by step/2 and keeps the KL error second order
(about step**2 / 24 nats per token). The rule is repeated in every file's Arrow schema metadata so
any Parquet reader can decode without this package. See data/FORMAT.md.

Sampled targets (version 2, `generate --samples N`): per position the distinct ids of N draws from
the teacher's distribution, ascending and gap-coded like the top-k, with how often each was drawn:

    sample_id_gaps:  list<list<int32>>   per position, U ids ascending, gap-coded (U <= N varies)
    sample_counts:   list<list<uint16>>  their counts, summing to N at every position with a target

A dataset carries top-k, samples, or both (`k` 0 means no top-k columns; `draws` 0 no samples).
With both (version 3), the N draws come from the teacher's distribution *outside* the top-k
(renormalised): the top-k is exact, and every draw goes where the estimate is needed. A position
whose top-k holds all the mass has no draws. Version 2 drew from the whole distribution.

What quantisation cannot give back (version 4), one uint16 per position each:

    tail_mass_q:      the teacher's exact mass outside the top-k, from the unquantised logits
                      (only with a top-k): the smaller of tail and 1 - tail, log-coded, the top
                      bit saying which:  q = round(-log(tail) / tail_step)  if tail < 1/2,
                                         q = 2**15 + round(-log(1 - tail) / tail_step)  else
    label_logprob_q:  q = round(-log p(next token) / label_step)   the teacher's log-prob of the
                      token that follows in the row (the "main path")

Why: 1 - sum(decoded top-k) has an *absolute* error of about step/2 times the top-k's mass, so a
confident position (top-1 above exp(-step/2) = 0.969) decodes to a tail of 0 and a target summing
to more than 1. A log-coded mass has a *relative* error of at most tail_step/2; coding the smaller
side keeps both the tail and the top-k's total exact, from one-hot to flat positions. The label's
log-prob is what cross-tokenizer losses need from every position (the top-k holds the next
token at only ~70 % of positions), and it makes the label residual exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from softlabels.data.errors import UserError

FORMAT_NAME = "softlabels"
FORMAT_VERSION = 4
# version 1: top-k only; 2: with top-k, the draws come from the whole distribution; 3: no exact
# tail mass or label log-prob
READS_VERSIONS = (1, 2, 3, 4)
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
    "input_ids[t+1] (0 stored where the mask is false and at the last position)."
)


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
    # version 4 (None when read from older versions):
    tail_logprob: np.ndarray | None = None  # (T,) float32 log of the mass outside the top-k
    label_logprob: np.ndarray | None = None  # (T,) float32 log p(input_ids[t+1]); NaN: none

    @property
    def record(self) -> int:
        return int(self.row_id.split(":")[0])

    @property
    def window(self) -> int:
        return int(self.row_id.split(":")[1])


def row_id(record: int, window: int) -> str:
    return f"{record}:{window}"


def schema(k: int, logprob_step: float = DEFAULT_LOGPROB_STEP,
           with_response: bool = False, draws: int = 0, sample_temperature: float = 1.0
           ) -> pa.Schema:
    """Arrow schema of a shard; its metadata carries the decoding rule and parameters.

    `with_response` adds the optional `response` column: the text of a teacher-written response,
    so the dataset doubles as an ordinary SFT dataset."""
    meta = {
        "softlabels.format": FORMAT_NAME,
        "softlabels.format_version": str(FORMAT_VERSION),
        "softlabels.k": str(k),
        "softlabels.logprob_step": repr(float(logprob_step)),
        "softlabels.draws": str(draws),
        "softlabels.sample_temperature": repr(float(sample_temperature)),
        "softlabels.tail_step": repr(TAIL_STEP),
        "softlabels.label_step": repr(LABEL_STEP),
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
        + ([pa.field("response", pa.string())] if with_response else []),
        metadata=meta,
    )


# Parquet leaf paths of the nested columns: encodings must name the leaf, or they are ignored.
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

    @property
    def tail_draws(self) -> bool:
        """Whether the draws come from outside the top-k (see the module docstring)."""
        return tail_draws(self.version, self.k, self.draws)

    @property
    def exact(self) -> bool:
        """Whether the file stores the exact tail mass and the label's log-prob (version 4)."""
        return self.version >= 4

    @property
    def list_columns(self) -> tuple[str, ...]:
        """The per-position list columns a row of this encoding has, each with T entries."""
        topk = ("topk_id_gaps", "topk_logprobs_q") + ("tail_mass_q",) * self.exact
        return (("input_ids", "target_mask") + topk * bool(self.k)
                + ("sample_id_gaps", "sample_counts") * bool(self.draws)
                + ("label_logprob_q",) * self.exact)

    def matches(self, m) -> bool:
        """Whether a manifest (or another Encoding) describes the same numbers: k, the steps,
        the draws, and what the columns mean (format 3's draws, format 4's exact columns)."""
        steps = ("k", "logprob_step", "draws") + ("tail_step", "label_step") * self.exact
        return (all(getattr(self, a) == getattr(m, a) for a in steps)
                and (self.tail_draws, self.exact) == (m.tail_draws, m.exact))

    @classmethod
    def from_schema(cls, s: pa.Schema) -> Encoding:
        meta = {k.decode(): v.decode() for k, v in (s.metadata or {}).items()}
        if meta.get("softlabels.format") != FORMAT_NAME:
            raise FormatError("not a softlabels shard (schema metadata has no softlabels.format)")
        version = int(meta.get("softlabels.format_version", -1))
        if version not in READS_VERSIONS:
            raise FormatError(
                f"format version {version}, this softlabels reads versions "
                f"{', '.join(map(str, READS_VERSIONS))}: use the softlabels release that wrote "
                "it, or regenerate the dataset"
            )
        return cls(k=int(meta["softlabels.k"]), logprob_step=float(meta["softlabels.logprob_step"]),
                   draws=int(meta.get("softlabels.draws", 0)),
                   sample_temperature=float(meta.get("softlabels.sample_temperature", 1.0)),
                   version=version,
                   tail_step=float(meta.get("softlabels.tail_step", TAIL_STEP)),
                   label_step=float(meta.get("softlabels.label_step", LABEL_STEP)))


def tail_draws(version: int, k: int, draws: int) -> bool:
    return version >= 3 and k > 0 and draws > 0


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


def encode_tail(log_tail: np.ndarray, step: float) -> np.ndarray:
    """(P,) log of the mass outside the top-k -> uint16: the smaller of tail and 1 - tail,
    log-coded (15 bits, clipped at -(2**15 - 1) steps), the top bit set for 1 - tail."""
    lt = np.minimum(np.asarray(log_tail, np.float64), 0.0)
    flat = lt >= np.log(0.5)
    with np.errstate(divide="ignore"):
        small = np.where(flat, np.log(-np.expm1(lt)), lt)  # log of the smaller mass, <= log 1/2
    q = np.minimum(np.rint(-small / step), TAIL_FLAG - 1)  # -inf (no mass) -> the largest code
    return np.where(flat, TAIL_FLAG + q, q).astype(np.uint16)


def decode_tail(q: np.ndarray, step: float) -> np.ndarray:
    """uint16 codes -> float32 log of the mass outside the top-k (see encode_tail)."""
    q = np.asarray(q)
    small = -step * (q & (TAIL_FLAG - 1)).astype(np.float64)
    with np.errstate(divide="ignore"):  # the top-k's mass coded as 1: no tail, log 0
        return np.where(q & TAIL_FLAG, np.log1p(-np.exp(small)), small).astype(np.float32)


def to_rank_order(ids: np.ndarray, lps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T, k) with ids ascending (as decoded) -> (T, k) by descending logprob; the stable sort
    keeps ties in ascending id order."""
    order = np.argsort(-lps, axis=-1, kind="stable")
    return np.take_along_axis(ids, order, -1), np.take_along_axis(lps, order, -1)


def check_row(row: Row, k: int, draws: int = 0) -> None:
    """Raise FormatError naming what is wrong with a row before it is written."""
    T = len(row.input_ids)
    problems = []
    if k and (row.topk_ids.shape != (T, k) or row.topk_logprobs.shape != (T, k)):
        problems.append(
            f"targets shaped {row.topk_ids.shape}/{row.topk_logprobs.shape}, expected ({T}, {k})"
        )
    if draws:
        ids, counts = row.sample_ids, row.sample_counts
        if ids is None or counts is None or ids.shape != counts.shape or len(ids) != T:
            problems.append(f"samples missing or not shaped ({T}, U)")
        else:
            total = counts.sum(-1)
            ok = total == np.where(row.target_mask, draws, 0)
            if k:  # a position whose top-k holds all the mass has no draws
                ok |= total == 0
            if not ok.all():
                problems.append(f"sample counts do not sum to {draws} where the mask is true")
            if k and row.topk_ids.shape == (T, k) and (
                    (ids[:, :, None] == row.topk_ids[:, None, :]).any(-1) & (counts > 0)).any():
                problems.append("a draw is in the top-k (with a top-k, draws come from outside "
                                "it)")
    if row.target_mask.shape != (T,):
        problems.append(f"target_mask shaped {row.target_mask.shape}, expected ({T},)")
    if k and (row.tail_logprob is None or row.tail_logprob.shape != (T,)):
        problems.append(f"tail_logprob missing or not shaped ({T},)")
    if row.label_logprob is None or row.label_logprob.shape != (T,):
        problems.append(f"label_logprob missing or not shaped ({T},)")
    elif row.target_mask.shape == (T,) and np.isnan(
            row.label_logprob[:-1][row.target_mask[:-1].astype(bool)]).any():
        problems.append("label_logprob missing (NaN) at a position with a target and a next "
                        "token")
    if T == 0:
        problems.append("empty row")
    if problems:
        raise FormatError(f"row {row.row_id}: " + "; ".join(problems))


def encode(rows: list[Row], k: int, logprob_step: float = DEFAULT_LOGPROB_STEP,
           draws: int = 0, sample_temperature: float = 1.0) -> pa.RecordBatch:
    """Rows -> one Arrow record batch in the shard schema (each position re-sorted by id)."""
    for r in rows:
        check_row(r, k, draws)
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum([len(r.input_ids) for r in rows])
    gaps, qs, toks, mask = [], [], [], []
    for r in rows:
        m = r.target_mask.astype(bool)
        ids = np.where(m[:, None], r.topk_ids, 0).astype(np.int64)
        by_id = np.argsort(ids, axis=-1, kind="stable")
        ids = np.take_along_axis(ids, by_id, -1)
        lp = np.where(m[:, None], np.take_along_axis(r.topk_logprobs, by_id, -1), 0.0)
        gap = np.diff(ids, axis=-1, prepend=0).astype(np.int32)
        if (gap[m, 1:] == 0).any():
            raise FormatError(f"row {r.row_id}: a position lists the same token id twice")
        gaps.append(gap)
        qs.append(quantise(lp, logprob_step))
        toks.append(r.input_ids.astype(np.int32))
        mask.append(m)
    pa_offsets = pa.array(offsets)

    def nested(chunks, typ):
        flat = pa.array(np.concatenate(chunks).reshape(-1), type=typ)
        return pa.ListArray.from_arrays(pa_offsets, pa.FixedSizeListArray.from_arrays(flat, k))

    def flat(chunks):
        return pa.ListArray.from_arrays(pa_offsets, pa.array(np.concatenate(chunks), pa.uint16()))

    # one value per position; 0 where there is none (no target; no next token for the label)
    tails = [np.where(m, encode_tail(r.tail_logprob, TAIL_STEP), 0)
             for r, m in zip(rows, mask)] if k else []
    labels = [quantise(np.where(_has_label(m), r.label_logprob, 0.0), LABEL_STEP)
              for r, m in zip(rows, mask)]
    with_response = any(r.response is not None for r in rows)
    s = schema(k, logprob_step, with_response, draws, sample_temperature)
    return pa.RecordBatch.from_arrays(
        [
            pa.array([r.row_id for r in rows], pa.string()),
            pa.ListArray.from_arrays(pa_offsets, pa.array(np.concatenate(toks), pa.int32())),
            pa.ListArray.from_arrays(pa_offsets, pa.array(np.concatenate(mask), pa.bool_())),
        ]
        + ([nested(gaps, pa.int32()), nested(qs, pa.uint16()), flat(tails)] if k else [])
        + (_encode_samples(rows, pa_offsets) if draws else [])
        + [flat(labels)]
        + ([pa.array([r.response for r in rows], pa.string())] if with_response else []),
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
ROW_COUNT_KEYS = ("softlabels.row_tokens", "softlabels.row_targets", "softlabels.row_ce_targets")


def row_counts(rows: list[Row]) -> dict[str, str]:
    """The footer metadata of `rows`: {key: base64 uint32 array}."""
    return encode_row_counts(np.array(
        [[len(r.input_ids) for r in rows], [int(r.target_mask.sum()) for r in rows],
         [int(r.target_mask[:-1].sum()) for r in rows]], np.int64).reshape(3, len(rows)))


def encode_row_counts(counts: np.ndarray) -> dict[str, str]:
    """(3, rows) [tokens, targets, ce targets] -> footer metadata {key: base64 uint32 array}."""
    import base64

    return {key: base64.b64encode(np.asarray(c, "<u4").tobytes()).decode()
            for key, c in zip(ROW_COUNT_KEYS, counts)}


def read_row_counts(meta: dict[bytes, bytes] | None, n_rows: int) -> np.ndarray | None:
    """(3, n_rows) int64 [tokens, targets, ce targets] from a file's metadata, or None."""
    import base64

    meta = meta or {}
    if not all(k.encode() in meta for k in ROW_COUNT_KEYS):
        return None
    out = np.stack([np.frombuffer(base64.b64decode(meta[k.encode()]), "<u4").astype(np.int64)
                    for k in ROW_COUNT_KEYS])
    if out.shape != (3, n_rows):
        raise FormatError(f"footer row counts cover {out.shape[1]} rows, the file has {n_rows}")
    return out


def count_rows(table: pa.Table | pa.RecordBatch) -> np.ndarray:
    """(3, rows) int64 [tokens, targets, ce targets] counted from input_ids and target_mask: what
    the footer counts must equal (and what a reader uses for shards written without them)."""
    import pyarrow.compute as pc

    lens = pc.list_value_length(table.column("input_ids")).to_numpy(
        zero_copy_only=False).astype(np.int64)
    mask = pc.list_flatten(table.column("target_mask")).to_numpy(zero_copy_only=False)
    ends = np.cumsum(lens)
    csum = np.zeros(len(mask) + 1, np.int64)
    np.cumsum(mask, out=csum[1:])
    targets = csum[ends] - csum[ends - lens]
    last = csum[ends] - csum[np.maximum(ends - 1, 0)]  # the row's last position has a target
    return np.stack([lens, targets, targets - np.where(lens > 0, last, 0)])


def _one_batch(batch: pa.RecordBatch | pa.Table) -> pa.RecordBatch | None:
    if isinstance(batch, pa.Table):
        return batch.combine_chunks().to_batches()[0] if batch.num_rows else None
    return batch


class BadRows(FormatError):
    """Rows whose stored values break the format: `rows` is [(row_id, what is wrong)]."""

    def __init__(self, rows: list[tuple[str, str]]):
        self.rows = rows
        super().__init__(f"row {rows[0][0]}: {rows[0][1]} ({len(rows)} bad rows)")


def bad_rows(batch: pa.RecordBatch | pa.Table, enc: Encoding, vocab_size: int
             ) -> list[tuple[str, str]]:
    """[(row_id, what is wrong)] for every row whose stored values break the format.

    The one definition of valid values (`_problems`): `verify` lists what this finds, and
    `decode(..., vocab_size=)` (what the reader calls) refuses the same rows, so a dataset that
    fails verification never trains."""
    batch = _one_batch(batch)
    if batch is None:
        return []
    return _problems(batch, _arrays(batch, enc), vocab_size, enc)


@dataclass
class _Flat:
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


def _arrays(batch: pa.RecordBatch, enc: Encoding) -> _Flat | None:
    """The flattened arrays, or None if the list columns disagree in length (then nothing per
    position can be checked or decoded)."""
    lens = [np.diff(batch.column(c).offsets.to_numpy()) for c in enc.list_columns]
    if any((x != lens[0]).any() for x in lens[1:]):
        return None
    k, n = enc.k, batch.num_rows
    tokens = batch.column("input_ids").flatten().to_numpy(zero_copy_only=False)
    f = _Flat(tokens,
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
    if enc.exact:
        f.label_q = batch.column("label_logprob_q").flatten().to_numpy()
        if k:
            f.tail_q = batch.column("tail_mass_q").flatten().to_numpy()
    return f


def _problems(batch: pa.RecordBatch, f: _Flat | None, vocab_size: int, enc: Encoding
              ) -> list[tuple[str, str]]:
    """The checks, vectorised over the batch on whole arrays (positions without a target hold
    zeros, so the mask is applied after the reductions; copying masked rows out cost more):
    the list columns agree in length; input ids lie in [0, vocab); at every position with a
    target the top-k ids are strictly ascending (distinct) and in [0, vocab), and their
    probabilities sum to at most exp(step / 2) (round-to-nearest can raise each by that
    factor); sampled ids likewise ascending, distinct and in [0, vocab), counts >= 1 summing to
    `draws` where the mask is true, and no samples where it is false. Log-probs need no range
    check: uint16 codes decode to [-65535 step, 0] by construction."""
    n = batch.num_rows
    why: list[str | None] = [None] * n

    def mark(rows: np.ndarray, reason: str) -> None:
        for i in np.unique(rows).tolist():
            why[i] = why[i] or reason

    if f is None:
        why = ["column lengths differ"] * n
    else:
        m, row_of = f.mask, f.row_of
        mark(row_of[(f.tokens < 0) | (f.tokens >= vocab_size)],
             f"input id outside [0, {vocab_size})")
        if enc.k:
            top = f.gaps.sum(-1, dtype=np.int64)  # ascending ids: the largest is the gap sum
            mark(row_of[m & ((f.gaps[:, 0] < 0) | (top >= vocab_size))],
                 f"target id outside [0, {vocab_size})")
            if enc.k > 1:
                mark(row_of[m & (f.gaps[:, 1:].min(-1) <= 0)],
                     "repeated or unordered id within a position")
            mass = np.exp(np.multiply(f.q, np.float32(-enc.logprob_step), dtype=np.float32)
                          ).sum(-1)
            mark(row_of[m & (mass > np.exp(enc.logprob_step / 2) + 1e-5)],
                 "probabilities sum to more than 1")
        if enc.exact:
            _check_exact(f, enc, mark)
        if enc.draws:
            pos = np.repeat(np.arange(len(m)), f.s_lens)
            first = np.ones(len(pos), bool)
            first[1:] = pos[1:] != pos[:-1]
            gaps = f.s_gaps.astype(np.int64)
            top = np.bincount(pos, weights=gaps, minlength=len(m))
            mark(row_of[pos[(first & (gaps < 0)) | (~first & (gaps <= 0))]],
                 "sampled ids repeated, unordered or negative within a position")
            mark(row_of[top >= vocab_size], f"sampled id outside [0, {vocab_size})")
            total = np.bincount(pos, weights=f.s_counts, minlength=len(m))
            mark(row_of[pos[f.s_counts == 0]], "a sampled id with count 0")
            wrong = total != np.where(m, enc.draws, 0)
            if enc.tail_draws:  # a position whose top-k holds all the mass has no draws
                wrong &= total != 0
            mark(row_of[wrong], f"sample counts do not sum to {enc.draws} where the mask is true "
                                "(or a position without a target has samples)")
            if enc.tail_draws:
                mark(row_of[pos[_in_topk(f, pos, first, gaps)]],
                     "a draw is in the top-k (with a top-k, draws come from outside it)")
    ids = batch.column("row_id").to_pylist() if any(why) else []
    return [(ids[i], w) for i, w in enumerate(why) if w]


def _check_exact(f: _Flat, enc: Encoding, mark) -> None:
    """Version 4's columns: nothing stored where there is no value; the top-k and the tail sum to
    1 within their rounding (each decoded value is within a factor exp(step / 2) of the truth);
    the label's log-prob equals its top-k entry within both roundings, or, outside the top-k,
    is at most the tail."""
    m, has, row_of = f.mask, f.has_label, f.row_of
    stray = ~has & (f.label_q != 0)
    if f.tail_q is not None:
        stray |= ~m & (f.tail_q != 0)
    mark(row_of[stray], "a tail or label value stored where the position has none")
    if not enc.k:
        return
    s, ts, ls = enc.logprob_step, enc.tail_step, enc.label_step
    lp = dequantise(f.q, s).astype(np.float64)  # (P, k)
    log_tail = decode_tail(f.tail_q, ts).astype(np.float64)
    total = np.exp(lp).sum(-1) + np.exp(log_tail)
    mark(row_of[m & (np.abs(total - 1) > np.expm1(max(s, ts) / 2) + 1e-5)],
         "the top-k and the tail mass do not sum to 1")
    ids = np.cumsum(f.gaps, -1, dtype=np.int64)
    nxt = np.append(f.tokens[1:], -1).astype(np.int64)  # the next token (within a row: `has`)
    at = ids == nxt[:, None]
    inside = at.any(-1)
    label = -ls * f.label_q.astype(np.float64)
    topk_value = np.where(at, lp, 0.0).sum(-1)
    off = np.where(inside, np.abs(label - topk_value) > (s + ls) / 2 + 1e-5,
                   label > log_tail + (ls + ts) / 2 + 1e-5)
    mark(row_of[has & off], "the label's log-prob disagrees with the top-k or the tail")


def _in_topk(f: _Flat, pos: np.ndarray, first: np.ndarray, gaps: np.ndarray) -> np.ndarray:
    """(S,) whether each sampled id is also in its position's top-k: keys position << 32 | id
    are ascending in both lists, so one searchsorted answers all (the stable sort is a pass over
    keys already in order; it only matters for rows the other checks reject)."""
    cum = np.cumsum(gaps)
    start = np.flatnonzero(first)
    sid = cum - np.repeat(cum[start] - gaps[start], np.diff(np.append(start, len(cum))))
    top = np.cumsum(f.gaps, -1, dtype=np.int64)[f.mask]
    tkey = np.sort(((np.flatnonzero(f.mask)[:, None] << 32) | top).ravel(), kind="stable")
    skey = (pos.astype(np.int64) << 32) | sid
    if not len(tkey):
        return np.zeros(len(skey), bool)
    return tkey[np.minimum(np.searchsorted(tkey, skey), len(tkey) - 1)] == skey


def padded_samples(f: _Flat) -> tuple[np.ndarray, np.ndarray]:
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


def decode(batch: pa.RecordBatch | pa.Table, enc: Encoding, vocab_size: int | None = None
           ) -> list[Row]:
    """One record batch (or table) -> rows, zero-copy reshapes to (T, k) where possible.

    With `vocab_size`, the rows are checked first (the checks of `bad_rows`) and BadRows is
    raised if any breaks the format."""
    batch = _one_batch(batch)
    if batch is None:
        return []
    cols = {name: batch.column(name) for name in batch.schema.names}
    offsets = cols["input_ids"].offsets.to_numpy()
    offsets = offsets - offsets[0]
    f = _arrays(batch, enc)  # flatten() honours slicing, unlike .values
    if f is None:
        raise BadRows(_problems(batch, None, vocab_size or 0, enc))
    if vocab_size is not None:
        bad = _problems(batch, f, vocab_size, enc)
        if bad:
            raise BadRows(bad)
    ids, lps = to_rank_order(np.cumsum(f.gaps, axis=-1, dtype=np.int64).astype(np.int32),
                             dequantise(f.q, enc.logprob_step))
    s_ids, s_counts = padded_samples(f) if enc.draws else (None, None)
    tail = label = None
    if enc.exact:
        label = np.where(f.has_label, dequantise(f.label_q, enc.label_step), np.nan)
        if enc.k:
            tail = decode_tail(f.tail_q, enc.tail_step)
    responses = cols["response"].to_pylist() if "response" in cols else None
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
            )
        )
    return rows
