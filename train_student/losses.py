"""Distillation losses on sparse teacher targets, computed a chunk of positions at a time.

The targets are, per position, ids with their teacher log-probs and the log of the teacher's mass
on no id of them (`rest`), summing to 1 (batches.targets_of): the stored top-k and its tail, or
the draws of a dataset generated with --samples turned into log(count / N) (no rest: forward KL
against the student's full softmax is then the Sparse Logit Sampling estimator, unbiased for full
KD's gradient), or both. Format 4 stores the tail and the label's log-prob exactly; older formats
give the tail as 1 - sum(rounded top-k), which rounding loses at confident positions.

Buckets: both sides become (N, S + 2) log-probs over [the S ids, the label, the rest], a bucket
absent on both sides holding NEG (exp() is 0 there, so it adds nothing to any divergence). Where
the rest goes is `residual`:
- "tail": a bucket for all other tokens on both sides (student: 1 - sum q over the same ids).
  Tails are computed in log space, log1mexp(logsumexp(.)): `1 - sum` in fp32 loses them.
- "label": the real next token gets its own bucket. Where the dataset stores the label's
  log-prob (format 4) this is exact: the label outside the ids gets its own mass, the rest of the
  rest stays a tail bucket, and every loss applies. Where it does not (older formats) the whole
  rest goes onto the label (Sparse Logit Sampling's ground-truth residual, Anshumann et al.
  2025), a full target for the student's full softmax: forward KL only. Positions with no known
  next token keep the tail bucket.
- "ground_truth": the whole rest onto the real next token whatever the format stores: what
  "label" meant before format 4, a different recipe (the label outside the top-k gets the
  teacher's whole tail, not its own small share); forward KL only.
- "none": the ids renormalised on both sides, which biases the student toward the head.
A teacher id of -1 marks a slot with no target (an id the student's vocabulary cannot produce):
its teacher mass is in the rest, and the slot adds nothing on either side.

Temperature: stored values are teacher log-probs at T=1. On the stored ids softmax(lp / T) is
exact, so T != 1 works with residual "none". With a residual it is refused: the teacher's rest
at T != 1 depends on the tokens the dataset does not store (spreading it evenly was off by
10-500 % on a Zipf distribution). Losses are multiplied by T**2 (Hinton et al.) so gradient
scale does not depend on T.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from softlabels.data.heads import PLAIN_HEAD, LogitTransform
from softlabels.train_student.config import (  # the choices, declared with the flags
    DIVERGENCES,
    LABEL_RESIDUAL_LOSS,
    RESIDUALS,
    TAIL_TEMPERATURE,
)

NEG = -1e4  # log-prob of an absent bucket: exp() is 0, and 0 * NEG stays finite
# Up to ~3 (chunk, vocab) float32 blocks exist at once per head chunk (two in the gradient built
# in the forward pass; more in the recomputed path): 2**26 floats a block keeps that below 1 GB
# at any vocabulary
HEAD_CHUNK_FLOATS = 1 << 26
# Reverse KL weighs -log p by the student's mass, so one teacher bucket stored as 0 (a tail the
# teacher's float32 exponentials could not resolve: below about V e^-87) would cost 1e4 nats per
# unit of student mass. Teacher log-probs below this floor count as the floor: a stated lower
# bound of the true penalty (as the buckets are of the full-vocabulary divergence).
REVERSE_FLOOR = -80.0


def log_tail(logp: torch.Tensor, floor: float = 1e-6) -> torch.Tensor:
    """log(1 - sum(exp(logp))) over the last dim, stable; (N, k) -> (N, 1). The mass is kept
    above about `floor` (log(0) has no gradient)."""
    lse = torch.logsumexp(logp, -1, keepdim=True).clamp(max=-floor)
    return log1mexp(lse).clamp(min=NEG)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends: the one torch form (data/format.py has the
    numpy one). Callers keep x below 0 where they need a gradient (at 0 it is -inf)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)),
                       torch.log(-torch.expm1(x)))


def _label_slots(ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, S) the label's slot among the ids, (N, 1) whether the label has a bucket of its own
    (known, and not among the ids)."""
    at = (ids == labels[:, None]) & (labels >= 0)[:, None]
    return at, ((labels >= 0)[:, None] & ~at.any(-1, keepdim=True))


