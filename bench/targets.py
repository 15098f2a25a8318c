"""Which stored targets teach a student most per byte, against online KD (issue 11, item 5).

A teacher trained 5x longer than the demo's (cached under --cache), a student ~14x smaller than
it, the same rows, steps and schedule for every row of the table, several seeds (mean ± std):
  CE only; stored top-k (k = 8, 64) with the tail bucket, with and without CE; top-64 with the
  ground-truth residual, with and without CE; sampled targets (N = 12, 25, 50), with and without
  CE; top-k + draws from outside it (8 + 12, 64 + 50); online full-vocabulary KD with the teacher
  in the loop.
`softlabels generate` runs make --top-k 64, --samples 50 and the two top-k + draws datasets; the
others are cut from them exactly: top-8 is the first 8 of the top-64, N = 12 is 12 of the 50
draws taken without replacement (which are 12 independent draws from the teacher).
Columns: held-out CE on the real next tokens; the exact full-vocabulary KL(teacher || student)
and top-1 agreement, both from a transformers forward of teacher and student over the held-out
split (the bench has the teacher); bytes/token of the stored dataset; training wall seconds.

    python bench/targets.py [--cache .cache/bench-targets] [--steps 300] [--seeds 0 1 2]
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
CORPUS = REPO / "data" / "corpus"
STUDENT = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 256,
           "num_hidden_layers": 2, "num_attention_heads": 1, "num_key_value_heads": 1,
           "head_dim": 64, "max_position_embeddings": 1024, "tie_word_embeddings": True}


def run(args: list) -> str:
    p = subprocess.run([sys.executable, "-m", "softlabels", *map(str, args)],
                       capture_output=True, text=True, cwd=REPO)
    if p.returncode:
        sys.exit(p.stderr[-3000:])
    return p.stdout


def teacher(cache: Path, steps: int) -> Path:
    import pyarrow.parquet as pq

    from softlabels.demo import make_tokenizer, train_teacher

    path = cache / "teacher"
    if not (path / "model.safetensors").is_file():
        texts = pq.read_table(CORPUS / "kjv-train.parquet").column("text").to_pylist()
        tmp = cache / ".teacher.tmp"
        tok = make_tokenizer(texts, vocab_size=4096, path=tmp)
        train_teacher(texts, tok, tmp, steps=steps)
        tmp.rename(path)
    return path


def derive(src: Path, dst: Path, k: int, draws: int, seed: int = 0) -> Path:
    """A dataset cut from `src` (top-64, or 50 draws): its first k of the top-k, or `draws` of
    its draws taken without replacement."""
    from softlabels.data.card import publish
    from softlabels.data.format import Encoding, Row
    from softlabels.data.manifest import Manifest
    from softlabels.data.reader import SoftLabelReader
    from softlabels.data.shard import write_shard
    from softlabels.generate.head import unique_counts

    if (dst / "manifest.json").is_file():
        return dst
    m = Manifest.load(src)
    rng = np.random.default_rng(seed)
    rows = []
    for r in SoftLabelReader(src):
        s_ids = s_counts = None
        if draws:
            pool = [np.repeat(i[c > 0], c[c > 0]) for i, c in zip(r.sample_ids, r.sample_counts)]
            kept = np.stack([rng.permutation(p)[:draws] if len(p) else np.zeros(draws, np.int64)
                             for p in pool])
            s_ids, s_counts = unique_counts(kept)
            s_counts[~r.target_mask] = 0
        rows.append(Row(r.row_id, r.input_ids, r.topk_ids[:, :k].copy(),
                        r.topk_logprobs[:, :k].copy(), r.target_mask, sample_ids=s_ids,
                        sample_counts=s_counts))
    dst.mkdir(parents=True, exist_ok=True)
    info = write_shard(dst / "shard-00000.parquet", rows, Encoding(k, m.logprob_step, draws))
    publish(dst, Manifest(k=k, logprob_step=m.logprob_step, vocab_size=m.vocab_size, draws=draws,
                          provenance={**m.provenance, "cut_from": str(src)}, shards=[info]))
    shutil.copytree(src / "tokenizer", dst / "tokenizer", dirs_exist_ok=True)
    return dst


def exact_eval(teacher: Path, student: Path, heldout: Path) -> dict:
    """Held-out CE, exact full-vocabulary KL(teacher || student) and top-1 agreement."""
    import torch
    from transformers import AutoModelForCausalLM

    from softlabels.data.reader import SoftLabelReader

    t = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    s = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    ce = kl = top1 = n = n_ce = 0.0
    with torch.no_grad():
        for r in SoftLabelReader(heldout):
            x = torch.from_numpy(r.input_ids.astype(np.int64))[None]
            lt = torch.log_softmax(t(x).logits[0].double(), -1)
            ls = torch.log_softmax(s(x).logits[0].double(), -1)
            kl += float((lt.exp() * (lt - ls)).sum())
            top1 += float((lt.argmax(-1) == ls.argmax(-1)).sum())
            ce -= float(ls[:-1].gather(-1, x[0, 1:, None]).sum())
            n += len(x[0])
            n_ce += len(x[0]) - 1
    return {"ce": ce / n_ce, "kl": kl / n, "top1": top1 / n}


def bytes_per_token(d: Path) -> float:
    m = json.loads((d / "manifest.json").read_text())
    return sum(s["bytes"] for s in m["shards"]) / sum(s["tokens"] for s in m["shards"])


def main() -> None:
    from quality import train_online

    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench-targets")
    ap.add_argument("--teacher-steps", type=int, default=600)  # the demo's teacher: 120
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", nargs="*", default=None, help="recipe names to run")
    a = ap.parse_args()
    cache = a.cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    tdir = teacher(cache, a.teacher_steps)
    (cache / "student.json").write_text(json.dumps(STUDENT))

    def generate(name: str, split: str, *flags) -> Path:
        out = cache / name
        if not (out / "manifest.json").is_file():
            run(["generate", "--teacher", tdir, "--input", CORPUS / f"kjv-{split}.parquet",
                 "--output", out, "--max-length", 256, *flags])
        return out

    made: dict[str, Path] = {}

    def dataset(name: str) -> Path:
        """A recipe's training set, generated or cut on first use (so --only makes no other)."""
        if name not in made:
            made[name] = {
                "k64": lambda: generate("k64", "train", "--top-k", 64),
                "k8": lambda: derive(dataset("k64"), cache / "k8", 8, 0),
                "n50": lambda: generate("n50", "train", "--samples", 50),
                "n25": lambda: derive(dataset("n50"), cache / "n25", 0, 25),
                "n12": lambda: derive(dataset("n50"), cache / "n12", 0, 12),
                "k8+t12": lambda: generate("k8t12", "train", "--top-k", 8, "--samples", 12),
                "k64+t50": lambda: generate("k64t50", "train", "--top-k", 64, "--samples", 50),
            }[name]()
        return made[name]

    heldout = generate("heldout-k64", "heldout", "--top-k", 64)
    tail, label = ["--residual", "tail"], ["--residual", "label"]
    recipes = {  # every option spelled out: defaults change
        "CE only": ("k64", ["--ce-weight", 1]),
        "top-8 + tail": ("k8", [*tail, "--ce-weight", 0]),
        "top-8 + tail + 0.5 CE": ("k8", [*tail, "--ce-weight", 0.5]),
        "top-64 + tail": ("k64", [*tail, "--ce-weight", 0]),
        "top-64 + tail + 0.5 CE": ("k64", [*tail, "--ce-weight", 0.5]),
        "top-64 + GT residual": ("k64", [*label, "--ce-weight", 0]),
        "top-64 + GT residual + 0.5 CE": ("k64", [*label, "--ce-weight", 0.5]),
        "sampled N=12": ("n12", ["--targets", "samples", "--ce-weight", 0]),
        "sampled N=50": ("n50", ["--targets", "samples", "--ce-weight", 0]),
        "sampled N=50 + 0.5 CE": ("n50", ["--targets", "samples", "--ce-weight", 0.5]),
        "sampled N=25": ("n25", ["--targets", "samples", "--ce-weight", 0]),
        "top-8 + 12 draws outside it": ("k8+t12", ["--targets", "both", *label,
                                                   "--ce-weight", 0]),
        "top-64 + 50 draws outside it": ("k64+t50", ["--targets", "both", *label,
                                                     "--ce-weight", 0]),
        "online full KD": (None, []),
    }
    run_now = {k: v for k, v in recipes.items() if not a.only or k in a.only}
    results_path = cache / f"results-{a.steps}.json"
    res = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for seed in a.seeds:
        for name, (ds, extra) in run_now.items():
            key = f"{name} | seed {seed}"
            if key in res:
                continue
            out = cache / "runs" / f"{name.replace(' ', '_')}-{a.steps}-{seed}"
            t = time.perf_counter()
            if ds is None:
                train_online(cache, dataset("k64"), out, a.steps, seed=seed)
            else:
                run(["train", "--student", cache / "student.json", "--data", dataset(ds),
                     "--output", out, "--max-steps", a.steps, "--batch-tokens", 4096,
                     "--lr", "3e-3", "--warmup", 10, "--seed", seed, "--report-to",
                     "tensorboard", *extra])
            wall = time.perf_counter() - t
            res[key] = {**exact_eval(tdir, out, heldout), "wall_s": wall,
                        "bytes_per_token": bytes_per_token(dataset(ds)) if ds else None}
            results_path.write_text(json.dumps(res, indent=1))
            print(key, res[key], file=sys.stderr)
    table(res, recipes, a, exact_eval(tdir, tdir, heldout)["ce"])


