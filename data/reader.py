"""Streaming reader: rows of a soft-label dataset, one row group in memory at a time.

Order is deterministic: the manifest's shards in order, each shard's row groups in order, rows in
order. With `shuffle`, row groups are visited in a seeded random order and rows are shuffled within
each group (a shuffle buffer of one row group keeps memory constant). `part`/`num_parts` keep every
num_parts-th row of that global order, so N readers together see every row exactly once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from softlabels.data.format import Encoding, FormatError, Row, decode
from softlabels.data.manifest import Manifest


class SoftLabelReader:
    def __init__(
        self,
        directory: str | os.PathLike,
        shuffle: bool = False,
        seed: int = 0,
        part: int = 0,
        num_parts: int = 1,
    ):
        if not 0 <= part < num_parts:
            raise ValueError(f"part {part} not in [0, {num_parts})")
        self.dir = Path(directory)
        self.manifest = Manifest.load(self.dir)
        self.shuffle, self.seed, self.part, self.num_parts = shuffle, seed, part, num_parts

    def __len__(self) -> int:
        """Rows this part yields per epoch."""
        n = self.manifest.rows
        return n // self.num_parts + (1 if self.part < n % self.num_parts else 0)

    def _groups(self, epoch: int) -> list[tuple[int, int, int]]:
        """(shard index, row group index, rows) in visiting order."""
        groups = []
        for si, shard in enumerate(self.manifest.shards):
            md = pq.read_metadata(self.dir / shard.file)
            groups += [(si, g, md.row_group(g).num_rows) for g in range(md.num_row_groups)]
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(groups))
            groups = [groups[i] for i in order]
        return groups

    def rows(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[int, Row]]:
        """Yield (global index, row) for this part, skipping global rows before `start`.

        The global index is the row's position in the epoch's order over all parts, so a
        resumed reader can start exactly where it stopped.
        """
        files: dict[int, pq.ParquetFile] = {}
        base = 0
        for si, g, n in self._groups(epoch):
            if base + n <= start:
                base += n
                continue
            idx = np.arange(base, base + n)
            local = np.arange(n)
            if self.shuffle:
                local = np.random.default_rng([self.seed, epoch, si, g]).permutation(n)
            keep = (idx % self.num_parts == self.part) & (idx >= start)
            if keep.any():
                if si not in files:
                    files = {si: pq.ParquetFile(self.dir / self.manifest.shards[si].file)}
                pf = files[si]
                enc = Encoding.from_schema(pf.schema_arrow)
                if enc.k != self.manifest.k:
                    raise FormatError(f"{pf} has k={enc.k}, the manifest says {self.manifest.k}")
                table = pf.read_row_group(g).take(local[keep])
                for gi, row in zip(idx[keep], decode(table, enc)):
                    yield int(gi), row
            base += n

    def __iter__(self) -> Iterator[Row]:
        for _, row in self.rows():
            yield row
