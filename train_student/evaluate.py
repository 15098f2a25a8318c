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
    p.add_argument("--data", required=True, help="held-out soft-label dataset")
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
    ce = float(sums[0] / max(sums[1], 1))
    return {"ce": ce, "ppl": math.exp(min(ce, 50)), "kl": float(sums[2] / max(sums[4], 1)),
            "top1_agreement": float(sums[3] / max(sums[4], 1)), "tokens": int(sums[4])}


def main(args) -> int:
    from transformers import AutoTokenizer

    from softlabels.data.show import load_tokenizer
    from softlabels.train_student.student import check_tokenizers, load_model

    model = load_model(args.model, args.trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError):
        tok = None
    check_tokenizers(tok, load_tokenizer(args.data), args.model, args.data)
    m = evaluate(model, args.data, args.batch_tokens)
    if args.json:
        print(json.dumps(m))
    else:
        print(f"{args.model} on {args.data}: CE {m['ce']:.4f} (ppl {m['ppl']:.2f}), "
              f"KL(teacher||model) {m['kl']:.4f}, top-1 agreement {m['top1_agreement']:.3f}, "
              f"{m['tokens']} tokens")
    return 0
