"""Stored soft targets in a `transformers.Trainer` (and so TRL): a dataset, a collator, a loss.

from softlabels.train_student.hf import DistillationTrainer, soft_label_dataset

    trainer = DistillationTrainer(model=student, args=TrainingArguments(..., max_steps=500),
                                  train_dataset=soft_label_dataset("targets/"))
    trainer.train()

A thin shell over what `softlabels train` uses, never a second implementation: rows come from
`SoftLabelReader` (the same value and hash checks), the recipe from `Recipe.for_dataset` (the same
defaults for the dataset and the same one-line refusals), batches and the loss from the CLI's
objective (objective.py; chunked lm_head: no (tokens, vocab) logits for the batch); a student
with a tokenizer of its own (`processing_class=`) gets `softlabels train --student-tokenizer`'s
objective (cross.py). Under gradient
accumulation and across processes the KD loss is normalised by the number of target tokens of
the whole step and the CE loss by the number of CE tokens (positions with a known next token),
as the CLI does, not averaged per micro-batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer

from softlabels.data.errors import UserError
from softlabels.data.format import Row
from softlabels.data.heads import decoder_of, logit_transform
from softlabels.data.store import is_url
from softlabels.train_student.losses import head_chunk
from softlabels.train_student.objective import SameTokenizer

_MARK = "softlabels"  # key of the dataset's description that names its folder


def _rows(paths: list[str], weights, shuffle: bool, seed: int):
    from softlabels.train_student.batches import writer_logprobs
    from softlabels.train_student.mixture import Mixture

    mix = Mixture(paths, weights, seed=seed, shuffle=shuffle)
    epoch = 0
    while True:  # a stream: the Trainer's max_steps decides when to stop
        n = len(mix.index(epoch).tokens)
        for a in range(0, n, 256):
            rows, sources = mix.read(epoch, np.arange(a, min(a + 256, n)))
            for r, d in zip(rows, sources.tolist()):
                r.writer_logprob = writer_logprobs(r)  # (the response text is not passed on)
                yield {**{k: v for k, v in vars(r).items() if v is not None and k != "response"},
                       "source": d}
        epoch += 1


def soft_label_dataset(path, weights=None, shuffle: bool = True, seed: int = 0):
    """The stored rows of a soft-label dataset, or of several mixed in `weights` proportions of
    target tokens (default: their sizes), as a streaming `datasets.IterableDataset`.

    Rows are decoded and checked by this package's reader, one row group in memory at a time, so
    a dataset of any size streams; it repeats epoch after epoch (set `max_steps`). Examples are
    numpy arrays: `input_ids` (T,), `target_mask` (T,), `topk_ids`/`topk_logprobs` (T, k),
    `tail_logprob` and `label_logprob` (T,) (format 4), on a dataset generated with --samples
    `sample_ids`/`sample_counts` (T, U); and `source`, the row's dataset. The description names
    the folders, so `DistillationTrainer` reads their manifests and trains what
    `softlabels train --data ...` would.
    """
    import datasets

    from softlabels.data.manifest import Manifest
    from softlabels.train_student.mixture import check_weights

    paths = [p if is_url(p) else str(Path(p).resolve())
             for p in ([path] if isinstance(path, (str, Path)) else path)]
    for p in paths:  # not a dataset: one line now, not an error inside the Trainer's loop
        Manifest.load(p)
    check_weights(weights, len(paths))
    # tuples: `datasets` would split lists in gen_kwargs into shards, one dataset each
    ds = datasets.IterableDataset.from_generator(_rows, gen_kwargs={
        "paths": tuple(paths), "weights": None if weights is None else tuple(weights),
        "shuffle": shuffle, "seed": seed})
    ds.info.description = json.dumps({_MARK: paths})
    return ds


def dataset_folders(ds) -> list[str] | None:
    """The folders `soft_label_dataset` read, or None for another dataset."""
    try:
        return list(json.loads(ds.info.description)[_MARK])
    except (AttributeError, TypeError, ValueError, KeyError):
        return None


@dataclass
class SoftLabelCollator:
    """Examples of `soft_label_dataset` -> the tensors `DistillationTrainer.compute_loss` reads:
    the objective's batch (objective.py), as `softlabels train` collates it."""

    objective: object  # objective.SameTokenizer or cross.Cross

    def __call__(self, examples: list[dict]) -> dict:
        sources = [e.get("source", 0) for e in examples]
        rows = [Row(**{k: v for k, v in e.items() if k != "source"}) for e in examples]
        return vars(self.objective.collate(rows, sources))


