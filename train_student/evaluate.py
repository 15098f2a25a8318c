"""`softlabels eval`: how close a model is to the teacher, on a held-out soft-label dataset.

ce/ppl: cross-entropy on the real next tokens; bpb: bits per byte, the same loss over the bytes
of the text those tokens spell (in bits), comparable across tokenizers; kl: KL(teacher || model)
on the stored top-k with the tail bucket, at T=1; top1_agreement: the model's argmax equals the
teacher's top-1. On a dataset of samples only, kl and top-1 use the draws (count / N, and the
most drawn id): an estimate, whose KL is biased upward by the sampling noise.

A model with another tokenizer than the dataset's is evaluated on its own tokens of each window's
text (rebuilt from the teacher's token bytes, tokenbytes.py): ce and bpb over the tokens the
cross-tokenizer trainer counts (chunks whose bytes are targets); kl and top-1 do not apply.

With --teacher and --prompts it also reports the model's reverse KL to the teacher on
continuations it writes itself (continuations.py).
"""

from __future__ import annotations

import json
import math

import torch

from softlabels.data.heads import decoder_of, logit_transform
from softlabels.data.reader import SoftLabelReader
from softlabels.train_student.batches import collate, token_batches
from softlabels.train_student.losses import (
    NEG,
    divergence,
    head_chunk,
    head_logits,
    student_buckets,
    teacher_buckets,
)


@torch.no_grad()
def evaluate(model, data, batch_tokens=8192, chunk=0, device="cpu", part=0, num_parts=1,
             reduce=None, tokenizer=None) -> dict:
    """Held-out metrics of `model` (see the module docstring); `tokenizer`: the model's, where it
    may differ from the dataset's."""
    from softlabels.data.dataset import load_tokenizer
    from softlabels.data.errors import UserError
    from softlabels.train_student.cross import CrossTeacher, collate_cross, label_logprobs
    from softlabels.train_student.student import same_tokenizer
    from softlabels.train_student.tokenbytes import TokenBytes

    was_training = model.training
    model.eval()
    reader = SoftLabelReader(data, part=part, num_parts=num_parts)
    data_tok = load_tokenizer(data)
    cross = tokenizer is not None and not same_tokenizer(tokenizer, data_tok)
    try:
        tb = TokenBytes(data_tok, f"the tokenizer of {data}") if data_tok is not None else None
    except UserError:
        if cross:
            raise
        tb = None  # no bits per byte: its tokens do not keep their bytes
    vocab = model.get_output_embeddings().weight.shape[0]
    chunk = head_chunk(vocab, chunk)
    lm_head = model.get_output_embeddings()
    transform = logit_transform(model.config, "student")
    # ce, ce tokens, kl over the top-k buckets, top1 hits, target tokens, bytes of the ce
    # tokens, cross-entropy to the teacher's full distribution (from the draws), positions with
    # draws, positions with a top-k
    sums = torch.zeros(9, dtype=torch.float64)
    m = reader.manifest
    targets = "topk" if m.k else "samples"
    full = ("both" if m.k else "samples") if m.draws and m.sample_temperature == 1.0 else None
    for _, rows in token_batches(reader.rows(), batch_tokens):
        if cross:
            b = collate_cross(rows, [0] * len(rows), [CrossTeacher(tb, None)], tokenizer,
                              [targets], False).to(device)
            h = decoder_of(model)(input_ids=b.input_ids,
                                    attention_mask=b.attention_mask).last_hidden_state
            lq = label_logprobs(h.reshape(-1, h.shape[-1])[b.pos], lm_head, b.labels, chunk,
                                transform)
            sums[[0, 1, 5]] += torch.tensor([-float(lq.sum()), len(lq), float(b.n_bytes)],
                                            dtype=torch.float64)
            continue
        b = collate(rows, vocab, targets).to(device)
        # draws: the whole teacher (the same batch where the targets are the draws already)
        d = None if not full else b if full == targets else collate(rows, vocab, full).to(device)
        h = decoder_of(model)(input_ids=b.input_ids,
                              attention_mask=b.attention_mask).last_hidden_state
        h = h.reshape(-1, h.shape[-1])[b.pos]
        for s in range(0, h.shape[0], chunk):
            logits = head_logits(h[s : s + chunk], lm_head.weight, lm_head.bias, transform)
            if d is not None:  # -sum p log q, p estimated without bias by the draws
                ids_d, lp_d = d.ids[s : s + chunk], d.lp[s : s + chunk]
                lq = torch.log_softmax(logits, -1).gather(-1, ids_d.clamp(min=0))
                sums[6] -= float((lp_d.exp() * lq).masked_fill(ids_d < 0, 0.0).sum())
                sums[7] += len(ids_d)
            ids, lp, labels = b.ids[s : s + chunk], b.lp[s : s + chunk], b.labels[s : s + chunk]
            has = labels >= 0
            ce = torch.nn.functional.cross_entropy(logits[has], labels[has], reduction="sum")
            n_bytes = float(tb.lengths[labels[has].cpu().numpy()].sum()) if tb else 0.0
            sums[[0, 1, 4, 5]] += torch.tensor([float(ce), float(has.sum()), len(ids), n_bytes],
                                               dtype=torch.float64)
            if m.k:  # over draws alone a bucket KL says little: teacher_ce does
                kl = divergence(teacher_buckets(lp.masked_fill(ids < 0, NEG),
                                                b.rest[s : s + chunk]),
                                student_buckets(logits, ids), "forward_kl", 0.5).sum()
                top1 = (logits.argmax(-1) == ids[:, 0]).sum()
                sums[[2, 3, 8]] += torch.tensor([float(kl), float(top1), len(ids)],
                                                dtype=torch.float64)
    if reduce is not None:
        sums = reduce(sums.to(device), reduction="sum").cpu()
    model.train(was_training)
    return _metrics(sums)


