"""Students on cheap hardware (issue 12): a >= 100M-parameter student on this CPU, from stored
targets — full fine-tuning vs LoRA r=16 vs LoRA + gradient checkpointing — and the KD step vs a
plain CE step for the same student and batch. Optionally (--demo DIR, after `softlabels demo`),
the held-out gain of LoRA vs full fine-tuning at equal steps, starting from the demo's
pre-trained CE student.

    python bench/students.py [--steps 4] [--batch-tokens 2048] [--demo demo_out]

Speed: each mode runs in its own process (peak RSS is per process); a step includes reading and
decoding the batch, collation, forward, loss, backward and the optimiser step; one warm-up step
is not timed. Targets are the top-64 of a random-weight model (speed does not depend on values).
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

REPO = Path(__file__).resolve().parents[1]
# ~105M parameters: 14 Llama layers of hidden 768 (99M) + 2 x 4096 x 768 embeddings
STUDENT = {"model_type": "llama", "hidden_size": 768, "intermediate_size": 2048,
           "num_hidden_layers": 14, "num_attention_heads": 12, "num_key_value_heads": 12,
           "head_dim": 64, "max_position_embeddings": 1024, "tie_word_embeddings": False}
MODES = ("ce", "kd", "kd_lora16", "kd_lora16_gc")


def one_mode(mode: str, data: str, student: str, steps: int, batch_tokens: int) -> dict:
    import torch

    from softlabels.data.reader import SoftLabelReader
    from softlabels.train_student.batches import collate, token_batches
    from softlabels.train_student.config import Recipe
    from softlabels.train_student.student import add_lora, load_student
    from softlabels.train_student.train import Distiller

    torch.manual_seed(0)
    model, _ = load_student(student, data)
    vocab = model.get_output_embeddings().weight.shape[0]
    if mode.endswith("_gc"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if "lora16" in mode:
        add_lora(model, 16, 32.0, ("all-linear",))
    model.train()
    # the loss these numbers were measured with (the defaults have changed since)
    distiller = Distiller(model, [Recipe(residual="tail", ce_weight=0.0, targets="topk")])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    stream = token_batches(SoftLabelReader(data, shuffle=True, seed=0).rows(), batch_tokens)
    times = []
    for i in range(1 + steps):
        t = time.perf_counter()
        _, rows = next(stream)
        b = collate(rows, vocab)
        if mode == "ce":  # the usual CE step: HF forward with labels (full logits), same tokens
            labels = b.input_ids.masked_fill(b.attention_mask == 0, -100)
            loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask,
                         labels=labels).loss
        else:
            kd = distiller(b)[0].sum()
            loss = kd / len(b.ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t)
    return {"mode": mode, "step_s": sorted(times)[len(times) // 2],
            "tokens": sum(len(r.input_ids) for r in rows),
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in params),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def speed(a) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    from reader import make_dataset

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        m = make_dataset(d, 4 * a.batch_tokens * (a.steps + 2), 64)
        from softlabels.data.dataset import TOKENIZER_DIR

        (d / "model").rename(d / TOKENIZER_DIR)  # the dataset carries its tokenizer
        student = d / "student.json"
        student.write_text(json.dumps(dict(STUDENT, vocab_size=m.vocab_size)))
        res = {}
        for mode in MODES:
            p = subprocess.run([sys.executable, __file__, "--mode", mode, "--data", str(d),
                                "--student", str(student), "--steps", str(a.steps),
                                "--batch-tokens", str(a.batch_tokens)],
                               capture_output=True, text=True)
            if p.returncode:
                sys.exit(p.stderr[-3000:])
            res[mode] = json.loads(p.stdout.strip().splitlines()[-1])
    r0 = res["kd"]
    print(f"student: {r0['parameters'] / 1e6:.1f}M parameters (Llama, 14 x 768, vocab "
          f"{m.vocab_size}); {r0['tokens']} tokens per step, k=64, median of {a.steps} steps\n")
    print("| mode | trainable params | s/step | tokens/s | peak RSS MiB |")
    print("|---|---|---|---|---|")
    for r in res.values():
        print(f"| {r['mode']} | {r['trainable'] / 1e6:.2f}M | {r['step_s']:.2f} | "
              f"{r['tokens'] / r['step_s']:.0f} | {r['peak_rss_mib']:.0f} |")
    print(f"\nKD step / CE step (full fine-tuning): {r0['step_s'] / res['ce']['step_s']:.2f}")


def held_out_gain(demo: Path, steps: int) -> None:
    """Full fine-tuning vs LoRA r=16, equal steps and tokens, from the demo's CE student."""
    def run(*args):
        p = subprocess.run([sys.executable, "-m", "softlabels", *map(str, args)],
                           capture_output=True, text=True, cwd=REPO)
        if p.returncode:
            sys.exit(p.stderr[-3000:])
        return p.stdout

    def held_out(model):
        return json.loads(run("eval", "--model", model, "--data", demo / "targets-heldout",
                              "--json").strip().splitlines()[-1])

    start = demo / "student_ce"
    rows = {"start (demo CE student)": (held_out(start), 0.0, None)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("full fine-tuning", []),
                            ("LoRA r=16", ["--lora-r", 16, "--lora-alpha", 32, "--lr", "3e-3"])):
            out = Path(tmp) / name.split()[0]
            t = time.perf_counter()
            run("train", "--student", start, "--data", demo / "targets-train", "--output", out,
                "--max-steps", steps, "--batch-tokens", 4096, "--ce-weight", 0.5,
                "--residual", "tail",
                "--warmup", 5, "--report-to", "tensorboard", *extra)
            wall = time.perf_counter() - t
            log = json.loads((out / "train_log.json").read_text())
            rows[name] = (held_out(out), wall, log["trainable_parameters"])
    print(f"\nfrom {start}, {steps} steps x 4096 tokens of the demo targets (KD + 0.5 CE); "
          "held-out:\n")
    print("| student | trainable | held-out CE | KL(teacher‖student) | top-1 | train wall s |")
    print("|---|---|---|---|---|---|")
    for name, (m, wall, tr) in rows.items():
        print(f"| {name} | {tr or '-'} | {m['ce']:.4f} | {m['kl_topk']:.4f} | "
              f"{m['top1_agreement']:.3f} | {wall:.0f} |")
    s, f, lo = (rows[k][0]["ce"] for k in rows)
    print(f"\nheld-out CE gain: full {s - f:.4f}, LoRA {s - lo:.4f} "
          f"(LoRA / full = {(s - lo) / (s - f):.2f})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--demo", type=Path, default=None, help="a `softlabels demo` output folder")
    ap.add_argument("--gain-steps", type=int, default=60)
    ap.add_argument("--mode", default=None)
    ap.add_argument("--data")
    ap.add_argument("--student")
    a = ap.parse_args()
    if a.mode:
        print(json.dumps(one_mode(a.mode, a.data, a.student, a.steps, a.batch_tokens)))
        return
    speed(a)
    if a.demo:
        held_out_gain(a.demo, a.gain_steps)


if __name__ == "__main__":
    main()
