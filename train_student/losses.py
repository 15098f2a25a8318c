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
    LABEL_RESIDUAL_LOSS,
    LOSSES,
    RESIDUALS,
    TAIL_TEMPERATURE,
)

NEG = -1e4  # log-prob of an absent bucket: exp() is 0, and 0 * NEG stays finite
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
    absent = ids < 0
    at_ids = logits.gather(-1, ids.clamp(min=0))
    if residual == "none":
        return torch.log_softmax(at_ids.masked_fill(absent, NEG), -1)
    lse = torch.logsumexp(logits, -1, keepdim=True)
    lq = (at_ids - lse).masked_fill(absent, NEG)
    none = torch.full_like(lse, NEG)
    if residual == "tail":
        return torch.cat([lq, none, log_tail(lq)], -1)
    _, own = _label_slots(ids, labels)
    extra = torch.where(own, logits.gather(-1, labels.clamp(min=0)[:, None]) - lse, none)
    # the rest's bucket: there with the label's log-prob stored, or with no label (tail)
    has_tail = torch.isfinite(label_lp)[:, None] | (labels < 0)[:, None]
    return torch.cat([lq, extra, torch.where(has_tail, log_tail(torch.cat([lq, extra], -1)),
                                             none)], -1)


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
    raise ValueError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")


def _chunk_sums(h, weight, bias, ids, lp, rest, label_lp, labels, has_label, loss, beta,
                temperature, residual, transform):
    """KD and CE sums for one chunk of positions; only (chunk, V) logits ever exist."""
    logits = head_logits(h, weight, bias, transform)
    kd = divergence(
        teacher_buckets(lp.masked_fill(ids < 0, NEG), rest, temperature, residual, ids, labels,
                        label_lp),
        student_buckets(logits / temperature, ids, residual, labels, label_lp),
        loss,
        beta,
    ).sum() * temperature**2
    ce = (F.cross_entropy(logits, labels.clamp(min=0), reduction="none") * has_label).sum()
    return kd, ce


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed KD loss and summed CE loss (over the positions with a label) of N positions.

    Chunked over positions, and each chunk recomputed in the backward pass (checkpoint), so
    peak memory holds one (chunk, V) logits block instead of (N, V) logits and log-probs.
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
    kd = hidden.new_zeros((), dtype=torch.float32)
    ce = hidden.new_zeros((), dtype=torch.float32)
    has_label = (labels >= 0).float()
    for s in range(0, hidden.shape[0], chunk):
        e = s + chunk
        args = (hidden[s:e], lm_head.weight, lm_head.bias, ids[s:e], lp[s:e], rest[s:e],
                label_lp[s:e], labels[s:e], has_label[s:e], loss, beta, temperature, residual,
                transform)
        if torch.is_grad_enabled():
            k, c = checkpoint(_chunk_sums, *args, use_reentrant=False)
        else:
            k, c = _chunk_sums(*args)
        kd, ce = kd + k, ce + c
    return kd, ce