def _metrics(sums: torch.Tensor) -> dict:
    """The sums (see `evaluate`) -> the reported numbers, None where they do not apply.

    `kl_topk` is KL(teacher || student) over the top-k and ONE bucket for everything else: a
    lower bound that cannot see how the student spreads the mass outside the top-k (measured: a
    pure-KD student 0.118 against CE-only's 0.244, while its full KL was the larger). Where the
    dataset has draws (temperature 1), `teacher_ce` is the cross-entropy to the teacher's whole
    distribution, estimated without bias by them: the full KL plus the teacher's entropy (a
    constant), so it ranks students as the full KL does."""
    ce = float(sums[0] / max(sums[1], 1))
    kd = sums[8] > 0
    return {"ce": ce, "ppl": math.exp(min(ce, 50)),
            "bpb": float(sums[0] / (math.log(2) * sums[5])) if sums[5] > 0 else None,
            "kl_topk": float(sums[2] / sums[8]) if kd else None,
            "top1_agreement": float(sums[3] / sums[8]) if kd else None,
            "teacher_ce": float(sums[6] / sums[7]) if sums[7] > 0 else None,
            "tokens": int(sums[4]), "ce_tokens": int(sums[1]), "bytes": int(sums[5]),
            "draw_positions": int(sums[7]), "topk_positions": int(sums[8])}


def evaluate_all(model, folders, batch_tokens=8192, **kw) -> tuple[dict, dict]:
    """Each held-out dataset apart -> (their token-weighted mean, {name: metrics})."""
    each = {name: evaluate(model, f, batch_tokens, **kw)
            for name, f in zip(names_of(folders), folders)}
    return weighted_mean(list(each.values())), each


def weighted_mean(metrics: list[dict]) -> dict:
    """Datasets' metrics -> those of all their tokens together (CE by CE tokens, KL and top-1
    by target tokens)."""
    sums = torch.zeros(9, dtype=torch.float64)
    for m in metrics:
        sums += torch.tensor([m["ce"] * m["ce_tokens"], m["ce_tokens"],
                              (m["kl_topk"] or 0.0) * m["topk_positions"],
                              (m["top1_agreement"] or 0.0) * m["topk_positions"], m["tokens"],
                              m["bytes"], (m["teacher_ce"] or 0.0) * m["draw_positions"],
                              m["draw_positions"], m["topk_positions"]], dtype=torch.float64)
    return _metrics(sums)


