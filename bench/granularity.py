"""Students whose tokens are finer than the teacher's (issue 31): one teacher, one corpus, student
tokenizers of ~1, ~2 and ~4 tokens per teacher token, every loss, equal text seen.

The teacher is a random Llama over a word-level tokenizer of 1,500 words written as byte-level
pieces ("Ġword": decode then encode gives the same ids, so its bytes are exact), its head scaled
so that it is confident, and the corpus is *sampled from it*: the teacher is the truth and
distillation has something to give. Its top-64 targets are stored by `softlabels generate`
(vLLM). Students: the same body (2 layers x 128) with the teacher's tokenizer (the same-tokenizer
reference) or a byte-level BPE trained on the corpus, sized for the ratio. Every row is
`softlabels train` with batches of the same teacher windows (so the same text per step whatever
the student's tokens) and the same steps; then held-out bits per byte over each student's own
tokens of the teacher's other samples, split into the bits of tokens that start a teacher token
(a word's first piece, with its space) and of tokens inside one. Throughput: text bytes per
second against the same-tokenizer path's, of the teacher's tokenizer (the reference student) and
of the same student (its own tokenizer's dataset of the same texts, `same_path_data`: the cost
of the student itself, whose head and token count the tokenizer sets).

    python bench/granularity.py [--seeds 0 1 2] [--only ROW ...] [--steps 150]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WORDS, LENGTH, ALPHA = 1500, 128, 25.0  # teacher vocabulary, words per sample, head scale
TRAIN, HELD = 3000, 200  # samples
# student tokenizers: byte-level BPEs sized for ~1-4 tokens per word, and a SentencePiece-style
# Unigram (which, trained on this corpus, cuts ~5); sizes found by `tokenizers` on the corpus, the
# ratio measured is printed
STUDENTS = {"~1": ("bpe", 3500), "~2": ("bpe", 1600), "~3": ("bpe", 700), "~4": ("bpe", 420),
            "~5 unigram": ("unigram", 2000)}
LOSSES = {  # row: train arguments of a student with its own tokenizer
    "CE only": ["--ce-weight", 1],
    "dist + 0.5 CE": ["--cross-loss", "dist", "--ce-weight", 0.5],
    "alm + 0.5 CE": ["--cross-loss", "alm", "--ce-weight", 0.5],
    "both + 0.5 CE": ["--cross-loss", "both", "--ce-weight", 0.5],
    "dist": ["--cross-loss", "dist", "--ce-weight", 0],
    "alm": ["--cross-loss", "alm", "--ce-weight", 0],
}
SHORT = ("CE only", "dist + 0.5 CE", "alm + 0.5 CE")  # the rows of ~3 and the Unigram


def rows() -> dict:
    out = {"same tokenizer, CE only": (None, ["--ce-weight", 1]),
           "same tokenizer, top-64 (default)": (None, [])}
    for r in STUDENTS:
        for name, extra in LOSSES.items():
            if r in ("~1", "~2", "~4") or name in SHORT:
                out[f"{r}, {name}"] = (r, extra)
    return out


def words(n: int, seed: int) -> list[str]:
    """n distinct lowercase words, 2-10 letters, short ones more common (as in text)."""
    rng = np.random.default_rng(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        k = int(np.clip(rng.geometric(0.22) + 1, 2, 10))
        out["".join(chr(97 + c) for c in rng.integers(0, 26, k))] = None
    return list(out)


def teacher(cache: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from softlabels.demo import make_model

    path = cache / "teacher"
    if (path / "model.safetensors").is_file():
        return path
    vocab = {"Ġ" + w: i for i, w in enumerate(words(WORDS, 0))}
    t = Tokenizer(models.WordLevel(vocab, unk_token=next(iter(vocab))))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    tmp = cache / ".teacher.tmp"
    PreTrainedTokenizerFast(tokenizer_object=t, unk_token=next(iter(vocab))).save_pretrained(tmp)
    model = make_model(tmp, vocab_size=WORDS, hidden=128, layers=2, heads=4, seed=0)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(ALPHA)
    model.save_pretrained(tmp)
    tmp.rename(path)
    return path


def sample(cache: Path, t: Path, name: str, n: int, seed: int) -> Path:
    """n texts of LENGTH words sampled from the teacher (temperature 1), each from a random
    first word."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = cache / f"{name}.parquet"
    if out.is_file():
        return out
    tok = AutoTokenizer.from_pretrained(t)
    model = AutoModelForCausalLM.from_pretrained(t, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    texts, top1 = [], []
    for a in range(0, n, 250):
        x = torch.randint(0, WORDS, (min(250, n - a), 1), generator=g)
        past = None
        with torch.no_grad():
            step = x
            for _ in range(LENGTH - 1):
                o = model(step, past_key_values=past, use_cache=True)
                past = o.past_key_values
                p = torch.softmax(o.logits[:, -1].double(), -1)
                top1.append(float(p.max(-1).values.mean()))
                step = torch.multinomial(p, 1, generator=g)
                x = torch.cat([x, step], 1)
        texts += [tok.decode(r) for r in x.tolist()]
    assert tok(texts[-1]).input_ids == x[-1].tolist(), "decode then encode changed the ids"
    tmp = out.with_suffix(".tmp")
    pq.write_table(pa.table({"text": texts}), tmp)
    tmp.rename(out)
    print(f"{name}: {n} samples, the teacher's mean top-1 {np.mean(top1):.3f}", file=sys.stderr)
    return out


def generate(cache: Path, t: Path, src: Path, name: str) -> Path:
    out = cache / name
    if not (out / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "softlabels", "generate", "--teacher", str(t),
                        "--input", str(src), "--output", str(out), "--top-k", "64",
                        "--max-length", str(LENGTH)], check=True, cwd=REPO)
    return out


