"""GPU evidence in one prepared command (issue 22): the student side and the teacher's output
head on CUDA, each measured against a baseline in the same run.

    pip install --no-deps -e .                 # on the GPU machine (torch, transformers,
    python bench/gpu.py --out gpu_out          #  accelerate, peft, pyarrow are there); ~5 min
    python bench/gpu.py --smoke --out /tmp/s   # a tiny CPU version: the test suite runs it

Nothing on its path imports vLLM, Dask or `datasets` (the GPU machine has none of them): the
soft-label dataset is made here from a transformers teacher through `generate/head.py`'s Head and
`data/`'s writer, exactly as `generate` makes one from vLLM's hidden states. Parts:

  head      Head on CUDA vs a transformers fp32 forward of the same teacher at a 151,936-token
            vocabulary: top-k ids, log-probs (hence the normaliser), exact tail and label
            log-prob agree; draws reproducible; positions/s (and in bf16, with its error)
  train     the real `softlabels train` on a ~0.45B-parameter student, bf16: the default recipe
            vs CE-only (--ce-weight 1, the same command), LoRA, --gradient-checkpointing:
            tokens/s and peak GPU memory; the reader's decode rate vs what training consumes
  fsdp      `accelerate launch --use_fsdp --fsdp_version 2` with 1 process: trains, and the saved
            model loads in transformers

Writes OUT/gpu.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FULL = {"vocab": 151936, "teacher_hidden": 1024, "teacher_layers": 2, "rows": 512, "length": 1024,
        "student": {"model_type": "llama", "hidden_size": 1024, "intermediate_size": 2816,
                    "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 4,
                    "head_dim": 64, "max_position_embeddings": 2048,
                    "tie_word_embeddings": True},
        "steps": 20, "warmup": 5, "batch_tokens": 16384, "head_positions": 65536,
        "mixed_precision": "bf16"}
SMOKE = {"vocab": 1000, "teacher_hidden": 64, "teacher_layers": 1, "rows": 24, "length": 64,
         "student": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1,
                     "head_dim": 32, "max_position_embeddings": 256,
                     "tie_word_embeddings": True},
         "steps": 4, "warmup": 1, "batch_tokens": 256, "head_positions": 512,
         "mixed_precision": "no"}
K = 64


def make_teacher(path: Path, c: dict, device: str):
    """A random Llama over a word-level tokenizer of `vocab` tokens, saved like a real teacher."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(c["vocab"])}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(path)
    torch.manual_seed(0)
    h = c["teacher_hidden"]
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=c["vocab"], hidden_size=h, intermediate_size=4 * h,
        num_hidden_layers=c["teacher_layers"], num_attention_heads=h // 64 or 1,
        num_key_value_heads=h // 64 or 1, head_dim=min(64, h), tie_word_embeddings=False,
        max_position_embeddings=2048))
    with torch.no_grad():  # confident and flat positions side by side
        model.lm_head.weight.mul_(8)
    model.save_pretrained(path)
    return model.to(device).eval()


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def head_part(teacher: Path, model, c: dict, device: str) -> dict:
    """Head on `device` against transformers' own logits (float64 after its fp32 head)."""
    import torch

    from softlabels.generate.head import Head

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, c["vocab"], (4, 256), generator=g).to(device)
    with torch.no_grad():
        h = model.model(input_ids=ids).last_hidden_state.float()  # (4, 256, H)
        ref = torch.log_softmax(model(ids).logits.double(), -1)  # (4, 256, V)
    out: dict = {"vocab": c["vocab"], "k": K}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        head = Head(teacher, dtype, device)
        top_ok = lp_err = tail_err = label_err = 0.0
        n = 0
        for b in range(len(ids)):
            labels = np.append(ids[b, 1:].cpu().numpy(), -1)
            t = head.outputs(h[b], K, labels)
            v, i = ref[b].topk(K, -1)
            tail = torch.logsumexp(ref[b].scatter(-1, i, -torch.inf), -1).cpu().numpy()
            top_ok += float((t.topk_ids == i.cpu().numpy()).mean())
            lp_err = max(lp_err, float(np.abs(t.topk_logprobs - v.cpu().numpy()).max()))
            tail_err = max(tail_err, float(np.abs(np.expm1(t.tail_logprob - tail)).max()))
            label = ref[b, :-1].gather(-1, ids[b, 1:, None])[:, 0].cpu().numpy()
            label_err = max(label_err, float(np.abs(t.label_logprob[:-1] - label).max()))
            n += 1
        out[name] = {"topk_ids_equal": top_ok / n, "max_logprob_err": lp_err,
                     "max_tail_rel_err": tail_err, "max_label_err": label_err}
        # speed: positions/s of the whole targets() call, top-k only and with 50 draws
        x = torch.randn(c["head_positions"], h.shape[-1], generator=g).to(device, torch.float32)
        for draws in (0, 50):
            head.outputs(x[:head.chunk], K, np.full(head.chunk, -1), draws, seed=0)  # warm-up
            _sync(device)
            t0 = time.perf_counter()
            head.outputs(x, K, np.full(len(x), -1), draws, seed=0)
            _sync(device)
            out[name][f"positions_per_s_draws_{draws}"] = len(x) / (time.perf_counter() - t0)
    head = Head(teacher, torch.float32, device)
    a = head.outputs(h[0], K, np.full(256, -1), 50, seed=7)
    b = head.outputs(h[0], K, np.full(256, -1), 50, seed=7)
    out["draws_reproducible"] = bool(np.array_equal(a.sample_ids, b.sample_ids)
                                     and np.array_equal(a.sample_counts, b.sample_counts))
    if device == "cuda":  # the same uniforms inverted on the CPU: how often the same id
        cpu = Head(teacher, torch.float32, "cpu").outputs(h[0].cpu(), K, np.full(256, -1), 50,
                                                          seed=7)
        out["draws_same_as_cpu"] = float(np.mean([
            np.array_equal(x[y > 0], p[q > 0]) for x, y, p, q in
            zip(a.sample_ids, a.sample_counts, cpu.sample_ids, cpu.sample_counts)]))
    return out


