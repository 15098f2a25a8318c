"""softlabels train beside the field's trainers: the same stored top-k targets, a student with a
151,936-id head (Qwen's) on a small body, the same rows per step, on this CPU.

    python bench/peers.py [--steps 6] [--tokens 1024 2048]

- softlabels: `softlabels train --residual none --ce-weight 0.5` (forward KL on the top-k
  renormalised on both sides, as axolotl's `kd_normalize_topk`, + 0.5 CE), in its own process.
- peer: a `transformers.Trainer` whose compute_loss is axolotl's top-k KD loss over the student's
  full logits (log_softmax over the vocabulary, gather the K, renormalise over them, forward KL;
  `axolotl/integrations/kd/topk_logprob/forward_kl.py` with its kernel's normalize_topk) + 0.5
  CE: what the field's trainers do (DistillKit's and TRL's the same, full logits), in its own
  process, on the same rows (decoded before the clock starts, as a prepared dataset is).

Per batch size: median seconds per step after one warm-up step (data waiting included for
softlabels, whose reader runs in the background), tokens/s, and peak RSS of the process
(everything: model, optimiser, data). The largest batch each fits in 16 GiB is extrapolated from
the peak RSS of the two batch sizes (it grows linearly with the batch), said as such.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
VOCAB, K, T = 151_936, 64, 512
GIB = 1 << 30


def make_student(path: Path, hidden: int, layers: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 4,
        num_hidden_layers=layers, num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64, head_dim=64, tie_word_embeddings=False,
        max_position_embeddings=T, torch_dtype="float32")).save_pretrained(path)


def make_data(path: Path, rows: int, seed: int = 0) -> None:
    """`rows` windows of T tokens with a top-K per position (the next token among them), its
    exact tail and label log-prob: what `generate` stores, without a teacher run."""
    from softlabels.data.format import Row
    from tests.helpers import write_dataset

    rng = np.random.default_rng(seed)
    out = []
    for i in range(rows):
        ids = rng.integers(0, VOCAB, T).astype(np.int32)
        base = rng.integers(0, VOCAB, (T, 1))
        top = ((base + np.arange(K) * 7919) % VOCAB).astype(np.int32)  # K distinct ids
        top[:-1, 0] = np.where((top[:-1, 1:] == ids[1:, None]).any(-1), top[:-1, 0], ids[1:])
        raw = np.sort(rng.normal(0, 2, (T, K)), -1)[:, ::-1]
        mass = rng.uniform(0.6, 0.99, (T, 1))
        lp = (raw - np.logaddexp.reduce(raw, -1, keepdims=True) + np.log(mass))
        label = np.full(T, np.nan, np.float32)
        slot = (top[:-1] == ids[1:, None]).argmax(-1)  # the next token's place in the top-K
        label[:-1] = lp[np.arange(T - 1), slot]
        out.append(Row(f"{i}:0", ids, top, lp.astype(np.float32), np.ones(T, bool),
                       tail_logprob=np.log1p(-mass[:, 0]).astype(np.float32),
                       label_logprob=label))
    from imports import tokenizer  # a word-level tokenizer of VOCAB tokens

    write_dataset(path, out, K, VOCAB, tokenizer=tokenizer(path.parent / "tokenizer"))


def run_softlabels(data: Path, student: Path, tokens: int, steps: int, out: Path,
                   *flags: str) -> dict:
    p = subprocess.run([sys.executable, "-m", "softlabels", "train", "--student", str(student),
                        "--data", str(data), "--output", str(out), "--max-steps", str(steps),
                        "--batch-tokens", str(tokens), "--residual", "none", "--ce-weight",
                        "0.5", "--lr", "1e-4", "--warmup", "1", *flags],
                       capture_output=True, text=True, cwd=REPO)
    if p.returncode:
        raise SystemExit(p.stderr[-3000:])
    log = json.loads((out / "train_log.json").read_text())
    times = [h["step_s"] for h in log["history"][1:]]
    return {"step_s": float(np.median(times)), "tokens": log["history"][0]["tokens"],
            "peak_gib": log["peak_memory_bytes"] / GIB}


def peer(data: str, student: str, tokens: int, steps: int) -> dict:
    """The peer loop, in this process: transformers.Trainer + axolotl's KD loss on full
    logits."""
    import torch
    import torch.nn.functional as F
    from transformers import (
        AutoModelForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from softlabels.data.reader import SoftLabelReader

    rows_per_step = tokens // T
    rows = list(SoftLabelReader(data))[: rows_per_step * steps]
    feats = []
    for r in rows:  # axolotl's prepared rows: top-K renormalised over the K, mask per position
        lp = r.topk_logprobs.astype(np.float64)
        lp = lp - np.logaddexp.reduce(lp, -1, keepdims=True)
        feats.append({"input_ids": torch.from_numpy(r.input_ids.astype(np.int64)),
                      "labels": torch.from_numpy(r.input_ids.astype(np.int64)),
                      "target_token_ids": torch.from_numpy(r.topk_ids.astype(np.int64)),
                      "target_logprobs": torch.from_numpy(lp.astype(np.float32)),
                      "target_mask": torch.from_numpy(
                          np.repeat(r.target_mask[:, None], K, 1).astype(np.int64))})

    class KDTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            logits = model(input_ids=inputs["input_ids"]).logits.float()  # (B, T, V)
            logp = torch.log_softmax(logits, -1)
            q = logp.gather(-1, inputs["target_token_ids"])
            q = q - torch.logsumexp(q, -1, keepdim=True)  # normalize_topk
            m = inputs["target_mask"].bool()
            p = inputs["target_logprobs"]
            kd = (p.exp() * (p - q))[m].sum() / m[..., 0].sum()
            ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                 inputs["labels"][:, 1:].reshape(-1))
            loss = 0.5 * kd + 0.5 * ce
            return (loss, None) if return_outputs else loss

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as d:
        args = TrainingArguments(d, per_device_train_batch_size=rows_per_step, max_steps=steps,
                                 learning_rate=1e-4, warmup_steps=1, report_to=[],
                                 save_strategy="no", logging_strategy="no", use_cpu=True,
                                 dataloader_num_workers=0, remove_unused_columns=False)
        KDTrainer(model=model, args=args, train_dataset=feats,
                  data_collator=lambda b: {k: torch.stack([x[k] for x in b]) for k in b[0]},
                  callbacks=[Clock()]).train()
    return {"step_s": float(np.median(times[1:])), "tokens": rows_per_step * T,
            "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}


def head_mode(data: str, student: str, tokens: int, steps: int, fused: bool) -> dict:
    """softlabels' own step (Distiller + AdamW, the train loop's loss), the head's gradient
    computed in the forward pass (fused) or each chunk recomputed in the backward pass: the
    measurement of whether the first is worth having."""
    import torch

    from softlabels.data.manifest import Manifest
    from softlabels.data.reader import SoftLabelReader
    from softlabels.train_student.config import Recipe
    from softlabels.train_student.objective import SameTokenizer
    from softlabels.train_student.student import load_student
    from softlabels.train_student.train import Distiller

    model, _ = load_student(student, data)
    recipe = Recipe(residual="none", ce_weight=0.5).for_dataset(Manifest.load(data), data)
    objective = SameTokenizer([recipe], VOCAB)
    distiller = Distiller(model, objective)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rows = list(SoftLabelReader(data))
    per = tokens // T
    times = []
    for i in range(steps):
        batch = objective.collate(rows[i * per: (i + 1) * per], np.zeros(per, np.int64))
        counts = objective.batch_counts(vars(batch))
        t = time.perf_counter()
        coef = objective.coefficients(counts)
        s = distiller(batch, coef if fused else None)
        objective.loss(s, counts).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return {"step_s": float(np.median(times[1:])), "tokens": tokens, "chunk": distiller.chunk,
            "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB}


def fit_16g(points: list[dict]) -> float:
    """Tokens per step at 16 GiB of peak RSS, on the line through the measured points."""
    x = np.array([p["tokens"] for p in points], float)
    y = np.array([p["peak_gib"] for p in points])
    slope, base = np.polyfit(x, y, 1)
    return (16 - base) / slope


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--work", type=Path, default=REPO / ".cache" / "bench-peers")
    ap.add_argument("--peer", nargs=4, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--head", nargs=5, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.peer:
        print(json.dumps(peer(a.peer[0], a.peer[1], int(a.peer[2]), int(a.peer[3]))))
        return
    if a.head:
        print(json.dumps(head_mode(a.head[0], a.head[1], int(a.head[2]), int(a.head[3]),
                                   a.head[4] == "fused")))
        return
    student, data = a.work / "student", a.work / "data"
    if not (student / "config.json").is_file():
        make_student(student, a.hidden, a.layers)
    rows = max(a.tokens) // T * a.steps
    if not (data / "manifest.json").is_file() or json.loads(
            (data / "manifest.json").read_text())["shards"][0]["rows"] < rows:
        import shutil

        shutil.rmtree(data, ignore_errors=True)
        make_data(data, rows)
    res = {"softlabels": [], "peer": []}
    for tokens in a.tokens:
        for _ in range(1):
            res["softlabels"].append(run_softlabels(data, student, tokens, a.steps,
                                                    a.work / f"run-{tokens}"))
            p = subprocess.run([sys.executable, __file__, "--peer", str(data), str(student),
                                str(tokens), str(a.steps)], capture_output=True, text=True)
            if p.returncode:
                raise SystemExit(p.stderr[-3000:])
            res["peer"].append(json.loads(p.stdout.strip().splitlines()[-1]))
    print(f"student: Llama, {a.layers} layers x {a.hidden} hidden, vocab {VOCAB}; top-{K} "
          f"targets, rows of {T} tokens, {a.steps} steps (median after the first)")
    print("| batch tokens | trainer | s/step | tokens/s | peak RSS GiB |")
    print("|---|---|---|---|---|")
    for name in ("peer", "softlabels"):
        for r in res[name]:
            print(f"| {r['tokens']} | {name} | {r['step_s']:.2f} | {r['tokens'] / r['step_s']:.0f}"
                  f" | {r['peak_gib']:.2f} |")
    for s, p in zip(res["softlabels"], res["peer"]):
        print(f"at {s['tokens']} tokens: memory {s['peak_gib'] / p['peak_gib']:.2f}x the peer's "
              f"(goal <= 0.33), tokens/s {p['step_s'] / s['step_s']:.2f}x (goal >= 1.0)")
    if len(a.tokens) > 1:
        mine, theirs = fit_16g(res["softlabels"]), fit_16g(res["peer"])
        print(f"largest batch in 16 GiB (extrapolated): softlabels {mine:,.0f} tokens, peer "
              f"{theirs:,.0f}: {mine / theirs:.1f}x (goal >= 3)")
    tokens = max(a.tokens)  # the head alone: its gradient in the forward pass, or recomputed
    head = {}
    for mode in ("recompute", "fused", "recompute", "fused"):  # interleaved: a noisy machine
        p = subprocess.run([sys.executable, __file__, "--head", str(data), str(student),
                            str(tokens), str(a.steps), mode], capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(p.stderr[-3000:])
        r = json.loads(p.stdout.strip().splitlines()[-1])
        head[mode] = min(head.get(mode, r), r, key=lambda x: x["step_s"])
    print(f"softlabels' step at {tokens} tokens (chunk {head['fused']['chunk']}), the head's "
          f"gradient in the forward pass vs recomputed: {head['fused']['step_s']:.2f} vs "
          f"{head['recompute']['step_s']:.2f} s/step "
          f"({head['recompute']['step_s'] / head['fused']['step_s']:.2f}x), peak RSS "
          f"{head['fused']['peak_gib']:.2f} vs {head['recompute']['peak_gib']:.2f} GiB")
    print(json.dumps({**res, "head": head}))


if __name__ == "__main__":
    main()