def names_of(folders) -> list[str]:
    """Short names for datasets in logs and metrics: the folder's name, or as many of its last
    path parts as make every name distinct (`x/held/data` and `y/held/data` ->
    `x/held/data`, `y/held/data`); a name is a key, so two datasets must never share one."""
    from pathlib import PurePath

    parts = [PurePath(str(f)).parts or (str(f),) for f in folders]
    for n in range(1, max(map(len, parts)) + 1):
        names = ["/".join(p[-n:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{name}#{i}" for i, name in enumerate(names)]  # the same folder twice


def main(args) -> int:
    from transformers import AutoTokenizer

    from softlabels.data.dataset import load_tokenizer
    from softlabels.data.errors import UserError
    from softlabels.train_student.student import check_student, load_model

    if bool(args.teacher) != bool(args.prompts):
        raise UserError("--teacher and --prompts go together: the model continues the prompts "
                        "and the teacher scores what it wrote")
    if not args.data and not args.prompts:
        raise UserError("eval needs --data (held-out soft-label datasets), or --teacher with "
                        "--prompts (the model's own continuations), or both")
    for flag in ("max_new_tokens", "n", "max_prompts"):
        if getattr(args, flag) < (0 if flag == "max_prompts" else 1):
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least "
                            f"{0 if flag == 'max_prompts' else 1}")
    model = load_model(args.model, args.trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError):
        tok = None
    check_student(model, tok)
    for d in args.data:  # every dataset checked before any is evaluated
        if load_tokenizer(d) is None:
            raise UserError(f"{d} has no tokenizer/ folder; regenerate it with softlabels "
                            "generate")
    if args.prompts:
        from softlabels.train_student import continuations as cont

        if tok is None:
            raise UserError(f"model {args.model} has no tokenizer to write continuations with")
        teacher = load_model(args.teacher, args.trust_remote_code)
        try:
            teacher_tok = AutoTokenizer.from_pretrained(args.teacher)
        except (OSError, ValueError):
            teacher_tok = None
        cont.check_pair(model, teacher, tok, teacher_tok, args.teacher)
        prompts = cont.load_prompts(args.prompts, args.prompt_column, tok, args.max_prompts)
    rows = [{"data": d, **evaluate(model, d, args.batch_tokens, tokenizer=tok)}
            for d in args.data]
    if args.prompts:
        rows.append({"prompts": args.prompts, "teacher": args.teacher,
                     **cont.evaluate_continuations(model, teacher, tok, prompts,
                                                   args.max_new_tokens, args.n, args.seed)})
    if args.json:
        print(json.dumps(rows[0] if len(rows) == 1 else rows))
        return 0
    held = [m for m in rows if "data" in m]
    for m in rows[len(held):]:
        print(f"{args.model} on its own continuations of {m['prompts']} ({m['continuations']}, "
              f"{m['continuation_tokens']} tokens): reverse KL to {m['teacher']} "
              f"{m['reverse_kl']:.4f} nats/token, the teacher's NLL of them "
              f"{m['teacher_nll']:.4f}, its own {m['model_nll']:.4f}")
    for m in held + ([{"data": "token-weighted mean", **weighted_mean(held)}]
                     if len(held) > 1 else []):
        print(f"{args.model} on {m['data']}: CE {m['ce']:.4f} (ppl {m['ppl']:.2f})"
              + (f", {m['bpb']:.4f} bits/byte" if m["bpb"] is not None else "")
              + (f", KL over the top-k + 1 bucket {m['kl_topk']:.4f}, top-1 agreement "
                 f"{m['top1_agreement']:.3f}" if m["kl_topk"] is not None else "")
              + (f", CE to the teacher (from draws) {m['teacher_ce']:.4f}"
                 if m["teacher_ce"] is not None else "")
              + f", {m['ce_tokens']} tokens")
    return 0
