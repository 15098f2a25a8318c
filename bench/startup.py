"""Trainer start-up vs dataset size (issue 10): 2 training steps of the real `softlabels train`
command on a dataset and on one 40x larger, same student and batch; the time must not grow with
the data (the epoch is planned from the shards' footers, and only the rows trained on are
decoded). Then the same 2 steps under `accelerate launch` with 2 processes, counting the rows each
process decoded.

    python bench/startup.py [--tokens 262144] [--times 40]

Targets are the top-64 of a random-weight model (planning and decoding cost the same whatever the
values). Wall time of the whole command (process start, imports, planning, 2 steps, saving), the
best of 2 alternating runs each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUDENT = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 1, "num_key_value_heads": 1,
           "head_dim": 64, "max_position_embeddings": 1024}


def dataset(d: Path, tokens: int) -> int:
    sys.path.insert(0, str(REPO / "bench"))
    from reader import make_dataset

    from softlabels.data.dataset import TOKENIZER_DIR

    m = make_dataset(d, tokens, 64)
    (d / "model").rename(d / TOKENIZER_DIR)
    return m.tokens


def train(data: Path, out: Path, launch: list[str]) -> tuple[float, dict]:
    cmd = [*launch, "-m", "softlabels", "train", "--student", str(data.parent / "student.json"),
           "--data", str(data), "--output", str(out), "--max-steps", "2",
           "--batch-tokens", "4096", "--report-to", "tensorboard"]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, OMP_NUM_THREADS="2"))
    wall = time.perf_counter() - t
    if p.returncode:
        sys.exit(p.stderr[-3000:])
    return wall, json.loads((out / "train_log.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=262144)
    ap.add_argument("--times", type=int, default=40)
    a = ap.parse_args()
    py = [sys.executable]
    two = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    with tempfile.TemporaryDirectory() as tmp:
        small, big = Path(tmp) / "small" / "data", Path(tmp) / "big" / "data"
        sizes = {}
        for d, n in ((small, a.tokens), (big, a.tokens * a.times)):
            d.mkdir(parents=True)
            sizes[d] = dataset(d, n)
            (d.parent / "student.json").write_text(json.dumps(STUDENT))
        best = {small: float("inf"), big: float("inf")}
        for i in range(2):
            for d in (small, big):
                wall, _ = train(d, Path(tmp) / f"out-{d.parent.name}-{i}", py)
                best[d] = min(best[d], wall)
        _, log2 = train(big, Path(tmp) / "out-two", two)
    print(f"2 steps of 4096 tokens, student {STUDENT['num_hidden_layers']} x "
          f"{STUDENT['hidden_size']}, k=64; wall s of the whole `softlabels train`, best of 2\n")
    print("| dataset | tokens | shards | wall s |\n|---|---|---|---|")
    for d in (small, big):
        n = sizes[d]
        print(f"| {d.parent.name} | {n:,} | {-(-n // (256 * 512))} | {best[d]:.2f} |")
    print(f"\n{a.times}x the data: {best[big] / best[small]:.2f}x the time")
    rows = log2["rows_decoded_per_process"]
    print(f"accelerate launch, 2 processes, same 2 steps on the big dataset: rows decoded per "
          f"process {rows} (of {sizes[big] // 512:,} rows in the dataset)")


if __name__ == "__main__":
    main()
