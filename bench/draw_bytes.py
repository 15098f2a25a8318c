"""What the stored draws cost and why (issue 11, goal "N=50 at <= 30 bytes/token").

Reads the datasets `bench/targets.py` left in its cache and prints:
  1. bytes/token per column of the N=50 dataset;
  2. the same shard rewritten with other Parquet encodings for the id gaps and counts (any
     Parquet reader decodes them, so the writer could switch freely);
  3. the order-0 entropy of the gaps and counts (what an entropy coder with no context needs), and
     of the gaps after renumbering ids by frequency (what a remapped vocabulary would give);
  4. distinct ids per position at N=50 against the teacher's entropy at that position (from the
     top-64 + tail of the same windows): the number that sets the size.

    python bench/draw_bytes.py [--cache .cache/bench-targets]
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GAPS = "sample_id_gaps.list.element.list.element"
COUNTS = "sample_counts.list.element.list.element"


def entropy_bits(x: np.ndarray) -> float:
    _, c = np.unique(x, return_counts=True)
    p = c / c.sum()
    return float(-(p * np.log2(p)).sum())


def columns(shard: Path, tokens: int) -> None:
    md = pq.ParquetFile(shard).metadata
    size: dict[str, int] = {}
    for g in range(md.num_row_groups):
        for c in range(md.num_columns):
            col = md.row_group(g).column(c)
            size[col.path_in_schema] = size.get(col.path_in_schema, 0) + col.total_compressed_size
    print("| column | bytes/token |\n|---|---|")
    for name, b in size.items():
        print(f"| {name.split('.')[0]} | {b / tokens:.2f} |")


def encodings(shard: Path, tokens: int) -> None:
    f = pq.ParquetFile(shard)

    def size(gaps: str, counts: str | None) -> float:
        buf = io.BytesIO()
        enc = {"input_ids.list.element": "BYTE_STREAM_SPLIT", GAPS: gaps}
        if counts:
            enc[COUNTS] = counts
        with pq.ParquetWriter(buf, f.schema_arrow, compression="zstd", compression_level=9,
                              use_dictionary=["row_id"] + ([] if counts else [COUNTS]),
                              column_encoding=enc) as w:
            for g in range(f.num_row_groups):
                w.write_table(f.read_row_group(g))
        return len(buf.getvalue()) / tokens

    print("\n| id gaps | counts | bytes/token |\n|---|---|---|")
    for gaps in ("BYTE_STREAM_SPLIT", "PLAIN", "DELTA_BINARY_PACKED"):
        for counts in ("BYTE_STREAM_SPLIT", "PLAIN", None):
            print(f"| {gaps} | {counts or 'RLE_DICTIONARY'} | {size(gaps, counts):.2f} |")


def main() -> None:
    from softlabels.data.manifest import Manifest
    from softlabels.data.reader import SoftLabelReader

    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench-targets")
    a = ap.parse_args()
    n50, k64 = a.cache / "n50", a.cache / "k64"  # the same windows, row for row
    m = Manifest.load(n50)
    tokens = m.tokens
    shard = n50 / m.shards[0].file
    print(f"N={m.draws}, vocabulary {m.vocab_size}, {tokens} tokens; as written: "
          f"{m.shards[0].bytes / tokens:.2f} B/token\n")
    columns(shard, tokens)
    encodings(shard, tokens)

    by_row = {}
    for r in SoftLabelReader(k64):
        lp = r.topk_logprobs[r.target_mask].astype(np.float64)
        tail = np.clip(1 - np.exp(lp).sum(-1), 1e-12, 1)
        by_row[r.row_id] = -(np.exp(lp) * lp).sum(-1) - tail * np.log(tail)  # tail: one bucket
    ids, counts, entropy = [], [], []
    for r in SoftLabelReader(n50):
        mask = r.target_mask
        for i, c in zip(r.sample_ids[mask], r.sample_counts[mask]):
            ids.append(i[c > 0])
            counts.append(c[c > 0])
        entropy.append(by_row[r.row_id])
    entropy = np.concatenate(entropy)
    distinct = np.array([len(i) for i in ids])
    gaps = np.concatenate([np.diff(i, prepend=0) for i in ids])
    freq = np.bincount(np.concatenate(ids), weights=np.concatenate(counts),
                       minlength=m.vocab_size)
    rank = np.empty(m.vocab_size, np.int64)
    rank[np.argsort(-freq, kind="stable")] = np.arange(m.vocab_size)
    rgaps = np.concatenate([np.diff(np.sort(rank[i]), prepend=0) for i in ids])
    allc = np.concatenate(counts)
    n = len(gaps) / 8 / tokens  # bits per value -> bytes/token
    print(f"\norder-0 entropy: id gaps {entropy_bits(gaps):.2f} bits = "
          f"{entropy_bits(gaps) * n:.1f} B/token; counts {entropy_bits(allc):.2f} bits = "
          f"{entropy_bits(allc) * n:.1f} B/token; gaps of frequency-ranked ids "
          f"{entropy_bits(rgaps):.2f} bits = {entropy_bits(rgaps) * n:.1f} B/token")
    print(f"\n{distinct.mean():.1f} distinct ids per position; teacher entropy (nats, top-64 + "
          f"tail bucket: a lower bound) mean {entropy.mean():.2f}\n")
    print("| teacher entropy at the position | share of positions | distinct ids at N=50 |")
    print("|---|---|---|")
    for lo, hi in ((0, 0.5), (0.5, 1), (1, 1.5), (1.5, 2), (2, 2.5), (2.5, 3), (3, 9)):
        s = (entropy >= lo) & (entropy < hi)
        if s.any():
            print(f"| {lo}-{hi} | {s.mean():.3f} | {distinct[s].mean():.1f} |")


if __name__ == "__main__":
    main()
