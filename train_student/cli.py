"""`softlabels train`: arguments -> TrainConfig -> train(); unchanged under `accelerate launch`."""

from __future__ import annotations

import argparse
import json

from softlabels.train_student.config import TrainConfig
from softlabels.train_student.losses import LOSSES

D = TrainConfig.__dataclass_fields__


def add_arguments(p) -> None:
    def default(name):
        return D[name].default

    p.add_argument("--student", required=True,
                   help="HF causal-LM folder to fine-tune, or a JSON/YAML model config (fresh)")
    p.add_argument("--data", required=True, help="soft-label dataset folder")
    p.add_argument("--output", required=True, help="where the trained student goes")
    p.add_argument("--loss", default=default("loss"), choices=LOSSES)
    p.add_argument("--beta", type=float, default=default("beta"),
                   help="JSD beta / skew KL alpha (default 0.5)")
    p.add_argument("--ce-weight", type=float, default=default("ce_weight"),
                   help="loss = (1-w) KD + w CE on the hard next tokens (1.0 = CE only)")
    p.add_argument("--temperature", type=float, default=default("temperature"))
    p.add_argument("--tail", action=argparse.BooleanOptionalAction, default=default("tail"),
                   help="(k+1)-th bucket for the mass outside the top-k (default) or renormalise")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--max-steps", type=int, default=default("max_steps"))
    g.add_argument("--epochs", type=int, default=default("epochs"))
    p.add_argument("--batch-tokens", type=int, default=default("batch_tokens"),
                   help="tokens per micro-batch and process")
    p.add_argument("--grad-accum", type=int, default=default("grad_accum"))
    p.add_argument("--lr", type=float, default=default("lr"))
    p.add_argument("--warmup", type=int, default=default("warmup"), help="warm-up steps")
    p.add_argument("--weight-decay", type=float, default=default("weight_decay"))
    p.add_argument("--mixed-precision", default=default("mixed_precision"),
                   choices=["no", "bf16", "fp16"])
    p.add_argument("--eval-data", default=None, help="held-out soft-label dataset")
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations")
    p.add_argument("--save-every", type=int, default=0, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--seed", type=int, default=default("seed"))
    p.add_argument("--chunk", type=int, default=default("chunk"),
                   help="positions per lm_head chunk (memory)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU exists")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the student folder run its own Python (auto_map); off by default")


def main(args) -> int:
    from softlabels.train_student.train import train

    result = train(TrainConfig.from_args(args))
    print(json.dumps({k: v for k, v in result.items()}))
    return 0
