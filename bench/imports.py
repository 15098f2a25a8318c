"""`softlabels import --from distillkit` speed: MB of source Parquet per second per worker, and
bytes per token before and after, on a DistillKit-layout set shaped like Arcee's public ones.

    python bench/imports.py [--mb 200] [--workers 1 2] [--config qwen3|recommended]

The source is written here in DistillKit's layout (its columns, its bit order, its float bytes,
pyarrow's default Parquet settings as its StreamingParquetWriter uses them), packed rows of 4096
tokens in 2-4 documents, vocabulary 151,936 (Qwen's):
- qwen3: the config of arcee-ai/Qwen3-235B-Logits-Packed-8192's card (k 128, exact_k 32 float32,
  polynomial [0, 1, 2], delta encoding);
- recommended: DistillKit's README pick for new captures (k 128, exact_k 16 bfloat16,
  polynomial [0, 1, 2, 3, 4, sqrt], no delta).
Values: a peaked top-32 (the teacher's) then a polynomial tail, so every position decodes to a
distribution. Each run is `softlabels import` in its own process on an embedded cluster; the
rate is the converted source bytes over the conversion's wall time (cluster start excluded),
and the per-piece rate (a piece's bytes over its worker's seconds) is the per-core figure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
V, ROW = 151_936, 4096
CONFIGS = {
    "qwen3": dict(d=V, k=128, exact_k=32, exact_dtype="float32", polynomial_terms=[0, 1, 2],
                  term_dtype="float32", residual_bins=[], delta_encoding=True),
    "recommended": dict(d=V, k=128, exact_k=16, exact_dtype="bfloat16",
                        polynomial_terms=[0, 1, 2, 3, 4, "sqrt"], term_dtype="float32",
                        residual_bins=[], delta_encoding=False),
}


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """(P, n) ints -> (P, ceil(n * bits / 8)) bytes, most significant bit first."""
    b = ((values[..., None] >> np.arange(bits - 1, -1, -1)) & 1).astype(np.uint8)
    return np.packbits(b.reshape(len(values), -1), axis=1)


def encode_positions(P: int, c, rng) -> tuple[np.ndarray, np.ndarray]:
    """(P, value bytes) and (P, index bytes) of plausible positions."""
    from softlabels.data.distillkit import Compression

    cfg = Compression.from_dict(c, "bench")
    raw = np.sort(rng.normal(0, 2.5, (P, cfg.exact_k)), -1)[:, ::-1]
    top = raw - np.logaddexp.reduce(raw, -1, keepdims=True) + np.log(0.95)  # (P, exact_k)
    if cfg.delta_encoding:
        exact = np.concatenate([top[:, :1], np.diff(top, axis=1)], 1)
    else:
        exact = top
    parts = [exact.astype(np.float32).view(np.uint8) if cfg.exact_dtype == "float32" else
             (exact.astype(np.float32).view(np.uint32) >> 16).astype("<u2").view(np.uint8)]
    n = len(cfg.polynomial_terms)
    coeffs = np.zeros((P, n), np.float32)
    if cfg.delta_encoding:  # each further value 0.05 below the one before
        coeffs[:, 0] = -0.05
    else:  # from 4 below the last exact value, down by 0.05 a step
        coeffs[:, 0] = top[:, -1] - 4
        coeffs[:, 1] = -0.05
    parts.append(coeffs.view(np.uint8))
    # distinct ids, dense among the frequent (small) ids as real top-k sets are, in value order
    gaps = 1 + rng.geometric(np.minimum(1.0, 1.0 / np.linspace(1, 600, cfg.k)), (P, cfg.k))
    ids = np.cumsum(gaps, 1) % V
    ids = np.take_along_axis(ids, np.argsort(rng.random((P, cfg.k)), 1), 1)
    return np.concatenate(parts, 1), pack(ids, cfg.index_bits)


def make_source(path: Path, mb: float, config: str, seed: int = 0) -> None:
    import yaml

    rng = np.random.default_rng(seed)
    c = CONFIGS[config]
    path.mkdir(parents=True)
    (path / "compression_config.yaml").write_text(yaml.safe_dump({**c, "error_diffusion": False,
                                                                  "normalize_t": False}))
    schema = pa.schema([("input_ids", pa.list_(pa.uint64())),
                        ("attention_mask", pa.list_(pa.int64())),
                        ("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
                        ("bytepacked_indices", pa.list_(pa.list_(pa.uint8())))])
    f, written = 0, 0
    while written < mb * 1e6:
        name = path / f"train-{f:05d}.parquet"
        with pq.ParquetWriter(name, schema) as w:  # its writer's settings: pyarrow's defaults
            for _ in range(4):  # 4 batches of 8 rows
                rows = []
                for _ in range(8):
                    vals, idx = encode_positions(ROW, c, rng)
                    cuts = np.sort(rng.choice(np.arange(256, ROW - 256), rng.integers(1, 4),
                                              replace=False))
                    seg = np.searchsorted(cuts, np.arange(ROW), side="right") + 1
                    rows.append({"input_ids": rng.integers(0, V, ROW).tolist(),
                                 "attention_mask": seg.tolist(),
                                 "compressed_logprobs": vals, "bytepacked_indices": idx})
                w.write_table(pa.table({
                    "input_ids": pa.array([r["input_ids"] for r in rows], schema[0].type),
                    "attention_mask": pa.array([r["attention_mask"] for r in rows],
                                               schema[1].type),
                    **{n: pa.ListArray.from_arrays(
                        pa.array(np.arange(0, len(rows) * ROW + 1, ROW, dtype=np.int32)),
                        pa.ListArray.from_arrays(
                            pa.array(np.arange(0, len(rows) * ROW * r0.shape[1] + 1,
                                               r0.shape[1], dtype=np.int32)),
                            pa.array(np.concatenate([r[n] for r in rows]).reshape(-1))))
                       for n, r0 in (("compressed_logprobs", rows[0]["compressed_logprobs"]),
                                     ("bytepacked_indices", rows[0]["bytepacked_indices"]))},
                }, schema=schema))
        written += name.stat().st_size
        f += 1


def tokenizer(path: Path) -> Path:
    """A tokenizer of V tokens (the vocabulary is the tokenizer's): a word-level one."""
    if not (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        vocab = {f"w{i}": i for i in range(V)}
        fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
            vocab, unk_token="w0")))
        fast.save_pretrained(path)
    return path


