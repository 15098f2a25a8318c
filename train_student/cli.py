"""`softlabels train` and `softlabels eval`: their flags, and the hand-over to train() and
evaluate's main. Nothing here imports torch, so `--help` answers at once; under `accelerate
launch` the same. The train flags are generated from TrainConfig's fields (one declaration each).
"""

from __future__ import annotations

import json

from softlabels.train_student.config import add_arguments, from_args

__all__ = ["add_arguments", "add_eval_arguments", "main"]


def main(args) -> int:
    from softlabels.train_student.train import train

    result = train(from_args(args))
    print(json.dumps(result))
    return 0


def add_eval_arguments(p) -> None:
    p.add_argument("--model", required=True, help="HF causal-LM folder (student or teacher)")
    p.add_argument("--data", required=True, nargs="+",
                   help="held-out soft-label dataset(s): a row (--json: an object) for each")
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the model folder run its own Python (auto_map); off by default")