def tokenizers(cache: Path, src: Path) -> dict:
    """The student tokenizers, each with its tokens per teacher token and bytes per token on the
    corpus; and the teacher's bytes per token (a word and its space)."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from softlabels.demo import make_tokenizer, make_unigram_tokenizer

    texts = pq.read_table(src).column("text").to_pylist()
    n_words = sum(len(x.split()) for x in texts[:500])
    n_bytes = sum(len(x.encode()) for x in texts[:500])
    out = {}
    for r, (kind, size) in STUDENTS.items():
        d = cache / f"{kind}-{size}"
        if not d.is_dir():
            (make_tokenizer if kind == "bpe" else make_unigram_tokenizer)(texts, size, d)
        tok = AutoTokenizer.from_pretrained(d)
        n = sum(len(x) for x in tok(texts[:500], add_special_tokens=False).input_ids)
        out[r] = (d, n / n_words, n_bytes / n)
    return out, n_bytes / n_words


def student(cache: Path) -> Path:
    path = cache / "student.json"
    path.write_text(json.dumps({
        "model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
        "head_dim": 64, "max_position_embeddings": 1024, "tie_word_embeddings": False}))
    return path


def held_bits(model_dir: Path, texts: list[str]) -> dict:
    """Held-out bits per byte over the model's own tokens, skipping each text's first word
    (nothing predicts it), split into tokens that start a word (their bytes begin with its
    space) and tokens inside one; both over all counted bytes, so they add up."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    bits = {"first": 0.0, "inside": 0.0}
    n_bytes = 0
    for text in texts:
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        ids, off = enc.input_ids, enc.offset_mapping
        first_end = text.index(" ", 1)
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        for i in range(1, len(ids)):
            a, b = off[i]
            if a < first_end:
                continue
            nll = -float(lp[i - 1, ids[i]]) / math.log(2)
            bits["first" if text[a] == " " else "inside"] += nll
            n_bytes += len(text[a:b].encode())
    return {"bpb": sum(bits.values()) / n_bytes,
            **{f"bpb_{k}": v / n_bytes for k, v in bits.items()}}


