"""Writes one shard: rows -> a Parquet file with the encodings that make top-k targets small."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from softlabels.data.atomic import atomic_path
from softlabels.data.format import (
    DEFAULT_LOGPROB_STEP,
    LEAF_COLUMNS,
    Row,
    encode,
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
) -> ShardInfo:
    """Encode `rows` into `path` atomically; return its manifest entry.

    Id gaps and quantised log-probs get BYTE_STREAM_SPLIT (so zstd sees the near-constant high
    bytes as one run) and no dictionary (a dictionary of 32k+ ids is larger than the data).
    """
    path = Path(path)
    encodings = {leaf: "BYTE_STREAM_SPLIT" for leaf in LEAF_COLUMNS.values()}
    with atomic_path(path) as tmp:
        s = schema(k, logprob_step, any(r.response is not None for r in rows))
        with pq.ParquetWriter(
            tmp,
            s.with_metadata({**s.metadata, **{k_.encode(): v.encode()
                                              for k_, v in row_counts(rows).items()}}),
            compression="zstd",
            compression_level=ZSTD_LEVEL,
            use_dictionary=["row_id"],
            column_encoding=encodings,
            write_statistics=["row_id"],
        ) as w:
            for group in _row_groups(rows, row_group_tokens):
                w.write_batch(encode(group, k, logprob_step))
        digest = sha256_file(tmp)
        size = tmp.stat().st_size
    return ShardInfo(
        file=path.name,
        rows=len(rows),
        tokens=int(sum(len(r.input_ids) for r in rows)),
        sha256=digest,
        bytes=size,
    )
