"""The on-disk encoding of soft targets: one symmetric pair, `encode` and `decode`.

A row is one window of one input record. Per position t the teacher's top-k next-token
distribution is stored as ids in rank order plus quantised, delta-coded log-probabilities:

    Q[t, j] = round(-logprob[t, j] / step)      (non-decreasing in j, since ranks are sorted)
    q[t, 0] = Q[t, 0];  q[t, j] = Q[t, j] - Q[t, j-1]        (stored, uint16, mostly tiny)
    logprob[t, j] = -step * cumsum(q[t, :])[j]               (decoded)

Why this and not float16: the deltas of a sorted list are small non-negative integers, which
Parquet's BYTE_STREAM_SPLIT + zstd packs into a few bits each, and round-to-nearest in log space
keeps the KL error second order (about step**2 / 24 nats per token). The rule is repeated in
every file's Arrow schema metadata so any Parquet reader can decode without this package.
See data/FORMAT.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from data.errors import UserError

FORMAT_NAME = "softlabels"
FORMAT_VERSION = 1
DEFAULT_LOGPROB_STEP = 1 / 16
# Log-probabilities below this are clipped (vLLM can return -inf for impossible tokens).
MIN_LOGPROB = -1000.0

DECODING_RULE = (
    "topk_ids[t] are token ids in descending probability. "
    "logprob[t, j] = -logprob_step * cumsum(topk_logprob_deltas[t, :j+1]) : natural-log "
    "probabilities at temperature 1, normalised over the full vocabulary. Positions where "
    "target_mask[t] is false carry no target (zeros). targets[t] predicts the token after "
    "input_ids[0..t]."
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

    @property
    def record(self) -> int:
        return int(self.row_id.split(":")[0])

    @property
    def window(self) -> int:
        return int(self.row_id.split(":")[1])


def row_id(record: int, window: int) -> str:
    return f"{record}:{window}"


def schema(k: int, logprob_step: float = DEFAULT_LOGPROB_STEP) -> pa.Schema:
    """Arrow schema of a shard; its metadata carries the decoding rule and parameters."""
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
            pa.field("topk_ids", pa.list_(pa.list_(pa.int32(), k)), nullable=False),
            pa.field("topk_logprob_deltas", pa.list_(pa.list_(pa.uint16(), k)), nullable=False),
        ],
        metadata=meta,
    )


# Parquet leaf paths of the nested columns: encodings must name the leaf, or they are ignored.
LEAF_COLUMNS = {
    "input_ids": "input_ids.list.element",
    "topk_ids": "topk_ids.list.element.list.element",
    "topk_logprob_deltas": "topk_logprob_deltas.list.element.list.element",
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
    """(T, k) descending float logprobs -> (T, k) uint16 deltas of round(-lp / step)."""
    lp = np.clip(np.nan_to_num(logprobs, nan=MIN_LOGPROB, neginf=MIN_LOGPROB), MIN_LOGPROB, 0.0)
    q = np.rint(-lp.astype(np.float64) / step).astype(np.int64)
    q = np.maximum.accumulate(q, axis=-1)  # ties/rounding can never make a delta negative
    d = np.diff(q, axis=-1, prepend=0)
    if d.size and d.max() > np.iinfo(np.uint16).max:
        raise FormatError("a log-probability gap exceeds the uint16 range; raise logprob_step")
    return d.astype(np.uint16)


def dequantise(deltas: np.ndarray, step: float) -> np.ndarray:
    """(T, k) uint16 deltas -> (T, k) float32 logprobs."""
    return (-step * np.cumsum(deltas, axis=-1, dtype=np.int64)).astype(np.float32)


def check_row(row: Row, k: int, vocab_size: int | None = None) -> None:
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
    if vocab_size is not None and T and not problems:
        hi = max(int(row.input_ids.max()), int(row.topk_ids.max()))
        if hi >= vocab_size or min(int(row.input_ids.min()), int(row.topk_ids.min())) < 0:
            problems.append(f"token id out of range [0, {vocab_size})")
    if problems:
        raise FormatError(f"row {row.row_id}: " + "; ".join(problems))


def encode(rows: list[Row], k: int, logprob_step: float = DEFAULT_LOGPROB_STEP) -> pa.RecordBatch:
    """Rows -> one Arrow record batch in the shard schema (sorting each position by rank)."""
    for r in rows:
        check_row(r, k)
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum([len(r.input_ids) for r in rows])
    ids, lps, toks, mask = [], [], [], []
    for r in rows:
        order = np.argsort(-r.topk_logprobs, axis=-1, kind="stable")
        lp = np.take_along_axis(r.topk_logprobs, order, axis=-1)
        tid = np.take_along_axis(r.topk_ids, order, axis=-1)
        m = r.target_mask.astype(bool)
        lp = np.where(m[:, None], lp, 0.0)
        tid = np.where(m[:, None], tid, 0)
        ids.append(tid.astype(np.int32))
        lps.append(quantise(lp, logprob_step))
        toks.append(r.input_ids.astype(np.int32))
        mask.append(m)
    pa_offsets = pa.array(offsets)

    def nested(chunks, typ):
        flat = pa.array(np.concatenate(chunks).reshape(-1), type=typ)
        return pa.ListArray.from_arrays(pa_offsets, pa.FixedSizeListArray.from_arrays(flat, k))

    s = schema(k, logprob_step)
    return pa.RecordBatch.from_arrays(
        [
            pa.array([r.row_id for r in rows], pa.string()),
            pa.ListArray.from_arrays(pa_offsets, pa.array(np.concatenate(toks), pa.int32())),
            pa.ListArray.from_arrays(pa_offsets, pa.array(np.concatenate(mask), pa.bool_())),
            nested(ids, pa.int32()),
            nested(lps, pa.uint16()),
        ],
        schema=s,
    )


def decode(batch: pa.RecordBatch | pa.Table, enc: Encoding) -> list[Row]:
    """One record batch (or table) -> rows, zero-copy reshapes to (T, k) where possible."""
    if isinstance(batch, pa.Table):
        batch = batch.combine_chunks().to_batches()[0] if batch.num_rows else None
        if batch is None:
            return []
    k = enc.k
    cols = {name: batch.column(name) for name in batch.schema.names}
    offsets = cols["input_ids"].offsets.to_numpy()
    offsets = offsets - offsets[0]
    # flatten() honours slicing, unlike .values
    toks = cols["input_ids"].flatten().to_numpy(zero_copy_only=False)
    mask = cols["target_mask"].flatten().to_numpy(zero_copy_only=False)
    ids = cols["topk_ids"].flatten().flatten().to_numpy().reshape(-1, k)
    deltas = cols["topk_logprob_deltas"].flatten().flatten().to_numpy().reshape(-1, k)
    lps = dequantise(deltas, enc.logprob_step)
    rows = []
    for i, rid in enumerate(cols["row_id"].to_pylist()):
        a, b = offsets[i], offsets[i + 1]
        rows.append(
            Row(
                row_id=rid,
                input_ids=toks[a:b],
                topk_ids=ids[a:b],
                topk_logprobs=lps[a:b],
                target_mask=mask[a:b].astype(bool),
            )
        )
    return rows

