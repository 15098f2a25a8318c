"""Reader throughput with and without the safety checks (issue 13), same data, same run.

    python bench/reader.py [--tokens 262144] [--k 64]

Targets are the top-k of a real forward pass (a random-weight Llama, vocabulary 4096, over the KJV
corpus: the checks and the decoding cost the same whatever the values). "decode only" is the
reader's loop without the checks (read row group, take, decode), as the reader was before them;
"reader" is `SoftLabelReader` as train and eval use it: the value checks on every row group and
each shard's sha256 on first open. Three alternating repeats; the best of each is reported.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from softlabels.data.card import publish
from softlabels.data.format import DEFAULT_LOGPROB_STEP, Encoding, Row, decode, row_id
from softlabels.data.manifest import Manifest
from softlabels.data.reader import SoftLabelReader
from softlabels.data.shard import write_shard
from softlabels.demo import make_model, make_tokenizer

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus" / "kjv-train.parquet"


def make_dataset(d: Path, tokens: int, k: int) -> Manifest:
    texts = pq.read_table(CORPUS).column("text").to_pylist()
    tok = make_tokenizer(texts[:300], vocab_size=4096, path=d / "model")
    model = make_model(d / "model", vocab_size=len(tok), hidden=64, layers=2, heads=1).eval()
    ids = np.array([t for x in texts for t in tok(x).input_ids], np.int32)
    ids = np.resize(ids, tokens)  # the corpus repeated when more tokens are asked for
    per = 256 * 512  # tokens per shard: 131k, the default unit; one shard in memory at a time
    shards = []
    with torch.no_grad():
        for s in range(0, len(ids), per):
            rows = []
            for i in range(s, min(s + per, len(ids)), 512):
                w = ids[i : i + 512]
                x = torch.from_numpy(w.astype(np.int64))[None]
                lp = torch.log_softmax(model(x).logits[0], -1)
                v, top = lp.topk(k, -1)
                label = np.full(len(w), np.nan, np.float32)  # format 4: the label's log-prob
                label[:-1] = lp[:-1].gather(-1, x[0, 1:, None])[:, 0].numpy()
                tail = torch.logsumexp(lp.scatter(-1, top, -torch.inf), -1).numpy()
                rows.append(Row(row_id(i // 512, 0), w, top.numpy().astype(np.int32), v.numpy(),
                                np.ones(len(w), bool), label_logprob=label, tail_logprob=tail))
            shards.append(write_shard(d / f"shard-{s // per:05d}.parquet",
                                      rows, Encoding(k, DEFAULT_LOGPROB_STEP)))
    m = Manifest(k=k, logprob_step=DEFAULT_LOGPROB_STEP, vocab_size=len(tok), shards=shards)
    publish(d, m)
    return m


def decode_only(d: Path, m: Manifest) -> int:
    n = 0
    for s in m.shards:
        pf = pq.ParquetFile(d / s.file)
        enc = Encoding.from_schema(pf.schema_arrow)
        for g in range(pf.num_row_groups):
            t = pf.read_row_group(g)
            rows = decode(t.take(np.arange(t.num_rows)), enc)
            n += sum(len(r.input_ids) for r in rows)
    return n


def reader(d: Path, m: Manifest) -> int:
    return sum(len(r.input_ids) for r in SoftLabelReader(d))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=262144)
    ap.add_argument("--k", type=int, default=64)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        m = make_dataset(d, a.tokens, a.k)
        best = {"decode only": float("inf"), "reader (checks + sha256)": float("inf")}
        for _ in range(3):
            for name, fn in (("decode only", decode_only), ("reader (checks + sha256)", reader)):
                t0 = time.perf_counter()
                n = fn(d, m)
                best[name] = min(best[name], time.perf_counter() - t0)
        print(f"{n} tokens, k={a.k}, {len(m.shards)} shards, best of 3\n")
        print("| path | s | tokens/s |\n|---|---|---|")
        for name, s in best.items():
            print(f"| {name} | {s:.3f} | {n / s:,.0f} |")
        base, chk = best["decode only"], best["reader (checks + sha256)"]
        print(f"\nreader with checks / decode only, tokens/s: {base / chk:.3f}")


if __name__ == "__main__":
    main()
