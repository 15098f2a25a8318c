"""Streaming reader: rows of a soft-label dataset, one row group in memory at a time.

Order is deterministic: the manifest's shards in order, each shard's row groups in order, rows in
order. With `shuffle`, row groups are visited in a seeded random order and rows are shuffled within
each group (a shuffle buffer of one row group keeps memory constant). `part`/`num_parts` keep every
num_parts-th row of that global order, so N readers together see every row exactly once.

What the reader hands out has passed the checks `softlabels verify` makes: every row group's values
(`bad_rows`, vectorised) and, the first time a shard is opened, its sha256 against the manifest
(one extra sequential read of the file, ~1 % of decoding it). A dataset whose publisher controls
the manifest can still make both agree, which is why the values are checked too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from softlabels.data.format import Encoding, FormatError, Row, bad_rows, decode
from softlabels.data.manifest import Manifest
from softlabels.data.writer import sha256_file


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
        self._hashed: set[int] = set()  # shards whose sha256 matched the manifest

    def _open(self, si: int) -> pq.ParquetFile:
        shard = self.manifest.shards[si]
        path = self.dir / shard.file
        if si not in self._hashed:
            if sha256_file(path) != shard.sha256:
                raise FormatError(f"{path}: sha256 differs from manifest.json (changed or damaged "
                                  "after publishing); `softlabels verify` lists every problem: "
                                  "regenerate or re-download the dataset")
            self._hashed.add(si)
        pf = pq.ParquetFile(path)
        enc = Encoding.from_schema(pf.schema_arrow)
        if (enc.k, enc.logprob_step) != (self.manifest.k, self.manifest.logprob_step):
            raise FormatError(f"{path} has k={enc.k}, step={enc.logprob_step}; the manifest says "
                              f"k={self.manifest.k}, step={self.manifest.logprob_step}")
        return pf

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
                    files = {si: self._open(si)}
                pf = files[si]
                enc = Encoding.from_schema(pf.schema_arrow)
                table = pf.read_row_group(g).take(local[keep])
                bad = bad_rows(table, enc, self.manifest.vocab_size)
                if bad:
                    rid, why = bad[0]
                    raise FormatError(
                        f"{self.manifest.shards[si].file} row {rid}: {why} ({len(bad)} bad rows in "
                        f"row group {g}); this dataset fails `softlabels verify {self.dir}`: "
                        "regenerate or re-download it")
                for gi, row in zip(idx[keep], decode(table, enc)):
                    yield int(gi), row
            base += n

    def __iter__(self) -> Iterator[Row]:
        for _, row in self.rows():
            yield row
