"""What a training step optimises, behind one interface, so `train.py` has one step and `hf.py`
one loss: same-tokenizer (here) and cross-tokenizer (`cross.Cross`) objectives.

An objective does four things, in the order a step needs them:
- `collate(rows, sources)`: stored rows (of datasets `sources`) -> the batch its sums read;
- `sums(h, batch, head, chunk, transform, coef)`: student hidden states -> a tensor of summed
  losses, summed over positions (never normalised per micro-batch, so accumulation is exact);
  `coef`, the loss's weight of each sum (`coefficients(counts)`, or None), lets the head
  compute its gradient as it goes instead of recomputing (same-tokenizer only);
- `step_counts(plan, group, mine, reduce)` / `batch_counts(batch)`: what the step's sums are
  normalised by, over every process;
- `loss(sums, counts)`: the one scalar, the KD/CE mix formed once, and `record(sums, counts)`:
  the step's numbers for the log.

The recipe of each dataset is resolved once (config.Recipe.for_dataset) and travels forward
only: config -> recipes -> objective -> collate. The format generation (exact tail, label
residual, older formats) is settled in collate (batches.targets_of), so the loss sees one
representation.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from softlabels.data.heads import LogitTransform
from softlabels.train_student.batches import Batch, collate
from softlabels.train_student.losses import head_logits, kd_ce_sums


def target_sums(h: torch.Tensor, batch: Batch, head, recipes: list, chunk: int,
                transform: LogitTransform, coef: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L, H) student hidden states -> (2, D): summed KD (row 0) and summed CE (row 1) of each
    dataset's target positions in the batch, each with its dataset's recipe. `coef` (2, D): the
    loss's weight of each sum (SameTokenizer.coefficients), which lets the head compute its
    gradient as it goes (losses.kd_ce_sums).

    A micro-batch without a target (rows of context only, in datasets from before generate
    skipped them) gives zero losses that still run through the decoder and the head, so backward
    and DDP's all-reduce happen on every process as on any other step."""
    h = h.reshape(-1, h.shape[-1])  # (B*L, H)
    zero = head_logits(h[:1], head.weight, head.bias, transform).sum() * 0.0
    kd, ce = [zero] * len(recipes), [zero] * len(recipes)
    for d in batch.source.unique().tolist():
        at = batch.source == d
        r = recipes[d]
        kd[d], ce[d] = kd_ce_sums(
            h[batch.pos[at]], head, batch.ids[at], batch.lp[at], batch.rest[at],
            batch.label_lp[at], batch.labels[at], loss=r.loss, beta=r.beta,
            temperature=r.temperature, residual=r.residual, chunk=chunk, transform=transform,
            coef=None if coef is None else coef[:, d], writer_lp=batch.writer_lp[at])
    return torch.stack([torch.stack(kd), torch.stack(ce)])


@dataclass
class SameTokenizer:
    """The student shares the teacher's tokenizer: sparse KD on the stored targets plus CE, each
    dataset of a mixture with its own recipe.

    loss = sum over datasets d of (1 - w_d) KD_d / KD_n + w_d CE_d / CE_n: each dataset's sums
    with its own CE weight w_d, all normalised by the step's global counts (KD target positions,
    CE positions), which every process knows from the row index without communicating."""

    recipes: list  # per dataset, resolved (config.Recipe)
    vocab: int = 0  # the student's output size: teacher ids beyond it carry no target

    n_counts = 2

    def collate(self, rows, sources) -> Batch:
        return collate(rows, self.vocab, [r.targets for r in self.recipes], sources)

    def sums(self, h, batch: Batch, head, chunk: int, transform, coef=None) -> torch.Tensor:
        return target_sums(h, batch, head, self.recipes, chunk, transform, coef)

    def step_counts(self, plan, group, mine, reduce) -> list[int]:
        return [sum(c) for c in zip(*(plan.counts(m) for m in group))]

    def batch_counts(self, b: dict) -> list[int]:
        return [len(b["ids"]), int((b["labels"] >= 0).sum())]

    def unpack(self, inputs: dict) -> Batch:
        return Batch(**{f.name: inputs[f.name] for f in fields(Batch)})

    def coefficients(self, counts, device=None) -> torch.Tensor:
        """(2, D) what the loss multiplies each sum by: it is linear in them."""
        kd_n, ce_n = counts
        w = torch.tensor([r.ce_weight for r in self.recipes], dtype=torch.float64)
        return torch.stack([(1 - w) / max(kd_n, 1), w / max(ce_n, 1)]).float().to(device)

    def loss(self, sums: torch.Tensor, counts) -> torch.Tensor:
        return (self.coefficients(counts, sums.device) * sums).sum()

    def record(self, sums: torch.Tensor, counts) -> dict:
        kd_n, ce_n = counts
        return {"loss": float(self.loss(sums, counts)),
                "kd": float(sums[0].sum()) / max(kd_n, 1),
                "ce": float(sums[1].sum()) / max(ce_n, 1)}

    def resolved(self) -> dict:
        """What train_config.json records beside the flags: the recipes as resolved."""
        residuals = {r.residual for r in self.recipes}  # one flag: "auto" where they differ
        return {"targets": [r.targets for r in self.recipes],
                "loss": [r.loss for r in self.recipes],
                "ce_weight": [r.ce_weight for r in self.recipes],
                "residual": residuals.pop() if len(residuals) == 1 else "auto"}


def by_dataset(plan, group, n: int) -> np.ndarray:
    """(2, n) KD target tokens and rows of each dataset in the step's micro-batches."""
    return sum(plan.by_source(m, n) for m in group)