def run(src: Path, tok: Path, out: Path, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "softlabels", "import", str(src), str(out),
                        "--from", "distillkit", "--tokenizer", str(tok), "--workers",
                        str(workers)], capture_output=True, text=True, cwd=REPO)
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    s = json.loads(p.stdout.strip().splitlines()[-1])
    recs = [json.loads(f.read_text()) for f in (out / ".softlabels" / "import").glob("*.json")]
    s["per_piece_mb_s"] = float(np.median([r["source_bytes"] / 1e6 / r["seconds"]
                                           for r in recs]))
    s["command_s"] = time.perf_counter() - t
    return s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=200)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--config", default="qwen3", choices=CONFIGS)
    ap.add_argument("--work", type=Path, default=REPO / ".cache" / "bench-imports")
    a = ap.parse_args()
    src = a.work / f"src-{a.config}-{a.mb:g}"
    if not src.is_dir():
        make_source(src, a.mb, a.config)
    tok = tokenizer(a.work / "tokenizer")
    size = sum(f.stat().st_size for f in src.glob("*.parquet"))
    print(f"source: {a.config} config, {size / 1e6:.0f} MB in "
          f"{len(list(src.glob('*.parquet')))} files, rows of {ROW} tokens")
    print("| workers | MB/s (all) | MB/s per worker | MB/s per piece (one core) | "
          "source B/token | stored B/token | wall s |")
    print("|---|---|---|---|---|---|---|")
    for w in a.workers:
        s = run(src, tok, a.work / f"out-{w}", w)
        print(f"| {w} | {s['source_mb_per_s']:.1f} | {s['source_mb_per_s'] / w:.1f} | "
              f"{s['per_piece_mb_s']:.1f} | {s['source_bytes_per_token']:.0f} | "
              f"{s['bytes_per_token']:.0f} | {s['command_s']:.0f} |")


if __name__ == "__main__":
    main()
