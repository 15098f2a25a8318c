"""Stored soft targets in a `transformers.Trainer` (and so TRL): a dataset, a collator, a loss.

    from softlabels.train_student.hf import DistillationTrainer, soft_label_dataset

    trainer = DistillationTrainer(model=student, args=TrainingArguments(..., max_steps=500),
                                  train_dataset=soft_label_dataset("targets/"),
                                  loss="forward_kl", ce_weight=0.5)
    trainer.train()

A thin shell over what `softlabels train` uses, never a second implementation: rows come from
`SoftLabelReader` (the same value and hash checks), batches from `collate`, the loss from
`kd_ce_sums` (chunked lm_head: no (tokens, vocab) logits for the batch). Under gradient
accumulation and across processes the loss is normalised by the number of target tokens of the
whole step (the Trainer's `num_items_in_batch`), not averaged per micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Trainer

from softlabels.data.format import Row
from softlabels.train_student.batches import collate
from softlabels.train_student.losses import LOSSES, TAIL_TEMPERATURE, kd_ce_sums


def _rows(path: str, shuffle: bool, seed: int):
    from softlabels.data.reader import SoftLabelReader

    epoch = 0
    while True:  # a stream: the Trainer's max_steps decides when to stop
        for _, r in SoftLabelReader(path, shuffle=shuffle, seed=seed).rows(epoch=epoch):
            yield {"row_id": r.row_id, "input_ids": r.input_ids, "target_mask": r.target_mask,
                   "topk_ids": r.topk_ids, "topk_logprobs": r.topk_logprobs,
                   **({"sample_ids": r.sample_ids, "sample_counts": r.sample_counts}
                      if r.sample_ids is not None else {})}
        epoch += 1


def soft_label_dataset(path, shuffle: bool = True, seed: int = 0):
    """The stored rows of a soft-label dataset as a streaming `datasets.IterableDataset`.

    Rows are decoded and checked by this package's reader, one row group in memory at a time, so
    a dataset of any size streams; it repeats epoch after epoch (set `max_steps`). Examples are
    numpy arrays: `input_ids` (T,), `target_mask` (T,), `topk_ids`/`topk_logprobs` (T, k), and
    on a dataset generated with --samples `sample_ids`/`sample_counts` (T, U).
    """
    import datasets

    return datasets.IterableDataset.from_generator(
        _rows, gen_kwargs={"path": str(path), "shuffle": shuffle, "seed": seed})


@dataclass
class SoftLabelCollator:
    """Examples of `soft_label_dataset` -> the tensors `DistillationTrainer.compute_loss` reads."""

    vocab_size: int  # the student's output size: teacher ids beyond it carry no target
    # or samples / both (batches.targets_of) for datasets with samples; samples alone only where
    # the draws are from the whole distribution (not Manifest.tail_draws)
    targets: str = "topk"

    def __call__(self, examples: list[dict]) -> dict:
        b = collate([Row(e["row_id"], e["input_ids"], e["topk_ids"], e["topk_logprobs"],
                         e["target_mask"], sample_ids=e.get("sample_ids"),
                         sample_counts=e.get("sample_counts")) for e in examples],
                    self.vocab_size, self.targets)
        return {"input_ids": b.input_ids, "attention_mask": b.attention_mask, "pos": b.pos,
                "ids": b.ids, "lp": b.lp, "labels": b.labels,
                # The Trainer counts num_items_in_batch over shift_labels != -100: one per
                # target position (the next tokens are already aligned to the targets).
                "shift_labels": b.labels}


class DistillationTrainer(Trainer):
    """A `transformers.Trainer` whose default collator and loss are softlabels'.

    Extra keyword arguments are the CLI's loss options: `loss`, `ce_weight`, `temperature`,
    `beta`, `residual`, `chunk`.
    """

    loss_is_scaled_for_ga = True  # compute_loss normalises by the whole step's target tokens

    def __init__(self, *args, loss: str = "forward_kl", ce_weight: float = 0.5,
                 temperature: float = 1.0, beta: float = 0.5, residual: str = "label",
                 chunk: int = 1024, **kwargs):
        if loss not in LOSSES:
            raise ValueError(f"loss {loss!r}: choose from {', '.join(LOSSES)}")
        if residual != "none" and temperature != 1.0:
            raise ValueError(TAIL_TEMPERATURE)
        self.kd = {"loss": loss, "beta": beta, "temperature": temperature, "residual": residual,
                   "chunk": chunk}
        self.ce_weight = ce_weight
        model = kwargs.get("model", args[0] if args else None)
        if kwargs.get("data_collator") is None and model is not None:
            kwargs["data_collator"] = SoftLabelCollator(
                model.get_output_embeddings().weight.shape[0])
        targs = kwargs.get("args")
        if targs is not None:
            # the stored columns are not forward() arguments; dropping them would lose the targets
            targs.remove_unused_columns = False
            # each process collates its own rows (rows differ in length: batches cannot be
            # concatenated and dispatched from one process)
            targs.accelerator_config.dispatch_batches = False
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inner = self.accelerator.unwrap_model(model)
        decoder = inner.get_decoder()
        hidden = []
        hook = decoder.register_forward_hook(
            lambda _m, _a, out: hidden.append(out[0] if isinstance(out, tuple)
                                              else out.last_hidden_state))
        try:
            # through the (possibly DDP-wrapped) model, asking for no logits at all: the
            # output head runs below, chunk by chunk, on the target positions only
            model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                  logits_to_keep=torch.zeros(0, dtype=torch.long, device=inputs["pos"].device),
                  use_cache=False)
        finally:
            hook.remove()
        h = hidden[0].reshape(-1, hidden[0].shape[-1])[inputs["pos"]]  # (N, H)
        softcap = getattr(inner.config.get_text_config(), "final_logit_softcapping", None)
        kd, ce, _ = kd_ce_sums(h, inner.get_output_embeddings(), inputs["ids"], inputs["lp"],
                               inputs["labels"], softcap=softcap, **self.kd)
        w = self.ce_weight
        if num_items_in_batch is None:  # nothing counted: a per-micro-batch mean, scaled for GA
            n = max(len(inputs["ids"]), 1) * self.current_gradient_accumulation_steps
        else:
            n = num_items_in_batch
        loss = ((1 - w) * kd + w * ce) / n
        if (num_items_in_batch is not None and self.args.average_tokens_across_devices
                and self.accelerator.num_processes > 1):
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over ranks
        return (loss, {"loss": loss.detach()}) if return_outputs else loss
