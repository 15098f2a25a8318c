"""Storage benchmark: bytes per token and fidelity of the softlabels encoding vs plain Parquet.

Targets are the top-k of real forward passes of trained models (not synthetic numbers):
- the demo teacher (4096-token vocabulary), trained by `softlabels demo` (pass --demo-teacher);
- a 32768-token-vocabulary model this script pre-trains for a few minutes on the KJV corpus plus
  Python's standard library sources (a bigger, more varied vocabulary), cached in --cache.

    python bench/storage.py --demo-teacher demo_out/teacher --cache .cache/bench

Prints a table (markdown) for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from softlabels.data.format import (  # noqa: E402
    DEFAULT_LOGPROB_STEP,
    Encoding,
    Row,
    dequantise,
    quantise,
    row_id,
)
from softlabels.data.reader import SoftLabelReader  # noqa: E402
from softlabels.data.shard import write_shard  # noqa: E402
from softlabels.demo import make_model, make_tokenizer  # noqa: E402

KS = (8, 32, 64, 128)
CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus" / "kjv-train.parquet"


def texts_32k() -> list[str]:
    import sysconfig

    kjv = pq.read_table(CORPUS).column("text").to_pylist()
    src = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return kjv + [p.read_text(errors="replace") for p in src]


def pretrain_32k(path: Path, minutes: float) -> None:
    """A 32k-vocabulary model trained briefly with CE: real, if young, distributions."""
    if (path / "model.safetensors").is_file():
        return
    texts = texts_32k()
    tok = make_tokenizer(texts, vocab_size=32768, path=path)
    model = make_model(path, vocab_size=len(tok), hidden=256, layers=4, heads=4)
    ids = np.array([t for x in texts for t in tok(x).input_ids], np.int64)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    rng = np.random.default_rng(0)
    t0, step = time.time(), 0
    while time.time() - t0 < minutes * 60:
        s = rng.integers(0, len(ids) - 257, 16)
        x = torch.from_numpy(np.stack([ids[i : i + 256] for i in s]))
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        step += 1
        if step % 20 == 0:
            print(f"  32k pre-training step {step} loss {loss.item():.3f}", file=sys.stderr)
    model.save_pretrained(path)
    tok.save_pretrained(path)


@torch.no_grad()
def topk_of(model_dir: Path, texts: list[str], kmax: int, tokens: int):
    """Exact top-kmax (ids, logprobs) per position of real windows: [(T,), (T,k), (T,k)]."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = [t for x in texts for t in tok(x).input_ids][:tokens]
    out = []
    for s in range(0, len(ids), 256):
        w = ids[s : s + 256]
        lp = torch.log_softmax(model(torch.tensor([w])).logits[0].float(), -1)
        v, i = lp.topk(kmax, -1)
        out.append((np.array(w, np.int32), i.numpy().astype(np.int32), v.numpy()))
    return out, model.config.vocab_size


def plain_bytes(windows, k, value_type) -> int:
    """Parallel list columns written with pyarrow's defaults (dictionary + snappy)."""
    offs = pa.array(np.cumsum([0] + [len(w) for w, _, _ in windows]).astype(np.int32))
    ids = np.concatenate([i[:, :k] for _, i, _ in windows]).reshape(-1)
    lps = np.concatenate([v[:, :k] for _, _, v in windows]).reshape(-1).astype(value_type)
    t = pa.table({
        "input_ids": pa.ListArray.from_arrays(offs, pa.array(np.concatenate(
            [w for w, _, _ in windows]))),
        "topk_ids": pa.ListArray.from_arrays(offs, pa.FixedSizeListArray.from_arrays(
            pa.array(ids), k)),
        "topk_logprobs": pa.ListArray.from_arrays(offs, pa.FixedSizeListArray.from_arrays(
            pa.array(lps), k)),
    })
    with tempfile.TemporaryDirectory() as d:
        pq.write_table(t, f"{d}/x.parquet")
        return Path(f"{d}/x.parquet").stat().st_size


def fidelity(windows, k, step):
    """max/mean |decoded - exact| and mean KL(exact || decoded) over k+1 buckets (with tail)."""
    lp = np.concatenate([v[:, :k] for _, _, v in windows]).astype(np.float64)
    dec = dequantise(quantise(lp, step), step).astype(np.float64)
    err = np.abs(dec - lp)

    def buckets(x):
        tail = np.maximum(1 - np.exp(x).sum(-1, keepdims=True), 1e-12)
        return np.concatenate([np.exp(x), tail], -1)

    p, q = buckets(lp), buckets(dec)
    q = q / q.sum(-1, keepdims=True)  # decoded mass can exceed 1 by exp(step/2): renormalise
    kl = (p * (np.log(p) - np.log(q))).sum(-1)
    return err.max(), err.mean(), kl.mean()


def ours(windows, k, step) -> tuple[int, float]:
    """(bytes, reader tokens/s) of a real softlabels shard."""
    rows = [Row(row_id(n, 0), w, i[:, :k], v[:, :k], np.ones(len(w), bool))
            for n, (w, i, v) in enumerate(windows)]
    with tempfile.TemporaryDirectory() as d:
        from softlabels.data.card import publish
        from softlabels.data.manifest import Manifest

        info = write_shard(Path(d) / "s.parquet", rows, Encoding(k, step))
        publish(d, Manifest(k=k, logprob_step=step, vocab_size=1 << 20, shards=[info]))
        best = 0.0
        for _ in range(3):
            t = time.perf_counter()
            n = sum(len(r.input_ids) for r in SoftLabelReader(d))
            best = max(best, n / (time.perf_counter() - t))
        return info.bytes, best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo-teacher", type=Path, default=Path("demo_out/teacher"))
    ap.add_argument("--cache", type=Path, default=Path(".cache/bench"))
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--pretrain-minutes", type=float, default=4.0)
    ap.add_argument("--step", type=float, default=DEFAULT_LOGPROB_STEP)
    a = ap.parse_args()
    torch.manual_seed(0)
    heldout = pq.read_table(CORPUS.with_name("kjv-heldout.parquet")).column("text").to_pylist()
    models = []
    if (a.demo_teacher / "model.safetensors").is_file():
        models.append(("demo teacher", a.demo_teacher))
    big = a.cache / "model-32k"
    pretrain_32k(big, a.pretrain_minutes)
    models.append(("32k-vocab model", big))
    print(f"logprob step {a.step:g} nats; {a.tokens} held-out tokens per model\n")
    print("| model | vocab | k | ours B/tok | B/entry | fp32+int32 default | fp16+int32 default "
          "| max abs err | mean abs err | mean KL (nats/tok) | reader tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, path in models:
        windows, vocab = topk_of(path, heldout, max(KS), a.tokens)
        n = sum(len(w) for w, _, _ in windows)
        for k in KS:
            b, speed = ours(windows, k, a.step)
            f32 = plain_bytes(windows, k, np.float32)
            f16 = plain_bytes(windows, k, np.float16)
            mx, mean, kl = fidelity(windows, k, a.step)
            print(f"| {name} | {vocab} | {k} | {b / n:.1f} | {b / n / k:.2f} | {f32 / n:.1f} | "
                  f"{f16 / n:.1f} | {mx:.4f} | {mean:.4f} | {kl:.2e} | {speed:,.0f} |")


if __name__ == "__main__":
    main()
