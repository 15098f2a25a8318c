"""`softlabels eval --teacher T --prompts P`: how close a model is to the teacher on text it
writes itself, which is what on-policy distillation trains for (a student taught only on text
it did not write conditions on its own prefixes at generation time, where it was never taught).

For each prompt the model samples continuations from its whole distribution (temperature 1, no
top-k or top-p, up to `max_new_tokens`, ending at its EOS); then both models score them, live:
- `reverse_kl`: KL(model || teacher) at each continuation token's prefix, summed over the whole
  vocabulary: exact, not estimated from the sampled token;
- `teacher_nll`: the teacher's -log p of each sampled token (how likely the teacher finds what
  the model writes);
- `model_nll`: the model's own -log q of it (its entropy rate on its own text).
All are means over continuation tokens, in nats. A per-token KL needs one vocabulary: the
teacher must have the model's tokenizer and output size, or it is refused in one line. This is
evaluation (both models run); training never has the teacher live.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from softlabels.data.errors import UserError


@dataclass
class Continuation:
    prompt: list[int]  # token ids the model was given
    tokens: list[int]  # what it wrote (its EOS included where it stopped there)


def load_prompts(path: str, column: str, tok, limit: int = 0) -> list[list[int]]:
    """Prompt token ids from any input `generate` reads (Parquet, JSON Lines, .txt, a saved
    dataset, a URL), rendered as `generate` renders prompts (the chat template where the
    tokenizer has one); empty prompts skipped."""
    from softlabels.generate.inputs import open_corpus
    from softlabels.generate.records import Fields, prompt_ids

    corpus = open_corpus(path, (column,))
    fields = Fields(text=None, prompt=column)
    out: list[list[int]] = []
    for piece in corpus.pieces():
        for n, values in enumerate(corpus.records(piece), piece.first_record):
            ids = prompt_ids(values, fields, tok, n)
            if ids:
                out.append(ids)
            if limit and len(out) == limit:
                return out
    if not out:
        raise UserError(f"{path} holds no prompt in column {column!r}")
    return out


def check_pair(model, teacher, tok, teacher_tok, teacher_name: str) -> None:
    """One line, before any sampling, where the two cannot be compared token by token."""
    from softlabels.train_student.student import same_tokenizer

    if teacher_tok is None or not same_tokenizer(tok, teacher_tok):
        raise UserError(f"teacher {teacher_name} has another tokenizer than the model: the "
                        "per-token reverse KL needs one vocabulary")
    v_s = model.get_output_embeddings().weight.shape[0]
    v_t = teacher.get_output_embeddings().weight.shape[0]
    if v_s != v_t:
        raise UserError(f"teacher {teacher_name} has {v_t} outputs and the model {v_s}: the "
                        "per-token reverse KL needs one vocabulary")


@torch.no_grad()
def sample(model, prompts: list[list[int]], max_new_tokens: int, n: int = 1, seed: int = 0,
           eos: int | None = None, pad: int = 0, batch: int = 8) -> list[Continuation]:
    """`n` continuations of each prompt, drawn from the model's whole distribution: a generation
    config of its own, so nothing of the model's (Qwen's ships top_k 20, top_p 0.8, a repetition
    penalty) reshapes the draws."""
    from transformers import GenerationConfig

    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                              max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    torch.manual_seed(seed)
    model.eval()
    # (generate merges the model's own config into one passed: it must not see it at all)
    own, model.generation_config = model.generation_config, config
    try:
        return _sample(model, prompts, n, pad, batch, eos)
    finally:
        model.generation_config = own


def _sample(model, prompts, n, pad, batch, eos) -> list[Continuation]:
    out = []
    todo = [p for p in prompts for _ in range(n)]
    for a in range(0, len(todo), batch):
        part = todo[a:a + batch]
        width = max(map(len, part))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in part])  # left-padded
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in part])
        got = model.generate(input_ids=ids, attention_mask=mask)[:, width:].tolist()
        for p, g in zip(part, got):
            if eos is not None and eos in g:
                g = g[:g.index(eos) + 1]
            out.append(Continuation(p, g))
    return out


@torch.no_grad()
def score(model, teacher, samples: list[Continuation]) -> dict:
    """Reverse KL, teacher NLL and model NLL over the continuation tokens (means, nats)."""
    kl = t_nll = m_nll = 0.0
    count = 0
    for c in samples:
        if not c.tokens:
            continue
        x = torch.tensor([c.prompt + c.tokens])
        at = slice(len(c.prompt) - 1, x.shape[1] - 1)  # the positions predicting c.tokens
        lq = torch.log_softmax(model(input_ids=x).logits[0, at].double(), -1)
        lp = torch.log_softmax(teacher(input_ids=x).logits[0, at].double(), -1)
        y = torch.tensor(c.tokens)[:, None]
        kl += float((lq.exp() * (lq - lp)).sum())
        t_nll -= float(lp.gather(-1, y).sum())
        m_nll -= float(lq.gather(-1, y).sum())
        count += len(c.tokens)
    k = max(count, 1)
    return {"reverse_kl": kl / k, "teacher_nll": t_nll / k, "model_nll": m_nll / k,
            "continuation_tokens": count, "continuations": len(samples)}


def evaluate_continuations(model, teacher, tok, prompts: list[list[int]],
                           max_new_tokens: int = 64, n: int = 1, seed: int = 0) -> dict:
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    samples = sample(model, prompts, max_new_tokens, n, seed, tok.eos_token_id, pad)
    return {**score(model, teacher, samples), "prompt_count": len(prompts)}
