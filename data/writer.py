"""Writes one shard: rows -> a Parquet file with the encodings that make top-k targets small."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from softlabels.data.atomic import atomic_path
from softlabels.data.format import (
    DEFAULT_LOGPROB_STEP,
    LEAF_COLUMNS,
    ROW_COUNT_KEYS,
    Row,
    count_rows,
    encode,
    encode_row_counts,
    read_row_counts,
    row_counts,
    schema,
)

ZSTD_LEVEL = 9
ROW_GROUP_TOKENS = 32768  # reader memory is one row group: ~32k tokens x k entries


@dataclass
class ShardInfo:
    """What the manifest records of a committed shard."""

    file: str
    rows: int
    tokens: int
    sha256: str
    bytes: int


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def write_shard(
    path: str | os.PathLike,
    rows: list[Row],
    k: int,
    logprob_step: float = DEFAULT_LOGPROB_STEP,
    row_group_tokens: int = ROW_GROUP_TOKENS,
    draws: int = 0,
    sample_temperature: float = 1.0,
) -> ShardInfo:
    """Encode `rows` into `path` atomically; return its manifest entry."""
    path = Path(path)
    with atomic_path(path) as tmp:
        s = schema(k, logprob_step, any(r.response is not None for r in rows), draws,
                   sample_temperature)
        with _writer(tmp, s.with_metadata({**s.metadata, **_encoded(row_counts(rows))})) as w:
            for group in _row_groups(rows, row_group_tokens):
                w.write_batch(encode(group, k, logprob_step, draws, sample_temperature))
        digest = sha256_file(tmp)
        size = tmp.stat().st_size
    return ShardInfo(
        file=path.name,
        rows=len(rows),
        tokens=int(sum(len(r.input_ids) for r in rows)),
        sha256=digest,
        bytes=size,
    )


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
        digest = sha256_file(tmp)
        size = tmp.stat().st_size
    return ShardInfo(file=path.name, rows=rows, tokens=tokens, sha256=digest, bytes=size)


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
