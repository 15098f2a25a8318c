"""`softlabels eval`: how close a model is to the teacher, on a held-out soft-label dataset.

ce/ppl: cross-entropy on the real next tokens; kl: KL(teacher || model) on the stored top-k with
the tail bucket, at T=1; top1_agreement: the model's argmax equals the teacher's top-1. On a
dataset of samples only, kl and top-1 use the draws (count / N, and the most drawn id): an
estimate, whose KL is biased upward by the sampling noise.
"""

from __future__ import annotations

import json
import math

import torch

from softlabels.data.reader import SoftLabelReader
from softlabels.train_student.batches import chunks, collate
from softlabels.train_student.losses import (
    NEG,
    divergence,
    head_logits,
    student_buckets,
    teacher_buckets,
)


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="HF causal-LM folder (student or teacher)")
    p.add_argument("--data", required=True, nargs="+",
                   help="held-out soft-label dataset(s): a row (--json: an object) for each")
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the model folder run its own Python (auto_map); off by default")


@torch.no_grad()
def evaluate(model, data, batch_tokens=8192, chunk=1024, device="cpu", part=0, num_parts=1,
             reduce=None) -> dict:
    was_training = model.training
    model.eval()
    reader = SoftLabelReader(data, part=part, num_parts=num_parts)
    vocab = model.get_output_embeddings().weight.shape[0]
    lm_head = model.get_output_embeddings()
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    sums = torch.zeros(5, dtype=torch.float64)  # ce, ce tokens, kl, top1 hits, kd tokens
    targets = "topk" if reader.manifest.k else "samples"
    for _, rows in chunks(reader.rows(), batch_tokens):
        b = collate(rows, vocab, targets).to(device)
        h = model.get_decoder()(input_ids=b.input_ids,
                                attention_mask=b.attention_mask).last_hidden_state
        h = h.reshape(-1, h.shape[-1])[b.pos]
        for s in range(0, h.shape[0], chunk):
            logits = head_logits(h[s : s + chunk], lm_head.weight, lm_head.bias, softcap)
            ids, lp, labels = b.ids[s : s + chunk], b.lp[s : s + chunk], b.labels[s : s + chunk]
            has = labels >= 0
            ce = torch.nn.functional.cross_entropy(logits[has], labels[has], reduction="sum")
            kl = divergence(teacher_buckets(lp.masked_fill(ids < 0, NEG), b.rest[s : s + chunk]),
                            student_buckets(logits, ids), "forward_kl", 0.5).sum()
            top1 = (logits.argmax(-1) == ids[:, 0]).sum()
            sums += torch.tensor([float(ce), float(has.sum()), float(kl), float(top1), len(ids)],
                                 dtype=torch.float64)
    if reduce is not None:
        sums = reduce(sums.to(device), reduction="sum").cpu()
    model.train(was_training)
    return _metrics(sums)


def _metrics(sums: torch.Tensor) -> dict:
    """[ce sum, ce tokens, kl sum, top-1 hits, kd tokens] -> the reported numbers."""
    ce = float(sums[0] / max(sums[1], 1))
    return {"ce": ce, "ppl": math.exp(min(ce, 50)), "kl": float(sums[2] / max(sums[4], 1)),
            "top1_agreement": float(sums[3] / max(sums[4], 1)), "tokens": int(sums[4]),
            "ce_tokens": int(sums[1])}


def evaluate_all(model, folders, batch_tokens=8192, **kw) -> tuple[dict, dict]:
    """Each held-out dataset apart -> (their token-weighted mean, {name: metrics})."""
    each = {name: evaluate(model, f, batch_tokens, **kw)
            for name, f in zip(names_of(folders), folders)}
    return weighted_mean(list(each.values())), each


def weighted_mean(metrics: list[dict]) -> dict:
    """Datasets' metrics -> those of all their tokens together (CE by CE tokens, KL and top-1
    by target tokens)."""
    sums = torch.zeros(5, dtype=torch.float64)
    for m in metrics:
        sums += torch.tensor([m["ce"] * m["ce_tokens"], m["ce_tokens"],
                              m["kl"] * m["tokens"], m["top1_agreement"] * m["tokens"],
                              m["tokens"]], dtype=torch.float64)
    return _metrics(sums)


def names_of(folders) -> list[str]:
    """Short names for datasets in logs: the folder's name, its parent's too where two clash."""
    from pathlib import Path

    short = [Path(f).name for f in folders]
    return [f"{Path(f).parent.name}/{n}" if short.count(n) > 1 else n
            for f, n in zip(folders, short)]


def main(args) -> int:
    from transformers import AutoTokenizer

    from softlabels.data.show import load_tokenizer
    from softlabels.train_student.student import check_tokenizers, load_model

    model = load_model(args.model, args.trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError):
        tok = None
    for d in args.data:  # every dataset checked before any is evaluated
        check_tokenizers(tok, load_tokenizer(d), args.model, d)
    rows = [{"data": d, **evaluate(model, d, args.batch_tokens)} for d in args.data]
    if args.json:
        print(json.dumps(rows[0] if len(rows) == 1 else rows))
        return 0
    for m in rows:
        print(f"{args.model} on {m['data']}: CE {m['ce']:.4f} (ppl {m['ppl']:.2f}), "
              f"KL(teacher||model) {m['kl']:.4f}, top-1 agreement {m['top1_agreement']:.3f}, "
              f"{m['tokens']} tokens")
    if len(rows) > 1:
        mean = weighted_mean(rows)
        print(f"token-weighted mean: CE {mean['ce']:.4f}, KL {mean['kl']:.4f}, top-1 agreement "
              f"{mean['top1_agreement']:.3f}, {mean['tokens']} tokens")
    return 0
