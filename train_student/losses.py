"""Distillation losses on sparse teacher targets, computed a chunk of positions at a time.

The targets are (ids, log-probs) per position: the stored top-k, or the draws of a dataset
generated with --samples turned into log(count / N) (batches.targets_of). Draws sum to 1, so their
residual is ~0 and forward KL against the student's full softmax is the Sparse Logit Sampling
estimator: unbiased for full KD's gradient.

The stored top-k leave the teacher's other mass (1 - sum p) unsaid; `residual` says where it goes:
- "tail" (default): a (k+1)-th bucket for all other tokens on both sides (student: 1 - sum q over
  the same ids). Tails are computed in log space, log(-expm1(logsumexp(.))): `1 - sum` in fp32
  loses them.
- "label": onto the real next token (Sparse Logit Sampling's ground-truth residual, Anshumann et
  al. 2025), giving a full target distribution on top-k + label for the student's full softmax;
  forward KL only. Positions with no known next token keep the tail bucket.
- "none": the top-k renormalised on both sides, which biases the student toward the head.
A teacher id of -1 marks a slot with no target (an id the student's vocabulary cannot produce):
its teacher mass joins the residual, and the slot adds nothing on either side.

Temperature: stored values are teacher log-probs at T=1. On the top-k support softmax(lp / T) is
exact, so T != 1 works with residual "none". With a residual it is refused: the teacher's
residual mass at T != 1 depends on the tokens the dataset does not store (spreading it evenly was
off by 10-500 % on a Zipf distribution). Losses are multiplied by T**2 (Hinton et al.) so
gradient scale does not depend on T.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd")
RESIDUALS = ("tail", "label", "none")
NEG = -1e4  # log-prob of an absent bucket: exp() is 0, and 0 * NEG stays finite


def log_tail(logp: torch.Tensor, floor: float = 1e-6) -> torch.Tensor:
    """log(1 - sum(exp(logp))) over the last dim, stable; (N, k) -> (N, 1). The mass is kept
    above about `floor` (quantisation can make the sum reach 1, and log(0) has no gradient)."""
    lse = torch.logsumexp(logp, -1, keepdim=True).clamp(max=-floor)
    return torch.log(-torch.expm1(lse)).clamp(min=NEG)


TAIL_TEMPERATURE = ("a temperature other than 1 with a residual (tail or label) is not exact: "
                    "the teacher's mass outside the top-k at T != 1 depends on tokens the "
                    "dataset does not store; use --residual none (softmax(top-k / T), exact on "
                    "the stored ids) or --temperature 1")
LABEL_RESIDUAL_LOSS = ("--residual label makes a target distribution for the student's full "
                       "softmax: use it with --loss forward_kl")


def teacher_buckets(lp: torch.Tensor, temperature: float, residual: str = "tail",
                    ids: torch.Tensor | None = None, labels: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """(N, k) teacher log-probs at T=1 -> (N, k[+1]) bucket log-probs at `temperature`
    (`ids` and `labels` are needed for residual "label")."""
    if residual == "none":
        return torch.log_softmax(lp / temperature, -1)
    if temperature != 1.0:
        raise ValueError(TAIL_TEMPERATURE)
    lt = log_tail(lp, 1e-9)  # data, no gradient: sampled targets sum to 1 and leave ~0 here
    if residual == "tail":
        return torch.cat([lp, lt], -1)
    at = (ids == labels[:, None]) & (labels >= 0)[:, None]  # the label's top-k slot, if any
    lp = torch.where(at, torch.logaddexp(lp, lt), lp)  # the residual joins it there
    extra = torch.where(at.any(-1, keepdim=True), torch.full_like(lt, NEG), lt)
    return torch.cat([lp, extra], -1)  # extra: the label outside the top-k, or the tail


def student_buckets(logits: torch.Tensor, ids: torch.Tensor, residual: str = "tail",
                    labels: torch.Tensor | None = None) -> torch.Tensor:
    """(N, V) student logits (already / T) and (N, k) ids (-1: no target) -> (N, k[+1]) bucket
    log-probs, matching teacher_buckets."""
    absent = ids < 0
    at_ids = logits.gather(-1, ids.clamp(min=0))
    if residual == "none":
        return torch.log_softmax(at_ids.masked_fill(absent, NEG), -1)
    lse = torch.logsumexp(logits, -1, keepdim=True)
    lq = (at_ids - lse).masked_fill(absent, NEG)
    lt = log_tail(lq)
    if residual == "tail":
        return torch.cat([lq, lt], -1)
    at_label = logits.gather(-1, labels.clamp(min=0)[:, None]) - lse
    return torch.cat([lq, torch.where((labels >= 0)[:, None], at_label, lt)], -1)


def head_logits(h: torch.Tensor, weight: torch.Tensor, bias, softcap: float | None) -> torch.Tensor:
    """The student's output head on a chunk of hidden states, fp32, with the architecture's final
    logit soft-capping (Gemma 2): what the loss trains is what eval measures."""
    logits = F.linear(h, weight, bias).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def divergence(lp: torch.Tensor, lq: torch.Tensor, loss: str, beta: float) -> torch.Tensor:
    """Per-position divergence between teacher (lp) and student (lq) buckets: (N, B) -> (N,)."""
    p, q = lp.exp(), lq.exp()
    if loss == "forward_kl":
        return (p * (lp - lq)).sum(-1)
    if loss == "reverse_kl":
        return (q * (lq - lp)).sum(-1)
    if loss in ("jsd", "skew_kl"):
        lm = torch.logsumexp(torch.stack([lp + math.log(beta), lq + math.log(1 - beta)]), 0)
        kl_pm = (p * (lp - lm)).sum(-1)
        return kl_pm if loss == "skew_kl" else beta * kl_pm + (1 - beta) * (q * (lq - lm)).sum(-1)
    if loss == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise ValueError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)}")


def _chunk_sums(h, weight, bias, ids, lp, labels, has_label, loss, beta, temperature, residual,
                softcap):
    """KD and CE sums for one chunk of positions; only (chunk, V) logits ever exist."""
    logits = head_logits(h, weight, bias, softcap)
    kd = divergence(
        teacher_buckets(lp.masked_fill(ids < 0, NEG), temperature, residual, ids, labels),
        student_buckets(logits / temperature, ids, residual, labels),
        loss,
        beta,
    ).sum() * temperature**2
    ce = (F.cross_entropy(logits, labels.clamp(min=0), reduction="none") * has_label).sum()
    return kd, ce


def kd_ce_sums(
    hidden: torch.Tensor,  # (N, H) student hidden states at target positions
    lm_head: torch.nn.Linear,
    ids: torch.Tensor,  # (N, k) teacher top-k ids, -1 where the slot has no target
    lp: torch.Tensor,  # (N, k) teacher log-probs, T=1
    labels: torch.Tensor,  # (N,) next token, or -1 where unknown
    loss: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    residual: str = "tail",
    chunk: int = 1024,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Summed KD loss, summed CE loss, and the number of CE tokens, over N positions.

    Chunked over positions, and each chunk recomputed in the backward pass (checkpoint), so
    peak memory holds one (chunk, V) logits block instead of (N, V) logits and log-probs.
    """
    if residual not in RESIDUALS:
        raise ValueError(f"residual {residual!r}: choose from {', '.join(RESIDUALS)}")
    if residual == "label" and loss != "forward_kl":
        raise ValueError(LABEL_RESIDUAL_LOSS)
    kd = hidden.new_zeros((), dtype=torch.float32)
    ce = hidden.new_zeros((), dtype=torch.float32)
    has_label = (labels >= 0).float()
    for s in range(0, hidden.shape[0], chunk):
        e = s + chunk
        args = (hidden[s:e], lm_head.weight, lm_head.bias, ids[s:e], lp[s:e], labels[s:e],
                has_label[s:e], loss, beta, temperature, residual, softcap)
        if torch.is_grad_enabled():
            k, c = checkpoint(_chunk_sums, *args, use_reentrant=False)
        else:
            k, c = _chunk_sums(*args)
        kd, ce = kd + k, ce + c
    return kd, ce, int(has_label.sum())
