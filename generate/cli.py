"""`softlabels generate`: plan the corpus, score it with the teacher on Dask, publish a dataset.

Resumable and exactly-once: the plan is fixed before work starts, each unit commits one shard
atomically, a rerun skips units whose shard is intact, and the manifest is written last.
"""

from __future__ import annotations

import collections
import fcntl
import json
import os
import shlex
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from softlabels.data.errors import UserError
from softlabels.data.format import DEFAULT_LOGPROB_STEP
from softlabels.data.manifest import Manifest, fingerprint_files
from softlabels.generate.cluster import BATCH_SYSTEMS

DEFAULT_UNIT_TOKENS = 131072
DEFAULT_SHARD_TOKENS = 1 << 22  # 10B tokens -> ~2,400 files of ~300 MB at k=64


def add_arguments(p) -> None:
    p.add_argument("--teacher", required=True, help="Hugging Face causal-LM folder")
    p.add_argument("--input", required=True, help="Parquet file/folder, .jsonl, .txt files, "
                   "or a datasets.save_to_disk folder")
    p.add_argument("--output", required=True, help="dataset folder to write (resumable)")
    p.add_argument("--text-column", default="text", help="text column/field (default text)")
    p.add_argument("--prompt-column", default=None,
                   help="instruction data: prompt column (targets only on the response)")
    p.add_argument("--response-column", default=None, help="instruction data: response column")
    p.add_argument("--messages-column", default=None,
                   help="chat data: a [{role, content}, ...] column (targets on assistant turns)")
    p.add_argument("--top-k", type=int, default=None,
                   help="the teacher's k most likely next tokens, stored per token (default 64; "
                   "with --samples, none unless given)")
    p.add_argument("--samples", type=int, default=0,
                   help="N draws per token from the teacher's full distribution, stored as "
                   "distinct ids + counts: unbiased targets for the student's whole softmax "
                   "(37 bytes/token at N=50, 15 at N=12, for the benchmark's teacher); alone, "
                   "or with --top-k for both: then the top-k is exact and the draws come from "
                   "outside it")
    p.add_argument("--sample-temperature", type=float, default=1.0,
                   help="temperature of the distribution --samples draws from (default 1)")
    p.add_argument("--max-length", type=int, default=2048,
                   help="window length in tokens; longer records are split (default 2048)")
    p.add_argument("--stride", type=int, default=None,
                   help="new positions per later window of a long record: each later window "
                   "starts with the --max-length minus --stride tokens before it as context "
                   "(no targets there); the teacher scores max-length/stride times the tokens "
                   "(default: --max-length, windows do not overlap)")
    p.add_argument("--unit-tokens", type=int, default=DEFAULT_UNIT_TOKENS,
                   help=f"tokens per work unit: what a retry redoes (default "
                   f"{DEFAULT_UNIT_TOKENS})")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help="tokens per published shard, at most: consecutive units are "
                   f"concatenated into one file (default {DEFAULT_SHARD_TOKENS})")
    p.add_argument("--logprob-step", type=float, default=DEFAULT_LOGPROB_STEP,
                   help="log-prob quantisation step in nats (default 1/16)")
    r = p.add_argument_group("teacher-written responses (sequence-level distillation)")
    r.add_argument("--generate-responses", action="store_true",
                   help="the teacher answers each prompt (--prompt-column or --messages-column); "
                   "targets are stored on its response")
    r.add_argument("--max-new-tokens", type=int, default=256)
    r.add_argument("--temperature", type=float, default=1.0)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--n", type=int, default=1, help="responses per prompt")
    r.add_argument("--seed", type=int, default=0,
                   help="seed of the responses and of --samples (each window draws from its "
                   "own generator seeded by this and its row id)")
    c = p.add_argument_group("cluster")
    c.add_argument("--workers", type=int, default=None,
                   help="embedded cluster workers, one engine each (default: GPUs, or 1 on CPU)")
    c.add_argument("--scheduler", default=None,
                   help="tls://host:port (or tcp:// on a network only you can reach) of a "
                   "running `dask scheduler` to use instead")
    c.add_argument("--tls-ca-file", default=None, help="CA certificate of the cluster (mutual TLS)")
    c.add_argument("--tls-cert", default=None, help="this client's certificate, signed by the CA")
    c.add_argument("--tls-key", default=None, help="this client's private key")
    c.add_argument("--resource", default="teacher",
                   help="worker resource a unit needs (workers: --resources teacher=1)")
    c.add_argument("--retries", type=int, default=2, help="retries of a failing unit (default 2)")
    b = p.add_argument_group("batch scheduler (--cluster; the rest from Dask's jobqueue config)")
    b.add_argument("--cluster", default=None, choices=BATCH_SYSTEMS,
                   help="run the workers as jobs of the cluster's batch scheduler through "
                   "dask-jobqueue: --workers jobs (default 1), mutual TLS with certificates made "
                   "for the run, lost jobs replaced, every job cancelled when generate ends "
                   "(Slurm is tested; pbs, sge and lsf are not)")
    b.add_argument("--queue", default=None, help="partition / queue of the worker jobs")
    b.add_argument("--walltime", default=None, help="time limit of each worker job (HH:MM:SS)")
    b.add_argument("--worker-memory", default=None,
                   help="memory per worker job (e.g. 64GB; default: jobqueue config, or 16GiB)")
    b.add_argument("--worker-cores", type=int, default=None,
                   help="cores per worker job (default: jobqueue config, or 1)")
    b.add_argument("--gpus-per-worker", type=int, default=0,
                   help="GPUs per worker job (Slurm: --gres=gpu:N); one engine uses "
                   "--tensor-parallel-size of them")
    b.add_argument("--job-extra", action="append", default=[], metavar="DIRECTIVE",
                   help="another job directive, without its prefix (e.g. --job-extra "
                   "'--account=proj'; repeatable)")
    b.add_argument("--scheduler-host", default=None,
                   help="address the Dask scheduler listens on, reachable from the compute "
                   "nodes (default: this host's address)")
    b.add_argument("--worker-timeout", type=float, default=600.0,
                   help="seconds to wait for the first worker job to start before stopping, "
                   "with the scheduler's reason (default 600)")
    b.add_argument("--print-job-script", action="store_true",
                   help="print the worker job script and exit: nothing is submitted")
    p.add_argument("--dry-run", action="store_true",
                   help="plan only (tokenize, cut windows, units and shards; the plan is kept "
                   "and reused by the real run) and print the job's size; no teacher runs")
    p.add_argument("--calibrate", action="store_true",
                   help="with --dry-run: score the first unit on one worker and print the "
                   "teacher's tokens/s, the expected time and worker-hours, and the size on "
                   "disk measured from it (the unit is kept for the real run)")
    e = p.add_argument_group("vLLM engine")
    e.add_argument("--dtype", default="auto", help="auto = float32 on CPU, model dtype on GPU")
    e.add_argument("--tensor-parallel-size", type=int, default=1)
    e.add_argument("--max-num-batched-tokens", type=int, default=None)
    e.add_argument("--kv-cache-gib", type=int, default=2,
                   help="CPU KV cache size (VLLM_CPU_KVCACHE_SPACE), default 2")
    e.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other vllm.LLM argument, VALUE as JSON (repeatable)")
    e.add_argument("--trust-remote-code", action="store_true",
                   help="let the teacher folder run its own Python (auto_map); off by default")
    p.add_argument("--rehash", action="store_true",
                   help="hash the teacher, the input and every committed shard from their bytes "
                   "(by default files unchanged since they were hashed are trusted)")


