"""axolotl's KD layout (src/axolotl/integrations/kd, v0.21): its prepared rows into softlabels
rows, and softlabels rows into its columns.

A prepared row (what its KD trainer reads, from Hub Parquet or a `save_to_disk` folder) holds
`input_ids`, `attention_mask`, `labels` (-100: ignored) and, per position, `target_token_ids`
[T, K], `target_logprobs` [T, K] and `target_mask` [T, K]. Its trainer pairs the student's
hidden state t with target row t (as softlabels pairs position t with the token after it), and
drops the (position, k) entries whose mask is 0; its data path front-pads target rows it has no
logprobs for and masks each by `labels[t]`. The log-probs are renormalised over the K (softmax
of the teacher's top-K, at the KD temperature): the teacher's mass outside them is gone.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from softlabels.data.errors import UserError
from softlabels.data.format import Row, list_column, row_at

COLUMNS = ("input_ids", "target_token_ids", "target_logprobs", "target_mask")
# A renormalised position sums to 1 in float32 up to rounding; more is another kind of data.
RENORMALISED = 1e-3


def read_rows(batch: pa.RecordBatch, first: int, k: int, vocab: int, where: str
              ) -> tuple[list[Row], dict]:
    """The rows of a batch of prepared rows whose first is source row `first`, and
    {"skipped": the ids of rows with no target}. Every target row must have `k` entries, a mask
    of all 1 or all 0, and (where 1) ids in [0, vocab) and log-probs that sum to 1: else a
    one-line UserError naming the row."""
    n = batch.num_rows
    names = batch.schema.names
    off, ids = list_column(batch.column("input_ids"))
    tokens = ids.to_numpy(zero_copy_only=False).astype(np.int64)
    lens = np.diff(off)
    pos = []  # per target column: (P, k) values
    for name in COLUMNS[1:]:
        o, inner = list_column(batch.column(name))
        io, vals = list_column(inner)
        bad = np.flatnonzero(np.diff(o) != lens)
        if len(bad):
            raise UserError(f"{where}: row {first + bad[0]}: {np.diff(o)[bad[0]]} {name} rows for "
                            f"{lens[bad[0]]} input ids; axolotl's prepared rows have one per "
                            "position")
        width = np.diff(io)
        if (width != k).any():
            p = int(np.flatnonzero(width != k)[0])
            raise UserError(f"{where}: row {first + row_at(off, p)}: {name} has {width[p]} entries "
                            f"at position {p - off[row_at(off, p)]}, the dataset's first row {k}: "
                            "lists of unequal length")
        pos.append(vals.to_numpy(zero_copy_only=False).reshape(-1, k))
    tid, lps, tmask = pos
    if "attention_mask" in names:
        am = list_column(batch.column("attention_mask"))[1].to_numpy(zero_copy_only=False)
        if (am != 1).any():
            p = int(np.flatnonzero(am != 1)[0])
            raise UserError(f"{where}: row {first + row_at(off, p)}: attention_mask "
                            f"{int(am[p])}: padded or packed rows are not axolotl's prepared "
                            "layout (one sequence per row)")
    on = tmask.astype(bool)
    mask = on.all(-1)
    if (on.any(-1) != mask).any():
        p = int(np.flatnonzero(on.any(-1) != mask)[0])
        raise UserError(f"{where}: row {first + row_at(off, p)}: target_mask at position "
                        f"{p - off[row_at(off, p)]} is neither all 0 nor all 1")
    tid = tid.astype(np.int64)
    lps = lps.astype(np.float64)
    for what, bad in (
            (f"an input id outside [0, {vocab})", (tokens < 0) | (tokens >= vocab)),
            (f"a target id outside [0, {vocab})", mask & ((tid < 0) | (tid >= vocab)).any(-1)),
            ("a log-prob that is NaN or above 0", mask & ~(lps <= 1e-6).all(-1))):
        if bad.any():
            p = int(np.flatnonzero(bad)[0])
            raise UserError(f"{where}: row {first + row_at(off, p)}: {what} at position "
                            f"{p - off[row_at(off, p)]}")
    with np.errstate(over="ignore"):
        total = np.exp(lps).sum(-1)
    off1 = mask & (np.abs(total - 1) > RENORMALISED)
    if off1.any():
        p = int(np.flatnonzero(off1)[0])
        raise UserError(f"{where}: row {first + row_at(off, p)}: target probabilities sum to "
                        f"{total[p]:.4f} at position {p - off[row_at(off, p)]}, not 1: axolotl's "
                        "prepared rows are renormalised over the K")
    order = np.argsort(-lps, -1, kind="stable")  # rank order, as a decoded row has it
    tid = np.take_along_axis(tid, order, -1).astype(np.int32)
    lps = np.take_along_axis(lps, order, -1).astype(np.float32)
    rows, skipped = [], []
    for i in range(n):
        a, b = off[i], off[i + 1]
        rid = f"{first + i}:0"
        if b == a or not mask[a:b].any():
            skipped.append(rid)
            continue
        m = mask[a:b]
        rows.append(Row(rid, tokens[a:b].astype(np.int32),
                        np.where(m[:, None], tid[a:b], 0), np.where(m[:, None], lps[a:b], 0),
                        m, tail_logprob=np.full(b - a, -np.inf, np.float32)))
    return rows, {"skipped": skipped}


SCHEMA = pa.schema([
    pa.field("input_ids", pa.list_(pa.int32())),
    pa.field("attention_mask", pa.list_(pa.int8())),
    pa.field("labels", pa.list_(pa.int32())),
    pa.field("target_token_ids", pa.list_(pa.list_(pa.int32()))),
    pa.field("target_logprobs", pa.list_(pa.list_(pa.float32()))),
    pa.field("target_mask", pa.list_(pa.list_(pa.int8()))),
])


def columns(rows: list[Row], k: int) -> pa.RecordBatch:
    """softlabels rows -> a batch of axolotl's prepared rows, as its trainer reads them: target
    row t is position t's top-k renormalised over the k (its `kd_temperature` 1), rank order;
    positions without a target as its data path pads them (ids 0..k-1, -inf, mask 0); `labels`
    hold input_ids[t + 1] at position t + 1 where position t has a target (its trainer's
    cross-entropy reads labels[t + 1] at hidden state t), -100 elsewhere."""
    lens = np.array([len(r.input_ids) for r in rows], np.int64)
    off = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lens, out=off[1:])
    tokens = np.concatenate([r.input_ids for r in rows]).astype(np.int32)
    mask = np.concatenate([r.target_mask for r in rows]).astype(bool)
    ids = np.concatenate([r.topk_ids for r in rows]).astype(np.int32)
    lp = np.concatenate([r.topk_logprobs for r in rows]).astype(np.float64)
    with np.errstate(divide="ignore"):
        lp = lp - np.logaddexp.reduce(lp, -1, keepdims=True)
    ids = np.where(mask[:, None], ids, np.arange(k, dtype=np.int32))
    lp = np.where(mask[:, None], lp, -np.inf).astype(np.float32)
    first = np.zeros(len(tokens), bool)
    first[off[:-1]] = True
    labels = np.full(len(tokens), -100, np.int32)
    trained = np.zeros(len(tokens), bool)
    trained[1:] = mask[:-1] & ~first[1:]  # position t + 1 of the same row
    labels[trained] = tokens[trained]
    o = pa.array(off.astype(np.int32))
    inner = pa.array(np.arange(0, len(tokens) * k + 1, k, dtype=np.int32))

    def nested(values, typ):
        return pa.ListArray.from_arrays(o, pa.ListArray.from_arrays(inner, pa.array(
            values.reshape(-1), typ)))

    return pa.RecordBatch.from_arrays([
        pa.ListArray.from_arrays(o, pa.array(tokens)),
        pa.ListArray.from_arrays(o, pa.array(np.ones(len(tokens), np.int8))),
        pa.ListArray.from_arrays(o, pa.array(labels)),
        nested(ids, pa.int32()), nested(lp, pa.float32()),
        nested(np.repeat(mask.astype(np.int8), k), pa.int8()),
    ], schema=SCHEMA)
