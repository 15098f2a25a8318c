"""Quality: does distillation from *stored* top-k targets work, and what does it cost?

Same student architecture, same training rows and steps, held-out evaluation:
  (1) CE only;
  (2) stored top-k KD, k in {1, 8, 64}: with tail bucket, renormalised, and tail bucket plus
      0.5 CE on the real next tokens (what the demo uses);
  (3) online full-vocabulary KD with the teacher run in the loop (the expensive way softlabels
      avoids; implemented here as a reference, with the trainer's batches and schedule).
Inputs come from `softlabels demo` (teacher, top-64 targets for train and held-out splits); the
k=1 and k=8 datasets are the k=64 ones truncated (exactly what generate would write for them).

    python bench/quality.py --demo demo_out --steps 60

Prints a markdown table and writes bench_quality.png beside --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def truncate(src: Path, dst: Path, k: int) -> None:
    """Rewrite a top-64 dataset as top-k (the first k of a sorted list are the top-k)."""
    import shutil

    from softlabels.data.card import publish
    from softlabels.data.format import Encoding, Row
    from softlabels.data.manifest import Manifest
    from softlabels.data.reader import SoftLabelReader
    from softlabels.data.shard import write_shard

    if (dst / "manifest.json").is_file():
        return
    m = Manifest.load(src)
    rows = [Row(r.row_id, r.input_ids, r.topk_ids[:, :k].copy(), r.topk_logprobs[:, :k].copy(),
                r.target_mask) for r in SoftLabelReader(src)]
    info = write_shard(dst / "shard-00000.parquet", rows, Encoding(k, m.logprob_step))
    publish(dst, Manifest(k=k, logprob_step=m.logprob_step, vocab_size=m.vocab_size,
                          provenance={**m.provenance, "truncated_from_k": m.k}, shards=[info]))
    shutil.copytree(src / "tokenizer", dst / "tokenizer", dirs_exist_ok=True)


def train_stored(demo: Path, data: Path, out: Path, steps: int, extra: list) -> float:
    cmd = [sys.executable, "-m", "softlabels", "train", "--student", str(demo / "student.json"),
           "--data", str(data), "--output", str(out), "--max-steps", str(steps),
           "--batch-tokens", "4096", "--lr", "3e-3", "--warmup", "10", *extra]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO)
    return time.perf_counter() - t


def train_online(demo: Path, data: Path, out: Path, steps: int, seed: int = 0) -> float:
    """Online KD: every step runs the teacher on the batch; full-vocabulary forward KL."""
    import torch

    from softlabels.data.reader import SoftLabelReader
    from softlabels.train_student.batches import EpochPlan, collate
    from softlabels.train_student.config import TrainConfig
    from softlabels.train_student.student import load_student
    from softlabels.train_student.train import lr_at

    t0 = time.perf_counter()
    cfg = TrainConfig(student=str(demo / "student.json"), data=str(data), output=str(out),
                      max_steps=steps, batch_tokens=4096, lr=3e-3, warmup=10, seed=seed)
    torch.manual_seed(cfg.seed)
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(demo / "teacher", dtype=torch.float32).eval()
    student, tok = load_student(cfg.student, cfg.data)
    decay = [p for p in student.parameters() if p.ndim >= 2]
    rest = [p for p in student.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr,
                            betas=(0.9, 0.95))
    reader = SoftLabelReader(data, shuffle=True, seed=cfg.seed)
    step, epoch = 0, 0
    while step < steps:
        plan = EpochPlan.make(reader.index(epoch), cfg.batch_tokens, 1)
        for m in range(plan.micro_batches):  # the trainer's batches, in its order
            b = collate(reader.read(epoch, plan.rows(m, 0)[0]), student.config.vocab_size)
            with torch.no_grad():
                t_lp = torch.log_softmax(teacher(input_ids=b.input_ids,
                                                 attention_mask=b.attention_mask).logits, -1)
            s_lp = torch.log_softmax(student(input_ids=b.input_ids,
                                             attention_mask=b.attention_mask).logits, -1)
            t_lp = t_lp.reshape(-1, t_lp.shape[-1])[b.pos]
            s_lp = s_lp.reshape(-1, s_lp.shape[-1])[b.pos]
            loss = (t_lp.exp() * (t_lp - s_lp)).sum() / len(b.pos)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg, steps)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step == steps:
                break
        epoch += 1
    student.save_pretrained(out)
    tok.save_pretrained(out)
    return time.perf_counter() - t0


def evaluate(model: Path, heldout: Path) -> dict:
    p = subprocess.run([sys.executable, "-m", "softlabels", "eval", "--model", str(model),
                        "--data", str(heldout), "--json"], check=True, capture_output=True,
                       text=True, cwd=REPO)
    return json.loads(p.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", type=Path, default=Path("demo_out"))
    ap.add_argument("--out", type=Path, default=Path(".cache/bench/quality"))
    ap.add_argument("--steps", type=int, default=60)
    a = ap.parse_args()
    demo, out = a.demo.resolve(), a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    heldout, full = demo / "targets-heldout", demo / "targets-train"
    data = {64: full}
    for k in (1, 8):
        data[k] = out / f"targets-k{k}"
        truncate(full, data[k], k)
    runs = {"CE only": (full, ["--ce-weight", "1.0"])}
    for k in (1, 8, 64):
        tail = ["--residual", "tail"]  # options spelled out: the defaults are another recipe
        runs[f"stored top-{k} KD, tail"] = (data[k], [*tail, "--ce-weight", "0"])
        runs[f"stored top-{k} KD, renormalised"] = (data[k], ["--residual", "none",
                                                              "--ce-weight", "0"])
        runs[f"stored top-{k} KD, tail, + 0.5 CE"] = (data[k], [*tail, "--ce-weight", "0.5"])
    results = {}
    for name, (d, extra) in runs.items():
        dst = out / name.replace(" ", "_").replace(",", "")
        wall = train_stored(demo, d, dst, a.steps, extra)
        results[name] = {**evaluate(dst, heldout), "wall_s": wall}
        print(name, results[name], file=sys.stderr)
    wall = train_online(demo, full, out / "online", a.steps)
    results["online full-vocab KD (teacher in the loop)"] = {**evaluate(out / "online", heldout),
                                                           "wall_s": wall}
    results["teacher"] = {**evaluate(demo / "teacher", heldout), "wall_s": 0.0}
    (out / "results.json").write_text(json.dumps(results, indent=1))

    ce0 = results["CE only"]["ce"]
    online = results["online full-vocab KD (teacher in the loop)"]
    print(f"student {demo / 'student.json'}, {a.steps} steps x 4096 tokens, held-out "
          f"{results['teacher']['tokens']} tokens")
    print("| run | held-out CE | KL(teacher‖student) | top-1 agree | train wall s | "
          "share of online KD's CE gain |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        share = (ce0 - r["ce"]) / (ce0 - online["ce"]) if ce0 != online["ce"] else float("nan")
        print(f"| {name} | {r['ce']:.4f} | {r['kl_topk']:.4f} | {r['top1_agreement']:.3f} | "
              f"{r['wall_s']:.0f} | {share:.0%} |")
    for name in ("stored top-64 KD, tail", "stored top-64 KD, tail, + 0.5 CE"):
        kd64 = results[name]
        print(f"\n{name}: recovers {(ce0 - kd64['ce']) / (ce0 - online['ce']):.0%} of online "
              f"KD's held-out CE gain over CE-only; training wall time "
              f"{kd64['wall_s'] / online['wall_s']:.2f}x online KD's")


if __name__ == "__main__":
    main()
