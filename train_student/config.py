"""The trainer's one config. Each option is declared once, here: its type, default and help.

`add_arguments` turns the fields into `softlabels train` flags (`lora_r` -> `--lora-r`), and
`--config FILE` (YAML or JSON, keys as field names) supplies any of them; flags given on the
command line override the file. The resolved config is saved beside the output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from softlabels.data.errors import UserError

# The choices of the recipe's options, here with the flags (no torch is imported for --help);
# losses.py, batches.py and cross.py implement each.
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd")  # on the stored buckets
# token_reverse_kl: on-policy distillation's per-token reverse KL of the written tokens
LOSSES = (*DIVERGENCES, "token_reverse_kl")
RESIDUALS = ("tail", "label", "ground_truth", "none")
TARGETS = ("topk", "samples", "both")  # batches.targets_of
CROSS_LOSSES = ("auto", "alm", "dist", "both")  # cross.py
TAIL_TEMPERATURE = ("a temperature other than 1 with a residual (tail or label) is not exact: "
                    "the teacher's mass outside the top-k at T != 1 depends on tokens the "
                    "dataset does not store; use --residual none (softmax(top-k / T), exact on "
                    "the stored ids) or --temperature 1")
LABEL_RESIDUAL_LOSS = ("--residual ground_truth (and label without the label's log-prob: "
                       "datasets before format 4) puts the teacher's whole rest on the real next "
                       "token, a target for the student's full softmax: use it with --loss "
                       "forward_kl")

# The default CE mix per kind of targets: the best measured (BENCHMARKS.md, "Stored targets").
DEFAULT_CE = {"topk": 0.5, "samples": 0.0, "both": 0.0}
_DEFAULT_CE_TEXT = ", ".join(f"{k} {v}" for k, v in DEFAULT_CE.items())
SAMPLED_ONLY_FORWARD_KL = ("sampled targets estimate the teacher's whole distribution for the "
                           "student's full softmax: train them with --loss forward_kl, "
                           "--temperature 1 (they were drawn at the dataset's sample "
                           "temperature) and a residual other than none")


@dataclass(frozen=True)
class Recipe:
    """What a student learns from one dataset: which stored targets, and the loss on them.

    The one set of rules for every front end (`softlabels train`, the `transformers.Trainer`
    adapter, each dataset of a mixture): `check` refuses what no dataset could serve,
    `for_dataset` resolves `auto` and the default CE weight for a dataset and refuses what that
    dataset cannot serve, each in one line naming it."""

    targets: str = "auto"
    loss: str = "forward_kl"
    beta: float = 0.5
    ce_weight: float | None = None
    temperature: float = 1.0
    residual: str = "auto"

    def problems(self) -> list[str]:
        errors = []
        if self.targets not in ("auto", *TARGETS):
            errors.append(f"--targets {self.targets!r}: choose from auto, {', '.join(TARGETS)}")
        if self.loss not in LOSSES:
            errors.append(f"--loss {self.loss!r}: choose from {', '.join(LOSSES)}")
        if self.ce_weight is not None and not 0.0 <= self.ce_weight <= 1.0:
            errors.append("--ce-weight must be in [0, 1]")
        if not 0.0 < self.beta < 1.0:
            errors.append("--beta must be in (0, 1)")
        if self.temperature <= 0:
            errors.append("--temperature must be > 0")
        elif (self.residual not in ("none", "auto") and self.temperature != 1.0
              and self.ce_weight != 1.0):
            errors.append(TAIL_TEMPERATURE)
        if self.residual not in ("auto", *RESIDUALS):
            errors.append(f"--residual {self.residual!r}: choose from auto, "
                          f"{', '.join(RESIDUALS)}")
        return errors

    def for_dataset(self, m, name: str) -> Recipe:
        """This recipe with `auto` targets and the default CE weight chosen for the dataset whose
        Manifest is `m` (called `name` in messages), or a one-line UserError."""
        errors = self.problems()
        if errors:
            raise UserError("; ".join(errors))
        targets = self.targets
        if targets == "auto":
            targets = "both" if m.k and m.draws else "samples" if m.draws else "topk"
        if targets != "topk" and not m.draws:
            raise UserError(f"--targets {targets}: {name} has no sampled targets ({m.what}; "
                            "`softlabels generate --samples N` writes them)")
        if targets == "samples" and m.tail_draws:
            raise UserError(f"--targets samples: the draws of {name} come from outside its "
                            "top-k, so alone they miss its head: use --targets both (or auto)")
        if targets != "samples" and not m.k:
            raise UserError(f"--targets {targets}: {name} has no top-k (generated with "
                            "--samples only): use --targets samples")
        if targets == "both" and m.sample_temperature != 1.0:
            raise UserError(f"--targets both: the draws of {name} are from temperature "
                            f"{m.sample_temperature:g} and its top-k from temperature 1, so their "
                            "sum is no distribution of the teacher's: use --targets topk (or "
                            "regenerate the draws at --sample-temperature 1)")
        ce = DEFAULT_CE[targets] if self.ce_weight is None else self.ce_weight
        residual = self.residual
        if residual == "auto":  # the best measured for what the dataset stores
            residual = ("none" if m.topk_renormalised else "label" if m.label_logprobs else
                        "ground_truth")
            if residual != "none" and self.temperature != 1.0 and ce < 1.0:
                raise UserError(TAIL_TEMPERATURE)
        elif residual == "label" and not m.label_logprobs and ce < 1.0 and targets != "samples":
            raise UserError(f"--residual label: {name} ({m.what}) has no label log-probs; "
                            "--residual ground_truth puts the teacher's whole rest onto the real "
                            "next token (auto picks it for such a dataset)")
        if targets != "topk" and ce < 1.0 and (self.loss != "forward_kl" or
                                               self.temperature != 1.0 or
                                               residual == "none"):
            raise UserError(SAMPLED_ONLY_FORWARD_KL)
        if m.topk_renormalised and residual != "none" and ce < 1.0:
            raise UserError(f"--residual {residual}: {name} ({m.what}) stores its top-k "
                            "renormalised over the k, so the teacher's mass outside it is "
                            "unknown; use --residual none (the default there)")
        if (targets == "topk" and self.loss != "forward_kl" and ce < 1.0 and (
                residual == "ground_truth" or residual == "label" and not m.label_logprobs)):
            raise UserError(f"{name} ({m.what}): {LABEL_RESIDUAL_LOSS}")
        if (self.loss == "reverse_kl" and residual != "none" and ce < 1.0
                and not (m.exact_tail and m.format_version >= 4)):
            raise UserError(f"--loss reverse_kl with --residual {residual}: {name} ({m.what}) "
                            "has no exact tail, only 1 - its stored top-k, which is 0 where the "
                            "teacher is confident (8,498 nats/token against 5.77 measured); use "
                            "--residual none, or regenerate it with `softlabels generate`")
        if self.loss == "token_reverse_kl" and ce < 1.0:
            if not (m.provenance.get("sampling") and m.label_logprobs):
                raise UserError(f"--loss token_reverse_kl: {name} ({m.what}) holds no written "
                                "responses with the teacher's log-prob of each token: it is for "
                                "datasets of `generate --generate-responses` (on-policy: "
                                "--response-model STUDENT)")
            if self.temperature != 1.0:
                raise UserError("--loss token_reverse_kl is the reverse KL of the teacher at "
                                "temperature 1 on the tokens written: drop --temperature")
        return replace(self, targets=targets, ce_weight=ce, residual=residual)

    def describe(self, m) -> str:
        """What a resolved recipe trains on a dataset with manifest `m`, in words."""
        what = {"topk": f"top-{m.k}", "samples": f"{m.draws} draws",
                "both": f"top-{m.k} + {m.draws} draws" + " outside it" * m.tail_draws}
        rest = {"tail": "the rest as a tail bucket", "none": "renormalised",
                "label": "the real next token's own mass" if m.label_logprobs else
                "the rest onto the real next token",
                "ground_truth": "the rest onto the real next token"}
        exact = ("" if self.targets == "samples" else  # draws alone have no tail
                 " (exact tail)" if m.exact_tail and m.format_version >= 4 else
                 f" (renormalised by its source, {m.what})" if m.topk_renormalised else
                 f" (tail from 1 - its top-k, {m.what})")
        if self.loss == "token_reverse_kl":
            return ("the written tokens, per-token reverse KL (policy gradient, importance "
                    f"weights to the writer's log-prob), CE weight {self.ce_weight:g}")
        return (f"{what[self.targets]}{exact}, {self.loss}"
                + (f", {rest[self.residual]}" if self.targets == "topk" else "")
                + f", CE weight {self.ce_weight:g}")


def opt(default, help: str, **argparse_kw):
    """A config field: its default and the help its flag shows."""
    return field(default=default, metadata={"help": help, **argparse_kw})


@dataclass(frozen=True)
class TrainConfig:
    student: str = opt(None, "HF causal-LM folder to fine-tune, or a JSON/YAML model config "
                             "(fresh student)")
    data: tuple[str, ...] = opt((), "soft-label dataset folder or URL (s3://, gs://, hf://), "
                                    "or several: each step's target "
                                    "tokens come from them in the proportions --data-weights "
                                    "gives")
    data_weights: tuple[float, ...] = opt((), "share of each --data in every step's target "
                                              "tokens, in order (normalised); default: "
                                              "proportional to their target tokens")
    output: str = opt(None, "where the trained student goes")
    loss: tuple[str, ...] = opt(
        ("forward_kl",), "divergence on the teacher's top-k + tail, for every --data or one per "
        "--data (reverse KL on the student's own responses, forward KL on a corpus); "
        "token_reverse_kl: on-policy distillation's per-token reverse KL of written responses "
        "(the teacher's log-prob of each token the student wrote, as a policy-gradient "
        "advantage)", choices=LOSSES)
    beta: float = opt(0.5, "JSD's mixing weight / skew KL's alpha")
    targets: tuple[str, ...] = opt(("auto",), "stored targets to train on, for every --data "
                                              "or one per --data: topk, samples (the draws, an "
                                              "unbiased estimate of the full distribution), both "
                                              "(the top-k exactly, the mass outside it shared "
                                              "among the draws outside it); auto: what the "
                                              "dataset carries, both if both",
                                   choices=("auto", *TARGETS))
    ce_weight: tuple[float, ...] = opt((), "loss = (1 - w) KD + w CE on the hard next tokens (1 "
                                           "= CE only), for every --data or one per --data; "
                                           "default: the best measured for the targets "
                                           f"({_DEFAULT_CE_TEXT})")
    temperature: float = opt(1.0, "softmax temperature of both sides")
    # The defaults (label residual, ce_weight 0.5) are the best stored-top-k recipe measured
    # (BENCHMARKS.md, "Where the mass outside the top-k goes"): better than CE-only on the mean of
    # 3 seeds; the tail bucket + 0.5 CE only matched it.
    residual: str = opt("auto", "where the teacher's mass outside the top-k goes: label (the real "
                                "next token its own mass, the rest a tail bucket), ground_truth "
                                "(all of it onto the real next token; forward_kl), tail (a "
                                "(k+1)-th bucket), none (renormalise the top-k), or auto: label; "
                                "ground_truth where the dataset has no label log-probs (formats "
                                "1-3, DistillKit imports); none where its top-k is renormalised "
                                "(axolotl imports)",
                        choices=("auto", *RESIDUALS))
    student_tokenizer: str | None = opt(None, "tokenizer folder of a fresh student (--student "
                                              "a config file) other than the teacher's: the "
                                              "training is then cross-tokenizer")
    cross_loss: str = opt("auto", "with a student tokenizer other than the teacher's: dist "
                                  "(the teacher's next-token distributions carried onto the "
                                  "student's tokens), alm (chunk likelihoods, approximate "
                                  "likelihood matching), both, or auto: alm where the student "
                                  "has 3 or more tokens per teacher token in the data's first "
                                  "rows or its tokenizer does not keep bytes, else dist",
                          choices=CROSS_LOSSES)
    max_steps: int = opt(0, "optimiser steps; 0: use --epochs")
    epochs: int = opt(1, "passes over the data when --max-steps is 0")
    batch_tokens: int = opt(4096, "tokens per micro-batch and process")
    grad_accum: int = opt(1, "micro-batches per optimiser step")
    lr: float = opt(1e-3, "peak learning rate (linear warm-up, cosine to 10 %)")
    warmup: int = opt(20, "warm-up steps")
    weight_decay: float = opt(0.01, "AdamW weight decay on matrices")
    max_grad_norm: float = opt(1.0, "gradient clipping; 0: off")
    mixed_precision: str = opt("no", "Accelerate mixed precision", choices=["no", "bf16", "fp16"])
    gradient_checkpointing: bool = opt(False, "recompute the student's layers in the backward "
                                              "pass (less memory, ~30 % more compute)")
    lora_r: int = opt(0, "LoRA rank; 0: full fine-tuning")
    lora_alpha: float = opt(16.0, "LoRA scale numerator (the update is scaled by alpha / r)")
    lora_targets: tuple[str, ...] = opt(("all-linear",), "module names LoRA adapts "
                                                         "(peft's all-linear: every linear "
                                                         "layer but the output head)")
    save_adapter: bool = opt(False, "with LoRA, also keep the adapter in OUTPUT/adapter "
                                    "(the model saved is always merged)")
    cache_dir: str = opt("", "with a --data URL: keep the checked byte ranges it reads here, so "
                             "a second epoch or run reads them from disk ('': no cache)")
    cache_gb: float = opt(20.0, "size limit of --cache-dir in GB (oldest ranges go first)")
    eval_data: tuple[str, ...] = opt((), "held-out soft-label dataset(s), each evaluated "
                                         "apart (and their token-weighted mean)")
    eval_every: int = opt(0, "steps between evaluations")
    save_every: int = opt(0, "steps between checkpoints")
    resume: bool = opt(False, "continue from the latest checkpoint in OUTPUT")
    continue_from: str = opt("", "a checkpoint folder of an earlier run (OUT/checkpoints/step-N): "
                                 "its weights, optimizer state and step count go on, over this "
                                 "run's --data from its start (on-policy rounds); --max-steps "
                                 "counts from step 0 of the first run. --resume, where OUTPUT "
                                 "has a checkpoint, comes first")
    schedule_steps: int = opt(0, "steps the learning-rate schedule spans (0: the run's own "
                                 "steps): a run continued by others keeps one schedule")
    seed: int = opt(0, "seed of the data order and initialisation")
    chunk: int = opt(0, "positions per lm_head chunk (memory: ~3 x chunk x vocab floats at "
                        "once); 0: 2^26 / vocab, rounded to a power of 2 in [64, 4096]")
    cpu: bool = opt(False, "train on the CPU even if a GPU exists")
    report_to: tuple[str, ...] = opt(("tensorboard",), "trackers, any Accelerate supports "
                                                       "(tensorboard, wandb, mlflow, ...)")
    trust_remote_code: bool = opt(False, "let the student folder run its own Python (auto_map)")

    def __post_init__(self):
        for name in ("data", "data_weights", "targets", "loss", "ce_weight", "eval_data"):
            v = getattr(self, name)  # a scalar is one value for all
            if v is not None and not isinstance(v, (tuple, list)):
                object.__setattr__(self, name, (v,))
            elif isinstance(v, list):
                object.__setattr__(self, name, tuple(v))
        errors = [f"--{n.replace('_', '-')} is required" for n in ("student", "data", "output")
                  if not getattr(self, n)]
        lengths = [f"--{n.replace('_', '-')} takes one value, or one per --data "
                   f"({len(self.data)})" for n in ("targets", "loss", "ce_weight")
                   if len(getattr(self, n)) not in (0, 1, len(self.data))]
        errors += lengths
        if not lengths:
            for i in range(max(1, len(self.data))):
                errors += [e for e in self.recipe(i).problems() if e not in errors]
        for flag, folders in (("--data", self.data), ("--eval-data", self.eval_data)):
            seen = [os.path.realpath(f) if "://" not in str(f) else str(f) for f in folders]
            twice = [f for i, f in enumerate(folders) if seen[i] in seen[:i]]
            if twice:  # trained (or averaged) twice per epoch without a word
                errors.append(f"{flag} names {twice[0]} twice: give each dataset once (to "
                              "weigh one dataset more, use --data-weights)")
        if self.cross_loss not in CROSS_LOSSES:
            errors.append(f"--cross-loss {self.cross_loss!r}: choose from "
                          f"{', '.join(CROSS_LOSSES)}")
        if self.batch_tokens < 1 or self.grad_accum < 1 or self.chunk < 0:
            errors.append("--batch-tokens and --grad-accum must be >= 1, --chunk >= 0")
        if self.max_steps <= 0 and self.epochs <= 0:
            errors.append("give --max-steps N or --epochs N")
        if self.schedule_steps < 0:
            errors.append("--schedule-steps must be >= 0")
        if self.continue_from and not (Path(self.continue_from) /
                                       "custom_checkpoint_0.pkl").is_file():
            errors.append(f"--continue-from {self.continue_from} is not a training checkpoint "
                          "(OUTPUT/checkpoints/step-N of a `softlabels train` run)")
        if not (self.cache_gb > 0 and math.isfinite(self.cache_gb)):
            errors.append(f"--cache-gb {self.cache_gb}: must be a size > 0 in GB")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            errors.append("--mixed-precision must be no, bf16 or fp16")
        if self.lora_r < 0 or (self.lora_r and not self.lora_targets):
            errors.append("--lora-r must be >= 0, with at least one --lora-targets name")
        if self.save_adapter and not self.lora_r:
            errors.append("--save-adapter needs --lora-r")
        if errors:
            raise UserError("; ".join(errors))

    def recipe(self, i: int = 0) -> Recipe:
        """The recipe of --data number i (the values given once apply to every dataset)."""
        def at(v: tuple):
            return v[i] if len(v) > 1 else v[0] if v else None

        return Recipe(targets=at(self.targets) or "auto", loss=at(self.loss) or "forward_kl",
                      beta=self.beta, ce_weight=at(self.ce_weight),
                      temperature=self.temperature, residual=self.residual)

    def to_json(self, resolved: dict | None = None) -> str:
        """The config as given, with `resolved` (what the objective made of `auto` and the
        default CE weights: objective.resolved()) in place of those options, as run."""
        return json.dumps({**asdict(self), **(resolved or {})}, indent=2) + "\n"


def _kind(name: str):
    """The plain type behind a field's annotation: str, int, float, bool, or tuple."""
    t = typing.get_type_hints(TrainConfig)[name]
    if typing.get_origin(t) is tuple:
        return tuple
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return args[0] if args else t


