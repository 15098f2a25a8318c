"""Teacher-side speed: `softlabels generate` end to end vs a bare vLLM loop vs plain transformers.

Same teacher (>= 50M parameters, so compute dominates), same token ids, one run, one machine:
  (a) `softlabels generate` end to end (planning, Dask, vLLM, encoding, atomic writes)
  (b) a bare vLLM prompt_logprobs loop over the same windows: no Dask, no writing
  (c) a plain transformers loop: batched forward + log_softmax + topk
  (a2) as (a) with --workers 2, each engine pinned to its own core

    python bench/generate.py --cache .cache/bench --tokens 65536

Engine start is reported apart (it is a fixed cost per worker, ~20-60 s here); the ratios are
given both for the whole wall time and for the time after the engine is up.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from softlabels.demo import make_model, make_tokenizer  # noqa: E402

CORPUS = REPO / "data" / "corpus" / "kjv-train.parquet"


def make_teacher(path: Path) -> None:
    if (path / "model.safetensors").is_file():
        return
    texts = pq.read_table(CORPUS).column("text").to_pylist()
    tok = make_tokenizer(texts, vocab_size=8192, path=path)
    m = make_model(path, vocab_size=len(tok), hidden=512, layers=12, heads=8)
    print(f"teacher: {sum(p.numel() for p in m.parameters()) / 1e6:.1f}M parameters",
          file=sys.stderr)


def windows_for(teacher: Path, tokens: int, max_len: int, inp: Path) -> list[list[int]]:
    """Write an input file whose records tokenize to ~`tokens` tokens; return its windows."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    texts, n = [], 0
    for t in pq.read_table(CORPUS).column("text").to_pylist():
        ids = tok(t).input_ids[:max_len]
        texts.append(tok.decode(ids, skip_special_tokens=True))
        n += len(ids)
        if n >= tokens:
            break
    pq.write_table(pa.table({"text": texts}), inp)
    return [tok(t).input_ids[:max_len] for t in texts]


def run_generate(teacher, inp, out, k, max_len, workers, tp=1) -> dict:
    cmd = [sys.executable, "-m", "softlabels", "generate", "--teacher", str(teacher),
           "--input", str(inp), "--output", str(out), "--top-k", str(k), "--max-length",
           str(max_len), "--unit-tokens", "8192", "--workers", str(workers),
           "--tensor-parallel-size", str(tp)]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"})
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    m = re.search(r"engine start ([\d.]+) s, teacher ([\d.]+) s, encoding and writing ([\d.]+) s",
                  p.stderr)
    return {"wall": wall, "engine_start": float(m[1]), "teacher": float(m[2]),
            "write": float(m[3])}


