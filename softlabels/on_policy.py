"""`softlabels on-policy`: on-policy distillation in rounds, the teacher only ever in batch jobs.

Each round: the current student writes responses to the prompts and the teacher scores every
token it wrote (`softlabels generate --generate-responses --response-model`, one scheduled job:
the embedded cluster, TLS workers or Slurm); then the student trains on that round's dataset
(with --mix-earlier-rounds K also the K rounds' before it, with --mix off-policy datasets)
(`softlabels train --continue-from` the previous round's last checkpoint: weights, optimizer
state and step count go on, one learning-rate schedule over all rounds); then, with
--eval-prompts, `softlabels eval` measures the reverse KL to the teacher on the student's own
continuations. Each stage is the ordinary command, so every round's dataset is an ordinary
soft-label dataset and each stage resumes as that command does.

A round's fixed cost is kept out of the rounds after the first (at the bench's size it was three
quarters of a round). generate runs in this process, so on the embedded cluster one cluster
serves every round: its workers keep the teacher's engine and load each round's student into the
writer's engine in place (vLLM's reload_weights), where both engines fit; on GPUs the embedded
workers drop their engines after each job (training here needs the memory). Long-lived workers
(--scheduler) keep both where they fit (on GPUs: when --engine-arg gpu_memory_utilization splits
the device); --cluster's worker jobs end with each round's job. Training runs in one child
process kept across rounds (`Trainer`): never in the process that holds a cluster, and holding no
model between rounds. Eval runs as its own command.

OUTPUT/
    rounds.json            per round: checkpoint, teacher tokens scored, wall time per stage, eval
    round-R/prompts.jsonl  with --prompts-per-round K: the round's K prompts (the next K, wrapping)
    round-R/data/          the round's dataset (written by the student of round R - 1)
    round-R/student/       the student after round R (model, tokenizer, checkpoints/, logs)

Interrupted anywhere, the same command resumes: finished rounds are skipped, a stage whose
output is complete is not rerun, and the others resume (generate's units are exactly-once;
training restarts the round from the previous round's checkpoint, with the same seed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from softlabels.data.atomic import write_text
from softlabels.data.errors import UserError

# generate's flags that on-policy sets itself (or that make no sense for rollouts)
GENERATE_OWN = {"--teacher", "--input", "--output", "--text-column", "--prompt-column",
                "--response-column", "--messages-column", "--generate-responses",
                "--response-model", "--temperature", "--top-p", "--seed", "--samples",
                "--sample-temperature", "--stride", "--dry-run", "--calibrate",
                "--print-job-script", "--trust-remote-code"}
# train's flags that on-policy sets itself
TRAIN_OWN = {"--config", "--student", "--data", "--output", "--max-steps",
             "--epochs", "--resume", "--continue-from", "--schedule-steps", "--save-every",
             "--seed", "--trust-remote-code", "--student-tokenizer", "--cross-loss"}
# round r's rollouts use seed + r * ROUND_SEED (prompt i: that + i): rounds of up to a million
# prompts share no draws, and the seed stays within what vLLM takes (2**32)
ROUND_SEED = 1_000_003
# The objective unless --loss / --ce-weight say otherwise: the best measured on student-written
# data (BENCHMARKS.md, "On-policy distillation in batch rounds"): reverse KL over the teacher's
# top-k and its exact tail; CE on the student's own tokens would teach it what it wrote.
DEFAULT_OBJECTIVE = {"loss": ["--loss", "reverse_kl"], "ce_weight": ["--ce-weight", "0"]}
# The rounds' --top-k unless given: on its own continuations a student far from the teacher puts
# a third to half of its mass outside the teacher's top-64, where the stored tail sees about half
# of that part's reverse KL; the top-256 lowered on-policy's reverse KL by 4-6 % on every seed
# (off-policy KD: no change), for 4x the bytes per round token (BENCHMARKS.md; measured from the
# bench's 600-step student, before it was trained to convergence: not rechecked since).
ROUND_TOP_K = 256


class _Flags:
    """Adds another command's flags to a group of `root`'s, but `skip`, and remembers them
    (`kept`) to hand the values given back to that command. The command's own groups become
    groups of `root` (argparse deprecates nesting them)."""

    def __init__(self, root, title: str, skip: set[str], kept: list):
        self.root, self.skip, self.kept = root, skip, kept
        self.p = root.add_argument_group(title)

    def add_argument(self, *names, **kw):
        if names[0] in self.skip:
            return None
        action = self.p.add_argument(*names, **kw)
        self.kept.append(action)
        return action

    def add_argument_group(self, title: str, *args, **kw):
        return _Flags(self.root, title, self.skip, self.kept)


def argv_of(args: argparse.Namespace, actions: list) -> list[str]:
    """The command-line flags of `actions` whose values in `args` differ from their defaults
    (train's flags have none: absent unless given)."""
    out = []
    for a in actions:
        if not hasattr(args, a.dest):
            continue
        v, flag = getattr(args, a.dest), a.option_strings[0]
        if v == a.default:
            continue
        if isinstance(a, argparse.BooleanOptionalAction):
            out.append(flag if v else "--no-" + flag[2:])
        elif a.nargs == 0:
            out += [flag] * bool(v)
        elif isinstance(v, list) and a.nargs != "+":  # an append action
            for x in v:
                out += [flag, str(x)]
        elif isinstance(v, (list, tuple)):
            out += [flag, *map(str, v)]
        else:
            out += [flag, str(v)]
    return out


_GENERATE: list = []
_TRAIN: list = []


def add_arguments(p: argparse.ArgumentParser) -> None:
    from softlabels.generate.cli import add_arguments as generate_arguments
    from softlabels.train_student.config import add_arguments as train_arguments

    p.add_argument("--teacher", required=True, help="HF causal-LM folder of the teacher")
    p.add_argument("--student", required=True, help="HF causal-LM folder of the student to "
                   "start from, with the teacher's tokenizer (it writes round 0's responses)")
    p.add_argument("--prompts", required=True, help="prompts: any input `generate` reads")
    p.add_argument("--prompt-column", default="prompt", help="the prompts' column")
    p.add_argument("--messages-column", default=None,
                   help="or a chat column (the last assistant turn, if any, is answered anew)")
    p.add_argument("--rounds", type=int, required=True, help="rollout -> score -> train rounds")
    p.add_argument("--prompts-per-round", type=int, default=0, metavar="K",
                   help="each round the next K prompts, wrapping around (default 0: all of "
                   "them every round); fewer prompts a round buys more rounds on the same "
                   "teacher tokens, each on fresher rollouts")
    p.add_argument("--steps-per-round", type=int, required=True,
                   help="optimiser steps each round trains")
    p.add_argument("--output", required=True, help="folder of the rounds (resumable)")
    p.add_argument("--mix", nargs="+", default=[], metavar="DATASET",
                   help="other soft-label datasets (off-policy: a corpus, teacher-written "
                   "responses) mixed into every round's training, in --data-weights' "
                   "proportions (this round's data first)")
    p.add_argument("--mix-earlier-rounds", type=int, default=0, metavar="K",
                   help="also train each round on the K rounds' datasets before it (older "
                   "rollouts); they share the round's --data-weights share "
                   "equally and take its other per-dataset values (--loss, --ce-weight, "
                   "--targets)")
    p.add_argument("--eval-prompts", default=None,
                   help="held-out prompts: after each round the student writes continuations "
                   "and `softlabels eval` gives the exact reverse KL to the teacher on them")
    p.add_argument("--eval-max-prompts", type=int, default=64)
    p.add_argument("--eval-max-new-tokens", type=int, default=None,
                   help="(default: --max-new-tokens)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the rollouts (round r: its own draws) and of training")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let the model folders run their own Python (auto_map)")
    _GENERATE.clear()
    _TRAIN.clear()
    generate_arguments(_Flags(p, "rollouts and scoring (softlabels generate's flags)",
                              GENERATE_OWN, _GENERATE))
    for a in _GENERATE:
        if a.dest == "top_k":
            a.help = f"the teacher's top-k stored per token (default here: {ROUND_TOP_K})"
    t = _Flags(p, "training (softlabels train's flags)", TRAIN_OWN, _TRAIN)
    train_arguments(t)


def _check(args) -> None:
    """Every flag, before any round: the numbers here, train's flags by building its config
    (generate checks its own flags, and the models, in its first seconds)."""
    from dataclasses import fields

    from softlabels.train_student.config import TrainConfig
    from softlabels.train_student.mixture import check_weights

    if args.rounds < 1 or args.steps_per_round < 1:
        raise UserError("--rounds and --steps-per-round must be >= 1")
    if args.mix_earlier_rounds < 0:
        raise UserError("--mix-earlier-rounds must be >= 0")
    if args.prompts_per_round < 0:
        raise UserError("--prompts-per-round must be >= 0 (0: every prompt every round)")
    if args.eval_max_prompts < 1:
        raise UserError("--eval-max-prompts must be >= 1")
    for flag, path in (("--student", args.student), ("--prompts", args.prompts),
                       ("--eval-prompts", args.eval_prompts)):
        if path is not None and "://" not in path and not Path(path).exists():
            raise UserError(f"{flag} {path} does not exist")
    if not (Path(args.student) / "config.json").is_file():
        raise UserError(f"--student {args.student} is not a model folder (save_pretrained): "
                        "it writes round 0's responses")
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    cfg = TrainConfig(**{"loss": "reverse_kl", "ce_weight": (0.0,), **values,
                         "student": args.student, "data": ("round",) + tuple(args.mix),
                         "output": args.output, "max_steps": args.steps_per_round})
    check_weights(cfg.data_weights, len(cfg.data))


def round_train_flags(args: argparse.Namespace, earlier: int) -> list[str]:
    """train's flags for a round whose dataset is followed by `earlier` earlier rounds' (then
    --mix's): a per-dataset value given for (round, *mix) is repeated for each earlier round,
    and the round's --data-weights share is split among them equally, so the on-policy share of
    every round's tokens stays what the user gave."""
    ns = argparse.Namespace(**vars(args))
    n = 1 + len(args.mix)
    for dest in ("loss", "ce_weight", "targets"):
        v = getattr(ns, dest, None)
        if earlier and v is not None and len(v) == n > 1:
            setattr(ns, dest, [v[0]] * (1 + earlier) + list(v[1:]))
    w = getattr(ns, "data_weights", None)
    if earlier and w is not None and len(w) == n:
        ns.data_weights = [w[0] / (1 + earlier)] * (1 + earlier) + list(w[1:])
    return argv_of(ns, _TRAIN)


def round_generate_flags(args: argparse.Namespace) -> list[str]:
    """generate's flags for every round: the ones given, and --top-k ROUND_TOP_K if not."""
    flags = argv_of(args, _GENERATE)
    return flags if args.top_k is not None else [*flags, "--top-k", str(ROUND_TOP_K)]


def round_prompts(args, r: int, out: Path) -> str:
    """The prompts of round r: --prompts, or with --prompts-per-round K its records r*K ...
    r*K + K - 1 (wrapping around; at most each once), written once to round-r/prompts.jsonl
    so a resumed round reads the same ones. More rounds of fewer prompts each learn from the
    rollouts of a student one round newer; whether that lowers the reverse KL at equal teacher
    tokens depends on the student (BENCHMARKS.md: yes from the bench's unfinished student, not
    clearly from its converged one)."""
    k = args.prompts_per_round
    if not k:
        return args.prompts
    path = out / f"round-{r}" / "prompts.jsonl"
    if not path.is_file():
        from softlabels.generate.inputs import open_corpus

        column = args.messages_column or args.prompt_column
        corpus = open_corpus(args.prompts, (column,))
        values = [v for piece in corpus.pieces() for (v,) in corpus.records(piece)]
        if not values:
            raise UserError(f"--prompts {args.prompts} holds no prompts")
        take = [values[(r * k + i) % len(values)] for i in range(min(k, len(values)))]
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, "".join(json.dumps({column: v}) + "\n" for v in take))
    return str(path)