def make_dataset(teacher: Path, model, out: Path, c: dict, device: str) -> Path:
    """Random windows scored by the teacher (transformers hidden states -> Head -> writer)."""
    import torch
    from transformers import AutoTokenizer

    from softlabels.data.card import publish
    from softlabels.data.dataset import TOKENIZER_DIR
    from softlabels.data.format import DEFAULT_LOGPROB_STEP, Encoding, Row
    from softlabels.data.manifest import Manifest
    from softlabels.data.shard import write_shard
    from softlabels.generate.head import Head

    head = Head(teacher, torch.float32, device)
    g = torch.Generator().manual_seed(2)
    rows = []
    for r in range(c["rows"]):
        ids = torch.randint(0, c["vocab"], (1, c["length"]), generator=g)
        with torch.no_grad():
            h = model.model(input_ids=ids.to(device)).last_hidden_state[0].float()
        w = ids[0].numpy().astype(np.int32)
        t = head.outputs(h, K, np.append(w[1:], -1))
        rows.append(Row(f"{r}:0", w, t.topk_ids, t.topk_logprobs, np.ones(len(w), bool),
                        tail_logprob=t.tail_logprob, label_logprob=t.label_logprob))
    out.mkdir(parents=True, exist_ok=True)
    enc = Encoding(K, DEFAULT_LOGPROB_STEP)
    shards = [write_shard(out / f"shard-{s:05d}.parquet", rows[s::4], enc)
              for s in range(4)]
    publish(out, Manifest(k=K, logprob_step=DEFAULT_LOGPROB_STEP, vocab_size=c["vocab"],
                          shards=shards, provenance={"made_by": "bench/gpu.py"}))
    AutoTokenizer.from_pretrained(teacher).save_pretrained(out / TOKENIZER_DIR)
    return out


def train_run(name: str, data: Path, out: Path, c: dict, extra: list, launch: list | None = None
              ) -> dict:
    """One `softlabels train` (the real command) in its own process -> tokens/s, peak memory."""
    cmd = [*(launch or [sys.executable]), "-m", "softlabels", "train", "--student",
           str(out / "student.json"), "--data", str(data), "--output", str(out / name),
           "--max-steps", str(c["steps"] + c["warmup"]), "--batch-tokens",
           str(c["batch_tokens"]), "--lr", "1e-4", "--warmup", "2", "--mixed-precision",
           c["mixed_precision"], "--report-to", "tensorboard", *map(str, extra)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if p.returncode:
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "failed",
                "wall_s": time.perf_counter() - t0}
    log = json.loads((out / name / "train_log.json").read_text())
    timed = log["history"][c["warmup"]:]
    return {"tokens_per_s": sum(h["tokens"] - p_["tokens"] for h, p_ in zip(
                timed, log["history"][c["warmup"] - 1:])) / sum(h["step_s"] for h in timed),
            "step_ms_median": 1000 * float(np.median([h["step_s"] for h in timed])),
            "peak_memory_gib": log["peak_memory_bytes"] / 2**30,
            "peak_memory_of": log["peak_memory_of"], "parameters": log["parameters"],
            "trainable_parameters": log["trainable_parameters"],
            "final_loss": log["final_loss"], "wall_s": time.perf_counter() - t0}


