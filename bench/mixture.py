"""What mixing datasets costs (issue 20): steps/s of `softlabels train` on 3 datasets mixed
(default weights) against one dataset holding the same rows, and the mixture's planning time as
the data grows.

    python bench/mixture.py [--cache .cache/bench-mixture] [--steps 40] [--repeats 2]

The three datasets are synthetic top-64 datasets over a 4096-token vocabulary (rows of 64-256,
256-512 and 512-1024 tokens); the single one is their rows in one folder. Each run is its own
process; the runs alternate (mix, one, mix, one, ...) and each side keeps its fastest median step,
because this machine is noisy. Steps include decoding (in the background thread), collation,
forward, loss, backward and the optimiser step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
STUDENT = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 512,
           "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
           "head_dim": 64, "max_position_embeddings": 1024, "tie_word_embeddings": False}
VOCAB, K = 4096, 64


def make(cache: Path) -> tuple[list[Path], Path]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tests.helpers import synthetic_rows, write_dataset

    tok = cache / "tok"
    if not tok.is_dir():
        t = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
        t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        PreTrainedTokenizerFast(tokenizer_object=t, unk_token="w0").save_pretrained(tok)
    parts, every = [], []
    for i, (n, lengths) in enumerate(((600, (64, 256)), (200, (256, 512)), (100, (512, 1024)))):
        rows = synthetic_rows(n, VOCAB, K, seed=i, lengths=lengths, prefix=f"{i}")
        every += rows
        d = cache / f"part-{i}"
        if not (d / "manifest.json").is_file():
            write_dataset(d, rows, K, VOCAB, tokenizer=tok, shards=2)
        parts.append(d)
    one = cache / "one"
    if not (one / "manifest.json").is_file():
        write_dataset(one, every, K, VOCAB, tokenizer=tok, shards=6)
    (cache / "student.json").write_text(json.dumps(STUDENT))
    return parts, one


def run(cache: Path, data: list[Path], out: Path, steps: int) -> float:
    """Median seconds per step of one `softlabels train` run (after 5 warm-up steps)."""
    cmd = [sys.executable, "-m", "softlabels", "train", "--student", cache / "student.json",
           "--data", *data, "--output", out, "--max-steps", steps + 5, "--batch-tokens", 4096,
           "--report-to", "tensorboard"]
    subprocess.run(list(map(str, cmd)), check=True, capture_output=True, cwd=REPO)
    hist = json.loads((out / "train_log.json").read_text())["history"][5:]
    return float(np.median([h["step_s"] for h in hist]))


def merge_seconds(rows: int) -> float:
    """Seconds of the merge an epoch of 3 datasets adds, at `rows` rows in all (synthetic target
    counts; the reader's own per-epoch shuffle is there with or without a mixture)."""
    from softlabels.train_student.mixture import merge

    rng = np.random.default_rng(0)
    targets = [rng.integers(64, 1024, rows // 3) for _ in range(3)]
    t = time.perf_counter()
    merge(targets, [0.5, 0.3, 0.2])
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench-mixture")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    cache = a.cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    parts, one = make(cache)
    best = {"mix": float("inf"), "one": float("inf")}
    for r in range(a.repeats):
        for name, data in (("mix", parts), ("one", [one])):
            s = run(cache, data, cache / "runs" / f"{name}-{r}", a.steps)
            best[name] = min(best[name], s)
            print(f"{name} run {r}: {1 / s:.2f} steps/s", file=sys.stderr)
    tokens = sum(s["tokens"] for s in json.loads((one / "manifest.json").read_text())["shards"])
    print(f"3 datasets (default weights) vs one dataset of the same rows ({tokens} tokens), "
          f"batches of 4096 tokens, a {STUDENT['num_hidden_layers']}-layer hidden-"
          f"{STUDENT['hidden_size']} student, median step of the fastest of {a.repeats} runs:")
    print("| data | steps/s | ratio |")
    print("|---|---|---|")
    print(f"| one dataset | {1 / best['one']:.3f} | 1.00 |")
    print(f"| 3 datasets mixed | {1 / best['mix']:.3f} | {best['one'] / best['mix']:.3f} |")
    print("\nthe merge an epoch of a mixture adds, by rows in all: " + ", ".join(
        f"{n:,}: {merge_seconds(n):.3f} s" for n in (10**5, 10**6, 10**7)))


if __name__ == "__main__":
    main()
