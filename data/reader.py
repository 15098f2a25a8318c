"""Streaming reader: rows of a soft-label dataset, a few row groups in memory at a time.

An epoch's row order is planned from the shards' footers alone (`index`): which shard, row group
and row each global position is, and its token and target counts (stored at commit; counted from
two cheap columns for older shards). So a trainer knows every epoch's batches and step counts
before decoding anything, and each process decodes only the rows it trains on (`read`).

Order is deterministic: the manifest's shards in order, each shard's row groups in order, rows in
order. With `shuffle`, row groups are visited in a seeded random order, and the rows of each run
of `window` consecutive (shuffled) groups are shuffled together: a batch mixes rows of several
shards, while memory holds at most `window` row groups. `part`/`num_parts` (for `rows`) keep every
num_parts-th row of the global order, so N readers together see every row exactly once.

What the reader hands out has passed the checks `softlabels verify` makes: every row group's values
(checks.py, vectorised), each row's length against its footer count, and, the first time a shard
is opened, its sha256 against the manifest (one extra sequential read of the file, ~1 % of decoding
it). A dataset whose publisher controls the manifest can make hashes agree, hence the value checks.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from softlabels.data.checks import problems
from softlabels.data.counts import count_rows, read_row_counts
from softlabels.data.dataset import sha256_file
from softlabels.data.format import Encoding, FormatError, Row, decode, flatten, one_batch
from softlabels.data.manifest import Manifest

SHUFFLE_WINDOW = 8  # row groups shuffled together (~32k tokens each)


@dataclass
class RowIndex:
    """Every row of one epoch, in that epoch's order: where it is stored and what it counts."""

    shard: np.ndarray  # (R,) shard index in the manifest
    group: np.ndarray  # (R,) row group within the shard
    local: np.ndarray  # (R,) row within the row group
    tokens: np.ndarray  # (R,) tokens
    kd_positions: np.ndarray  # (R,) positions with a target (KD)
    ce_positions: np.ndarray  # (R,) positions with a target and a known next token (CE)

    def take(self, order: np.ndarray) -> RowIndex:
        return RowIndex(*(a[order] for a in vars(self).values()))


@contextlib.contextmanager
def damaged(path):
    """pyarrow's (and numpy's) errors on a shard that is not what its manifest says -> one
    FormatError naming the file: a truncated or altered file, even one whose hash the
    publisher fixed, is bad input, not a crash."""
    try:
        yield
    except FormatError:
        raise
    except FileNotFoundError as e:
        raise FormatError(f"{path}: missing; `softlabels verify` lists every problem") from e
    except (pa.ArrowException, OSError, ValueError, IndexError, KeyError, TypeError) as e:
        why = (str(e).splitlines() or [""])[0]
        raise FormatError(f"{path}: unreadable ({type(e).__name__}: {why}); the file is "
                          "damaged: regenerate or re-download the dataset") from e


