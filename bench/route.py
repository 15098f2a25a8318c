"""Hidden-state route vs vLLM's prompt_logprobs route (issue 11): tokens/s, peak memory, exactness.

Same teacher (vocabulary 32,768), same windows, same batches of 16 windows (what a unit holds),
each route in its own process, in one run:
  (a) prompt_logprobs, k=64: vLLM's generate runner, flat logprobs turned into (T, k) arrays
      (the route softlabels used before)
  (b) hidden states (vLLM's pooling runner) + softlabels' head: top-64
  (c) as (b), top-64 + 50 draws per position
  (d) as (b), 50 draws only (the compact mode)
Peak memory is the process's peak RSS minus its RSS once the engine is up and warmed: what
scoring adds. The head works on chunks of positions, so (b)-(d) should not grow with the window
length; the prompt-logprob route builds (batched tokens, vocab) log-probs.

    python bench/route.py --cache .cache/bench-route [--tokens 65536] [--max-length 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = r"""
import json, os, resource, sys, time
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
import numpy as np

def rss():
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmRSS")) / 1024

def prompt_logprobs(teacher, k, max_len):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    llm = LLM(model=teacher, dtype="float32", enforce_eager=True, skip_tokenizer_init=True,
              max_logprobs=k, enable_prefix_caching=False, max_model_len=max_len + 1,
              max_num_batched_tokens=max(8192, max_len + 1), load_format="safetensors")
    sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, logprobs=k,
                        detokenize=False, flat_logprobs=True)
    def score(ws):
        outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in ws], sp, use_tqdm=False)
        res = []
        for w, o in zip(ws, outs):
            T = len(w)
            pl = o.prompt_logprobs
            ids = np.asarray(pl.token_ids, np.int32).reshape(T - 1, k + 1)[:, 1:]
            lps = np.asarray(pl.logprobs, np.float32).reshape(T - 1, k + 1)[:, 1:]
            res.append((ids, lps))
        return res
    return score

def hidden(teacher, k, max_len, draws):
    from softlabels.generate.engine import EngineConfig, Teacher
    t = Teacher(EngineConfig(teacher=teacher, k=k, max_length=max_len, draws=draws))
    def score(ws):
        r = t.outputs(ws, [f"{i}:0" for i in range(len(ws))])
        return [(x.topk_ids[:-1], x.topk_logprobs[:-1]) for x in r]
    return score

if __name__ == "__main__":
    route, teacher = sys.argv[1], sys.argv[2]
    k, max_len, draws = (int(x) for x in sys.argv[3:6])
    wins = json.load(open(sys.argv[6]))
    if route == "prompt_logprobs":
        score = prompt_logprobs(teacher, k, max_len)
    else:
        score = hidden(teacher, k, max_len, draws)
    score(wins[:2])
    base = rss()
    t = time.perf_counter()
    first = []
    for s in range(0, len(wins), 16):
        r = score(wins[s:s + 16])
        if s == 0:
            first = r[0]
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if k:
        np.save(sys.argv[7], np.stack([first[0].astype(np.float32), first[1]]))
    print(json.dumps({"wall": wall, "extra_peak_mib": peak - base, "peak_mib": peak}))
"""

ROUTES = [  # name, route, k, draws
    ("prompt_logprobs top-64", "prompt_logprobs", 64, 0),
    ("hidden top-64", "hidden", 64, 0),
    ("hidden top-64 + 50 draws", "hidden", 64, 50),
    ("hidden 50 draws", "hidden", 0, 50),
]


def make_teacher(path: Path) -> None:
    """Tokenizer of 8k pieces trained on the demo corpus, model vocabulary 32k (random)."""
    if (path / "model.safetensors").is_file():
        return
    import pyarrow.parquet as pq

    from softlabels.demo import make_model, make_tokenizer

    texts = pq.read_table(REPO / "data/corpus/kjv-train.parquet").column("text").to_pylist()
    make_tokenizer(texts, vocab_size=8192, path=path)
    make_model(path, vocab_size=32768, hidden=512, layers=8, heads=8, max_positions=8192)


def main() -> None:
    import numpy as np

    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench-route")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--max-length", type=int, default=2048)
    a = ap.parse_args()
    teacher = a.cache / "teacher"
    teacher.mkdir(parents=True, exist_ok=True)
    make_teacher(teacher)
    rng = np.random.default_rng(0)
    n = a.tokens // a.max_length
    wins = rng.integers(0, 8192, (n, a.max_length)).tolist()
    (a.cache / "windows.json").write_text(json.dumps(wins))
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR", "PYTHONPATH": str(REPO)}
    res = {}
    for name, route, k, draws in ROUTES:
        p = subprocess.run([sys.executable, "-c", CHILD, route, str(teacher), str(k),
                            str(a.max_length), str(draws), str(a.cache / "windows.json"),
                            str(a.cache / f"{route}-{k}-{draws}.npy")],
                           capture_output=True, text=True, env=env)
        if p.returncode:
            raise SystemExit(p.stderr[-3000:])
        res[name] = json.loads(p.stdout.strip().splitlines()[-1])
        print(name, res[name], file=sys.stderr)
    ref = np.load(a.cache / "prompt_logprobs-64-0.npy")
    new = np.load(a.cache / "hidden-64-0.npy")
    base = res[ROUTES[0][0]]["wall"]
    print(f"\n{n} windows x {a.max_length} tokens, vocabulary 32,768, batches of 16 windows\n")
    print("| route | tokens/s | vs prompt_logprobs | extra peak RSS MiB |")
    print("|---|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {a.tokens / r['wall']:.0f} | {base / r['wall']:.2f}x | "
              f"{r['extra_peak_mib']:.0f} |")
    same = ref[0] == new[0]
    print(f"\ntop-64 ids equal (first window): {same.mean():.5f}; max |logprob difference| "
          f"where equal: {np.abs(ref[1] - new[1])[same].max():.2e}")


if __name__ == "__main__":
    main()