def same_path_data(cache: Path, r: str, tok_dir: Path, texts: list[str]) -> Path:
    """For speed only: the same training texts as a dataset of the student's own tokenizer (one
    window per text), top-64 of a random model with that tokenizer (a step costs the same
    whatever the values): what the same student trains on through the same-tokenizer path."""
    import torch
    from transformers import AutoTokenizer

    from softlabels.data.card import publish
    from softlabels.data.dataset import TOKENIZER_DIR
    from softlabels.data.format import DEFAULT_LOGPROB_STEP, Encoding, Row, row_id
    from softlabels.data.manifest import Manifest
    from softlabels.data.shard import write_shard
    from softlabels.demo import make_model

    out = cache / f"same-path-{slug(r)}"
    if (out / "manifest.json").is_file():
        return out
    tmp = cache / ".same-path.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.save_pretrained(tmp / TOKENIZER_DIR)
    model = make_model(tmp / "model", vocab_size=len(tok), hidden=64, layers=1, heads=2).eval()
    shutil.rmtree(tmp / "model")  # (the dataset carries the tokenizer, not the random model)
    rows = []
    with torch.no_grad():
        for i, text in enumerate(texts):
            w = np.array(tok(text, add_special_tokens=False).input_ids, np.int32)
            lp = torch.log_softmax(model(torch.from_numpy(w.astype(np.int64))[None]).logits[0],
                                   -1)
            v, top = lp.topk(64, -1)
            label = np.full(len(w), np.nan, np.float32)
            label[:-1] = lp[:-1].gather(-1, torch.from_numpy(w[1:, None].astype(np.int64)))[
                :, 0].numpy()
            tail = torch.logsumexp(lp.scatter(-1, top, -torch.inf), -1).numpy()
            rows.append(Row(row_id(i, 0), w, top.numpy().astype(np.int32), v.numpy(),
                            np.ones(len(w), bool), label_logprob=label, tail_logprob=tail))
    shard = write_shard(tmp / "shard-00000.parquet", rows, Encoding(64, DEFAULT_LOGPROB_STEP))
    publish(tmp, Manifest(k=64, logprob_step=DEFAULT_LOGPROB_STEP, vocab_size=len(tok),
                          shards=[shard]))
    tmp.rename(out)
    return out


def slug(r: str) -> str:
    return r.replace("~", "").replace(" ", "-")


def run_dir(cache: Path, name: str, seed: int) -> Path:
    return cache / "runs" / f"{name.replace(' ', '_').replace(',', '')}-{seed}"