def _engine_extra(pairs: list[str]) -> tuple:
    extra = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UserError(f"--engine-arg {pair!r} is not KEY=VALUE")
        try:
            extra.append((key, json.loads(value)))
        except json.JSONDecodeError:
            extra.append((key, value))
    return tuple(extra)


def check_teacher(path: Path, k: int, trust_remote_code: bool = False,
                  safetensors_only: bool = True, scoring: bool = True):
    """Return (config, tokenizer) of a usable teacher, or a one-line UserError.

    Nothing in the folder runs: no remote code unless asked, and weights only as safetensors
    (pickled .bin/.pt weights can execute code when loaded)."""
    from transformers import AutoConfig, AutoTokenizer

    if not path.is_dir():
        raise UserError(f"teacher {path} does not exist; pass a folder written by save_pretrained")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise UserError(f"teacher {path} needs to run its own code (auto_map in its config); "
                            "pass --trust-remote-code only if you trust that folder") from e
        raise UserError(f"teacher {path} has no readable config.json ({e})") from e
    if not any(a.endswith("ForCausalLM") for a in (config.architectures or [])):
        raise UserError(f"teacher {path} is not a causal LM (architectures: "
                        f"{config.architectures}); pass a *ForCausalLM model folder")
    if safetensors_only and not any(path.glob("*.safetensors")):
        raise UserError(f"teacher {path} has no *.safetensors weights; pickled weights can run "
                        "code when loaded: convert them once with transformers' save_pretrained "
                        "(safe_serialization=True) in an environment you trust")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"teacher {path} has no loadable tokenizer ({e})") from e
    vocab = config.get_text_config().vocab_size
    if not 0 <= k <= vocab:
        raise UserError(f"--top-k {k} must be between 1 and the vocabulary size {vocab}")
    if scoring:  # softlabels applies the output head itself
        from softlabels.generate.head import check_architecture

        check_architecture(config)
    return config, tok


