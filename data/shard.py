"""One shard file: `write_shard(path, rows, enc)` and `read_shard(path)`, a symmetric pair, and
`concat_shards` (units into a published shard, never re-quantised).

The Parquet settings that make top-k targets small are `_writer`'s (data/FORMAT.md, "Parquet
settings"). The writer checks every row before encoding it (checks.check_rows); the reader
checks every value it decodes, against `vocab_size` when given.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from softlabels.data.atomic import atomic_path
from softlabels.data.checks import BadRows, check_rows, problems
from softlabels.data.counts import (
    ROW_COUNT_KEYS,
    count_rows,
    encode_row_counts,
    read_row_counts,
    row_counts,
)
from softlabels.data.dataset import ShardInfo, hashes
from softlabels.data.format import LEAF_COLUMNS, Encoding, Row, decode, encode, flatten, schema

ZSTD_LEVEL = 9
ROW_GROUP_TOKENS = 32768  # reader memory is one row group: ~32k tokens x k entries


def _row_groups(rows: list[Row], max_tokens: int):
    group, tokens = [], 0
    for r in rows:
        if group and tokens + len(r.input_ids) > max_tokens:
            yield group
            group, tokens = [], 0
        group.append(r)
        tokens += len(r.input_ids)
    if group:
        yield group


def write_shard(path: str | os.PathLike, rows: list[Row], enc: Encoding,
                row_group_tokens: int = ROW_GROUP_TOKENS) -> ShardInfo:
    """Encode `rows` into `path` atomically; return its manifest entry."""
    path = Path(path)
    check_rows(rows, enc)
    with atomic_path(path) as tmp:
        s = schema(enc, any(r.response is not None for r in rows))
        with _writer(tmp, s.with_metadata({**s.metadata, **_encoded(row_counts(rows))})) as w:
            for group in _row_groups(rows, row_group_tokens):
                w.write_batch(encode(group, enc))
        hashed = hashes(tmp)
    return ShardInfo(file=path.name, rows=len(rows),
                     tokens=int(sum(len(r.input_ids) for r in rows)), **hashed)


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


def _writer(path: Path, s) -> pq.ParquetWriter:
    """Id gaps and quantised log-probs get BYTE_STREAM_SPLIT (so zstd sees the near-constant high
    bytes as one run) and no dictionary (a dictionary of 32k+ ids is larger than the data)."""
    return pq.ParquetWriter(
        path,
        s,
        compression="zstd",
        compression_level=ZSTD_LEVEL,
        use_dictionary=["row_id"],
        column_encoding={leaf: "BYTE_STREAM_SPLIT" for col, leaf in LEAF_COLUMNS.items()
                         if col in s.names},
        write_statistics=["row_id"],
    )
