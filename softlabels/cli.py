"""The `softlabels` command: one subcommand per stage; each stage lives in its own package.

Imports are lazy so `softlabels --help` answers at once (importing vLLM takes ~25 s).
"""

from __future__ import annotations

import argparse
import errno
import sys


def _verify(args) -> int:
    from softlabels.data.verify import verify

    problems = verify(args.dir)
    for p in problems:
        print(p)
    if problems:
        print(f"{args.dir}: {len(problems)} problem(s); regenerate the named shards "
              "(rerun the same `softlabels generate` command)", file=sys.stderr)
        return 1
    from softlabels.data.manifest import Manifest

    m = Manifest.load(args.dir)
    print(f"{args.dir}: OK ({len(m.shards)} shards, {m.rows} rows, {m.tokens} tokens, k={m.k}, "
          f"draws={m.draws})")
    return 0


def _inspect(args) -> int:
    from softlabels.data.show import main

    return main(args)


def _generate(args) -> int:
    from softlabels.generate.cli import main

    return main(args)


def _train(args) -> int:
    from softlabels.train_student.cli import main

    return main(args)


def _eval(args) -> int:
    from softlabels.train_student.evaluate import main

    return main(args)


def _push(args) -> int:
    from softlabels.data.share import push

    push(args.dir, args.url)
    return 0


def _pull(args) -> int:
    from softlabels.data.share import pull

    pull(args.url, args.dir)
    return 0


def _import(args) -> int:
    import json
    import os

    from softlabels.data.convert import plan_import, run_import
    from softlabels.data.errors import UserError
    from softlabels.generate.cluster import connect, tls_security

    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}: give 1 or more")
    job = plan_import(args.src, args.out, args.kind, args.tokenizer, args.compression_config,
                      args.vocab_size, args.logprob_step)  # every check before any worker
    security = tls_security(args.tls_ca_file, args.tls_cert, args.tls_key)
    workers = args.workers or len(os.sched_getaffinity(0))
    with connect(args.scheduler, workers, "import", security) as client:
        summary = run_import(job, args.out, client)
    print(json.dumps(summary))
    return 0


def _export(args) -> int:
    import json

    from softlabels.data.convert import export_dataset

    print(json.dumps(export_dataset(args.dir, args.out, args.to)))
    return 0


def _on_policy(args) -> int:
    from softlabels.on_policy import main

    return main(args)