def reader_rate(data: Path) -> float:
    from softlabels.data.reader import SoftLabelReader

    t0, n = time.perf_counter(), 0
    for _, r in SoftLabelReader(data, shuffle=True, seed=1).rows():
        n += len(r.input_ids)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("gpu_out"))
    ap.add_argument("--smoke", action="store_true", help="a tiny CPU run of every part")
    ap.add_argument("--parts", nargs="+", default=["head", "train", "fsdp"])
    a = ap.parse_args()
    import torch

    c = SMOKE if a.smoke else FULL
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                 "torch": torch.__version__, "smoke": a.smoke}
    t0 = time.perf_counter()
    teacher = out / "teacher"
    model = make_teacher(teacher, c, device)
    if "head" in a.parts:
        res["head"] = head_part(teacher, model, c, device)
        print("head", json.dumps(res["head"]), file=sys.stderr, flush=True)
    if "train" in a.parts or "fsdp" in a.parts:
        data = make_dataset(teacher, model, out / "data", c, device)
        del model
        (out / "student.json").write_text(json.dumps(c["student"]))
        res["dataset"] = {"tokens": c["rows"] * c["length"],
                          "bytes_per_token": sum(f.stat().st_size for f in data.glob("*.parquet"))
                          / (c["rows"] * c["length"])}
    if "train" in a.parts:
        runs = {"default recipe": [], "CE only": ["--ce-weight", 1],
                "LoRA r=16": ["--lora-r", 16], "gradient checkpointing":
                ["--gradient-checkpointing"]}
        res["train"] = {}
        for name, extra in runs.items():
            res["train"][name] = train_run(name.replace(" ", "_"), data, out, c, extra)
            print(name, json.dumps(res["train"][name]), file=sys.stderr, flush=True)
        kd, ce = res["train"]["default recipe"], res["train"]["CE only"]
        if "tokens_per_s" in kd and "tokens_per_s" in ce:
            decode = reader_rate(data)
            res["kd_step_over_ce_step"] = ce["tokens_per_s"] / kd["tokens_per_s"]
            res["reader"] = {"tokens_per_s": decode,
                             "over_consumed": decode / kd["tokens_per_s"],
                             # training tokens/s scale ~1/parameters: below this size the
                             # reader, not the step, would set the pace
                             "bottleneck_below_parameters": kd["parameters"]
                             * kd["tokens_per_s"] / decode}
    if "fsdp" in a.parts:
        if device != "cuda":
            res["fsdp"] = {"skipped": "Accelerate's FSDP plugin needs GPUs"}
        else:
            launch = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp",
                      "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                      "--num_processes", "1", "--num_machines", "1", "--mixed_precision",
                      c["mixed_precision"], "--dynamo_backend", "no"]
            r = train_run("fsdp", data, out, c, [], launch)
            if "error" not in r:
                from transformers import AutoModelForCausalLM

                m = AutoModelForCausalLM.from_pretrained(out / "fsdp")
                r["loads_in_transformers"] = sum(p.numel() for p in m.parameters())
                r["same_parameter_count"] = r["loads_in_transformers"] == r["parameters"]
            res["fsdp"] = r
    res["wall_s"] = time.perf_counter() - t0
    (out / "gpu.json").write_text(json.dumps(res, indent=1))
    print(table(res))


def table(res: dict) -> str:
    lines = [f"device {res['device']}, torch {res['torch']}, {res['wall_s']:.0f} s"]
    if "head" in res:
        h = res["head"]
        lines.append(f"\nHead at vocabulary {h['vocab']}, k={h['k']} (vs transformers fp32):")
        lines.append("| head dtype | top-k ids equal | max logprob err | max tail rel err | "
                     "max label err | positions/s (top-k) | positions/s (+50 draws) |")
        lines.append("|---|---|---|---|---|---|---|")
        for d in ("fp32", "bf16"):
            x = h[d]
            lines.append(f"| {d} | {x['topk_ids_equal']:.4f} | {x['max_logprob_err']:.2e} | "
                         f"{x['max_tail_rel_err']:.2e} | {x['max_label_err']:.2e} | "
                         f"{x['positions_per_s_draws_0']:,.0f} | "
                         f"{x['positions_per_s_draws_50']:,.0f} |")
        lines.append(f"draws reproducible: {h['draws_reproducible']}"
                     + (f"; same ids as the CPU head: {h['draws_same_as_cpu']:.1%} of positions"
                        if "draws_same_as_cpu" in h else ""))
    if "train" in res:
        lines.append("\n| student run | tokens/s | median step ms | peak memory GiB | "
                     "trainable |")
        lines.append("|---|---|---|---|---|")
        for name, r in res["train"].items():
            lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['step_ms_median']:.0f} | "
                         f"{r['peak_memory_gib']:.2f} | {r['trainable_parameters']:,} |"
                         if "error" not in r else f"| {name} | failed: {r['error']} | | | |")
        if "kd_step_over_ce_step" in res:
            rd = res["reader"]
            lines.append(f"\nKD step / CE step: {res['kd_step_over_ce_step']:.3f}; reader "
                         f"{rd['tokens_per_s']:,.0f} tokens/s = {rd['over_consumed']:.1f}x what "
                         f"training consumes (the bottleneck below ~"
                         f"{rd['bottleneck_below_parameters'] / 1e6:,.0f}M parameters)")
    if "fsdp" in res:
        lines.append(f"\nFSDP2, 1 process: {json.dumps(res['fsdp'])}")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
