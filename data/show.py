"""`softlabels inspect DIR --row N`: one stored row, for a person or (with --json) a program."""

from __future__ import annotations

import json
import os

import numpy as np

from softlabels.data.dataset import load_tokenizer
from softlabels.data.errors import UserError
from softlabels.data.format import Row
from softlabels.data.reader import SoftLabelReader


def get_row(directory: str | os.PathLike, n: int) -> tuple[Row, int]:
    """The row and the dataset's draws per position."""
    reader = SoftLabelReader(directory)
    if not 0 <= n < reader.manifest.rows:
        raise UserError(f"--row {n} is out of range: the dataset has {reader.manifest.rows} rows")
    for _, row in reader.rows(start=n):
        return row, reader.manifest.draws
    raise UserError(f"row {n} not found")  # unreachable unless shards changed under us


def row_json(row: Row, draws: int = 0) -> dict:
    """`targets`: per position [[id, logprob], ...] in rank order (empty lists without top-k);
    `tail_mass`: the teacher's probability outside the stored top-k; `label_logprob`: its
    log-prob of the next token; with samples also `sampled`: per position [[id, count], ...]
    ascending ids, and `draws`. Positions without a value are null (`tail_mass` and
    `label_logprob` are all null for datasets older than format 4, which lack them)."""
    n = len(row.input_ids)
    tail = np.exp(row.tail_logprob) if row.tail_logprob is not None else [None] * n
    label = row.label_logprob if row.label_logprob is not None else np.full(n, np.nan)
    d = {
        "row_id": row.row_id,
        "input_ids": row.input_ids.tolist(),
        "targets": [[[int(i), float(lp)] for i, lp in zip(ids, lps)] if m else None
                    for ids, lps, m in zip(row.topk_ids, row.topk_logprobs, row.target_mask)],
        "mask": row.target_mask.tolist(),
        "tail_mass": [float(x) if m and x is not None else None
                      for x, m in zip(tail, row.target_mask)],
        "label_logprob": [None if np.isnan(x) else float(x) for x in label],
    }
    if draws:
        d["sampled"] = [[[int(i), int(c)] for i, c in zip(ids, cs) if c] if m else None
                        for ids, cs, m in zip(row.sample_ids, row.sample_counts,
                                              row.target_mask)]
        d["draws"] = draws
    return d


def render(row: Row, tok, top: int = 5, draws: int = 0) -> str:
    def text(i):
        return repr(tok.decode([int(i)])) if tok is not None else str(int(i))

    lines = [f"row {row.row_id}: {len(row.input_ids)} tokens, {int(row.target_mask.sum())} targets"]
    if tok is not None:
        # a token is part of a response when the position before it carries a target
        is_resp = np.concatenate([[False], row.target_mask[:-1]])
        if is_resp[1:].all():
            lines.append(repr(tok.decode(row.input_ids.tolist())))
        else:
            cuts = np.flatnonzero(np.diff(is_resp.astype(int))) + 1
            for seg in np.split(np.arange(len(row.input_ids)), cuts):
                label = "response:" if is_resp[seg[0]] else "prompt:  "
                lines.append(f"{label} {tok.decode(row.input_ids[seg].tolist())!r}")
    what = f"top-{top} next tokens (probability)" if row.topk_ids.shape[1] else \
        f"most drawn next tokens (count of {draws})"
    lines.append(f"{'t':>5} {'token':<16} {what}")
    for t, (tid, m) in enumerate(zip(row.input_ids, row.target_mask)):
        if not m:
            lines.append(f"{t:>5} {text(tid):<16} (context, no target)")
            continue
        ids, lps = row.topk_ids[t], row.topk_logprobs[t]
        if len(ids):
            if row.tail_logprob is not None:
                tail = f"tail {np.exp(row.tail_logprob[t]):.3g}"
            else:  # format < 4: only what the rounded top-k leave
                tail = f"tail ~{max(1 - float(np.exp(lps.astype(np.float64)).sum()), 0):.3f}"
            tops = "  ".join(f"{text(i)} {np.exp(lp):.3f}" for i, lp in zip(ids[:top], lps[:top]))
            lines.append(f"{t:>5} {text(tid):<16} {tops}  | {tail}")
        else:
            cs = row.sample_counts[t]
            order = np.argsort(-cs, kind="stable")[:top]
            lines.append(f"{t:>5} {text(tid):<16} " + "  ".join(
                f"{text(row.sample_ids[t][j])} {cs[j]}" for j in order if cs[j]))
    return "\n".join(lines)


def main(args) -> int:
    row, draws = get_row(args.dir, args.row)
    if args.json:
        print(json.dumps(row_json(row, draws)))
    else:
        print(render(row, load_tokenizer(args.dir), top=args.top, draws=draws))
    return 0