class DistillationTrainer(Trainer):
    """A `transformers.Trainer` whose collator and loss are `softlabels train`'s.

    Extra keyword arguments are the CLI's recipe options, with its defaults: `targets` (auto:
    what each dataset carries; one for all or a list, one per dataset), `loss` (one or a list),
    `ce_weight` (None: the default for the targets; one or a list), `beta`, `temperature`,
    `residual`; and `chunk`. `train_dataset` must come from `soft_label_dataset`: the manifests
    decide the defaults and what is refused, as for the CLI. A `processing_class` tokenizer other
    than the datasets' trains the student on its own tokens (`--student-tokenizer`), with
    `cross_loss` (auto, dist, alm or both) and one `ce_weight` (None: the CLI's default for it).
    """

    loss_is_scaled_for_ga = True  # compute_loss normalises by the whole step's token counts

    def __init__(self, *args, targets="auto", loss="forward_kl", ce_weight=None,
                 temperature: float = 1.0, beta: float = 0.5, residual: str = "auto",
                 chunk: int = 0, cross_loss: str = "auto", **kwargs):
        from softlabels.data.dataset import load_tokenizer
        from softlabels.data.manifest import Manifest
        from softlabels.train_student.config import TrainConfig
        from softlabels.train_student.cross import Cross
        from softlabels.train_student.mixture import Mixture
        from softlabels.train_student.student import check_student

        folders = dataset_folders(kwargs.get("train_dataset"))
        if folders is None:
            raise UserError("DistillationTrainer trains on stored soft targets: pass "
                            "train_dataset=soft_label_dataset(folder)")
        # the CLI's config: the same per-dataset values and the same checks
        cfg = TrainConfig(student="-", data=tuple(folders), output="-", targets=targets,
                          ce_weight=() if ce_weight is None else ce_weight, loss=loss,
                          beta=beta, temperature=temperature, residual=residual,
                          cross_loss=cross_loss)
        tokenizer = kwargs.get("processing_class")
        self.recipes = [cfg.recipe(i).for_dataset(Manifest.load(f), f)
                        for i, f in enumerate(folders)]
        targets = [r.targets for r in self.recipes]
        self.cross = None if tokenizer is None else Cross.setup(
            tokenizer, Mixture(folders, shuffle=False), cfg, targets)
        self.chunk = chunk
        model = kwargs.get("model", args[0] if args else None)
        if model is not None:  # the CLI's guards (a model_init model is checked by neither)
            check_student(model, tokenizer or load_tokenizer(folders[0]))
        vocab = model.get_output_embeddings().weight.shape[0] if model is not None else 0
        self.objective = self.cross or SameTokenizer(self.recipes, vocab)
        if kwargs.get("data_collator") is None and (self.cross is not None or model is not None):
            kwargs["data_collator"] = SoftLabelCollator(self.objective)
        targs = kwargs.get("args")
        if targs is not None:
            # the stored columns are not forward() arguments; dropping them would lose the targets
            targs.remove_unused_columns = False
            # each process collates its own rows (rows differ in length: batches cannot be
            # concatenated and dispatched from one process)
            targs.accelerator_config.dispatch_batches = False
        super().__init__(*args, **kwargs)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The step's micro-batches and its (KD targets, CE targets) over every process, or for
        a student of its own tokenizer its (target tokens, chunks, chunk starts): what the loss
        is normalised by, as in `softlabels train`."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        counts = torch.tensor([self.objective.batch_counts(b) for b in batches],
                              dtype=torch.long)
        w = self.objective.n_counts
        counts = counts.reshape(-1, w).sum(0).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.gather(counts).reshape(-1, w).sum(0)
        return batches, counts

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inner = self.accelerator.unwrap_model(model)
        decoder = decoder_of(inner)
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
        transform = logit_transform(inner.config, "student")
        w = self.objective.n_counts
        if torch.is_tensor(num_items_in_batch) and num_items_in_batch.numel() == w:
            counts = num_items_in_batch.tolist()
            scale = (self.accelerator.num_processes if self.args.average_tokens_across_devices
                     and self.accelerator.num_processes > 1 else 1)  # DDP averages gradients
        else:  # evaluation: this batch alone
            counts, scale = self.objective.batch_counts(inputs), 1
        head = inner.get_output_embeddings()
        sums = self.objective.sums(hidden[0], self.objective.unpack(inputs), head,
                                   head_chunk(head.weight.shape[0], self.chunk), transform,
                                   self.objective.coefficients(counts, hidden[0].device))
        loss = self.objective.loss(sums, counts) * scale
        return (loss, {"loss": loss.detach()}) if return_outputs else loss