def _demo(args) -> int:
    from softlabels.demo import main

    return main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="softlabels",
        description="Offline knowledge distillation: run the teacher once (vLLM on Dask), store "
        "its top-k soft targets in Parquet, train students from them (Accelerate).",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from softlabels.demo import add_arguments as demo_args
    from softlabels.generate.cli import add_arguments as gen_args
    from softlabels.train_student.cli import add_arguments as train_args
    from softlabels.train_student.cli import add_eval_arguments as eval_args

    g = sub.add_parser("generate", help="run the teacher over a corpus, write a soft-label dataset")
    gen_args(g)
    g.set_defaults(func=_generate)

    t = sub.add_parser("train", help="train a student on a soft-label dataset")
    train_args(t)
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="held-out CE, KL to the teacher and top-1 agreement; "
                       "reverse KL to a teacher on the model's own continuations")
    eval_args(e)
    e.set_defaults(func=_eval)

    from softlabels.on_policy import add_arguments as on_policy_args

    op = sub.add_parser("on-policy", help="on-policy distillation in rounds: the student writes, "
                        "the teacher scores in a batch job, the student trains; repeat",
                        description="On-policy distillation in rounds, the teacher only in "
                        "batch jobs. Train's objective defaults here to --loss reverse_kl "
                        "--ce-weight 0 (the best measured on student-written data).")
    on_policy_args(op)
    op.set_defaults(func=_on_policy)

    v = sub.add_parser("verify", help="check a dataset's shards against its manifest and format")
    v.add_argument("dir", help="dataset folder or URL (s3://, gs://, hf://)")
    v.set_defaults(func=_verify)

    i = sub.add_parser("inspect", help="show one stored row")
    i.add_argument("dir", help="dataset folder or URL")
    i.add_argument("--row", type=int, default=0, help="row number in dataset order (default 0)")
    i.add_argument("--top", type=int, default=5, help="targets shown per position")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(func=_inspect)

    pu = sub.add_parser("push", help="copy a finished dataset folder to a store or the Hub "
                        "(resumable, verified first, manifest last)")
    pu.add_argument("dir", help="local dataset folder")
    pu.add_argument("url", help="destination: s3://bucket/prefix, gs://..., hf://datasets/org/name")
    pu.set_defaults(func=_push)

    pl = sub.add_parser("pull", help="copy a dataset from a store or the Hub into a folder "
                        "(resumable, each shard checked, manifest last)")
    pl.add_argument("url", help="source URL")
    pl.add_argument("dir", help="local folder")
    pl.set_defaults(func=_pull)

    im = sub.add_parser("import", help="another tool's soft-label dataset (DistillKit, axolotl) "
                        "into this format (streamed, on Dask workers, resumable)")
    im.add_argument("src", help="the source: a Parquet file, a folder or URL of them, or a local "
                    "save_to_disk folder")
    im.add_argument("out", help="the new dataset's folder")
    im.add_argument("--from", dest="kind", required=True, choices=("distillkit", "axolotl"),
                    help="the source's layout")
    im.add_argument("--tokenizer", default=None, help="the teacher's tokenizer (a folder), where "
                    "the source carries none; its vocabulary is the dataset's")
    im.add_argument("--compression-config", default=None, metavar="FILE",
                    help="DistillKit's compression_config.yaml, where the source has none")
    im.add_argument("--vocab-size", type=int, default=None, help="the teacher's output size where "
                    "it exceeds its tokenizer's (padded embeddings); default: the tokenizer's")
    im.add_argument("--logprob-step", type=float, default=1 / 16,
                    help="quantisation step of the stored log-probs in nats (default 1/16)")
    im.add_argument("--workers", type=int, default=None,
                    help="embedded cluster workers (default: this machine's cores)")
    im.add_argument("--scheduler", default=None, help="tls://host:port of a running `dask "
                    "scheduler` whose workers share OUT's filesystem")
    im.add_argument("--tls-ca-file", default=None, help="CA certificate of the cluster")
    im.add_argument("--tls-cert", default=None, help="this client's certificate")
    im.add_argument("--tls-key", default=None, help="this client's private key")
    im.set_defaults(func=_import)

    ex = sub.add_parser("export", help="a dataset as another tool's columns (axolotl's KD "
                        "trainer), streamed, with a card saying what was dropped")
    ex.add_argument("dir", help="dataset folder or URL")
    ex.add_argument("out", help="the new folder")
    ex.add_argument("--to", required=True, choices=("axolotl",), help="the layout written")
    ex.set_defaults(func=_export)

    d = sub.add_parser("demo", help="the whole pipeline on the shipped corpus (`make demo`)")
    demo_args(d)
    d.set_defaults(func=_demo)
    for sp in sub.choices.values():
        sp.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from softlabels.data.errors import UserError

    try:
        return args.func(args) or 0
    except UserError as e:
        if args.debug:
            raise
        print(f"softlabels {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions, ...: the OS's words name the path
        if args.debug:
            raise
        hint = {errno.ENOSPC: "free space there and rerun the same command",
                errno.EDQUOT: "free space there and rerun the same command",
                errno.EACCES: "fix the permissions and rerun"}.get(e.errno, "fix it and rerun")
        print(f"softlabels {args.command}: error: {e}; {hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"softlabels {args.command}: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The `softlabels` command (and `python -m softlabels`): main(), then an exit that skips
    native teardown. Arrow's C++ thread pool can abort the process while the interpreter
    finalizes, after every byte of work and the last line are out ("terminate called without an
    active exception", exit -6; apache/arrow#34314): here ~1 in 12 `verify` runs before they
    stopped using its threads, and a `train` refusal under load in a fresh clone's suite. So:
    join our threads, run the atexit handlers (temp folders, logging, multiprocessing), flush,
    and leave by os._exit, which runs no C++ destructors. main() itself stays an ordinary call
    for whoever embeds it."""
    import atexit
    import os
    import threading

    code = main()
    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)


if __name__ == "__main__":
    run()
