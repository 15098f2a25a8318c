"""Students with their own tokenizer (issue 21): held-out bits per byte of students trained from
the confident teacher's stored top-64 (bench/confident.py: its datasets, its student config, its
300 steps) with a tokenizer of another kind (SentencePiece-style Unigram, 2048 pieces) and of
another size (byte-level BPE, 3000), each with CE only and with the cross-tokenizer losses,
against the same student on the teacher's tokenizer (4096) with CE only and with its default.

    python bench/confident.py --parts storage      # first: the datasets it reads
    python bench/cross.py [--seeds 0 1 2] [--only NAME ...]
    python bench/cross.py --speed [--speed-steps 60 --repeats 2]

"teacher-twin" is the teacher's tokenizer plus one unused token: the cross path with the
teacher's own cuts, which checks that the path itself loses nothing. Every row is `softlabels
train` (batches of 4096 teacher tokens; a cross row's student target tokens per step follow from
its text: ~4480 for the Unigram) then
`softlabels eval` (bits per byte over the student's own tokens of the held-out text). The
cross-tokenizer rows alone need the label log-probs (format 4): their cost per token is printed.
Throughput (--speed, on a quiet machine): the same-tokenizer default and the cross default
through the teacher's own tokenizer (the twin: same tokens, same head, only the path differs)
and with unigram-2048 (half the head) alternate, short runs each; student target tokens per second
(decoding, tokenizing and aligning in the prefetch thread, forward, loss, backward, optimiser;
a step's wait for data included), each side's best run, as a ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TOKENIZERS = {"unigram-2048": 2048, "bpe-3000": 3000}
TWIN = "teacher-twin"  # the teacher's tokenizer plus one unused token: the cross path, same cuts
ROWS = {  # name: (student tokenizer or None for the teacher's, train arguments)
    "teacher's tokenizer, CE only": (None, ["--ce-weight", 1]),
    "teacher's tokenizer, top-64 + label + 0.5 CE (default)": (None, []),
    "teacher's tokenizer, top-64 + label, CE 0": (None, ["--ce-weight", 0]),
    f"{TWIN}, dist + 0.5 CE": (TWIN, ["--cross-loss", "dist", "--ce-weight", 0.5]),
}
for _tok in TOKENIZERS:
    ROWS[f"{_tok}, CE only"] = (_tok, ["--ce-weight", 1])
    for _loss in ("both", "alm", "dist"):
        ROWS[f"{_tok}, {_loss}"] = (_tok, ["--cross-loss", _loss, "--ce-weight", 0])
        ROWS[f"{_tok}, {_loss} + 0.5 CE"] = (_tok, ["--cross-loss", _loss, "--ce-weight", 0.5])


def tokenizers(cache: Path) -> None:
    import pyarrow.parquet as pq

    from softlabels.data.dataset import load_tokenizer
    from softlabels.demo import make_tokenizer, make_unigram_tokenizer

    if not (cache / TWIN).is_dir():
        twin = load_tokenizer(cache / "k64")
        twin.add_tokens(["<twin>"])
        twin.save_pretrained(cache / TWIN)

    texts = pq.read_table(cache / "train.parquet").column("text").to_pylist()
    for name, size in TOKENIZERS.items():
        if not (cache / name).is_dir():
            (make_unigram_tokenizer if name.startswith("unigram") else make_tokenizer)(
                texts, size, cache / name)


def label_bytes_per_token(data: Path) -> float:
    import pyarrow.parquet as pq

    size = 0
    for f in data.glob("*.parquet"):
        meta = pq.ParquetFile(f).metadata
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                col = meta.row_group(g).column(c)
                if col.path_in_schema.startswith("label_logprob_q"):
                    size += col.total_compressed_size
    shards = json.loads((data / "manifest.json").read_text())["shards"]
    return size / sum(s["tokens"] for s in shards)


def train_cmd(cache: Path, out: Path, steps: int, seed: int, tok: str | None,
              extra: list) -> list[str]:
    """The `softlabels train` command of one run: the confident bench's student and recipe."""
    cmd = [sys.executable, "-m", "softlabels", "train", "--student", cache / "student.json",
           "--data", cache / "k64", "--output", out, "--max-steps", steps, "--batch-tokens",
           4096, "--lr", "3e-3", "--warmup", 10, "--seed", seed, *extra]
    if tok:
        cmd += ["--student-tokenizer", cache / tok]
    return list(map(str, cmd))