def bare_vllm(teacher, windows, k, max_len) -> dict:
    code = f"""
import json, time, os
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
if __name__ == "__main__":
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    llm = LLM(model={str(teacher)!r}, dtype="float32", enforce_eager=True,
              skip_tokenizer_init=True, max_logprobs={k}, enable_prefix_caching=False,
              max_model_len={max_len + 1}, max_num_batched_tokens={max(8192, max_len + 1)})
    sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs={k}, logprobs={k},
                        detokenize=False, flat_logprobs=True)
    wins = json.load(open({str(teacher / "windows.json")!r}))
    t1 = time.perf_counter()
    for s in range(0, len(wins), 16):  # the same batches of windows generate's units hold
        outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in wins[s:s + 16]], sp,
                            use_tqdm=False)
    t2 = time.perf_counter()
    print(json.dumps({{"engine_start": t1 - t0, "loop": t2 - t1}}))
"""
    (teacher / "windows.json").write_text(json.dumps(windows))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"})
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def transformers_loop(teacher, windows, k, batch=8) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    t = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(windows), batch):
            ws = windows[s : s + batch]
            L = max(len(w) for w in ws)
            x = torch.zeros(len(ws), L, dtype=torch.long)
            att = torch.zeros(len(ws), L, dtype=torch.long)
            for i, w in enumerate(ws):
                x[i, : len(w)], att[i, : len(w)] = torch.tensor(w), 1
            lp = torch.log_softmax(model(input_ids=x, attention_mask=att).logits.float(), -1)
            v, i = lp.topk(k, -1)
            _ = (v.numpy(), i.numpy())
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, default=Path(".cache/bench"))
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--tp", action="store_true", help="only: tensor parallel 2 vs 1")
    a = ap.parse_args()
    teacher = (a.cache / "teacher-54m").resolve()
    make_teacher(teacher)
    work = a.cache / "gen-bench"
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    windows = windows_for(teacher, a.tokens, a.max_length, work / "in.parquet")
    n = sum(len(w) for w in windows)
    if a.tp:
        tensor_parallel(teacher, work, n, a)
        return
    res = {"tokens": n}
    res["a"] = run_generate(teacher, work / "in.parquet", work / "out1", a.top_k,
                            a.max_length, 1)
    res["b"] = bare_vllm(teacher, windows, a.top_k, a.max_length)
    res["c"] = transformers_loop(teacher, windows, a.top_k)
    res["a2"] = run_generate(teacher, work / "in.parquet", work / "out2", a.top_k,
                             a.max_length, 2)
    a1, b, c, a2 = res["a"], res["b"], res["c"], res["a2"]
    print(json.dumps(res, indent=1), file=sys.stderr)

    def busy(r, workers):  # wall seconds the workers spent on units (summed / workers)
        return (r["teacher"] + r["write"]) / workers

    print(f"{n} tokens, k={a.top_k}, windows of <= {a.max_length}")
    print("| path | wall s | engine start s | unit time s (teacher + encode/write) | "
          "tokens/s in units | tokens/s overall |")
    print("|---|---|---|---|---|---|")
    for name, r, w in [("(a) softlabels generate, 1 worker", a1, 1),
                       ("(a2) softlabels generate, 2 workers", a2, 2)]:
        print(f"| {name} | {r['wall']:.1f} | {r['engine_start']:.1f} | "
              f"{busy(r, w):.1f} ({r['teacher'] / w:.1f} + {r['write'] / w:.1f}) | "
              f"{n / busy(r, w):.0f} | {n / r['wall']:.0f} |")
    print(f"| (b) bare vLLM loop | {b['loop'] + b['engine_start']:.1f} | "
          f"{b['engine_start']:.1f} | {b['loop']:.1f} | {n / b['loop']:.0f} | "
          f"{n / (b['loop'] + b['engine_start']):.0f} |")
    print(f"| (c) transformers loop | {c:.1f} | 0 | {c:.1f} | {n / c:.0f} | {n / c:.0f} |")
    print(f"\n(a)/(b) throughput in units: {b['loop'] / busy(a1, 1):.2f}; end to end: "
          f"{(b['loop'] + b['engine_start']) / a1['wall']:.2f}")
    print(f"(a)/(c) throughput in units: {c / busy(a1, 1):.2f}; end to end: {c / a1['wall']:.2f}")
    print(f"2 workers / 1 worker, throughput in units: {busy(a1, 1) / busy(a2, 2):.2f}; "
          f"end to end: {a1['wall'] / a2['wall']:.2f}")
    print(f"fixed costs of (a) outside the units (start-up, planning, Dask, publishing): "
          f"{a1['wall'] - a1['engine_start'] - busy(a1, 1):.1f} s")

def tensor_parallel(teacher, work, n, a) -> None:
    """TP=1 vs TP=2 (one vLLM rank per core) on the same windows, the real command, one worker."""
    r1 = run_generate(teacher, work / "in.parquet", work / "tp1", a.top_k, a.max_length, 1, 1)
    r2 = run_generate(teacher, work / "in.parquet", work / "tp2", a.top_k, a.max_length, 1, 2)
    print(f"{n} tokens, k={a.top_k}, windows of <= {a.max_length}, 1 worker")
    print("| tensor parallel | wall s | engine start s | teacher s | tokens/s in units |")
    print("|---|---|---|---|---|")
    for name, r in (("TP=1 (2 threads)", r1), ("TP=2 (1 core per rank)", r2)):
        print(f"| {name} | {r['wall']:.1f} | {r['engine_start']:.1f} | {r['teacher']:.1f} | "
              f"{n / (r['teacher'] + r['write']):.0f} |")
    print(f"\nTP=2 / TP=1 tokens/s in units: "
          f"{(r1['teacher'] + r1['write']) / (r2['teacher'] + r2['write']):.2f}")


if __name__ == "__main__":
    main()
