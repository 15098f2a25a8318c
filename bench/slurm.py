"""Teacher jobs on the batch scheduler (issue 23): worker jobs killed every unit or two, and how
close the dry run's predictions come to the real run.

    python bench/slurm.py [--cache .cache/bench-slurm] [--parts kills dryrun]   # as root

kills    a real single-node Slurm (tests/slurm.py starts and stops it); `generate --cluster slurm
         --workers 2` over a few hundred units of the tiny test teacher, while a watcher cancels a
         running worker job each time two more units are committed; reports the jobs killed, the
         unit runs against the units planned (teacher work redone), and that the dataset holds
         every row exactly once
dryrun   the quality bench's teacher (bench/targets.py, 600 steps) on the KJV train split,
         `--top-k 64`, on the embedded cluster: `--dry-run --calibrate` in one folder, the real
         run in another; the predicted size and teacher time against the real ones
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def softlabels(*args, env=None) -> subprocess.CompletedProcess:
    import os

    p = subprocess.run([sys.executable, "-m", "softlabels", *map(str, args)],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})})
    if p.returncode:
        sys.exit(p.stderr[-3000:])
    return p


def kills(cache: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from softlabels.data.verify import verify
    from softlabels.demo import make_model, make_tokenizer
    from tests import slurm as helper
    from tests.helpers import corpus_texts, read_dataset

    teacher = cache / "tiny-teacher"
    if not (teacher / "model.safetensors").is_file():
        tok = make_tokenizer(corpus_texts(200), vocab_size=512, path=teacher)
        make_model(teacher, vocab_size=len(tok), hidden=64, layers=2, heads=2, seed=0)
    inp = cache / "kills.parquet"
    pq.write_table(pa.table({"text": corpus_texts(200, offset=400)}), inp)
    out = cache / "kills"
    subprocess.run(["rm", "-rf", str(out)])
    s = helper.start(cache / "slurm")
    killed: list[str] = []
    stop = threading.Event()

    def watcher():
        done, seen = out / ".softlabels" / "done", 0
        while not stop.is_set():
            n = len(list(done.iterdir())) if done.is_dir() else 0
            if n >= seen + 2:
                q = subprocess.run(["squeue", "-h", "-t", "R", "-o", "%i", "-n",
                                    "softlabels-kills"], capture_output=True, text=True,
                                   env=s["env"]).stdout.split()
                if q:
                    subprocess.run(["scancel", q[len(killed) % len(q)]], env=s["env"])
                    killed.append(q[len(killed) % len(q)])
                    seen = n
            time.sleep(0.05)

    try:
        t = threading.Thread(target=watcher)
        t.start()
        t0 = time.time()
        p = softlabels("generate", "--teacher", teacher, "--input", inp, "--output", out,
                       "--top-k", 8, "--max-length", 96, "--unit-tokens", 1024, "--cluster",
                       "slurm", "--workers", 2, "--scheduler-host", "127.0.0.1",
                       "--worker-memory", "2GB", "--retries", 5, env=s["env"])
        wall = time.time() - t0
        stop.set()
        t.join()
    finally:
        helper.stop(s)
    report = p.stderr.strip().splitlines()[-1]
    m = re.search(r"units run (\d+) for (\d+) planned", report)
    rows = read_dataset(out)
    return {"killed": len(killed), "report": report, "units_run": int(m.group(1)),
            "units_planned": int(m.group(2)), "verify": verify(out), "rows": len(rows),
            "distinct_rows": len(set(rows)), "wall_s": wall}


def dryrun(cache: Path) -> dict:
    from targets import teacher as bench_teacher

    from softlabels.data.manifest import Manifest

    teacher = bench_teacher(REPO / ".cache" / "bench-targets", 600)
    inp = REPO / "data" / "corpus" / "kjv-train.parquet"
    a, b = cache / "dry", cache / "real"
    subprocess.run(["rm", "-rf", str(a), str(b)])
    args = ["--teacher", teacher, "--input", inp, "--top-k", 64, "--max-length", 256]
    p = softlabels("generate", *args, "--output", a, "--dry-run", "--calibrate")
    said = p.stdout
    size = float(re.search(r"expected size: ([\d.e+]+) GB", said).group(1)) * 1e9
    hours = float(re.search(r"expected teacher time with 1 worker\(s\): ([\d.e+]+) h",
                            said).group(1))
    t0 = time.time()
    p = softlabels("generate", *args, "--output", b)
    wall = time.time() - t0
    # the real run's teacher time: engine start + every unit's scoring and writing
    start, score, write = map(float, re.search(
        r"engine start ([\d.]+) s, teacher ([\d.]+) s, encoding and writing ([\d.]+) s",
        p.stderr).groups())
    real = sum(s.bytes for s in Manifest.load(b).shards)
    return {"dry_run": said.strip(), "predicted_bytes": size, "real_bytes": real,
            "size_ratio": size / real, "predicted_s": hours * 3600,
            "real_teacher_s": start + score + write, "real_wall_s": wall,
            "time_ratio": hours * 3600 / (start + score + write),
            "time_ratio_to_wall": hours * 3600 / wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench-slurm")
    ap.add_argument("--parts", nargs="+", default=["kills", "dryrun"])
    a = ap.parse_args()
    cache = a.cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    res = {}
    if "kills" in a.parts:
        res["kills"] = kills(cache)
        print(json.dumps(res["kills"], indent=1))
    if "dryrun" in a.parts:
        res["dryrun"] = dryrun(cache)
        print(json.dumps(res["dryrun"], indent=1))
    (cache / "results.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
