"""The trainer's one config: defaults live here, the resolved config is saved beside the output."""

from __future__ import annotations

from dataclasses import dataclass, fields

from softlabels.data.errors import UserError
from softlabels.train_student.losses import LOSSES


@dataclass(frozen=True)
class TrainConfig:
    student: str
    data: str
    output: str
    loss: str = "forward_kl"
    beta: float = 0.5  # JSD's mixing weight / skew KL's alpha
    ce_weight: float = 0.0  # loss = (1 - w) * KD + w * CE on the hard next tokens
    temperature: float = 1.0
    tail: bool = True  # (k+1)-th bucket for the mass outside the top-k; False: renormalise
    max_steps: int = 0  # 0: use epochs
    epochs: int = 1
    batch_tokens: int = 4096  # per process and micro-batch
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    eval_data: str | None = None
    eval_every: int = 0
    save_every: int = 0
    resume: bool = False
    seed: int = 0
    chunk: int = 1024  # positions per lm_head chunk
    cpu: bool = False
    trust_remote_code: bool = False  # the student folder's own Python runs only when asked

    def __post_init__(self):
        errors = []
        if self.loss not in LOSSES:
            errors.append(f"--loss {self.loss!r}: choose from {', '.join(LOSSES)}")
        if not 0.0 <= self.ce_weight <= 1.0:
            errors.append("--ce-weight must be in [0, 1]")
        if not 0.0 < self.beta < 1.0:
            errors.append("--beta must be in (0, 1)")
        if self.temperature <= 0:
            errors.append("--temperature must be > 0")
        if self.batch_tokens < 1 or self.grad_accum < 1 or self.chunk < 1:
            errors.append("--batch-tokens, --grad-accum and --chunk must be >= 1")
        if self.max_steps <= 0 and self.epochs <= 0:
            errors.append("give --max-steps N or --epochs N")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            errors.append("--mixed-precision must be no, bf16 or fp16")
        if errors:
            raise UserError("; ".join(errors))

    @classmethod
    def from_args(cls, args) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})
