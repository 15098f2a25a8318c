"""Per-row counts in each shard's footer (file metadata), so a trainer plans an epoch from the
footers alone: tokens, positions with a target (KD) and positions with a target and a known next
token (CE), each a little-endian uint32 array in row order, base64. Optional: shards without them
are counted from their input_ids and target_mask columns (`count_rows`, which the footer counts
must equal).
"""

from __future__ import annotations

import base64

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from softlabels.data.format import FormatError, Row

ROW_COUNT_KEYS = ("softlabels.row_tokens", "softlabels.row_targets", "softlabels.row_ce_targets")


def count_of(rows: list[Row]) -> np.ndarray:
    """(3, rows) int64 [tokens, targets, ce targets] of decoded rows."""
    return np.array(
        [[len(r.input_ids) for r in rows], [int(r.target_mask.sum()) for r in rows],
         [int(r.target_mask[:-1].sum()) for r in rows]], np.int64).reshape(3, len(rows))


def encode_row_counts(counts: np.ndarray) -> dict[str, str]:
    """(3, rows) [tokens, targets, ce targets] -> footer metadata {key: base64 uint32 array}."""
    return {key: base64.b64encode(np.asarray(c, "<u4").tobytes()).decode()
            for key, c in zip(ROW_COUNT_KEYS, counts)}


def read_row_counts(meta: dict[bytes, bytes] | None, n_rows: int) -> np.ndarray | None:
    """(3, n_rows) int64 [tokens, targets, ce targets] from a file's metadata, or None."""
    meta = meta or {}
    if not all(k.encode() in meta for k in ROW_COUNT_KEYS):
        return None
    out = np.stack([np.frombuffer(base64.b64decode(meta[k.encode()]), "<u4").astype(np.int64)
                    for k in ROW_COUNT_KEYS])
    if out.shape != (3, n_rows):
        raise FormatError(f"footer row counts cover {out.shape[1]} rows, the file has {n_rows}")
    return out


def count_rows(table: pa.Table | pa.RecordBatch) -> np.ndarray:
    """(3, rows) int64 [tokens, targets, ce targets] counted from input_ids and target_mask: what
    the footer counts must equal (and what a reader uses for shards written without them)."""
    lens = pc.list_value_length(table.column("input_ids")).to_numpy(
        zero_copy_only=False).astype(np.int64)
    mask = pc.list_flatten(table.column("target_mask")).to_numpy(zero_copy_only=False)
    ends = np.cumsum(lens)
    csum = np.zeros(len(mask) + 1, np.int64)
    np.cumsum(mask, out=csum[1:])
    targets = csum[ends] - csum[ends - lens]
    last = csum[ends] - csum[np.maximum(ends - 1, 0)]  # the row's last position has a target
    return np.stack([lens, targets, targets - np.where(lens > 0, last, 0)])


# ---------------------------------------------------------------- the dataset's index

INDEX = "index.parquet"
INDEX_COLUMNS = ("shard", "group", "tokens", "targets", "ce_targets")


def index_table(directory, shards) -> pa.Table:
    """Every row of the dataset in stored order: its shard (position in the manifest), row group
    and counts, from the local shards' footers (counted from the columns where a footer has none).
    Written beside the shards as `index.parquet`, so a reader plans an epoch from one object
    instead of one footer per shard (thousands of round trips to a store)."""
    import pyarrow.parquet as pq

    rows = []
    for si, s in enumerate(shards):
        pf = pq.ParquetFile(f"{directory}/{s.file}")
        rows.append(footer_rows(si, pf.metadata, pf.read_row_group))
    return rows_table(rows)


def rows_table(rows: list[np.ndarray]) -> pa.Table:
    """The index's table from each shard's `footer_rows`."""
    a = np.hstack(rows) if rows else np.zeros((5, 0), np.int64)
    return pa.table({name: pa.array(c.astype(np.uint32)) for name, c in zip(INDEX_COLUMNS, a)})


def footer_rows(si: int, md, read_group) -> np.ndarray:
    """(5, rows) int64 [shard, group, tokens, targets, ce targets] of shard number `si`, from its
    footer `md`; a footer without counts is counted from the columns (`read_group(g)`)."""
    sizes = [md.row_group(g).num_rows for g in range(md.num_row_groups)]
    counts = read_row_counts(md.metadata, md.num_rows)
    if counts is None:  # a shard written before the footer counts existed
        counts = np.hstack([count_rows(read_group(g)) for g in range(len(sizes))]
                           or [np.zeros((3, 0), np.int64)])
    return np.vstack([np.full(md.num_rows, si), np.repeat(np.arange(len(sizes)), sizes),
                      counts]).astype(np.int64)


def read_index(data: bytes, shards) -> np.ndarray:
    """(5, rows) int64 [shard, group, tokens, targets, ce targets] from an index file's bytes
    (hash already checked), or FormatError if it does not describe these shards."""
    import pyarrow.parquet as pq

    try:
        # one thread: arrow's pool, started here, aborted the interpreter at exit now and then
        # ("terminate called without an active exception", 1 run in ~12 of `softlabels verify`)
        t = pq.read_table(pa.BufferReader(data), use_threads=False)
        out = np.stack([t.column(c).to_numpy().astype(np.int64) for c in INDEX_COLUMNS])
    except (pa.ArrowException, KeyError, ValueError) as e:
        raise FormatError(f"{INDEX} is unreadable ({type(e).__name__}); regenerate or "
                          "re-download the dataset") from e
    per_shard = np.bincount(out[0], minlength=len(shards)) if out.shape[1] else \
        np.zeros(len(shards), np.int64)
    if len(per_shard) != len(shards) or (per_shard != [s.rows for s in shards]).any() or \
            (np.diff(out[0]) < 0).any():
        raise FormatError(f"{INDEX} does not list the manifest's shards' rows in order; "
                          "regenerate or re-download the dataset")
    return out