class OutputLock:
    """One `generate` per output folder: a second one is refused, not interleaved."""

    def __init__(self, out: Path):
        (out / ".softlabels").mkdir(parents=True, exist_ok=True)
        self.fd = os.open(out / ".softlabels" / "lock", os.O_CREAT | os.O_RDWR)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(self.fd)
            raise UserError(f"another softlabels generate is writing {out}; wait for it to "
                            "finish (or stop it) before running this one") from e

    def release(self) -> None:
        os.close(self.fd)


def _copy_tokenizer(tok, out: Path) -> None:
    """The dataset carries its tokenizer, so inspect and train can decode and check it."""
    from softlabels.data.show import TOKENIZER_DIR

    tmp = out / f".{TOKENIZER_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(out / TOKENIZER_DIR, ignore_errors=True)
    os.replace(tmp, out / TOKENIZER_DIR)


def _lost_work(out: Path, supervisor) -> str:
    """What lost worker jobs cost: jobs replaced, and unit attempts that reached the teacher
    against the units of the plan (attempts.log, over every run of this job)."""
    from softlabels.generate.plan import Plan
    from softlabels.generate.work import attempts_path

    plan = Plan.load(out)
    path = attempts_path(out)
    runs = len(path.read_text().splitlines()) if path.is_file() else 0
    how = supervisor.report()
    return (f"worker jobs replaced: {supervisor.replaced}{f' ({how})' if how else ''}; units "
            f"run {runs} for {len(plan.units) if plan else 0} planned")


def _wait_for_a_worker(client, supervisor, batch, out: Path) -> None:
    """Stop in one line, leaving a resumable folder, if no worker job starts in time."""
    try:
        client.wait_for_workers(1, timeout=batch.worker_timeout)
    except TimeoutError:
        supervisor.check()
        why = supervisor.why_waiting()
        raise UserError(
            f"no worker job started within {batch.worker_timeout:g} s"
            + (f" ({batch.kind}: {why})" if why else "")
            + f"; nothing was lost: rerun the same command when the queue has room (or raise "
            f"--worker-timeout) and it continues in {out}") from None