def table(res: dict, recipes: dict, a, teacher_ce: float) -> None:
    rows = {name: [res[f"{name} | seed {s}"] for s in a.seeds if f"{name} | seed {s}" in res]
            for name in recipes}
    ce0, online = (np.mean([r["ce"] for r in rows[name]] or [np.nan])
                   for name in ("CE only", "online full KD"))
    print(f"{a.steps} steps x 4096 tokens, seeds {a.seeds}; teacher held-out CE "
          f"{teacher_ce:.4f}\n")
    print("| recipe | held-out CE | share of online KD's gain | exact KL(teacher‖student) | "
          "top-1 agreement | bytes/token | train wall s (fastest seed) |")
    print("|---|---|---|---|---|---|---|")
    for name, rs in rows.items():
        if not rs:
            continue
        ce, kl, top1, wall = (np.array([r[k] for r in rs]) for k in ("ce", "kl", "top1",
                                                                      "wall_s"))
        b = rs[0]["bytes_per_token"]
        print(f"| {name} | {ce.mean():.4f} ± {ce.std():.4f} | "
              f"{(ce0 - ce.mean()) / (ce0 - online):.0%} | {kl.mean():.4f} ± {kl.std():.4f} | "
              f"{top1.mean():.3f} | {'-' if b is None else f'{b:.1f}'} | {wall.min():.0f} |")


if __name__ == "__main__":
    main()