def _generate(cmd: list[str], client, what: str) -> None:
    """A round's `softlabels generate` job, in this process: with `client` on the embedded
    cluster kept across rounds, else on the cluster its flags name. On a GPU the embedded
    workers' engines are dropped after the job: training and eval here need that memory."""
    from softlabels.generate.cli import add_arguments
    from softlabels.generate.cli import main as generate
    from softlabels.generate.engine import on_cpu
    from softlabels.generate.work import drop_engines

    p = argparse.ArgumentParser(prog="softlabels generate")
    add_arguments(p)
    print(f"{what}: softlabels {' '.join(cmd)}", file=sys.stderr, flush=True)
    generate(p.parse_args(cmd), client=client)
    if client is not None and not on_cpu():
        client.run(drop_engines)


def _cluster(args):
    """The embedded cluster of every round (the engines in its workers outlive each round:
    the teacher's is kept, the writer's takes the next student's weights in place)."""
    from softlabels.generate.cli import embedded_workers
    from softlabels.generate.cluster import connect, tls_security

    security = tls_security(args.tls_ca_file, args.tls_cert, args.tls_key)
    return connect(None, embedded_workers(args), args.resource, security)


def _preload(student: str) -> None:
    """What the first `train` would import on first use (~4 s of round 0's training here, against
    0.5 s in later rounds), imported instead while round 0's job runs: the trainer, Accelerate,
    TensorBoard's writer, matplotlib for the curves, and a local student's model code."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    from accelerate import Accelerator  # noqa: F401
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    import softlabels.train_student.train  # noqa: F401

    if (Path(student) / "config.json").is_file():
        try:
            MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(student))]
        except Exception:  # a warm-up only: `train` loads the model, and says what is wrong
            pass


def _train_loop(conn, student: str) -> None:
    """The trainer process: `softlabels` commands from `conn` until None, each one's exit code
    back. Between rounds it holds no model: each round loads the previous one's checkpoint, and
    a GPU's cached blocks go back to the device for the next round's engines."""
    import gc

    import torch

    from softlabels.cli import main

    _preload(student)

    while True:
        try:
            argv = conn.recv()
        except EOFError:  # on-policy itself is gone
            return
        if argv is None:
            return
        code = main(argv)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        conn.send(code)


class Trainer:
    """`softlabels train` for every round, in one child process kept across rounds: its imports
    (torch, transformers, accelerate: ~4 s here) would otherwise be paid each round, and at a
    small round they cost more than its steps. A child, not this process: what training
    allocates is never in the process that runs the next round's job."""

    def __init__(self, student: str):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_train_loop, args=(child, str(student)),
                                name="softlabels-train")
        self.proc.start()
        child.close()

    def run(self, cmd: list[str], what: str) -> None:
        print(f"{what}: softlabels {' '.join(cmd)}", file=sys.stderr, flush=True)
        try:
            self.conn.send(cmd)
            code = self.conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            self.proc.join(5)
            code = self.proc.exitcode if self.proc.exitcode is not None else -1
        if code:
            raise UserError(f"{what} failed (exit {code}, its message is above); fix the "
                            "cause and rerun the same command: finished rounds are kept")

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(None)
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.proc.join(30)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join()