def main(args) -> int:
    from softlabels.generate.cluster import (
        BatchOptions,
        batch_cluster,
        connect,
        job_script,
        tls_security,
    )
    from softlabels.generate.engine import Sampling, on_cpu
    from softlabels.generate.inputs import open_corpus
    from softlabels.generate.records import Fields

    t_start = time.time()
    teacher, out = Path(args.teacher), Path(args.output)
    fields = Fields(text=args.text_column, prompt=args.prompt_column,
                    response=args.response_column, messages=args.messages_column)
    sampling = None
    if args.generate_responses:
        if not (args.prompt_column or args.messages_column) or args.response_column:
            raise UserError("--generate-responses needs --prompt-column or --messages-column "
                            "(and no --response-column: the teacher writes the responses)")
        if args.n < 1 or args.max_new_tokens < 1:
            raise UserError("--n and --max-new-tokens must be >= 1")
        sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p, args.n, args.seed)
    elif args.prompt_column and not args.response_column:
        raise UserError("--prompt-column needs --response-column (or --generate-responses)")
    if args.top_k is None:
        args.top_k = 0 if args.samples else 64
    if not 0 <= args.samples <= 65535 or args.sample_temperature <= 0:
        raise UserError("--samples must be between 0 and 65535, --sample-temperature above 0")
    if args.top_k == 0 and not args.samples:
        raise UserError("--top-k 0 stores nothing: give --top-k K, --samples N, or both")
    if args.top_k and args.samples and args.sample_temperature != 1.0:
        raise UserError("--sample-temperature with --top-k: the draws beside a top-k share the "
                        "teacher's mass outside it at temperature 1, so they must come from "
                        "temperature 1 too; drop --sample-temperature, or use --samples alone "
                        "(its targets are then the teacher at that temperature)")
    if args.samples and args.generate_responses:
        raise UserError("--samples scores existing text; with --generate-responses the targets "
                        "are the top-k of each sampled step: drop one of them")
    corpus = open_corpus(args.input, fields.columns)
    extra = _engine_extra(args.engine_arg)
    config, tok = check_teacher(teacher, args.top_k, args.trust_remote_code,
                                safetensors_only="load_format" not in dict(extra),
                                scoring=not args.generate_responses)
    if args.max_length < 1 or args.unit_tokens < 1 or args.shard_tokens < 1:
        raise UserError("--max-length, --unit-tokens and --shard-tokens must be positive")
    if args.stride is not None and not 1 <= args.stride <= args.max_length:
        raise UserError(f"--stride {args.stride} must be between 1 and --max-length "
                        f"{args.max_length}")
    if args.stride is not None and args.generate_responses:
        raise UserError("--stride is for records cut into windows; with --generate-responses "
                        "each prompt is one window")
    security = tls_security(args.tls_ca_file, args.tls_cert, args.tls_key)
    cpu = on_cpu()
    if args.calibrate and not args.dry_run:
        raise UserError("--calibrate goes with --dry-run")
    if args.cluster and args.scheduler:
        raise UserError("--cluster submits its own workers: drop --scheduler (or --cluster)")
    batch = BatchOptions(args.cluster, args.workers or 1, args.queue, args.walltime,
                         args.worker_memory, args.worker_cores, args.gpus_per_worker,
                         tuple(args.job_extra), args.scheduler_host,
                         args.worker_timeout) if args.cluster else None
    if args.print_job_script:
        if batch is None:
            raise UserError("--print-job-script shows a --cluster's worker job script")
        print(job_script(batch, args.resource, out / ".softlabels"))
        return 0
    n_workers = args.workers or _default_workers(cpu, args.tensor_parallel_size)
    supervisor_report = None
    if batch:  # the jobs' TLS files go under OUT: take the folder before anything is written
        lock = OutputLock(out)
        try:
            with batch_cluster(batch, args.resource, out / ".softlabels", security) as \
                    (client, supervisor):
                print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr)
                _wait_for_a_worker(client, supervisor, batch, out)
                result = _job(args, client, teacher, out, corpus, fields, sampling, config, tok,
                              cpu, batch.workers, supervisor)
                supervisor_report = _lost_work(out, supervisor)
        finally:
            lock.release()
    else:
        # Connect first: a refused client (TLS, address) writes nothing.
        with connect(args.scheduler, n_workers, args.resource, security) as client:
            print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr)
            lock = OutputLock(out)
            try:
                result = _job(args, client, teacher, out, corpus, fields, sampling, config, tok,
                              cpu, n_workers)
            finally:
                lock.release()
    if args.dry_run:
        return 0
    m, plan, times = result
    wall = time.time() - t_start
    size = sum(s.bytes for s in m.shards)
    print(f"done: {plan.records} records, {m.tokens} tokens, {len(m.shards)} shards in "
          f"{wall:.0f} s ({m.tokens / wall:.0f} tokens/s), {size / m.tokens:.1f} bytes/token "
          f"-> {out}", file=sys.stderr)
    if times:
        print(f"time in workers: engine start {times['engine_start']:.1f} s, teacher "
              f"{times['teacher']:.1f} s, encoding and writing {times['write']:.1f} s (summed "
              "over units)", file=sys.stderr)
    if supervisor_report:
        print(supervisor_report, file=sys.stderr)
    return 0