def text_rate(out: Path, bytes_per_token: float) -> float:
    """Text bytes per second of a run, after its first 10 steps (warm-up): the student target
    tokens it trained on per second, times its tokenizer's bytes per token on the corpus."""
    h = json.loads((out / "train_log.json").read_text())["history"]
    return (h[-1]["tokens"] - h[9]["tokens"]) / sum(x["step_s"] for x in h[10:]) * bytes_per_token


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench-granularity")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", nargs="*", default=None, help="row names to run")
    ap.add_argument("--batch-tokens", type=int, default=2048)
    a = ap.parse_args()
    cache = a.cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    t = teacher(cache)
    train_src = sample(cache, t, "train", TRAIN, 1)
    held_src = sample(cache, t, "held", HELD, 2)
    data = generate(cache, t, train_src, "k64")
    toks, teacher_bytes = tokenizers(cache, train_src)
    import pyarrow.parquet as pq

    from softlabels.train_student.cross import ALM_FROM

    held = pq.read_table(held_src).column("text").to_pylist()
    ref_file = cache / "teacher.json"
    if not ref_file.is_file():
        ref_file.write_text(json.dumps(held_bits(t, held)))
    teacher_bits = json.loads(ref_file.read_text())
    s = student(cache)
    res_file = cache / "results.json"
    res = json.loads(res_file.read_text()) if res_file.is_file() else {}
    table = rows()
    for seed in a.seeds:
        for name, (r, extra) in table.items():
            key = f"{name} | seed {seed}"
            if key in res or (a.only and name not in a.only):
                continue
            out = run_dir(cache, name, seed)
            cmd = [sys.executable, "-m", "softlabels", "train", "--student", s, "--data", data,
                   "--output", out, "--max-steps", a.steps, "--batch-tokens", a.batch_tokens,
                   "--lr", "3e-3", "--warmup", 10, "--seed", seed, *extra]
            if r:
                cmd += ["--student-tokenizer", toks[r][0]]
            if not (out / "train_log.json").is_file():
                subprocess.run(list(map(str, cmd)), check=True, capture_output=True, cwd=REPO)
            log = json.loads((out / "train_log.json").read_text())
            res[key] = {**held_bits(out, held), "train_s": sum(h["step_s"]
                                                                for h in log["history"])}
            print(key, res[key], file=sys.stderr, flush=True)
            res_file.write_text(json.dumps(res, indent=1))

    # speed: each student through the same-tokenizer path, on the same texts
    texts = pq.read_table(train_src).column("text").to_pylist()
    for r, (tok_dir, ratio, _) in toks.items():
        out = cache / "runs" / f"same-path-{slug(r)}"
        if not (out / "train_log.json").is_file():
            subprocess.run(list(map(str, [
                sys.executable, "-m", "softlabels", "train", "--student", s, "--data",
                same_path_data(cache, r, tok_dir, texts[:1200]), "--output", out,
                "--max-steps", 60, "--batch-tokens", round(a.batch_tokens * ratio), "--lr",
                "3e-3", "--seed", 0])), check=True, capture_output=True, cwd=REPO)

    def rate(name: str, r: str | None) -> float:
        """Text bytes per second: the fastest seed (the least disturbed)."""
        per = toks[r][2] if r else teacher_bytes
        return max(text_rate(run_dir(cache, name, x), per) for x in a.seeds
                   if f"{name} | seed {x}" in res)

    def cells(name: str, k: str = "bpb") -> np.ndarray:
        return np.array([res[f"{name} | seed {x}"][k] for x in a.seeds
                         if f"{name} | seed {x}" in res])

    same_ce, same_kd = cells("same tokenizer, CE only"), cells("same tokenizer, top-64 (default)")
    gain = same_ce.mean() - same_kd.mean() if len(same_ce) and len(same_kd) else float("nan")
    print(f"teacher {teacher_bits['bpb']:.4f} bits/byte on the held-out samples; {a.steps} steps "
          f"of {a.batch_tokens} teacher tokens, seeds {a.seeds}; same-tokenizer gain "
          f"{gain:.4f} bits/byte; student tokens per teacher token: "
          + ", ".join(f"{r} {v[1]:.2f}" for r, v in toks.items()) + "\n")
    same_rate = rate("same tokenizer, top-64 (default)", None)
    print("| student tokens per teacher token, loss | held-out bits/byte | first pieces | "
          "inside | vs its CE only (seeds better) | share of the same-tokenizer gain | "
          "text bytes/s vs the same-tokenizer path: teacher's tokenizer | the same student |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (r, _) in table.items():
        v = cells(name)
        if not len(v):
            continue
        base_name = f"{r}, CE only" if r else "same tokenizer, CE only"
        paired = [x for x in a.seeds if f"{name} | seed {x}" in res
                  and f"{base_name} | seed {x}" in res]
        d = np.array([res[f"{name} | seed {x}"]["bpb"] - res[f"{base_name} | seed {x}"]["bpb"]
                      for x in paired])
        n = len(d)
        own = name == base_name
        speed = rate(name, r)
        same_student = (speed / text_rate(cache / "runs" / f"same-path-{slug(r)}", toks[r][2])
                        if r else speed / same_rate)
        auto = r and name.endswith("alm + 0.5 CE" if toks[r][1] >= ALM_FROM else
                                   "dist + 0.5 CE")  # what --cross-loss auto picks
        print(f"| {name}{' (default)' if auto else ''} | {v.mean():.4f} ± {v.std():.4f} | "
              f"{cells(name, 'bpb_first').mean():.4f}"
              f" | {cells(name, 'bpb_inside').mean():.4f} | "
              + ("" if own or not n else f"{d.mean():+.4f} ({(d < 0).sum()}/{n})") + " | "
              + ("" if own or not n else f"{-d.mean() / gain:.0%}") + " | "
              + f"{speed / same_rate:.2f}x | {same_student:.2f}x |")


if __name__ == "__main__":
    main()
