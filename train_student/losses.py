"""Distillation losses on sparse (top-k) teacher targets, computed a chunk of positions at a time.

Both distributions are put on k+1 buckets: the teacher's top-k ids plus one "tail" bucket for
all other tokens (teacher: 1 - sum p; student: 1 - sum q over the same ids). Without the tail the
top-k are renormalised, which biases the student toward the head (Sparse Logit Sampling, 2025).
Tails are computed in log space, log(-expm1(logsumexp(.))): `1 - sum` in fp32 loses them.
A teacher id of -1 marks a slot with no target (an id the student's vocabulary cannot produce):
its teacher mass joins the teacher's tail, and the slot adds nothing on either side.

Temperature: stored values are teacher log-probs at T=1. On the top-k support softmax(lp / T) is
exact, so T != 1 works with renormalised top-k (`tail=False`). With the tail bucket it is refused:
the teacher's tail mass at T != 1 depends on the tokens the dataset does not store (spreading it
evenly was off by 10-500 % on a Zipf distribution). Losses are multiplied by T**2 (Hinton et al.)
so gradient scale does not depend on T.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd")
NEG = -1e4  # log-prob of an absent bucket: exp() is 0, and 0 * NEG stays finite


def log_tail(logp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(logp))) over the last dim, stable; (N, k) -> (N, 1)."""
    lse = torch.logsumexp(logp, -1, keepdim=True).clamp(max=-1e-6)  # quantisation can reach 0
    return torch.log(-torch.expm1(lse)).clamp(min=NEG)


TAIL_TEMPERATURE = ("a temperature other than 1 with the tail bucket is not exact: the teacher's "
                    "tail mass at T != 1 depends on tokens the dataset does not store; use "
                    "--no-tail (softmax(top-k / T), exact on the stored ids) or --temperature 1")


def teacher_buckets(lp: torch.Tensor, temperature: float, tail: bool) -> torch.Tensor:
    """(N, k) teacher log-probs at T=1 -> (N, k[+1]) bucket log-probs at `temperature`."""
    if not tail:
        return torch.log_softmax(lp / temperature, -1)
    if temperature != 1.0:
        raise ValueError(TAIL_TEMPERATURE)
    return torch.cat([lp, log_tail(lp)], -1)


def student_buckets(logits: torch.Tensor, ids: torch.Tensor, tail: bool) -> torch.Tensor:
    """(N, V) student logits (already / T) and (N, k) ids (-1: no target) -> (N, k[+1]) bucket
    log-probs."""
    absent = ids < 0
    at_ids = logits.gather(-1, ids.clamp(min=0))
    if not tail:
        return torch.log_softmax(at_ids.masked_fill(absent, NEG), -1)
    lq = (at_ids - torch.logsumexp(logits, -1, keepdim=True)).masked_fill(absent, NEG)
    return torch.cat([lq, log_tail(lq)], -1)


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


def _chunk_sums(h, weight, bias, ids, lp, labels, has_label, loss, beta, temperature, tail,
                softcap):
    """KD and CE sums for one chunk of positions; only (chunk, V) logits ever exist."""
    logits = head_logits(h, weight, bias, softcap)
    kd = divergence(
        teacher_buckets(lp.masked_fill(ids < 0, NEG), temperature, tail),
        student_buckets(logits / temperature, ids, tail),
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
    tail: bool = True,
    chunk: int = 1024,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Summed KD loss, summed CE loss, and the number of CE tokens, over N positions.

    Chunked over positions, and each chunk recomputed in the backward pass (checkpoint), so
    peak memory holds one (chunk, V) logits block instead of (N, V) logits and log-probs.
    """
    kd = hidden.new_zeros((), dtype=torch.float32)
    ce = hidden.new_zeros((), dtype=torch.float32)
    has_label = (labels >= 0).float()
    for s in range(0, hidden.shape[0], chunk):
        e = s + chunk
        args = (hidden[s:e], lm_head.weight, lm_head.bias, ids[s:e], lp[s:e], labels[s:e],
                has_label[s:e], loss, beta, temperature, tail, softcap)
        if torch.is_grad_enabled():
            k, c = checkpoint(_chunk_sums, *args, use_reentrant=False)
        else:
            k, c = _chunk_sums(*args)
        kd, ce = kd + k, ce + c
    return kd, ce, int(has_label.sum())
