"""Several soft-label datasets as one stream of rows, in chosen proportions of target tokens.

An epoch of the mixture is one pass over the dataset that takes longest to go through at its
weight (its target tokens / its weight); the others are repeated as often as their weight asks,
each repetition in a new order (their reader's next epoch), the last one cut short. So with the
default weights (proportional to the datasets' target tokens) every dataset is seen exactly once
per epoch, and with a single dataset the mixture is that dataset's reader.

Rows are merged by when they are due: row i of dataset d, whose rows so far hold c_i target
tokens, is due at (c_{i-1} + t_i / 2) / w_d on the mixture's target-token clock. Sorting every
row by that time (stable, ties by dataset) puts dataset d's share of every prefix of the stream
within one row of w_d (Megatron's blended datasets do the same greedily, row by row); it is one
sort over the epoch's rows, from the footers alone, so start-up stays flat in the total size.
"""

from __future__ import annotations

import math
from pathlib import PurePosixPath

import numpy as np

from softlabels.data.errors import UserError
from softlabels.data.format import Row
from softlabels.data.reader import RowIndex, SoftLabelReader

MAX_EPOCH = 64  # an epoch's target tokens, at most, in multiples of all the datasets' together


def check_weights(weights, n: int) -> list[float] | None:
    """The weights normalised to sum to 1, None for the default, or a one-line UserError."""
    if weights is None or len(weights) == 0:
        return None
    if len(weights) != n:
        raise UserError(f"--data-weights has {len(weights)} values for {n} --data folders: give "
                        "one weight per dataset, in the same order")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise UserError(f"--data-weights {' '.join(map(str, weights))}: weights must be "
                        "finite and >= 0")
    top = max(weights)
    if top <= 0:
        raise UserError("--data-weights are all zero: at least one dataset must have weight")
    scaled = [w / top for w in weights]  # in [0, 1]: their sum cannot overflow (1e308 1e308)
    return [w / sum(scaled) for w in scaled]


def merge(targets: list[np.ndarray], weights) -> tuple[np.ndarray, np.ndarray]:
    """Rows of several sequences (their target counts, in order) -> (order into their
    concatenation, the sequence of each merged row), each row at the time it is due (see the
    module docstring)."""
    due = [(np.cumsum(t, dtype=np.float64) - t / 2) / w for t, w in zip(targets, weights)]
    seq = np.concatenate([np.full(len(t), i) for i, t in enumerate(targets)])
    order = np.lexsort((seq, np.concatenate(due)))
    return order, seq[order]


class Mixture:
    """The datasets' readers behind one `index(epoch)` / `read(epoch, positions)` pair, as the
    trainer uses a single reader: `source(epoch)` says which dataset each row comes from."""

    def __init__(self, folders, weights=None, seed: int = 0, shuffle: bool = True, cache=None):
        self.folders = [str(f) for f in folders]
        self.readers = [SoftLabelReader(f, shuffle=shuffle, seed=seed, cache=cache)
                        for f in self.folders]
        self.target_tokens = np.array([int(r._stored_index().kd_positions.sum())
                                       for r in self.readers], np.float64)
        empty = [f for f, t in zip(self.folders, self.target_tokens) if t == 0]
        if empty:
            raise UserError(f"{empty[0]} has no target tokens: it cannot take part in a mixture")
        given = check_weights(weights, len(self.folders))
        self.weights = (np.asarray(given) if given is not None else
                        self.target_tokens / self.target_tokens.sum())
        on = self.weights > 0
        # target tokens of one epoch: one pass over the dataset slowest to go through, at most
        # MAX_EPOCH times all of them, so that building an epoch costs memory and time in
        # proportion to the rows, not to the passes a tiny weight asks for (0.999999 0.000001:
        # a million passes over the first); such a dataset's pass then spans several epochs
        self.epoch_tokens = float(min((self.target_tokens[on] / self.weights[on]).max(),
                                      MAX_EPOCH * self.target_tokens.sum()))
        self.need = self.weights * self.epoch_tokens  # target tokens of each, per epoch
        self.passes = np.maximum(1, np.ceil(self.need / self.target_tokens - 1e-9)).astype(int)
        self._epoch: tuple[int, RowIndex, np.ndarray] | None = None

    @property
    def decoded(self) -> int:
        return sum(r.decoded for r in self.readers)

    @property
    def fetched(self) -> int:
        """Bytes the readers read from their stores (a cache's hits not counted)."""
        return sum(r.fetched for r in self.readers)

    def _sub_epoch(self, epoch: int, rep: int) -> int:
        """Dataset epochs used by mixture epoch `epoch`: consecutive, never reused."""
        return epoch * int(self.passes.max()) + rep

    def _build(self, epoch: int) -> tuple[RowIndex, np.ndarray]:
        if self._epoch and self._epoch[0] == epoch:
            return self._epoch[1], self._epoch[2]
        parts, used = [], []
        for d, reader in enumerate(self.readers):
            if self.weights[d] == 0:
                continue
            reps = [reader.index(self._sub_epoch(epoch, r)) for r in range(self.passes[d])]
            idx = RowIndex(*(np.concatenate([getattr(x, f) for x in reps])
                             for f in vars(reps[0])))
            c = np.cumsum(idx.kd_positions, dtype=np.float64)
            keep = int(np.searchsorted(c, self.need[d] - 1e-9) + 1)  # the last pass cut short
            parts.append(idx.take(np.arange(min(keep, len(c)))))
            used.append(d)
        order, source = merge([p.kd_positions for p in parts], self.weights[used])
        merged = RowIndex(*(np.concatenate([getattr(p, f) for p in parts])[order]
                            for f in vars(parts[0])))
        source = np.asarray(used)[source]
        self._epoch = (epoch, merged, source)
        return merged, source

    def index(self, epoch: int = 0) -> RowIndex:
        """The epoch's rows in mixture order (shard/group/local refer to each row's dataset)."""
        return self._build(epoch)[0]

    def source(self, epoch: int = 0) -> np.ndarray:
        """(R,) the dataset of each row of `index(epoch)`."""
        return self._build(epoch)[1]

    def read(self, epoch: int, positions: np.ndarray) -> tuple[list[Row], np.ndarray]:
        """The rows at these positions of the epoch, in that order, and their datasets."""
        positions = np.asarray(positions, np.int64)
        idx, src = self._build(epoch)
        sub, which = idx.take(positions), src[positions]
        rows: list[Row | None] = [None] * len(positions)
        for d in np.unique(which).tolist():
            at = np.flatnonzero(which == d)
            for i, row in zip(at.tolist(), self.readers[d].read_index(sub.take(at))):
                rows[i] = row
        return rows, which

    def seen(self, epochs: float) -> list[float]:
        """How many times each dataset is gone through in `epochs` mixture epochs."""
        return [float(epochs * n / t) for n, t in zip(self.need, self.target_tokens)]

    def name(self, d: int) -> str:
        return PurePosixPath(self.folders[d].rstrip("/")).name