def _job(args, client, teacher, out, corpus, fields, sampling, config, tok, cpu, n_workers,
         supervisor=None):
    """Plan, run the units still to do, concatenate them into shards, publish:
    -> (manifest, plan, times); with --dry-run, plan (and calibrate) only: -> None."""
    from softlabels.data.card import publish
    from softlabels.generate.engine import EngineConfig
    from softlabels.generate.inputs import PIECE_BYTES
    from softlabels.generate.plan import Job, claim
    from softlabels.generate.work import is_published, shard_info, unit_path

    print(f"hashing teacher {teacher} and input {args.input} ...", file=sys.stderr)
    teacher_files = [f for f in teacher.rglob("*") if f.is_file() and
                     not any(part.startswith(".") for part in f.relative_to(teacher).parts)]
    job = Job(
        teacher_hash=fingerprint_files(teacher_files, teacher, args.rehash),
        input_fingerprint=corpus.fingerprint(args.rehash),
        k=args.top_k,
        max_length=args.max_length,
        unit_tokens=args.unit_tokens,
        logprob_step=args.logprob_step,
        draws=args.samples,
        sample_temperature=args.sample_temperature,
        seed=args.seed,
        shard_tokens=args.shard_tokens,
        stride=0 if args.stride in (None, args.max_length) else args.stride,
        piece_bytes=PIECE_BYTES,
        fields=repr(fields),
        sampling=repr(sampling) if sampling else "",
        engine=json.dumps({"dtype": args.dtype, "engine_args": sorted(args.engine_arg),
                           "vllm": _vllm_version(), "trust_remote_code": args.trust_remote_code}),
    )
    claim(out, job)
    engine = EngineConfig(
        teacher=str(teacher.resolve()),
        k=args.top_k,
        max_length=args.max_length,
        dtype=args.dtype,
        tensor_parallel_size=args.tensor_parallel_size,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_gib=args.kv_cache_gib,
        seed=args.seed,
        draws=args.samples,
        sample_temperature=args.sample_temperature,
        extra=_engine_extra(args.engine_arg),
        trust_remote_code=args.trust_remote_code,
    )
    budget = sampling.max_new_tokens * sampling.n if sampling else 0
    run = _Run(args, client, out, job, cpu, n_workers, engine, sampling, supervisor)
    plan = run.plan_and_score(corpus, fields, budget, score=not args.dry_run)
    if args.dry_run and not run.failures:
        _dry_run_report(run, plan, args, n_workers)
        return None
    if not run.failures:
        run.concatenate(plan)
    if run.failures:
        for name, err in run.failures:
            print(f"{name} failed: {err}", file=sys.stderr)
        first = run.failures[0][1].splitlines()[0]
        raise UserError(f"{len(run.failures)} tasks failed (named above; first: {first}); fix "
                        "the cause and rerun the same command to finish the rest")
    # Two attempts of one unit (a client that died while an external worker ran it, then a
    # rerun) can both commit: publish only if every shard still matches its record.
    stale = [s.name for s in plan.shards if not is_published(out, s)]
    if stale:
        raise UserError(f"{len(stale)} shards no longer match their commit records (another "
                        f"attempt replaced them: {', '.join(stale[:3])}); rerun the same command")
    _copy_tokenizer(tok, out)
    m = Manifest(
        k=args.top_k,
        logprob_step=args.logprob_step,
        vocab_size=config.get_text_config().vocab_size,
        draws=args.samples,
        sample_temperature=args.sample_temperature,
        shards=[shard_info(out, s) for s in plan.shards],
        provenance={
            "teacher": str(teacher.resolve()),
            "teacher_sha256": job.teacher_hash,
            "tokenizer_vocab_size": len(tok),
            "k": args.top_k,
            "samples": args.samples,
            "sample_temperature": args.sample_temperature,
            "seed": args.seed,
            "max_length": args.max_length,
            "stride": args.stride or args.max_length,
            "vllm_version": _vllm_version(),
            "input": str(Path(args.input).resolve()),
            "input_fingerprint": job.input_fingerprint,
            "columns": repr(fields),
            "sampling": repr(sampling) if sampling else None,
            "skipped_prompts_too_long": plan.too_long,
            "records": plan.records,
            "empty_records_skipped": plan.empty_records,
            "context_windows_skipped": plan.context_windows,
            "records_without_targets": plan.untargeted,
            "job_id": job.id(),
            "command": shlex.join(["softlabels", *sys.argv[1:]]),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )
    publish(out, m)
    for u in plan.units:  # now inside the published shards (a shard of one unit is its link)
        unit_path(out, u).unlink(missing_ok=True)
    return m, plan, run.times


def _vllm_version() -> str:
    """The installed vLLM's version, without importing it (~25 s): `vllm` or `vllm-cpu`."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist}=={version(dist)}"
        except PackageNotFoundError:
            continue
    return "unknown"


def _dry_run_report(run, plan, args, n_workers: int) -> None:
    """What the job is, and (--calibrate) what it will cost, from one unit scored for real."""
    rows = sum(u.rows for u in plan.units)
    print(f"plan: {plan.records} records ({plan.empty_records} empty), {plan.tokens} tokens in "
          f"{rows} windows, {len(plan.units)} units, {len(plan.shards)} shards")
    if not args.calibrate:
        per_token = 2.5 + 1.0 * args.top_k + 0.5 * args.samples  # the format's rough cost
        print(f"expected size: ~{per_token * plan.tokens / 1e9:.3g} GB (~{per_token:.0f} "
              "bytes/token, rough: it depends on the teacher's confidence; --calibrate "
              "measures it)")
        return
    r = run.calibrate(plan)
    per_token = r["bytes"] / r["tokens"]
    rate = r["tokens"] / (r["teacher_s"] + r["write_s"])
    one = plan.tokens / rate  # seconds of one worker, engine start aside
    print(f"calibration: unit {plan.units[0].name} ({r['tokens']} tokens) on one worker: engine "
          f"start {r['engine_start_s']:.0f} s, {rate:,.0f} tokens/s, {per_token:.1f} bytes/token")
    print(f"expected size: {per_token * plan.tokens / 1e9:.3g} GB")
    print(f"expected teacher time with {n_workers} worker(s): "
          f"{(one / n_workers + r['engine_start_s']) / 3600:.3g} h "
          f"({(one + n_workers * r['engine_start_s']) / 3600:.3g} worker-hours)")


class _Run:
    """The job's Dask tasks: plan pieces, score units as soon as their piece is planned, then
    concatenate units into shards. Failures are collected by name; a UserError (bad input)
    stops the job."""

    def __init__(self, args, client, out, job, cpu, n_workers, engine, sampling,
                 supervisor=None):
        from softlabels.generate.cluster import cpu_groups, gpu_groups

        local = not (args.scheduler or args.cluster)
        self.supervisor = supervisor
        self.n_workers = n_workers
        self.waiting: collections.deque = collections.deque()  # units not yet submitted
        self.in_flight = 0
        self.args, self.client, self.out, self.job = args, client, out, job
        self.engine, self.sampling = engine, sampling
        self.cpus = cpu_groups(n_workers) if (cpu and local) else ()
        self.gpus = gpu_groups(n_workers, args.tensor_parallel_size) if (not cpu and local) \
            else ()
        self.failures: list[tuple[str, str]] = []
        self.times = {"engine_start": 0.0, "teacher": 0.0, "write": 0.0}

    def plan_and_score(self, corpus, fields, budget, score: bool = True):
        """-> the plan (None if a piece failed); units run as their pieces are planned (with
        `score`; without, only the plan is made)."""
        from distributed import as_completed
        from tqdm import tqdm

        from softlabels.generate.inputs import PIECE_BYTES
        from softlabels.generate.plan import PiecePlan, Plan
        from softlabels.generate.work import PlanTask, is_published, plan_task

        out, args = self.out, self.args
        plan = Plan.load(out)
        published = set() if plan is None else {
            u for s in plan.shards if is_published(out, s, args.rehash) for u in s.units}
        pieces = [] if plan is not None else corpus.pieces(PIECE_BYTES)  # checks the columns
        self.tasks, self.ac, self.submitted, planned = {}, as_completed(), 0, {}
        self.score = score
        self.bar = tqdm(total=0, unit=" tok", unit_scale=True, desc="teacher", smoothing=0.1,
                        leave=False)
        if plan is not None:
            self._release(plan.units, published)
        else:
            for p in pieces:
                if (pp := PiecePlan.load(out, p.index)) is not None:
                    planned[p.index] = pp
                    self._release(pp.units, published)
                    continue
                task = PlanTask(str(out.resolve()), corpus, p, self.job, fields,
                                self.engine.teacher, self.engine.trust_remote_code, budget)
                # planning first: workers tokenize before they take teacher work
                f = self.client.submit(plan_task, task, key=f"plan-{p.index}-{self.job.id()}",
                                       retries=args.retries, priority=10, pure=False)
                self.tasks[f] = f"planning piece {p.index} ({p.files[0]})"
                self.ac.add(f)
        if plan is None and len(planned) == len(pieces):
            plan = self._whole(pieces, planned)
        elif plan is not None:
            tqdm.write(f"plan: {len(plan.units)} units, {len(plan.shards)} shards; "
                       f"{self.submitted} to run", file=sys.stderr)
        plan_bar = tqdm(total=len(pieces), initial=len(planned), unit=" pieces",
                        desc="planning", position=1, leave=False, disable=not pieces)
        try:
            for f in self.ac:
                what = self.tasks.pop(f)
                if what.startswith("unit "):
                    self.in_flight -= 1
                    self._fill()
                try:
                    r = f.result()
                except Exception as e:  # reported by name; the rest of the job goes on
                    self.failures.append((what, f"{type(e).__name__}: {e}"))
                    continue
                if isinstance(r, UserError):  # bad input: one message, nothing else to do
                    raise r
                if isinstance(r, PiecePlan):
                    planned[r.piece] = r
                    self._release(r.units, published)
                    plan_bar.update(1)
                    if len(planned) == len(pieces):
                        plan = self._whole(pieces, planned)
                else:
                    self.times["engine_start"] = max(self.times["engine_start"],
                                                     r["engine_start_s"])
                    self.times["teacher"] += r["teacher_s"]
                    self.times["write"] += r["write_s"]
                    self.bar.update(r["tokens"])
                if self.supervisor is not None:  # worker jobs: how many run, how many wait
                    self.bar.set_postfix_str(f"workers: {self.supervisor.status()}")
        except BaseException:
            self.client.cancel(list(self.tasks))
            raise
        finally:
            plan_bar.close()
            self.bar.close()
        return plan

    def _whole(self, pieces, planned):
        """Every piece is planned: record the plan (plan.json) and report it."""
        from tqdm import tqdm

        from softlabels.generate.plan import finish_plan

        plan = finish_plan(self.out, self.job, [planned[p.index] for p in pieces])
        tqdm.write(f"plan: {plan.records} records ({plan.empty_records} empty, skipped), "
                   f"{plan.tokens} tokens, {len(plan.units)} units, {len(plan.shards)} shards; "
                   f"{self.submitted} to run", file=sys.stderr)
        if plan.too_long:
            tqdm.write(f"{len(plan.too_long)} prompts leave no room for a response within "
                       f"--max-length and are skipped: records {plan.too_long[:20]}"
                       + (" ..." if len(plan.too_long) > 20 else ""), file=sys.stderr)
        if plan.context_windows:
            tqdm.write(f"{plan.context_windows} windows hold context only (no target position) "
                       "and are not scored"
                       + (f"; records with no target at all: {plan.untargeted[:20]}"
                          + (" ..." if len(plan.untargeted) > 20 else "")
                          if plan.untargeted else ""), file=sys.stderr)
        return plan

    def _release(self, units, published) -> None:
        """Queue the units not yet committed for the teacher workers."""
        from softlabels.generate.work import is_done

        if not self.score:
            return
        self.bar.total += sum(u.tokens for u in units)
        for u in units:
            if u.name in published or is_done(self.out, u, self.args.rehash):
                self.bar.update(u.tokens)
                continue
            self.waiting.append(u)
            self.submitted += 1
        self._fill()
        self.bar.refresh()

    def _fill(self) -> None:
        """Submit waiting units while fewer than two per worker are in flight. Dask sends a
        task with a resource restriction to a worker at once, and a worker's death counts
        against every task it holds (after `allowed-failures`, the task fails): holding the
        rest here keeps each lost worker to the one unit it runs and the one next in line."""
        from softlabels.generate.work import UnitTask, run_unit

        workers = max(self.n_workers, len(self.client.scheduler_info().get("workers", {})))
        while self.waiting and self.in_flight < 2 * workers:
            u = self.waiting.popleft()
            task = UnitTask(str(self.out.resolve()), u, self.engine, self.args.logprob_step,
                            self.cpus, self.gpus, self.sampling)
            f = self.client.submit(run_unit, task, key=f"unit-{u.name}",
                                   resources={self.args.resource: 1},
                                   retries=self.args.retries, pure=False)
            self.tasks[f] = f"unit {u.name}"
            self.ac.add(f)
            self.in_flight += 1

    def calibrate(self, plan) -> dict:
        """Score the plan's first unit on one worker (committed: the real run keeps it); its
        run_unit summary, or the summary recorded when it was committed before."""
        from softlabels.generate.work import UnitTask, done_path, is_done, run_unit

        u = plan.units[0]
        if is_done(self.out, u):
            rec = json.loads(done_path(self.out, u).read_text())
            if "teacher_s" in rec:
                return rec
        task = UnitTask(str(self.out.resolve()), u, self.engine, self.args.logprob_step,
                        self.cpus, self.gpus, self.sampling)
        return self.client.submit(run_unit, task, key=f"calibrate-{u.name}",
                                  resources={self.args.resource: 1}, pure=False).result()

    def concatenate(self, plan) -> None:
        """Make the shards not yet published from their committed units, on the workers."""
        from distributed import as_completed
        from tqdm import tqdm

        from softlabels.generate.work import MergeTask, is_published, merge_shard

        todo = [s for s in plan.shards if not is_published(self.out, s, self.args.rehash)]
        futures = {self.client.submit(merge_shard, MergeTask(str(self.out.resolve()), s),
                                      key=f"shard-{s.name}", retries=self.args.retries,
                                      pure=False): s for s in todo}
        for f in tqdm(as_completed(futures), total=len(todo), desc="shards", leave=False,
                      disable=len(todo) < 2):
            try:
                f.result()
            except Exception as e:
                self.failures.append((f"shard {futures[f].name}", f"{type(e).__name__}: {e}"))


def _default_workers(cpu: bool, tensor_parallel: int) -> int:
    """One engine per GPU (or per tensor-parallel group); one on a CPU machine: two engines
    pinned to one core each were 7 % faster per unit on 2 cores but no faster end to end (two
    engine starts) and hold two copies of the model (BENCHMARKS.md)."""
    if cpu:
        return 1
    import torch

    return max(1, torch.cuda.device_count() // tensor_parallel)