def teacher_buckets(lp: torch.Tensor, rest: torch.Tensor, temperature: float = 1.0,
                    residual: str = "tail", ids: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None, label_lp: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """(N, S) teacher log-probs at T=1 and (N,) log of the rest -> (N, S + 2) bucket log-probs
    [ids, label, rest] (or (N, S) at `temperature` for residual "none"). `ids`, `labels` and
    `label_lp` ((N,), NaN where not stored) are needed for residual "label"."""
    if residual == "none":
        return torch.log_softmax(lp / temperature, -1)
    if temperature != 1.0:
        raise ValueError(TAIL_TEMPERATURE)
    rest = rest[:, None]
    absent = torch.full_like(rest, NEG)
    if residual == "tail":
        return torch.cat([lp, absent, rest], -1)
    at, own = _label_slots(ids, labels)
    exact = torch.isfinite(label_lp)[:, None]
    # format 4: the label's own mass (at most the rest: rounding), the remainder a tail bucket
    mine = torch.minimum(label_lp[:, None].nan_to_num(NEG), rest)
    left = (rest + log1mexp((mine - rest).clamp(max=-1e-7))).clamp(min=NEG)
    # older formats: the whole rest onto the label, in its slot or its own bucket
    ground = torch.where(at & ~exact, torch.logaddexp(lp, rest), lp)
    extra = torch.where(own, torch.where(exact, mine, rest), absent)
    tail = torch.where(own & exact, left, torch.where(exact | (labels < 0)[:, None], rest,
                                                      absent))
    return torch.cat([ground, extra, tail], -1)


def student_buckets(logits: torch.Tensor, ids: torch.Tensor, residual: str = "tail",
                    labels: torch.Tensor | None = None, label_lp: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """(N, V) student logits (already / T) and (N, S) ids (-1: no target) -> bucket log-probs,
    matching teacher_buckets."""
    at_label = None if labels is None else logits.gather(-1, labels.clamp(min=0)[:, None])
    return buckets_of(logits.gather(-1, ids.clamp(min=0)),
                      torch.logsumexp(logits, -1, keepdim=True), at_label, ids, residual,
                      labels, label_lp)


def buckets_of(at_ids: torch.Tensor, lse: torch.Tensor, at_label: torch.Tensor | None,
               ids: torch.Tensor, residual: str = "tail", labels: torch.Tensor | None = None,
               label_lp: torch.Tensor | None = None) -> torch.Tensor:
    """The student's buckets from what they depend on: its logits at the ids (N, S) and at the
    label (N, 1), and their log-normaliser (N, 1). Every bucket is a function of these few
    numbers, which is why the head's gradient needs no (N, V) graph (HeadGradientInForward)."""
    absent = ids < 0
    if residual == "none":
        return torch.log_softmax(at_ids.masked_fill(absent, NEG), -1)
    lq = (at_ids - lse).masked_fill(absent, NEG)
    none = torch.full_like(lse, NEG)
    if residual == "tail":
        return torch.cat([lq, none, log_tail(lq)], -1)
    _, own = _label_slots(ids, labels)
    extra = torch.where(own, at_label - lse, none)
    # the rest's bucket: there with the label's log-prob stored, or with no label (tail)
    has_tail = torch.isfinite(label_lp)[:, None] | (labels < 0)[:, None]
    return torch.cat([lq, extra, torch.where(has_tail, log_tail(torch.cat([lq, extra], -1)),
                                             none)], -1)


def head_chunk(vocab: int, chunk: int = 0) -> int:
    """Positions per output-head chunk: `chunk`, or for 0 the power of 2 nearest
    HEAD_CHUNK_FLOATS / vocab in [64, 4096] (512 at Qwen's 151,936 ids, 4096 at 16k and below):
    at 152k ids a step of 4096 tokens peaked at 2.60 GiB with 512 and 3.19 with 1024, in the
    same time (BENCHMARKS.md, "Beside the field's trainers")."""
    if chunk:
        return chunk
    return int(min(4096, max(64, 2 ** round(math.log2(HEAD_CHUNK_FLOATS / max(vocab, 1))))))


def head_logits(h: torch.Tensor, weight: torch.Tensor, bias,
                transform: LogitTransform) -> torch.Tensor:
    """The student's output head on a chunk of hidden states, fp32, with its family's transform
    (Gemma's soft-cap, Granite's and Cohere's scales): the logits its saved model gives, so what
    the loss trains is what eval and transformers measure."""
    return transform(F.linear(h, weight, bias).float())


def divergence(lp: torch.Tensor, lq: torch.Tensor, loss: str, beta: float) -> torch.Tensor:
    """Per-position divergence between teacher (lp) and student (lq) buckets: (N, B) -> (N,)."""
    p, q = lp.exp(), lq.exp()
    if loss == "forward_kl":
        return (p * (lp - lq)).sum(-1)
    if loss == "reverse_kl":
        return (q * (lq - lp.clamp(min=REVERSE_FLOOR))).sum(-1)
    if loss in ("jsd", "skew_kl"):
        lm = torch.logsumexp(torch.stack([lp + math.log(beta), lq + math.log(1 - beta)]), 0)
        kl_pm = (p * (lp - lm)).sum(-1)
        return kl_pm if loss == "skew_kl" else beta * kl_pm + (1 - beta) * (q * (lq - lm)).sum(-1)
    if loss == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise ValueError(f"unknown divergence {loss!r}; choose from {', '.join(DIVERGENCES)}")


# Importance weights of token_reverse_kl are clipped here (truncated importance sampling): a
# token the student now likes far more than when it wrote it cannot dominate the step.
IS_CLIP = 2.0


def token_reverse_kl(lq: torch.Tensor, label_lp: torch.Tensor, writer_lp: torch.Tensor
                     ) -> torch.Tensor:
    """(n,) the student's log-prob now of each written token, the teacher's and the writer's ->
    the summed per-token reverse KL estimate of on-policy distillation (GKD; Thinking Machines'
    "On-Policy Distillation"): its value is sum_t w_t (log q(x_t) - log p(x_t)), its gradient
    sum_t w_t (log q(x_t) - log p(x_t)) d log q(x_t), the score-function gradient of
    KL(q || p) from tokens the student wrote. w_t = min(q(x_t) / q_writer(x_t), IS_CLIP)
    corrects for a writer that was an older student (1 for a fresh one); both weights and
    advantages are constants of the gradient."""
    adv = (lq - label_lp.clamp(min=REVERSE_FLOOR)).detach()
    w = torch.exp(lq.detach() - writer_lp).clamp(max=IS_CLIP)
    value = w * adv
    return (value * lq + (value - value * lq).detach()).sum()


def _chunk_sums(h, weight, bias, ids, lp, rest, label_lp, labels, has_label, loss, beta,
                temperature, residual, transform, writer_lp=None):
    """KD and CE sums for one chunk of positions; only (chunk, V) logits ever exist."""
    logits = head_logits(h, weight, bias, transform)
    if loss == "token_reverse_kl":
        lq = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[:, None])[:, 0]
        kd = token_reverse_kl(lq, label_lp, writer_lp)
    else:
        kd = divergence(
            teacher_buckets(lp.masked_fill(ids < 0, NEG), rest, temperature, residual, ids,
                            labels, label_lp),
            student_buckets(logits / temperature, ids, residual, labels, label_lp),
            loss,
            beta,
        ).sum() * temperature**2
    ce = (F.cross_entropy(logits, labels.clamp(min=0), reduction="none") * has_label).sum()
    return kd, ce


def softmax_(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax, log-normaliser) of (n, V) logits, the softmax written over `x`: one block."""
    m = x.amax(-1, keepdim=True)
    x.sub_(m).exp_()
    total = x.sum(-1, keepdim=True)
    return x.div_(total), m + total.log()


def through_head(raw: torch.Tensor, transform: LogitTransform, gradient_of):
    """(n, V) raw head outputs -> (sums, the gradient of the loss with respect to them), where
    `gradient_of(logits)` gives the sums and the gradient with respect to the logits and may
    overwrite them (one block). The family's transform, where there is one, is kept for its
    derivative at the end."""
    x = raw.float()
    del raw  # (a bfloat16 block under autocast: x is the float32 one)
    if transform.kind == "none" or not transform.factor:
        return gradient_of(x)
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        out = transform(x)
    sums, g = gradient_of(out.detach().clone())
    (g,) = torch.autograd.grad(out, x, g)
    return sums, g


def _chunk_gradient(raw, coef, ids, lp, rest, label_lp, labels, has_label, loss, beta,
                    temperature, residual, transform, writer_lp=None):
    """One chunk's KD and CE sums, and the gradient of coef[0] KD + coef[1] CE with respect to its
    raw head outputs, built in place from the softmax.

    Every student bucket is a function of the logits at the ids and at the label and of the
    log-normaliser (`buckets_of`), so autograd runs on those (n, S + 2) numbers only; the dense
    part of the gradient is the softmax times d/d(log-normaliser), plus those few entries. At
    most two (n, V) blocks exist (one with the family's plain head and temperature 1), where
    autograd through the (n, V) logits holds five."""
    T = temperature

    def gradient_of(logits):
        lab = labels.clamp(min=0)[:, None]
        at_label1 = logits.gather(-1, lab)
        scaled = logits / T if T != 1.0 else logits
        at_ids, at_label = scaled.gather(-1, ids.clamp(min=0)), scaled.gather(-1, lab)
        q, lse = softmax_(scaled)  # the KD's softmax (at T), over the logits' block at T = 1
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (lse, at_ids, at_label)]
            lse_, at_ids_, at_label_ = leaves
            if loss == "token_reverse_kl":  # (T is 1: Recipe)
                kd = token_reverse_kl((at_label_ - lse_)[:, 0], label_lp, writer_lp)
            else:
                kd = divergence(
                    teacher_buckets(lp.masked_fill(ids < 0, NEG), rest, T, residual, ids,
                                    labels, label_lp),
                    buckets_of(at_ids_, lse_, at_label_, ids, residual, labels, label_lp),
                    loss, beta).sum() * T**2
            d_lse, d_ids, d_label = (torch.zeros_like(v) if g is None else g for v, g in zip(
                leaves, torch.autograd.grad(coef[0] * kd, leaves, allow_unused=True)))
        w = coef[1] * has_label[:, None]  # CE = lse - logit of the label, at T = 1
        if T == 1.0:
            g = q.mul_(d_lse + w)
            g.scatter_add_(-1, ids.clamp(min=0), d_ids)
            g.scatter_add_(-1, lab, d_label - w)
            lse1 = lse
        else:
            g = q.mul_(d_lse / T)
            g.scatter_add_(-1, ids.clamp(min=0), d_ids / T)
            g.scatter_add_(-1, lab, d_label / T - w)
            q1, lse1 = softmax_(logits)
            g.add_(q1.mul_(w))
            del q1
        ce = ((lse1 - at_label1)[:, 0] * has_label).sum()
        return torch.stack([kd.detach(), ce.detach()]), g

    return through_head(raw, transform, gradient_of)


class HeadGradientInForward(torch.autograd.Function):
    """Sums of losses over N positions whose head gradient (for the loss coef . sums) is computed
    chunk by chunk as soon as each chunk's logits exist, the logits then freed: no chunk is
    recomputed in the backward pass (Liger's fused linear losses do the same). `part(raw, s, e)`
    gives positions [s, e)'s sums and their gradient with respect to the raw head outputs;
    `bounds` are the chunks' edges. Its backward scales the gradients by the one factor its
    incoming gradients are of `coef`; a loss that weighs the sums otherwise is an error, not a
    wrong gradient. The same-tokenizer losses (KD, CE) and the cross-tokenizer ones (ALM, dist,
    CE) both go through it."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, coef, bounds, part):
        gh = torch.zeros_like(hidden)
        gw = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        gb = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        sums = hidden.new_zeros(len(coef), dtype=torch.float32)
        for s, e in zip(bounds[:-1], bounds[1:]):
            h = hidden[s:e]
            k, g = part(F.linear(h, weight, bias), s, e)
            g = g.to(weight.dtype)
            gh[s:e] = (g @ weight).to(gh.dtype)  # (n, V) @ (V, H)
            if gw is not None:
                gw.addmm_(g.t(), h.to(weight.dtype))
            if gb is not None:
                gb += g.sum(0)
            sums = sums + k
        ctx.save_for_backward(gh, gw, gb, coef)
        return sums

    @staticmethod
    def backward(ctx, got):
        gh, gw, gb, coef = ctx.saved_tensors
        got, c = got.double(), coef.double()
        scale = (got @ c) / (c @ c)
        if not torch.allclose(got, scale * c, rtol=1e-5, atol=1e-12):
            raise RuntimeError(f"the loss weighs its sums {got.tolist()}, not as the "
                               f"coefficients {coef.tolist()} they were computed for")
        scale = scale.to(gh.dtype)  # in place: a head's gradient is as large as its weight
        return (gh.mul_(scale), None if gw is None else gw.mul_(scale),
                None if gb is None else gb.mul_(scale), None, None, None)


def kd_ce_sums(
    hidden: torch.Tensor,  # (N, H) student hidden states at target positions
    lm_head: torch.nn.Linear,
    ids: torch.Tensor,  # (N, S) teacher target ids, -1 where the slot has no target
    lp: torch.Tensor,  # (N, S) teacher log-probs, T=1
    rest: torch.Tensor,  # (N,) log of the teacher's mass on no id of `ids`
    label_lp: torch.Tensor,  # (N,) teacher log-prob of the label; NaN: not stored
    labels: torch.Tensor,  # (N,) next token, or -1 where unknown
    loss: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    residual: str = "tail",
    chunk: int = 1024,
    transform: LogitTransform = PLAIN_HEAD,
    coef: torch.Tensor | None = None,
    writer_lp: torch.Tensor | None = None,  # (N,) the writer's log-prob of the label
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed KD loss and summed CE loss (over the positions with a label) of N positions.
    With loss "token_reverse_kl" the KD sum is `token_reverse_kl` of the labels (the tokens the
    student wrote), which needs `writer_lp` and the teacher's `label_lp` at every position.

    Chunked over positions, so peak memory holds one (chunk, V) logits block instead of (N, V)
    logits and log-probs. `coef` (2,): what the step's loss multiplies the two sums by
    (objective.coefficients). Given, each chunk's gradient is computed in the forward pass
    (3 head matmuls a chunk instead of 4: BENCHMARKS.md, "Beside the field's trainers"), and
    the sums are only differentiable in that proportion. Without it, each chunk is recomputed
    in the backward pass (checkpoint), for any use of the sums.
    """
    if residual not in RESIDUALS:
        raise ValueError(f"residual {residual!r}: choose from {', '.join(RESIDUALS)}")
    if residual == "ground_truth":  # the label residual as if no label log-prob were stored
        if loss != "forward_kl":
            raise ValueError(LABEL_RESIDUAL_LOSS)
        residual, label_lp = "label", torch.full_like(label_lp, float("nan"))
    if residual == "label" and loss != "forward_kl" and bool(
            (torch.isnan(label_lp) & (labels >= 0)).any()):
        raise ValueError(LABEL_RESIDUAL_LOSS)
    if loss == "token_reverse_kl" and (writer_lp is None or bool(
            (torch.isnan(label_lp) | torch.isnan(writer_lp) | (labels < 0)).any())):
        raise ValueError("--loss token_reverse_kl needs, at every target position, the written "
                         "token, the teacher's log-prob of it and the writer's (a dataset of "
                         "written responses: generate --generate-responses)")
    has_label = (labels >= 0).float()
    targets = (ids, lp, rest, label_lp, labels, has_label, loss, beta, temperature, residual,
               transform, writer_lp)
    if coef is not None and torch.is_grad_enabled() and (
            hidden.requires_grad or lm_head.weight.requires_grad):
        coef = coef.detach().float()

        def part(raw, s, e):
            return _chunk_gradient(raw, coef, *(t[s:e] if torch.is_tensor(t) and t.dim() else t
                                                for t in targets))

        N = hidden.shape[0]
        sums = HeadGradientInForward.apply(hidden, lm_head.weight, lm_head.bias, coef,
                                           [*range(0, N, chunk), N], part)
        return sums[0], sums[1]
    kd = hidden.new_zeros((), dtype=torch.float32)
    ce = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[0], chunk):
        e = s + chunk
        args = (hidden[s:e], lm_head.weight, lm_head.bias, ids[s:e], lp[s:e], rest[s:e],
                label_lp[s:e], labels[s:e], has_label[s:e], loss, beta, temperature, residual,
                transform, None if writer_lp is None else writer_lp[s:e])
        if torch.is_grad_enabled():
            k, c = checkpoint(_chunk_sums, *args, use_reentrant=False)
        else:
            k, c = _chunk_sums(*args)
        kd, ce = kd + k, ce + c
    return kd, ce
