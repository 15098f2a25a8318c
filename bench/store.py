"""Students training from an object store against the same run from a local folder (issue 28).

    python bench/store.py [--tokens 524288] [--steps 40] [--latency 0.02] [--shards 2400]

A real S3 API server (moto's, its own process) behind the tests' fault proxy (tests/proxy.py) that
adds `--latency` s to every request, as a remote store does. All rows run the real `softlabels
train` command, same student, data, seed and batch:

- steps/s: the training steps after the first 2, from train_log.json's per-step times (waiting for
  data included): local folder; s3:// with no cache (the first epoch); s3:// with a warm
  --cache-dir (a second epoch or run). Also the bytes read from the store per target token trained
  (one epoch of a streaming student should read each stored byte about once: the ratio to the
  dataset's bytes per token is printed).
- start-up: the wall time of a 1-step run (command to exit: imports, manifest, planning from the
  footers, one step, saving) on a dataset of `--shards` small shards, local vs s3://.
Best of 2 alternating repeats each.

    python bench/store.py --generate [--gen-tokens 65536] [--cache .cache/bench]

- the teacher side instead: `softlabels generate` of bench/generate.py's 54M teacher (k=64,
  512-token windows, 8192-token units, embedded cluster, one worker) writing to a local folder
  against the same job writing to s3:// through the proxy, its workers committing units to the
  store themselves. Tokens/s after the engine is up (wall minus engine start: planning, units,
  shards, publishing) and in the units; alternating, best of 2.
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
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
STUDENT = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 1, "num_key_value_heads": 1,
           "head_dim": 64, "max_position_embeddings": 1024}


def moto(tmp: Path) -> tuple[subprocess.Popen, int]:
    import socket

    import s3fs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H",
                               "127.0.0.1", "-p", str(port)], stdout=open(tmp / "moto.log", "wb"),
                              stderr=subprocess.STDOUT)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    for _ in range(180):
        try:
            s3fs.S3FileSystem(skip_instance_cache=True).mkdir("bench")
            return server, port
        except Exception:
            time.sleep(0.5)
    sys.exit("moto_server did not answer")


def many_shards(d: Path, n: int) -> None:
    """n shards of 2 rows x 64 tokens each (top-8 targets), and the tokenizer of the big one."""
    import numpy as np

    from softlabels.data.card import publish
    from softlabels.data.format import DEFAULT_LOGPROB_STEP, Encoding
    from softlabels.data.manifest import Manifest
    from softlabels.data.shard import write_shard
    from tests.helpers import synthetic_rows

    d.mkdir(parents=True)
    rows = synthetic_rows(2 * n, 4096, 8, seed=0, lengths=(64, 65))
    for i, r in enumerate(rows):
        r.row_id = f"{i}:0"
        r.input_ids = np.asarray(r.input_ids) % 4096
    infos = [write_shard(d / f"shard-{s:05d}.parquet", rows[2 * s:2 * s + 2],
                         Encoding(8, DEFAULT_LOGPROB_STEP)) for s in range(n)]
    publish(d, Manifest(k=8, logprob_step=DEFAULT_LOGPROB_STEP, vocab_size=4096, shards=infos))


def train(data: str, out: Path, steps: int, env: dict, *extra) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "softlabels", "train", "--student",
           str(out.parent / "student.json"), "--data", data, "--output", str(out),
           "--max-steps", str(steps), "--batch-tokens", "8192", "--seed", "1", *extra]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "2", **env})
    wall = time.perf_counter() - t
    if p.returncode:
        sys.exit(p.stderr[-3000:])
    return wall, json.loads((out / "train_log.json").read_text())


def steps_per_s(log: dict) -> float:
    times = [h["step_s"] for h in log["history"][2:]]
    return len(times) / sum(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=524288)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--latency", type=float, default=0.02)
    ap.add_argument("--shards", type=int, default=2400)
    ap.add_argument("--startup-only", action="store_true", help="only the start-up rows")
    ap.add_argument("--generate", action="store_true", help="only: generate to s3:// vs local")
    ap.add_argument("--gen-tokens", type=int, default=65536)
    ap.add_argument("--cache", type=Path, default=Path(".cache/bench"))
    a = ap.parse_args()
    if a.generate:
        return generate_rows(a)
    import shutil

    from reader import make_dataset

    from softlabels.data.dataset import TOKENIZER_DIR
    from softlabels.data.share import push
    from tests.proxy import start

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "student.json").write_text(json.dumps(STUDENT))
        server, port = moto(tmp)
        try:
            data = tmp / "data"
            data.mkdir()
            m = make_dataset(data, a.tokens if not a.startup_only else 131072, 64)
            (data / "model").rename(data / TOKENIZER_DIR)
            push(data, "s3://bench/data", log=lambda *_: None)
            many = tmp / "many"
            many_shards(many, a.shards)
            shutil.copytree(data / TOKENIZER_DIR, many / TOKENIZER_DIR)
            push(many, "s3://bench/many", log=lambda *_: None)
            proxy, pport = start(port, latency=a.latency)
            far = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{pport}"}
            cache = tmp / "cache"
            if not a.startup_only:
                train("s3://bench/data", tmp / "warm", a.steps, far, "--cache-dir", str(cache))
            rates = {"local": [], "s3": [], "s3 cached": []}
            read = {}
            start_s = {"local": [], "s3": []}
            for i in range(2):
                start_s["local"].append(train(str(many), tmp / f"ml{i}", 1, {})[0])
                start_s["s3"].append(train("s3://bench/many", tmp / f"ms{i}", 1, far)[0])
                if a.startup_only:
                    continue
                _, log = train(str(data), tmp / f"l{i}", a.steps, {})
                rates["local"].append(steps_per_s(log))
                _, log = train("s3://bench/data", tmp / f"s{i}", a.steps, far)
                rates["s3"].append(steps_per_s(log))
                read["s3"] = (sum(log["bytes_read_per_process"]), log["tokens"])
                _, log = train("s3://bench/data", tmp / f"c{i}", a.steps, far,
                               "--cache-dir", str(cache))
                rates["s3 cached"].append(steps_per_s(log))
                read["s3 cached"] = (sum(log["bytes_read_per_process"]), log["tokens"])
            proxy.shutdown()
        finally:
            server.terminate()
    per_token = sum(s.bytes for s in m.shards) / m.tokens
    print(f"{m.tokens:,} tokens in {len(m.shards)} shards (k=64, {per_token:.1f} B/token); "
          f"{a.steps} steps of 8192 tokens; {a.latency * 1000:.0f} ms added to every store "
          "request; best of 2\n")
    print("| data | steps/s | vs local | bytes read from the store / target token | "
          "bytes read / dataset bytes |\n|---|---|---|---|---|")
    best = {k: max(v) for k, v in rates.items() if v}
    total = sum(s.bytes for s in m.shards)
    for k, v in best.items():
        b = read.get(k)
        shown = f"{b[0] / b[1]:.1f} | {b[0] / total:.3f}" if b else "(disk) | (disk)"
        print(f"| {k} | {v:.2f} | {v / best['local']:.3f} | {shown} |")
    ls, ss = min(start_s["local"]), min(start_s["s3"])
    print(f"\nstart-up, {a.shards} shards, 1-step run: local {ls:.1f} s, s3:// {ss:.1f} s: "
          f"{ss / ls:.2f}x")


def generate_rows(a) -> None:
    from generate import make_teacher, run_generate, windows_for
    from tests.proxy import start

    teacher = (a.cache / "teacher-54m").resolve()
    make_teacher(teacher)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        windows = windows_for(teacher, a.gen_tokens, 512, tmp / "in.parquet")
        n = sum(len(w) for w in windows)
        server, port = moto(tmp)
        proxy, pport = start(port, latency=a.latency)
        runs = {"local": [], "s3": []}
        try:
            for i in range(2):
                runs["local"].append(run_generate(teacher, tmp / "in.parquet", tmp / f"l{i}", 64,
                                                  512, 1))
                os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{pport}"
                runs["s3"].append(run_generate(teacher, tmp / "in.parquet", f"s3://bench/g{i}",
                                               64, 512, 1))
                os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
        finally:
            proxy.shutdown()
            server.terminate()
    print(f"{n:,} tokens, k=64, windows of <= 512, units of 8192 tokens, 1 worker; "
          f"{a.latency * 1000:.0f} ms added to every store request; best of 2\n")
    print("| output | wall s | engine start s | tokens/s after engine start | vs local | "
          "tokens/s in units | vs local |\n|---|---|---|---|---|---|---|")

    def after(r):
        return n / (r["wall"] - r["engine_start"])

    def units(r):
        return n / (r["teacher"] + r["write"])

    best = {k: max(v, key=after) for k, v in runs.items()}
    for k, r in best.items():
        print(f"| {k} | {r['wall']:.1f} | {r['engine_start']:.1f} | {after(r):.0f} | "
              f"{after(r) / after(best['local']):.3f} | {units(r):.0f} | "
              f"{units(r) / units(best['local']):.3f} |")


if __name__ == "__main__":
    main()
