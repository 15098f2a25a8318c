"""From stored rows to training tensors: token-budget batches, split identically on every process.

Every process plans the same epoch from the row index (the shards' footers: token and target
counts per row) and cuts it into the same chunks; a global micro-batch is `num_processes`
consecutive chunks and process p decodes and trains on chunk p only. So all processes run the
same number of steps, each row is seen exactly once per epoch, every process knows the global
target-token count of a step without communicating or decoding others' rows, and the data
position to resume from is one integer (the global row index).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from softlabels.data.errors import UserError
from softlabels.data.format import Row, log1mexp
from softlabels.data.reader import RowIndex
from softlabels.train_student.losses import NEG


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) long, right-padded
    attention_mask: torch.Tensor  # (B, L)
    pos: torch.Tensor  # (N,) flat indices into (B*L) of positions with a target
    ids: torch.Tensor  # (N, S) teacher target ids, -1 for a slot with no target
    lp: torch.Tensor  # (N, S) their teacher log-probs (T=1)
    rest: torch.Tensor  # (N,) log of the teacher's mass on no id of `ids` (NEG: none)
    label_lp: torch.Tensor  # (N,) teacher log-prob of the label; NaN: not stored
    labels: torch.Tensor  # (N,) next token, -1 at a window's last position
    source: torch.Tensor  # (N,) the dataset of each position (its index in a mixture)
    writer_lp: torch.Tensor  # (N,) log-prob of the label under the model that wrote it; NaN: none

    def to(self, device) -> Batch:
        return Batch(**{k: v.to(device) for k, v in vars(self).items()})


def _log(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(x)


def _topk(row: Row, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, k) ids, (n, k) log-probs and (n,) log of the mass outside them, summing to exactly 1.

    Format 4 stores the tail exactly (relative error <= tail_step / 2): the rounded top-k are
    scaled to 1 - tail, so a confident position keeps its tail. Older formats only have the
    rounded top-k: the tail is 1 - their sum, and a sum above 1 (rounding) is scaled to 1."""
    lp = row.topk_logprobs[t].astype(np.float64)
    total = np.logaddexp.reduce(lp, -1) if lp.shape[1] else np.full(len(t), -np.inf)
    if row.tail_logprob is not None:
        rest = row.tail_logprob[t].astype(np.float64)
        lp = lp - total[:, None] + log1mexp(np.minimum(rest, -1e-12))[:, None]
    else:
        rest = log1mexp(np.minimum(total, 0.0))
        lp = lp - np.maximum(total, 0.0)[:, None]
    return row.topk_ids[t].astype(np.int64), lp, rest


