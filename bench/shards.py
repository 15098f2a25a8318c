"""Shards apart from units (issue 10): what concatenating committed units into one published
shard costs, against what writing (encoding) those units cost, same run.

    python bench/shards.py [--units 8] [--unit-tokens 32768] [--k 64]

Rows of 2048 tokens with k targets drawn like a teacher's (ids from a 32k vocabulary, a Zipf
head; log-probs descending) are written as --units unit files with `write_shard` (what a worker
does after the teacher), then concatenated into one shard with `concat_shards` (what `generate`
does at the end). Both compress with zstd-9; the concatenation decodes Parquet pages and
re-compresses them but never re-quantises.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from softlabels.data.format import DEFAULT_LOGPROB_STEP, Encoding, Row
from softlabels.data.shard import concat_shards, write_shard


def rows(n_tokens: int, k: int, seed: int, vocab: int = 32768) -> list[Row]:
    rng = np.random.default_rng(seed)
    out, T = [], 2048
    for i in range(n_tokens // T):
        ids = np.minimum(rng.zipf(1.2, (T, k)), vocab - 1).astype(np.int32)
        ids = np.stack([rng.permutation(vocab)[:k] if len(set(r)) < k else r for r in ids])
        lps = np.sort(-rng.gamma(2.0, 2.0, (T, k)).astype(np.float32), axis=1)[:, ::-1]
        out.append(Row(f"{seed}:{i}", rng.integers(0, vocab, T, dtype=np.int32), ids,
                       np.ascontiguousarray(lps), np.ones(T, bool)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=8)
    ap.add_argument("--unit-tokens", type=int, default=32768)
    ap.add_argument("--k", type=int, default=64)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        units = [rows(a.unit_tokens, a.k, s) for s in range(a.units)]
        t = time.perf_counter()
        infos = [write_shard(d / f"unit-{i}.parquet", r, Encoding(a.k, DEFAULT_LOGPROB_STEP))
                 for i, r in enumerate(units)]
        write_s = time.perf_counter() - t
        handles = [open(d / i.file, "rb") for i in infos]
        t = time.perf_counter()
        shard = concat_shards(d / "shard.parquet", handles)
        concat_s = time.perf_counter() - t
        for h in handles:
            h.close()
        tokens = sum(i.tokens for i in infos)
        assert shard.tokens == tokens and shard.rows == sum(i.rows for i in infos)
        whole = pq.read_table(d / "shard.parquet")
        parts = [pq.read_table(d / i.file) for i in infos]
        assert whole.column("topk_logprobs_q").to_pylist() == [
            x for p in parts for x in p.column("topk_logprobs_q").to_pylist()]
        unit_bytes = sum(i.bytes for i in infos)
    print(f"{a.units} units x {a.unit_tokens:,} tokens, k={a.k}\n")
    print("| step | wall s | tokens/s | bytes |")
    print("|---|---|---|---|")
    print(f"| write units (encode + zstd-9 + sha256) | {write_s:.2f} | {tokens / write_s:,.0f} | "
          f"{unit_bytes:,} |")
    print(f"| concatenate into one shard | {concat_s:.2f} | {tokens / concat_s:,.0f} | "
          f"{shard.bytes:,} |")
    print(f"\nconcatenation / writing time: {concat_s / write_s:.2f}x")


if __name__ == "__main__":
    main()
