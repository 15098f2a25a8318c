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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from softlabels.data.errors import UserError

FORMAT_NAME = "softlabels"
FORMAT_VERSION = 1
DEFAULT_LOGPROB_STEP = 1 / 16
# Log-probabilities below this are clipped (vLLM can return -inf for impossible tokens).
MIN_LOGPROB = -1000.0

DECODING_RULE = (
    "per position t: ids = cumsum(topk_id_gaps[t]) (ascending token ids); "
    "logprobs = -logprob_step * topk_logprobs_q[t] (natural-log probabilities at temperature 1, "
    "normalised over the full vocabulary, same order as ids); sort by descending logprob for "
    "rank order. Positions where target_mask[t] is false carry no target (zeros). targets[t] "
    "predicts the token after input_ids[0..t]."
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

    @property
    def record(self) -> int:
        return int(self.row_id.split(":")[0])

    @property
    def window(self) -> int:
        return int(self.row_id.split(":")[1])


def row_id(record: int, window: int) -> str:
    return f"{record}:{window}"


def schema(k: int, logprob_step: float = DEFAULT_LOGPROB_STEP,
           with_response: bool = False) -> pa.Schema:
    """Arrow schema of a shard; its metadata carries the decoding rule and parameters.

    `with_response` adds the optional `response` column: the text of a teacher-written response,
    so the dataset doubles as an ordinary SFT dataset."""
    meta = {
        "softlabels.format": FORMAT_NAME,
        "softlabels.format_version": str(FORMAT_VERSION),
        "softlabels.k": str(k),
        "softlabels.logprob_step": repr(float(logprob_step)),
        "softlabels.decoding": DECODING_RULE,
    }
    return pa.schema(
        [
            pa.field("row_id", pa.string(), nullable=False),
            pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("target_mask", pa.list_(pa.bool_()), nullable=False),
            pa.field("topk_id_gaps", pa.list_(pa.list_(pa.int32(), k)), nullable=False),
            pa.field("topk_logprobs_q", pa.list_(pa.list_(pa.uint16(), k)), nullable=False),
        ]
        + ([pa.field("response", pa.string())] if with_response else []),
        metadata=meta,
    )


# Parquet leaf paths of the nested columns: encodings must name the leaf, or they are ignored.
LEAF_COLUMNS = {
    "input_ids": "input_ids.list.element",
    "topk_id_gaps": "topk_id_gaps.list.element.list.element",
    "topk_logprobs_q": "topk_logprobs_q.list.element.list.element",
}


@dataclass(frozen=True)
class Encoding:
    """What a reader needs to decode a file, read back from its schema metadata."""

    k: int
    logprob_step: float

    @classmethod
    def from_schema(cls, s: pa.Schema) -> Encoding:
        meta = {k.decode(): v.decode() for k, v in (s.metadata or {}).items()}
        if meta.get("softlabels.format") != FORMAT_NAME:
            raise FormatError("not a softlabels shard (schema metadata has no softlabels.format)")
        version = int(meta.get("softlabels.format_version", -1))
        if version != FORMAT_VERSION:
            raise FormatError(
                f"format version {version}, this softlabels reads version {FORMAT_VERSION}: "
                "use the softlabels release that wrote it, or regenerate the dataset"
            )
        return cls(k=int(meta["softlabels.k"]), logprob_step=float(meta["softlabels.logprob_step"]))


def quantise(logprobs: np.ndarray, step: float) -> np.ndarray:
    """float logprobs -> uint16 round(-lp / step), clipped at MIN_LOGPROB."""
    lp = np.clip(np.nan_to_num(logprobs, nan=MIN_LOGPROB, neginf=MIN_LOGPROB), MIN_LOGPROB, 0.0)
    q = np.rint(-lp.astype(np.float64) / step)
    if q.size and q.max() > np.iinfo(np.uint16).max:
        raise FormatError(f"logprob_step {step} cannot reach {MIN_LOGPROB} in uint16; raise it")
    return q.astype(np.uint16)


def dequantise(q: np.ndarray, step: float) -> np.ndarray:
    return (-step * q.astype(np.float64)).astype(np.float32)


def to_rank_order(ids: np.ndarray, lps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T, k) with ids ascending (as decoded) -> (T, k) by descending logprob; the stable sort
    keeps ties in ascending id order."""
    order = np.argsort(-lps, axis=-1, kind="stable")
    return np.take_along_axis(ids, order, -1), np.take_along_axis(lps, order, -1)


def check_row(row: Row, k: int) -> None:
    """Raise FormatError naming what is wrong with a row before it is written."""
    T = len(row.input_ids)
    problems = []
    if row.topk_ids.shape != (T, k) or row.topk_logprobs.shape != (T, k):
        problems.append(
            f"targets shaped {row.topk_ids.shape}/{row.topk_logprobs.shape}, expected ({T}, {k})"
        )
    if row.target_mask.shape != (T,):
        problems.append(f"target_mask shaped {row.target_mask.shape}, expected ({T},)")
    if T == 0:
        problems.append("empty row")
    if problems:
        raise FormatError(f"row {row.row_id}: " + "; ".join(problems))


def encode(rows: list[Row], k: int, logprob_step: float = DEFAULT_LOGPROB_STEP) -> pa.RecordBatch:
    """Rows -> one Arrow record batch in the shard schema (each position re-sorted by id)."""
    for r in rows:
        check_row(r, k)
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

    with_response = any(r.response is not None for r in rows)
    s = schema(k, logprob_step, with_response)
    return pa.RecordBatch.from_arrays(
        [
            pa.array([r.row_id for r in rows], pa.string()),
            pa.ListArray.from_arrays(pa_offsets, pa.array(np.concatenate(toks), pa.int32())),
            pa.ListArray.from_arrays(pa_offsets, pa.array(np.concatenate(mask), pa.bool_())),
            nested(gaps, pa.int32()),
            nested(qs, pa.uint16()),
        ]
        + ([pa.array([r.response for r in rows], pa.string())] if with_response else []),
        schema=s,
    )


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
    arrays = _arrays(batch, enc.k)
    if arrays is None:
        return _problems(batch, None, vocab_size, enc.logprob_step)
    _, _, gaps, q = arrays
    top = gaps.sum(-1, dtype=np.int64)  # ascending ids: the largest is the sum of the gaps
    mass = np.exp(np.multiply(q, np.float32(-enc.logprob_step), dtype=np.float32)).sum(-1)
    return _problems(batch, (*arrays[:3], top, mass), vocab_size, enc.logprob_step)


def _arrays(batch: pa.RecordBatch, k: int):
    """(tokens, mask, (P, k) gaps, (P, k) codes) flattened, or None if the four list columns
    disagree in length (then nothing per position can be checked or decoded)."""
    lens = [np.diff(batch.column(c).offsets.to_numpy()) for c in
            ("input_ids", "target_mask", "topk_id_gaps", "topk_logprobs_q")]
    if any((x != lens[0]).any() for x in lens[1:]):
        return None
    return (batch.column("input_ids").flatten().to_numpy(zero_copy_only=False),
            batch.column("target_mask").flatten().to_numpy(zero_copy_only=False).astype(bool),
            batch.column("topk_id_gaps").flatten().flatten().to_numpy().reshape(-1, k),
            batch.column("topk_logprobs_q").flatten().flatten().to_numpy().reshape(-1, k))


def _problems(batch: pa.RecordBatch, arrays, vocab_size: int, step: float
              ) -> list[tuple[str, str]]:
    """The checks, vectorised over the batch on whole arrays (positions without a target hold
    zeros, so the mask is applied after the reductions; copying masked rows out cost more):
    the four list columns agree in length; input ids lie in [0, vocab); at every position with
    a target the ids are strictly ascending (distinct) and in [0, vocab) — `top` is the largest
    id — and the probabilities sum (`mass`) to at most exp(step / 2) (round-to-nearest can raise
    each by that factor). Log-probs need no range check: uint16 codes decode to
    [-65535 step, 0] by construction."""
    n = batch.num_rows
    why: list[str | None] = [None] * n

    def mark(rows: np.ndarray, reason: str) -> None:
        for i in np.unique(rows).tolist():
            why[i] = why[i] or reason

    if arrays is None:
        why = ["column lengths differ"] * n
    else:
        toks, m, gaps, top, mass = arrays
        row_of = np.repeat(np.arange(n), np.diff(batch.column("input_ids").offsets.to_numpy()))
        mark(row_of[(toks < 0) | (toks >= vocab_size)], f"input id outside [0, {vocab_size})")
        mark(row_of[m & ((gaps[:, 0] < 0) | (top >= vocab_size))],
             f"target id outside [0, {vocab_size})")
        if gaps.shape[1] > 1:
            mark(row_of[m & (gaps[:, 1:].min(-1) <= 0)],
                 "repeated or unordered id within a position")
        mark(row_of[m & (mass > np.exp(step / 2) + 1e-5)], "probabilities sum to more than 1")
    ids = batch.column("row_id").to_pylist() if any(why) else []
    return [(ids[i], w) for i, w in enumerate(why) if w]


def decode(batch: pa.RecordBatch | pa.Table, enc: Encoding, vocab_size: int | None = None
           ) -> list[Row]:
    """One record batch (or table) -> rows, zero-copy reshapes to (T, k) where possible.

    With `vocab_size`, the rows are checked first (the checks of `bad_rows`, on the arrays
    decoding computes anyway) and BadRows is raised if any breaks the format."""
    batch = _one_batch(batch)
    if batch is None:
        return []
    cols = {name: batch.column(name) for name in batch.schema.names}
    offsets = cols["input_ids"].offsets.to_numpy()
    offsets = offsets - offsets[0]
    arrays = _arrays(batch, enc.k)  # flatten() honours slicing, unlike .values
    if arrays is None:
        raise BadRows(_problems(batch, None, vocab_size or 0, enc.logprob_step))
    toks, mask, gaps, q = arrays
    cum = np.cumsum(gaps, axis=-1, dtype=np.int64)
    lps = dequantise(q, enc.logprob_step)
    if vocab_size is not None:
        bad = _problems(batch, (toks, mask, gaps, cum[:, -1], np.exp(lps).sum(-1)), vocab_size,
                        enc.logprob_step)
        if bad:
            raise BadRows(bad)
    ids, lps = to_rank_order(cum.astype(np.int32), lps)
    responses = cols["response"].to_pylist() if "response" in cols else None
    rows = []
    for i, rid in enumerate(cols["row_id"].to_pylist()):
        a, b = offsets[i], offsets[i + 1]
        rows.append(
            Row(
                row_id=rid,
                input_ids=toks[a:b],
                topk_ids=ids[a:b],
                topk_logprobs=lps[a:b],
                target_mask=mask[a:b],
                response=responses[i] if responses else None,
            )
        )
    return rows