def _eval(args, model: Path) -> dict:
    cmd = ["eval", "--model", str(model), "--teacher", args.teacher, "--prompts",
           args.eval_prompts, "--prompt-column", args.prompt_column, "--max-prompts",
           str(args.eval_max_prompts), "--max-new-tokens",
           str(args.eval_max_new_tokens or args.max_new_tokens), "--seed", str(args.seed),
           "--json"]
    print(f"eval: softlabels {' '.join(cmd)}", file=sys.stderr, flush=True)
    p = subprocess.run([sys.executable, "-m", "softlabels", *cmd], stdout=subprocess.PIPE,
                       text=True)
    if p.returncode:
        raise UserError(f"eval of {model} failed (exit {p.returncode}, its message is above)")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _stage_seconds(data: Path) -> dict:
    """What the round's job spent in its workers (summed over units, from their commit
    records): the response model writing, the teacher scoring, and engine starts; and per unit
    how its engine came ("built", "kept" from an earlier task, "reloaded" with new weights)."""
    from softlabels.generate.state import done_dir, written_dir

    out = {"writing_s": 0.0, "scoring_s": 0.0, "engine_starts_s": 0.0,
           "engines": {"writer": {}, "teacher": {}}}
    for key, side, folder in (("writing_s", "writer", written_dir(data)),
                              ("scoring_s", "teacher", done_dir(data))):
        for f in folder.glob("*.json"):
            rec = json.loads(f.read_text())
            out[key] += rec["teacher_s"] + rec["write_s"]
            out["engine_starts_s"] += rec["engine_start_s"]
            how, e = out["engines"][side], rec.get("engine", "unrecorded")  # older records
            how[e] = how.get(e, 0) + 1
    return out


