"""What values a shard may hold: the one definition, for the writer (`check_rows`, before a row
is encoded) and for every reader and `verify` (`bad_rows`, on the stored batch, vectorised).

A dataset that fails verification never trains: the reader refuses the same rows `verify` lists.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from softlabels.data.format import (
    TAIL_FLAG,
    Encoding,
    Flat,
    FormatError,
    Row,
    decode_tail,
    dequantise,
    flatten,
    one_batch,
)


def check_rows(rows: list[Row], enc: Encoding) -> None:
    """Raise FormatError naming the first row that does not fit `enc`, before it is written."""
    for r in rows:
        check_row(r, enc.k, enc.draws, enc.label_logprobs)


def check_row(row: Row, k: int, draws: int = 0, label: bool = True) -> None:
    """Raise FormatError naming what is wrong with a row before it is written (`label`: the
    encoding stores the label's log-prob)."""
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
    if label and (row.label_logprob is None or row.label_logprob.shape != (T,)):
        problems.append(f"label_logprob missing or not shaped ({T},)")
    elif label and row.target_mask.shape == (T,) and np.isnan(
            row.label_logprob[:-1][row.target_mask[:-1].astype(bool)]).any():
        problems.append("label_logprob missing (NaN) at a position with a target and a next "
                        "token")
    if row.writer_logprob is not None:
        # where a written token follows: a finite log-prob (encode would store NaN as 0 and
        # -inf as the float32 minimum, both of which pass as log-probs once written)
        w = row.writer_logprob
        if w.shape != (T,):
            problems.append(f"writer_logprob not shaped ({T},)")
        elif row.target_mask.shape == (T,) and not (
                np.isfinite(w[:-1]) & (w[:-1] <= 0))[row.target_mask[:-1].astype(bool)].all():
            problems.append("writer_logprob not a finite number <= 0 where a written token "
                            "follows")
    if T == 0:
        problems.append("empty row")
    if problems:
        raise FormatError(f"row {row.row_id}: " + "; ".join(problems))



class BadRows(FormatError):
    """Rows whose stored values break the format: `rows` is [(row_id, what is wrong)]."""

    def __init__(self, rows: list[tuple[str, str]]):
        self.rows = rows
        super().__init__(f"row {rows[0][0]}: {rows[0][1]} ({len(rows)} bad rows)")


def bad_rows(batch: pa.RecordBatch | pa.Table, enc: Encoding, vocab_size: int
             ) -> list[tuple[str, str]]:
    """[(row_id, what is wrong)] for every row whose stored values break the format.

    `verify` lists what this finds, and the reader refuses the same rows (`problems` on the
    arrays it decodes), so a dataset that fails verification never trains."""
    batch = one_batch(batch)
    if batch is None:
        return []
    return problems(batch, flatten(batch, enc), vocab_size, enc)


def problems(batch: pa.RecordBatch, f: Flat | None, vocab_size: int, enc: Encoding
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
        if enc.tail_column or enc.label_logprobs:
            _check_exact(f, enc, mark)
        if "writer_logprob" in batch.schema.names:
            _check_writer(batch.column("writer_logprob"), f, mark)
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


def _check_exact(f: Flat, enc: Encoding, mark) -> None:
    """The tail and label columns (version 4 on): nothing stored where there is no value; the
    top-k and the tail sum to 1 within their rounding (each decoded value is within a factor
    exp(step / 2) of the truth), and a renormalised top-k has no tail; the label's log-prob
    equals its top-k entry within both roundings, or, outside the top-k, is at most the tail."""
    m, has, row_of = f.mask, f.has_label, f.row_of
    stray = np.zeros(len(m), bool)
    if f.label_q is not None:
        stray |= ~has & (f.label_q != 0)
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
    if enc.topk_renormalised:
        mark(row_of[m & (f.tail_q != TAIL_FLAG - 1)],
             "a tail stored beside a top-k renormalised over the k")
    if f.label_q is None:
        return
    ids = np.cumsum(f.gaps, -1, dtype=np.int64)
    nxt = np.append(f.tokens[1:], -1).astype(np.int64)  # the next token (within a row: `has`)
    at = ids == nxt[:, None]
    inside = at.any(-1)
    label = -ls * f.label_q.astype(np.float64)
    topk_value = np.where(at, lp, 0.0).sum(-1)
    off = np.where(inside, np.abs(label - topk_value) > (s + ls) / 2 + 1e-5,
                   label > log_tail + (ls + ts) / 2 + 1e-5)
    mark(row_of[has & off], "the label's log-prob disagrees with the top-k or the tail")


def _check_writer(col: pa.ListArray, f: Flat, mark) -> None:
    """The writer's log-probs: one per position, a finite log-prob where a written token follows
    (`has_label`), 0 elsewhere."""
    off = np.diff(col.offsets.to_numpy()) != np.bincount(f.row_of, minlength=len(col))
    if off.any():
        mark(np.flatnonzero(off), "writer_logprob's length differs from input_ids'")
        return
    w = col.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    bad = np.where(f.has_label, ~np.isfinite(w) | (w > 0), w != 0)
    mark(f.row_of[bad], "a writer log-prob not a finite number <= 0 where a written token "
                        "follows, or stored where none does")


def _in_topk(f: Flat, pos: np.ndarray, first: np.ndarray, gaps: np.ndarray) -> np.ndarray:
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