def _draws(row: Row, t: np.ndarray, exclude: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """(n, U) drawn ids, most drawn first, and log(count / their total): the draws' estimate of
    the distribution they were drawn from. `exclude` (n, k): ids whose draws are dropped
    (format 2's draws that fell inside the top-k, which is stored exactly)."""
    counts = row.sample_counts[t].astype(np.float64)
    sids = row.sample_ids[t].astype(np.int64)
    if exclude is not None:
        counts = np.where((sids[:, :, None] == exclude[:, None, :]).any(-1), 0.0, counts)
    order = np.argsort(-counts, -1, kind="stable")
    counts, sids = np.take_along_axis(counts, order, -1), np.take_along_axis(sids, order, -1)
    with np.errstate(invalid="ignore"):
        return sids, _log(counts / counts.sum(-1, keepdims=True))


def targets_of(row: Row, t: np.ndarray, targets: str
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, S) ids, (n, S) log-probs and (n,) log of the rest at positions t: what the loss trains
    on (-1 / NEG: no slot). Ids, their mass and the rest sum to 1 at every position.

    topk: the stored top-k and the tail. samples: the drawn ids with log(count / N), most drawn
    first: an unbiased estimate of the whole distribution, no rest. both: the top-k, and the tail
    shared among the drawn ids outside the top-k by their counts (unbiased too); where no draw is
    outside it, the tail stays the rest (the residual)."""
    if targets == "samples":
        sids, lp = _draws(row, t)
        rest = np.full(len(t), -np.inf)
    else:
        sids, lp, rest = _topk(row, t)
        if targets == "both":
            dids, dlp = _draws(row, t, exclude=sids)
            drawn = np.isfinite(dlp).any(-1)
            sids = np.concatenate([sids, dids], -1)
            lp = np.concatenate([lp, dlp + rest[:, None]], -1)
            rest = np.where(drawn, -np.inf, rest)
    absent = ~np.isfinite(lp)
    return (np.where(absent, -1, sids), np.where(absent, NEG, lp).astype(np.float32),
            np.maximum(rest, NEG).astype(np.float32))


def collate(rows: list[Row], student_vocab: int, targets: str | list[str] = "topk",
            sources: np.ndarray | None = None) -> Batch:
    """Rows -> a Batch; `sources` (B,) names each row's dataset, whose targets kind is
    `targets[source]` (one kind for all when `targets` is a string)."""
    B, L = len(rows), max(len(r.input_ids) for r in rows)
    sources = np.zeros(B, np.int64) if sources is None else np.asarray(sources, np.int64)
    kinds = [targets] if isinstance(targets, str) else list(targets)
    input_ids = np.zeros((B, L), np.int64)
    attn = np.zeros((B, L), np.int64)
    pos, ids, lps, rests, label_lps, labels, src, writer_lps = [], [], [], [], [], [], [], []
    for b, r in enumerate(rows):
        T = len(r.input_ids)
        input_ids[b, :T] = r.input_ids
        attn[b, :T] = 1
        t = np.flatnonzero(r.target_mask)
        pos.append(b * L + t)
        src.append(np.full(len(t), sources[b]))
        i, lp, rest = targets_of(r, t, kinds[sources[b] if len(kinds) > 1 else 0])
        ids.append(i)
        lps.append(lp)
        rests.append(rest)
        label_lps.append(r.label_logprob[t] if r.label_logprob is not None else
                         np.full(len(t), np.nan, np.float32))
        nxt = np.append(r.input_ids[1:], -1).astype(np.int64)
        labels.append(nxt[t])
        w = writer_logprobs(r)
        writer_lps.append(np.full(len(t), np.nan, np.float32) if w is None else w[t])
    width = max(x.shape[1] for x in ids)  # rows decoded apart can hold fewer distinct draws
    ids = np.concatenate([np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=-1)
                          for x in ids])
    lp = np.concatenate([np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=NEG)
                         for x in lps])
    rest = np.concatenate(rests)
    if student_vocab and input_ids.max() >= student_vocab:  # an IndexError (a device assert) below
        b = int(np.argmax(input_ids.max(-1)))
        raise UserError(f"row {rows[b].row_id}: input id {int(input_ids[b].max())} is beyond the "
                        f"student's vocabulary ({student_vocab}): the dataset holds ids its "
                        "tokenizer cannot have made (softlabels verify names them) or the "
                        "student's embeddings are too small")
    # A teacher id the student cannot produce (teacher's padded vocab) is no target (-1): its
    # teacher mass joins the rest, and the slot adds nothing on either side.
    beyond = ids >= student_vocab
    if beyond.any():
        rest = np.logaddexp(rest, _log(np.where(beyond, np.exp(lp), 0.0).sum(-1))
                            ).astype(np.float32)
        ids[beyond] = -1
        lp[beyond] = NEG
    return Batch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attn),
        pos=torch.from_numpy(np.concatenate(pos).astype(np.int64)),
        ids=torch.from_numpy(ids),
        lp=torch.from_numpy(lp),
        rest=torch.from_numpy(rest),
        label_lp=torch.from_numpy(np.concatenate(label_lps).astype(np.float32)),
        labels=torch.from_numpy(np.concatenate(labels)),
        source=torch.from_numpy(np.concatenate(src).astype(np.int64)),
        writer_lp=torch.from_numpy(np.concatenate(writer_lps).astype(np.float32)),
    )


def writer_logprobs(row: Row) -> np.ndarray | None:
    """(T,) the log-prob of each written token under the model that wrote it: the response
    model's own (--response-model), or, for responses the teacher wrote, the teacher's (its
    label log-prob); None for text no model wrote."""
    if row.writer_logprob is not None:
        return row.writer_logprob
    if row.response is not None:
        return row.label_logprob
    return None


def token_batches(stream: Iterator[tuple[int, Row]], batch_tokens: int
                  ) -> Iterator[tuple[int, list]]:
    """Cut (index, row) into lists of rows of at most batch_tokens tokens (at least one row).

    Yields (global index after the chunk's last row, rows). For evaluation, which streams."""
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


def cut(tokens: np.ndarray, batch_tokens: int) -> np.ndarray:
    """Chunk boundaries over rows of these token counts: a chunk takes consecutive rows while
    they fit in batch_tokens (at least one row). (C + 1,) indices, first 0, last len(tokens)."""
    cum = np.r_[0, np.cumsum(tokens)]
    bounds, a, n = [0], 0, len(tokens)
    while a < n:
        b = int(np.searchsorted(cum, cum[a] + batch_tokens, side="right")) - 1
        a = max(b, a + 1)
        bounds.append(a)
    return np.asarray(bounds)


@dataclass
class EpochPlan:
    """One epoch's global micro-batches, from the row index alone (nothing decoded).

    Micro-batch m is chunks m*P .. m*P+P-1 (P processes); process p trains on chunk m*P+p, or
    on a zero-weight copy of chunk m*P when the epoch's chunks have run out."""

    index: RowIndex
    bounds: np.ndarray  # chunk boundaries in the epoch's row order
    num_processes: int
    source: np.ndarray | None = None  # (R,) each row's dataset in a mixture

    @classmethod
    def make(cls, index: RowIndex, batch_tokens: int, num_processes: int,
             source: np.ndarray | None = None) -> EpochPlan:
        return cls(index, cut(index.tokens, batch_tokens), num_processes, source)

    @property
    def micro_batches(self) -> int:
        return -(-(len(self.bounds) - 1) // self.num_processes)

    def rows(self, m: int, p: int) -> tuple[np.ndarray, float]:
        """(row positions, weight) process p trains on in micro-batch m."""
        c = m * self.num_processes + p
        w = 1.0
        if c >= len(self.bounds) - 1:
            c, w = m * self.num_processes, 0.0
        return np.arange(self.bounds[c], self.bounds[c + 1]), w

    def counts(self, m: int) -> tuple[int, int]:
        """(KD target tokens, CE tokens) of micro-batch m over all processes."""
        a, b = self.start(m), self.end(m)
        return int(self.index.kd_positions[a:b].sum()), int(self.index.ce_positions[a:b].sum())

    def by_source(self, m: int, n: int) -> np.ndarray:
        """(2, n) KD target tokens and rows of each of n datasets in micro-batch m."""
        a, b = self.start(m), self.end(m)
        src = np.zeros(b - a, np.int64) if self.source is None else self.source[a:b]
        return np.stack([np.bincount(src, self.index.kd_positions[a:b], n),
                         np.bincount(src, minlength=n)]).astype(np.int64)

    def start(self, m: int) -> int:
        return int(self.bounds[m * self.num_processes])

    def end(self, m: int) -> int:
        return int(self.bounds[min((m + 1) * self.num_processes, len(self.bounds) - 1)])

    def at_row(self, row: int) -> int:
        """The micro-batch starting at global row `row` (a resume point)."""
        m = int(np.searchsorted(self.bounds[:: self.num_processes], row))
        if m < self.micro_batches and self.start(m) != row:
            raise ValueError(f"row {row} is not the start of a micro-batch")
        return m


def prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """Run `items` in a background thread, `depth` ahead: decoding overlaps the training step.

    An exception in the thread is raised in the consumer at the item where it happened; a
    consumer that stops early stops the thread (no producer left blocked on a full queue)."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(x) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, not swallowed
            put((done, e))

    t = threading.Thread(target=produce, name="softlabels-prefetch", daemon=True)
    t.start()
    try:
        while True:
            item, err = q.get()
            if err is not None:
                raise err
            if item is done:
                return
            yield item
    finally:
        # stop the producer and wait for it: a thread still decoding while the interpreter
        # shuts down aborts the process
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(timeout=0.1)