def main(args) -> int:
    _check(args)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "rounds.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {"rounds": []}
    done = {r["round"]: r for r in log["rounds"] if r.get("done")}
    generate_flags = round_generate_flags(args)
    default_objective = [
        x for dest, flags in DEFAULT_OBJECTIVE.items() if not hasattr(args, dest) for x in flags]
    remote = ["--trust-remote-code"] * args.trust_remote_code
    todo = [r for r in range(args.rounds) if r not in done]
    with ExitStack() as stack:
        trainer = None
        if todo:  # started now, it imports what training needs while round 0's job runs
            trainer = Trainer(args.student)
            stack.callback(trainer.close)
        held = []

        def client():  # the embedded cluster, started inside the first round's job (timed)
            if args.scheduler or args.cluster:
                return None
            if not held:
                held.append(stack.enter_context(_cluster(args)))
            return held[0]

        for r in todo:
            _round(args, r, out, client, trainer, log, generate_flags, default_objective, remote)
    print(json.dumps(log["rounds"][-1] if log["rounds"] else {}))
    return 0


def _round(args, r: int, out: Path, client, trainer, log: dict, generate_flags: list[str],
           default_objective: list[str], remote: list[str]) -> None:
    """Round r: rollouts and scores, training, eval; then its record in rounds.json.
    `client()`: the embedded cluster's client (None: generate's flags name a cluster);
    `trainer`: the training process kept across rounds."""
    from softlabels.data.manifest import Manifest

    log_path = out / "rounds.json"
    N = args.steps_per_round
    t0 = time.time()
    writer = Path(args.student) if r == 0 else out / f"round-{r - 1}" / "student"
    data, student = out / f"round-{r}" / "data", out / f"round-{r}" / "student"
    earlier = [str(out / f"round-{j}" / "data")
               for j in range(max(0, r - args.mix_earlier_rounds), r)][::-1]
    prompts = round_prompts(args, r, out)
    rec = {"round": r, "writer": str(writer), "prompts": prompts, "data": str(data),
           "earlier_data": earlier}
    generated = not (data / "manifest.json").is_file()
    if generated:
        columns = (["--messages-column", args.messages_column] if args.messages_column
                   else ["--prompt-column", args.prompt_column])
        _generate(["--teacher", args.teacher, "--input", prompts, "--output", str(data),
                   *columns, "--generate-responses", "--response-model", str(writer),
                   "--seed", str(args.seed + r * ROUND_SEED), *generate_flags, *remote],
                  client(), f"round {r}: rollouts by {writer.name} and the teacher's scores")
    t1 = time.time()
    m = Manifest.load(data)
    rec.update(teacher_tokens=m.tokens, rows=m.rows, generate_wall_s=t1 - t0,
               **_stage_seconds(data))
    previous = out / f"round-{r - 1}" / "student" / "checkpoints" / f"step-{r * N}"
    train_log = student / "train_log.json"
    trained = not (train_log.is_file()
                   and json.loads(train_log.read_text())["steps"] >= (r + 1) * N)
    if trained:
        trainer.run(["train", "--student", args.student, "--data", str(data), *earlier,
                       *args.mix, "--output", str(student), "--max-steps", str((r + 1) * N),
                       "--schedule-steps", str(args.rounds * N), "--save-every", str(N),
                       "--seed", str(args.seed), "--resume",
                       *(["--continue-from", str(previous)] if r else []),
                       *round_train_flags(args, len(earlier)), *default_objective, *remote],
                      f"round {r}: training")
    t2 = time.time()
    history = json.loads(train_log.read_text())["history"]
    rec.update(checkpoint=str(student / "checkpoints" / f"step-{(r + 1) * N}"),
               train_wall_s=t2 - t1,
               train_steps_s=sum(h.get("step_s", 0.0) for h in history[r * N:]),
               final_loss=history[-1]["loss"])
    if args.eval_prompts:
        rec["eval"] = _eval(args, student)
    evals = json.loads(train_log.read_text())["evals"]  # --eval-data's, at the round's end
    rec["eval_data"] = evals[-1] if evals else None
    rec["wall_s"] = time.time() - t0
    # what the round spent on other than writing, scoring, training steps and eval; a
    # stage an earlier run finished took no time in this one
    rec["overhead_s"] = (t2 - t0) - generated * (rec["writing_s"] + rec["scoring_s"]) - \
        trained * rec["train_steps_s"]
    rec["resumed"] = not (generated and trained)
    rec["done"] = True
    log["rounds"] = [x for x in log["rounds"] if x["round"] != r] + [rec]
    write_text(log_path, json.dumps(log, indent=1) + "\n")
    print(f"round {r}: {m.tokens} teacher tokens, {rec['wall_s']:.0f} s (overhead "
          f"{rec['overhead_s']:.0f} s)" + (
              f", reverse KL {rec['eval']['reverse_kl']:.4f}" if "eval" in rec else ""),
          file=sys.stderr)