def run(cache: Path, name: str, seed: int, steps: int) -> dict:
    tok, extra = ROWS[name]
    out = cache / "cross-runs" / f"{name.split(' (')[0].replace(' ', '_').replace(',', '')}-{seed}"
    if not (out / "train_log.json").is_file():
        subprocess.run(train_cmd(cache, out, steps, seed, tok, extra), check=True,
                       capture_output=True, cwd=REPO)
    r = json.loads(subprocess.run(
        [sys.executable, "-m", "softlabels", "eval", "--model", str(out), "--data",
         str(cache / "heldout-k64"), "--json"], check=True, capture_output=True, text=True,
        cwd=REPO).stdout)
    return {"bpb": r["bpb"], "ce": r["ce"]}


def speed(cache: Path, steps: int, repeats: int) -> None:
    sides = {"same-tokenizer default": (None, []),
             f"{TWIN}, dist + 0.5 CE": (TWIN, ["--cross-loss", "dist"]),
             "unigram-2048, dist + 0.5 CE": ("unigram-2048", ["--cross-loss", "dist"])}
    best = {}
    for r in range(repeats):
        for name, (tok, extra) in sides.items():
            out = cache / "speed-runs" / f"{tok or 'same'}-{r}"
            if not (out / "train_log.json").is_file():
                subprocess.run(train_cmd(cache, out, steps, 0, tok, extra), check=True,
                               capture_output=True, cwd=REPO)
            hist = json.loads((out / "train_log.json").read_text())["history"][5:]
            tps = (hist[-1]["tokens"] - hist[0]["tokens"]) / sum(h["step_s"] for h in hist[1:])
            best[name] = max(best.get(name, 0.0), tps)
            print(f"{name}, run {r}: {tps:.0f} student tokens/s", file=sys.stderr, flush=True)
    same = best.pop("same-tokenizer default")
    print(f"same-tokenizer default: {same:.0f} student target tokens/s ({steps} steps a run, "
          f"best of {repeats})")
    for name, tps in best.items():
        print(f"{name}: {tps:.0f} student target tokens/s, {tps / same:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench-confident")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", nargs="*", default=None, help="row names to run")
    ap.add_argument("--speed", action="store_true", help="throughput only")
    ap.add_argument("--speed-steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    cache = a.cache.resolve()
    if not (cache / "k64" / "manifest.json").is_file():
        sys.exit(f"{cache}/k64 is missing: run `python bench/confident.py --parts storage` first")
    tokenizers(cache)
    if a.speed:
        return speed(cache, a.speed_steps, a.repeats)
    res_file = cache / "cross.json"
    res = json.loads(res_file.read_text()) if res_file.is_file() else {}
    for seed in a.seeds:
        for name in ROWS:
            key = f"{name} | seed {seed}"
            if key in res or (a.only and name not in a.only):
                continue
            res[key] = run(cache, name, seed, a.steps)
            print(key, res[key], file=sys.stderr, flush=True)
            res_file.write_text(json.dumps(res, indent=1))

    def cells(name: str) -> np.ndarray:
        return np.array([res[f"{name} | seed {s}"]["bpb"] for s in a.seeds
                         if f"{name} | seed {s}" in res])

    same_ce = cells("teacher's tokenizer, CE only")
    same_kd = cells("teacher's tokenizer, top-64 + label + 0.5 CE (default)")
    gain = same_ce.mean() - same_kd.mean() if len(same_ce) and len(same_kd) else float("nan")
    print(f"label log-probs cost {label_bytes_per_token(cache / 'k64'):.2f} B/token; "
          f"{a.steps} steps, seeds {a.seeds}; same-tokenizer gain {gain:.4f} bits/byte\n")
    print("| student tokenizer, loss | held-out bits/byte | vs its CE only (seeds better) | "
          "share of the same-tokenizer gain |")
    print("|---|---|---|---|")
    for name, (tok, _) in ROWS.items():
        v = cells(name)
        if not len(v):
            continue
        own_ce = f"{tok}, CE only" if tok and tok != TWIN else "teacher's tokenizer, CE only"
        base = cells(own_ce)[:len(v)]
        d = v[:len(base)] - base
        own = "CE only" in name
        print(f"| {name} | {v.mean():.4f} ± {v.std():.4f} | "
              + ("" if own else f"{d.mean():+.4f} ({(d < 0).sum()}/{len(d)})") + " | "
              + ("" if own or not tok else f"{-d.mean() / gain:.0%}") + " |")


if __name__ == "__main__":
    main()
