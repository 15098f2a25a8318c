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
    p.add_argument("--data", nargs="+", default=[],
                   help="held-out soft-label dataset(s): a row (--json: an object) for each")
    p.add_argument("--teacher", help="HF causal-LM folder of the teacher, with --prompts: the "
                   "model writes continuations of each prompt and both score them (exact "
                   "reverse KL to the teacher, the teacher's NLL of them)")
    p.add_argument("--prompts", help="prompts for --teacher: any input `generate` reads")
    p.add_argument("--prompt-column", default="prompt", help="the prompts' column")
    p.add_argument("--max-prompts", type=int, default=0, help="the first N prompts (0: all)")
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="longest continuation, in tokens (it ends sooner at the model's EOS)")
    p.add_argument("--n", type=int, default=1, help="continuations per prompt")
    p.add_argument("--seed", type=int, default=0, help="the sampling seed")
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the model folder run its own Python (auto_map); off by default")
