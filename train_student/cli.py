"""`softlabels train`: flags and/or --config -> TrainConfig -> train(); the same under
`accelerate launch`. The flags are generated from TrainConfig's fields (one declaration each)."""

from __future__ import annotations

import json

from softlabels.train_student.config import add_arguments, from_args

__all__ = ["add_arguments", "main"]


def main(args) -> int:
    from softlabels.train_student.train import train

    result = train(from_args(args))
    print(json.dumps(result))
    return 0
