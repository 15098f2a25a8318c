"""One shard file: `write_shard(path, rows, enc)` and `read_shard(path)`, a symmetric pair, and
`concat_shards` (units into a published shard, never re-quantised).

The Parquet settings that make top-k targets small are `_writer`'s (data/FORMAT.md, "Parquet
settings"). The writer checks every row before encoding it (checks.check_rows); the reader
checks every value it decodes, against `vocab_size` when given.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from softlabels.data.atomic import atomic_path
from softlabels.data.checks import BadRows, check_rows, problems
from softlabels.data.counts import (
    ROW_COUNT_KEYS,
    count_of,
    count_rows,
    encode_row_counts,
    read_row_counts,
)
from softlabels.data.dataset import ShardInfo, hashes
from softlabels.data.format import (
    LEAF_COLUMNS,
    Encoding,
    Row,
    decode,
    encode,
    flatten,
    optional_columns,
    schema,
)

ZSTD_LEVEL = 9
# A converter is bound by the writer (40 % of an import's time at level 9), a teacher run is
# not: level 3 wrote an imported shard 2.5x faster for 1.3 % more bytes (BENCHMARKS.md,
# "Importing DistillKit sets").
FAST_ZSTD_LEVEL = 3
ROW_GROUP_TOKENS = 32768  # reader memory is one row group: ~32k tokens x k entries


def write_shard(path: str | os.PathLike, rows: list[Row], enc: Encoding,
                row_group_tokens: int = ROW_GROUP_TOKENS) -> ShardInfo:
    """Encode `rows` into `path` atomically; return its manifest entry."""
    with shard_writer(path, enc, optional_columns(rows), row_group_tokens) as w:
        w.add(rows)
    return w.info


class ShardWriter:
    """Rows in, in any number of calls; row groups of ~`row_group_tokens` out as they fill, so a
    converter holds one row group, not a shard. The footer's row counts are added at the end."""

    def __init__(self, tmp: Path, enc: Encoding, optional: tuple[str, ...],
                 row_group_tokens: int, level: int = ZSTD_LEVEL):
        self.enc, self.group_tokens = enc, row_group_tokens
        self.writer = _writer(tmp, schema(enc, optional), level)
        self.pending: list[Row] = []
        self.tokens = 0  # in `pending`
        self.counts: list[np.ndarray] = []
        self.info: ShardInfo | None = None  # set once the shard is committed

    def add(self, rows: list[Row]) -> None:
        check_rows(rows, self.enc)
        for r in rows:
            if self.pending and self.tokens + len(r.input_ids) > self.group_tokens:
                self._flush()
            self.pending.append(r)
            self.tokens += len(r.input_ids)

    def _flush(self) -> None:
        if self.pending:
            self.writer.write_batch(encode(self.pending, self.enc))
            self.counts.append(count_of(self.pending))
            self.pending, self.tokens = [], 0

    def close(self) -> tuple[int, int]:
        """(rows, tokens) written; the file is complete after this."""
        self._flush()
        counts = np.hstack(self.counts) if self.counts else np.zeros((3, 0), np.int64)
        self.writer.add_key_value_metadata(encode_row_counts(counts))
        self.writer.close()
        return counts.shape[1], int(counts[0].sum())


@contextlib.contextmanager
def shard_writer(path: str | os.PathLike, enc: Encoding, optional: tuple[str, ...] = (),
                 row_group_tokens: int = ROW_GROUP_TOKENS, level: int = ZSTD_LEVEL):
    """A ShardWriter whose file becomes `path` atomically on a clean exit (its manifest entry is
    then `.info`); on an exception nothing appears."""
    path = Path(path)
    with atomic_path(path) as tmp:
        w = ShardWriter(tmp, enc, optional, row_group_tokens, level)
        try:
            yield w
        except BaseException:
            w.writer.close()  # (the temp file goes with atomic_path)
            raise
        rows, tokens = w.close()
        w.info = ShardInfo(file=path.name, rows=rows, tokens=tokens, **hashes(tmp))


def read_shard(path: str | os.PathLike, vocab_size: int | None = None
               ) -> tuple[list[Row], Encoding]:
    """Every row of one shard and its encoding; with `vocab_size`, every value checked first
    (BadRows names the rows that break the format)."""
    pf = pq.ParquetFile(path)
    enc = Encoding.from_schema(pf.schema_arrow)
    rows: list[Row] = []
    for g in range(pf.num_row_groups):
        for batch in pf.read_row_group(g).combine_chunks().to_batches():
            f = flatten(batch, enc)
            if vocab_size is not None and (bad := problems(batch, f, vocab_size, enc)):
                raise BadRows(bad)
            rows += decode(batch, enc, f)
    return rows, enc


def concat_shards(path: str | os.PathLike, sources: list) -> ShardInfo:
    """Write the row groups of `sources` (open binary files of shards of one encoding), in order,
    into one shard at `path`, atomically; footer row counts concatenated.

    The values are decoded from Parquet pages and re-compressed, never re-quantised: the rows
    are byte-for-byte the sources' rows."""
    path = Path(path)
    files = [pq.ParquetFile(f) for f in sources]
    base = files[0].schema_arrow
    meta = {k: v for k, v in base.metadata.items() if k.decode() not in ROW_COUNT_KEYS}
    counts, rows, tokens = [], 0, 0
    for f in files:
        if f.schema_arrow.remove_metadata() != base.remove_metadata() or {
                k: v for k, v in f.schema_arrow.metadata.items()
                if k.decode() not in ROW_COUNT_KEYS} != meta:
            raise ValueError(f"{path.name}: its units were written with different encodings")
        c = read_row_counts(f.metadata.metadata, f.metadata.num_rows)
        if c is None:
            c = np.hstack([count_rows(f.read_row_group(g)) for g in range(f.num_row_groups)])
        counts.append(c)
        rows += f.metadata.num_rows
        tokens += int(c[0].sum())
    with atomic_path(path) as tmp:
        with _writer(tmp, base.with_metadata(
                {**meta, **_encoded(encode_row_counts(np.hstack(counts)))})) as w:
            for f in files:
                for g in range(f.num_row_groups):
                    w.write_table(f.read_row_group(g), row_group_size=f.metadata.num_rows)
        hashed = hashes(tmp)
    return ShardInfo(file=path.name, rows=rows, tokens=tokens, **hashed)


def _encoded(meta: dict[str, str]) -> dict[bytes, bytes]:
    return {k.encode(): v.encode() for k, v in meta.items()}


def _writer(path: Path, s, level: int = ZSTD_LEVEL) -> pq.ParquetWriter:
    """Id gaps and quantised log-probs get BYTE_STREAM_SPLIT (so zstd sees the near-constant high
    bytes as one run) and no dictionary (a dictionary of 32k+ ids is larger than the data)."""
    return pq.ParquetWriter(
        path,
        s,
        compression="zstd",
        compression_level=level,
        use_dictionary=["row_id"],
        column_encoding={leaf: "BYTE_STREAM_SPLIT" for col, leaf in LEAF_COLUMNS.items()
                         if col in s.names},
        write_statistics=["row_id"],
    )