def _item(name: str):
    """The type of a tuple field's items (str or float)."""
    return typing.get_args(typing.get_type_hints(TrainConfig)[name])[0]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML or JSON file of options (keys as the flags, - or _); flags given "
                   "on the command line override it")
    for f in fields(TrainConfig):
        kind = _kind(f.name)
        text = f"{f.metadata['help']} (default: {_shown(f.default)})".replace("%", "%%")
        kw = {"default": argparse.SUPPRESS,  # absent flags fall back to the file, then the field
              "help": text}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif kind is tuple:
            kw["nargs"] = "+"
            kw["type"] = _item(f.name)
        else:
            kw["type"] = kind
        p.add_argument("--" + f.name.replace("_", "-"), **kw)


def _shown(v) -> str:
    return " ".join(map(str, v)) if isinstance(v, tuple) else str(v)


def from_args(args: argparse.Namespace) -> TrainConfig:
    """Field defaults, then the --config file, then the flags given."""
    values = load_config_file(args.config) if getattr(args, "config", None) else {}
    names = {f.name for f in fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return TrainConfig(**values)


def load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {path} does not exist")
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            d = yaml.safe_load(p.read_text()) or {}
        else:
            d = json.loads(p.read_text())
    except Exception as e:  # yaml and json raise their own types; the message says where
        raise UserError(f"--config {path} is not valid {p.suffix[1:] or 'JSON'}: "
                        f"{str(e).splitlines()[0]}") from e
    if not isinstance(d, dict):
        raise UserError(f"--config {path} must hold a mapping of option: value")
    names = {f.name: f for f in fields(TrainConfig)}
    out, unknown = {}, []
    for key, value in d.items():
        name = str(key).replace("-", "_")
        if name not in names:
            unknown.append(str(key))
            continue
        kind = _kind(name)
        if kind is tuple:  # one value, or a list of them
            item = _item(name)
            value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
            if not all(_fits(v, item) for v in value):
                raise UserError(f"--config {path}: {key} should be {item.__name__} or a list of "
                                f"them, got {list(value)!r}")
        elif not (value is None or _fits(value, kind)):
            raise UserError(f"--config {path}: {key} should be {kind.__name__}, got {value!r}")
        out[name] = value
    if unknown:
        raise UserError(f"--config {path}: unknown option(s) {', '.join(unknown)}; the options "
                        "are the `softlabels train` flags")
    return out


def _fits(value, kind) -> bool:
    """A config file's value is of this kind (an int does for a float, a bool for nothing else)."""
    if isinstance(value, bool) and kind is not bool:
        return False
    return isinstance(value, kind) or (kind is float and isinstance(value, int))
