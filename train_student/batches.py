"""From stored rows to training tensors: token-budget batches, split identically on every process.

Every process reads the same global row order and cuts it into the same chunks; a global
micro-batch is `num_processes` consecutive chunks and process p trains on chunk p. So all
processes run the same number of steps, each row is seen exactly once per epoch, every process
knows the global target-token count of a step without communicating, and the data position to
resume from is one integer (the global row index).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from softlabels.data.format import Row
from softlabels.data.reader import SoftLabelReader


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) long, right-padded
    attention_mask: torch.Tensor  # (B, L)
    pos: torch.Tensor  # (N,) flat indices into (B*L) of positions with a target
    ids: torch.Tensor  # (N, k) teacher top-k ids, -1 where the student cannot produce the id
    lp: torch.Tensor  # (N, k) teacher log-probs (T=1)
    labels: torch.Tensor  # (N,) next token, -1 at a window's last position
    weight: float = 1.0  # 0 for the filler chunk a process gets when the data runs out

    def to(self, device) -> Batch:
        t = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
        return Batch(**t, weight=self.weight)


def counts(rows: list[Row]) -> tuple[int, int]:
    """(KD target tokens, CE tokens) of rows: CE needs a known next token."""
    kd = sum(int(r.target_mask.sum()) for r in rows)
    ce = sum(int(r.target_mask[:-1].sum()) for r in rows)
    return kd, ce


def collate(rows: list[Row], student_vocab: int) -> Batch:
    B, L = len(rows), max(len(r.input_ids) for r in rows)
    input_ids = np.zeros((B, L), np.int64)
    attn = np.zeros((B, L), np.int64)
    pos, ids, lps, labels = [], [], [], []
    for b, r in enumerate(rows):
        T = len(r.input_ids)
        input_ids[b, :T] = r.input_ids
        attn[b, :T] = 1
        t = np.flatnonzero(r.target_mask)
        pos.append(b * L + t)
        ids.append(r.topk_ids[t])
        lps.append(r.topk_logprobs[t])
        nxt = np.append(r.input_ids[1:], -1).astype(np.int64)
        labels.append(nxt[t])
    ids = np.concatenate(ids).astype(np.int64)
    lp = np.concatenate(lps).astype(np.float32)
    # A teacher id the student cannot produce (teacher's padded vocab) is no target (-1): the
    # loss leaves the slot out and counts its teacher mass in the tail.
    ids[ids >= student_vocab] = -1
    return Batch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attn),
        pos=torch.from_numpy(np.concatenate(pos).astype(np.int64)),
        ids=torch.from_numpy(ids),
        lp=torch.from_numpy(lp),
        labels=torch.from_numpy(np.concatenate(labels)),
    )


def chunks(stream: Iterator[tuple[int, Row]], batch_tokens: int) -> Iterator[tuple[int, list]]:
    """Cut (index, row) into lists of rows of at most batch_tokens tokens (at least one row).

    Yields (global index after the chunk's last row, rows).
    """
    chunk, tokens, end = [], 0, 0
    for gi, row in stream:
        if chunk and tokens + len(row.input_ids) > batch_tokens:
            yield end, chunk
            chunk, tokens = [], 0
        chunk.append(row)
        tokens += len(row.input_ids)
        end = gi + 1
    if chunk:
        yield end, chunk


def global_batches(
    reader: SoftLabelReader, epoch: int, start: int, batch_tokens: int, num_processes: int
) -> Iterator[tuple[int, list[list[Row]]]]:
    """Yield (resume index, one chunk per process); a short last batch is filled with
    zero-weight copies so every process still takes part in the step."""
    group, end = [], start
    for end, chunk in chunks(reader.rows(epoch=epoch, start=start), batch_tokens):
        group.append(chunk)
        if len(group) == num_processes:
            yield end, group
            group = []
    if group:
        yield end, group + [None] * (num_processes - len(group))