class SoftLabelReader:
    def __init__(
        self,
        directory: str | os.PathLike,
        shuffle: bool = False,
        seed: int = 0,
        part: int = 0,
        num_parts: int = 1,
        window: int = SHUFFLE_WINDOW,
    ):
        if not 0 <= part < num_parts:
            raise ValueError(f"part {part} not in [0, {num_parts})")
        self.dir = Path(directory)
        self.manifest = Manifest.load(self.dir)
        self.shuffle, self.seed, self.part, self.num_parts = shuffle, seed, part, num_parts
        self.window = max(1, window)
        self.decoded = 0  # rows decoded by this reader (each process decodes only its own)
        self._encodings: dict[int, Encoding] = {}  # shards opened (sha256 checked)
        self._file: tuple[int, pq.ParquetFile] | None = None  # the shard open now
        self._stored: RowIndex | None = None  # every row in stored order, from the footers
        self._epoch: tuple[int, RowIndex] | None = None
        self._tables: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()  # undecoded groups

    def __len__(self) -> int:
        """Rows this part yields per epoch."""
        n = self.manifest.rows
        return n // self.num_parts + (1 if self.part < n % self.num_parts else 0)

    # ------------------------------------------------------------------ planning (footers only)

    def _stored_index(self) -> RowIndex:
        if self._stored is None:
            cols = []
            for si, shard in enumerate(self.manifest.shards):
                with damaged(self.dir / shard.file):
                    md = pq.read_metadata(self.dir / shard.file)
                    sizes = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
                    counts = read_row_counts(md.metadata, md.num_rows)
                    if counts is None:  # a shard written before the footer counts existed
                        counts = count_rows(pq.read_table(self.dir / shard.file,
                                                          columns=["input_ids", "target_mask"]))
                cols.append((np.full(md.num_rows, si), np.repeat(np.arange(len(sizes)), sizes),
                             np.concatenate([np.arange(n) for n in sizes]) if sizes else
                             np.zeros(0, np.int64), *counts))
            self._stored = RowIndex(*(np.concatenate(c).astype(np.int64) if c else
                                      np.zeros(0, np.int64) for c in
                                      (zip(*cols) if cols else [()] * 6)))
        return self._stored

    def index(self, epoch: int = 0) -> RowIndex:
        """The epoch's row order (see the module docstring); cached for the last epoch asked."""
        if self._epoch and self._epoch[0] == epoch:
            return self._epoch[1]
        stored = self._stored_index()
        if not self.shuffle:
            idx = stored
        else:
            # row groups as (shard, group) runs of the stored order
            key = stored.shard * (1 << 32) + stored.group
            starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
            ends = np.r_[starts[1:], len(key)]
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(starts))
            order = []
            for w in range(0, len(perm), self.window):
                groups = perm[w:w + self.window]
                rows = np.concatenate([np.arange(starts[g], ends[g]) for g in groups])
                order.append(np.random.default_rng([self.seed, epoch, w]).permutation(rows))
            idx = stored.take(np.concatenate(order) if order else np.zeros(0, np.int64))
        self._epoch = (epoch, idx)
        return idx

    # ------------------------------------------------------------------ reading

    def _table(self, si: int, g: int) -> tuple[pa.Table, Encoding]:
        """One row group, undecoded; with shuffle the last `window` are kept."""
        if (si, g) not in self._tables:
            pf, _ = self._open(si)
            with damaged(self.dir / self.manifest.shards[si].file):
                self._tables[(si, g)] = pf.read_row_group(g)
            # a shuffle window's groups are revisited; in order, each is read once
            while len(self._tables) > (self.window if self.shuffle else 1):
                self._tables.popitem(last=False)
        return self._tables[(si, g)], self._encodings[si]

    def _open(self, si: int) -> tuple[pq.ParquetFile, Encoding]:
        """A shard, its sha256 checked against the manifest the first time it is opened. The
        last one stays open: a fresh ParquetFile per row group made each read ~2x slower."""
        if self._file and self._file[0] == si:
            return self._file[1], self._encodings[si]
        shard = self.manifest.shards[si]
        path = self.dir / shard.file
        with damaged(path):
            if si not in self._encodings and sha256_file(path) != shard.sha256:
                raise FormatError(f"{path}: sha256 differs from manifest.json (changed or damaged "
                                  "after publishing); `softlabels verify` lists every problem: "
                                  "regenerate or re-download the dataset")
            pf = pq.ParquetFile(path)
            enc = Encoding.from_schema(pf.schema_arrow)
        m = self.manifest
        if not enc.matches(m):
            raise FormatError(f"{path} (format {enc.version}, k={enc.k}, step={enc.logprob_step},"
                              f" draws={enc.draws}) does not match the manifest (format "
                              f"{m.format_version}, k={m.k}, step={m.logprob_step}, "
                              f"draws={m.draws}); regenerate the dataset")
        self._encodings[si] = enc
        self._file = (si, pf)
        return pf, enc

    def read(self, epoch: int, positions: np.ndarray) -> list[Row]:
        """The rows at these global positions of the epoch, in that order, checked and decoded."""
        return self.read_index(self.index(epoch).take(np.asarray(positions, np.int64)))

    def read_index(self, idx: RowIndex) -> list[Row]:
        """The rows an index names (shard, group, row and their counts), in its order."""
        rows: list[Row | None] = [None] * len(idx.shard)
        keys = list(dict.fromkeys(zip(idx.shard.tolist(), idx.group.tolist())))
        for si, g in keys:
            at = np.flatnonzero((idx.shard == si) & (idx.group == g))
            table, enc = self._table(si, g)
            with damaged(self.dir / self.manifest.shards[si].file):
                rows_of_group = self._checked(table.take(idx.local[at]), idx, at, si, g, enc)
            for i, row in zip(at.tolist(), rows_of_group):
                rows[i] = row
        self.decoded += len(rows)
        return rows

    def _checked(self, taken: pa.Table, idx: RowIndex, at: np.ndarray, si: int, g: int,
                 enc: Encoding) -> list[Row]:
        """Rows of one row group, checked against their footer counts and the format, decoded."""
        # the footer's counts planned the batches and weigh the loss: they must be true
        counted = count_rows(taken)
        planned = np.stack([idx.tokens[at], idx.kd_positions[at], idx.ce_positions[at]])
        if (counted != planned).any():
            j = int(np.flatnonzero((counted != planned).any(0))[0])
            raise FormatError(
                f"{self.manifest.shards[si].file} row {taken.column('row_id')[j]}: "
                f"tokens/targets {counted[:, j].tolist()}, its footer says "
                f"{planned[:, j].tolist()}; regenerate or re-download the dataset")
        batch = one_batch(taken)
        flat = flatten(batch, enc)
        bad = problems(batch, flat, self.manifest.vocab_size, enc)  # what verify checks
        if bad:
            rid, why = bad[0]
            raise FormatError(
                f"{self.manifest.shards[si].file} row {rid}: {why} ({len(bad)} bad rows "
                f"in row group {g}); this dataset fails `softlabels verify {self.dir}`: "
                "regenerate or re-download it")
        return decode(batch, enc, flat)

    def rows(self, epoch: int = 0, start: int = 0, block: int = 256
             ) -> Iterator[tuple[int, Row]]:
        """Yield (global index, row) for this part, skipping global rows before `start`.

        The global index is the row's position in the epoch's order over all parts, so a
        resumed reader can start exactly where it stopped.
        """
        n = len(self.index(epoch).tokens)
        for a in range(start, n, block):
            mine = np.arange(a, min(a + block, n))
            mine = mine[mine % self.num_parts == self.part]
            if len(mine):
                yield from zip(mine.tolist(), self.read(epoch, mine))

    def __iter__(self) -> Iterator[Row]:
        for _, row in self.rows():
            yield row

