"""`softlabels generate`: flags -> a `Job` and its engine's config -> the driver -> a dataset.

This module only reads and checks the flags (all before anything expensive starts), connects the
cluster, and hands over: driver.py runs the Dask side, publish.py writes the manifest and card,
state.py owns the `.softlabels/` folder. Resumable and exactly-once: see driver.py.
"""

from __future__ import annotations

import difflib
import json
import sys
import time
from pathlib import Path

from softlabels.data.errors import UserError
from softlabels.data.format import DEFAULT_LOGPROB_STEP
from softlabels.generate.cluster import BATCH_SYSTEMS

DEFAULT_UNIT_TOKENS = 131072
DEFAULT_SHARD_TOKENS = 1 << 22  # 10B tokens -> ~2,400 files of ~300 MB at k=64


def add_arguments(p) -> None:
    p.add_argument("--teacher", required=True, help="Hugging Face causal-LM folder")
    p.add_argument("--input", required=True, help="Parquet file/folder, .jsonl, .txt files, "
                   "or a datasets.save_to_disk folder; or Parquet/JSON Lines at an s3://... URL")
    p.add_argument("--output", required=True, help="dataset folder, or s3://bucket/prefix (the "
                   "workers write to the store), to write (resumable)")
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
    p.add_argument("--max-length", type=int, default=None,
                   help="window length in tokens; longer records are split (default 2048, or "
                   "the teacher's context if shorter)")
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
    r.add_argument("--response-model", default=None, metavar="MODEL",
                   help="another model writes the responses (a student checkpoint, for "
                   "on-policy distillation) and the teacher scores them in the same job: "
                   "every unit is written first, then scored; each response token also keeps "
                   "the writer's own log-prob (column writer_logprob), the manifest the "
                   "checkpoint's hash. Same tokenizer as the teacher")
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
    """--engine-arg KEY=VALUE pairs -> ((key, value), ...), VALUE parsed as JSON where it is."""
    extra = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UserError(f"--engine-arg {pair!r} is not KEY=VALUE")
        try:
            extra.append((key, json.loads(value)))
        except json.JSONDecodeError:
            extra.append((key, value))
    if extra:  # a misspelt key would fail every unit inside vLLM, after its engine started
        import dataclasses

        from vllm.engine.arg_utils import EngineArgs  # seconds to import: only when asked

        known = {f.name for f in dataclasses.fields(EngineArgs)} | {"chat_template"}  # LLM's own
        wrong = [k for k, _ in extra if k not in known]
        if wrong:
            near = difflib.get_close_matches(wrong[0], known, n=1)
            raise UserError(f"--engine-arg {wrong[0]}: vLLM has no such "
                            "engine argument" + (f" (did you mean {near[0]}?)" if near else "")
                            + "; see vLLM's EngineArgs")
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
        from softlabels.data.heads import logit_transform

        logit_transform(config)
    return config, tok


def _top_k(args) -> int:
    """--top-k, or its default: 64, none with --samples."""
    if args.top_k is not None:
        return args.top_k
    return 0 if args.samples else 64


def _check_numbers(args, k: int) -> None:
    """Every number a flag gives, checked before anything runs: a NaN temperature or a negative
    step would otherwise cost the whole teacher run (and be found only by verify, or never)."""
    import math

    from softlabels.data.format import check_logprob_step

    if not 0 <= args.samples <= 65535 or not args.sample_temperature > 0 or \
            not math.isfinite(args.sample_temperature):
        raise UserError("--samples must be between 0 and 65535, --sample-temperature a finite "
                        "number above 0")
    check_logprob_step(args.logprob_step)
    if not (math.isfinite(args.temperature) and args.temperature >= 0) or \
            not 0 < args.top_p <= 1:
        raise UserError("--temperature must be a finite number >= 0 and --top-p in (0, 1]")
    if args.retries < 0 or not args.worker_timeout > 0 or args.kv_cache_gib < 1 or \
            args.tensor_parallel_size < 1:
        raise UserError("--retries must be >= 0, --worker-timeout above 0, --kv-cache-gib and "
                        "--tensor-parallel-size >= 1")
    if not 0 <= args.seed < 1 << 31:
        raise UserError(f"--seed {args.seed} must be between 0 and 2**31 - 1 (vLLM seeds its "
                        "engine with it, and each prompt with it plus the prompt's index)")
    if k == 0 and not args.samples:
        raise UserError("--top-k 0 stores nothing: give --top-k K, --samples N, or both")
    if k and args.samples and args.sample_temperature != 1.0:
        raise UserError("--sample-temperature with --top-k: the draws beside a top-k share the "
                        "teacher's mass outside it at temperature 1, so they must come from "
                        "temperature 1 too; drop --sample-temperature, or use --samples alone "
                        "(its targets are then the teacher at that temperature)")
    if args.samples and args.generate_responses:
        raise UserError("--samples scores existing text; with --generate-responses the targets "
                        "are the top-k of each sampled step: drop one of them")


def _max_length(args, config) -> int:
    """--max-length, or its default: 2048, or the teacher's context where that is shorter. A
    window longer than the context fails in every unit inside vLLM, after the engine started."""
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    if args.max_length is None:
        return min(2048, context) if context else 2048
    if context and args.max_length > context:
        raise UserError(f"--max-length {args.max_length} is longer than the teacher's context "
                        f"({context} positions, max_position_embeddings): give --max-length "
                        f"{context} or less")
    return args.max_length


def _check_windows(args, max_length: int) -> None:
    if max_length < 1 or args.unit_tokens < 1 or args.shard_tokens < 1:
        raise UserError("--max-length, --unit-tokens and --shard-tokens must be positive")
    if args.stride is not None and not 1 <= args.stride <= max_length:
        raise UserError(f"--stride {args.stride} must be between 1 and --max-length "
                        f"{max_length}")
    if args.stride is not None and args.generate_responses:
        raise UserError("--stride is for records cut into windows; with --generate-responses "
                        "each prompt is one window")


def _sampling(args):
    """The teacher-written responses' settings (--generate-responses), or None."""
    from softlabels.generate.engine import Sampling

    if args.generate_responses:
        if not (args.prompt_column or args.messages_column) or args.response_column:
            raise UserError("--generate-responses needs --prompt-column or --messages-column "
                            "(and no --response-column: the teacher writes the responses)")
        if args.n < 1 or args.max_new_tokens < 1:
            raise UserError("--n and --max-new-tokens must be >= 1")
        return Sampling(args.max_new_tokens, args.temperature, args.top_p, args.n, args.seed)
    if args.prompt_column and not args.response_column:
        raise UserError("--prompt-column needs --response-column (or --generate-responses)")
    return None


def check_response_model(args, teacher_tok, teacher_config, max_length: int) -> Path | None:
    """The response model, if any, checked like the teacher (a causal LM, safetensors, no
    remote code unless asked) and against it: the ids it writes must mean the same text to the
    teacher, and fit its embedding."""
    if args.response_model is None:
        return None
    if not args.generate_responses:
        raise UserError("--response-model writes responses: it goes with --generate-responses")
    from softlabels.data.store import is_url

    if is_url(args.output):
        raise UserError("--response-model writes to a local --output folder (a URL's job "
                        "cannot hold its written responses yet); write locally, then "
                        "`softlabels push` the dataset")
    path = Path(args.response_model)
    config, tok = check_teacher(path, 0, args.trust_remote_code, scoring=False)
    if tok.get_vocab() != teacher_tok.get_vocab():
        raise UserError(f"--response-model {path} has another tokenizer than the teacher: the "
                        "teacher scores the ids it writes, so both must use the same one")
    vocab, teacher_vocab = config.get_text_config().vocab_size, \
        teacher_config.get_text_config().vocab_size
    if vocab > teacher_vocab:
        raise UserError(f"--response-model {path} has {vocab} outputs, the teacher "
                        f"{teacher_vocab}: it could write ids the teacher cannot read")
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    if context and context < max_length:
        raise UserError(f"--response-model {path} holds {context} positions, less than "
                        f"--max-length {max_length}: give --max-length {context} or less")
    return path


def main(args, client=None) -> int:
    """`softlabels generate`. `client`: an embedded cluster's client that outlives this job
    (`softlabels on-policy` keeps one across its rounds, and with it the workers' engines)."""
    from contextlib import nullcontext

    from softlabels.data.store import is_url
    from softlabels.generate.cluster import (
        BatchOptions,
        batch_cluster,
        connect,
        job_script,
        tls_security,
    )
    from softlabels.generate.driver import lost_work, wait_for_a_worker
    from softlabels.generate.engine import EngineConfig, on_cpu
    from softlabels.generate.inputs import open_corpus
    from softlabels.generate.records import Fields
    from softlabels.generate.state import OutputLock, client_dir

    t_start = time.time()
    teacher = Path(args.teacher)
    out = args.output if is_url(args.output) else Path(args.output)  # a URL: objects.py
    if is_url(out):
        from softlabels.generate.objects import check_output

        check_output(out)
    fields = Fields(text=args.text_column, prompt=args.prompt_column,
                    response=args.response_column, messages=args.messages_column)
    sampling = _sampling(args)
    k = _top_k(args)
    _check_numbers(args, k)
    corpus = open_corpus(args.input, fields.columns)
    extra = _engine_extra(args.engine_arg)
    config, tok = check_teacher(teacher, k, args.trust_remote_code,
                                safetensors_only="load_format" not in dict(extra),
                                scoring=not args.generate_responses or
                                args.response_model is not None)
    max_length = _max_length(args, config)
    _check_windows(args, max_length)
    response_model = check_response_model(args, tok, config, max_length)
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
        print(job_script(batch, args.resource, client_dir(out)))
        return 0
    n_workers = embedded_workers(args)

    def run(client, workers, supervisor=None):
        job = _job(args, teacher, corpus, fields, sampling, k, max_length, response_model)
        # what the job's numbers are (k, window, seed, draws) comes from the Job alone
        engine = EngineConfig(
            teacher=str(teacher.resolve()), k=job.k, max_length=job.max_length, dtype=args.dtype,
            tensor_parallel_size=args.tensor_parallel_size,
            max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_gib=args.kv_cache_gib,
            seed=job.seed, draws=job.draws, sample_temperature=job.sample_temperature,
            extra=extra, trust_remote_code=args.trust_remote_code)
        writer = None
        if response_model is not None:  # the same engine settings, the model's own weights
            import dataclasses

            writer = dataclasses.replace(engine, teacher=str(response_model.resolve()), k=0,
                                         draws=0)
        return _run(args, client, out, job, engine, corpus, fields, sampling, tok,
                    config.get_text_config().vocab_size, cpu, workers, supervisor, writer)

    supervisor_report = None
    if batch:  # the jobs' TLS files go under OUT: take the folder before anything is written
        lock = OutputLock(out)
        try:
            with batch_cluster(batch, args.resource, client_dir(out), security) as \
                    (client, supervisor):
                print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr)
                wait_for_a_worker(client, supervisor, batch, out)
                result = run(client, batch.workers, supervisor)
                supervisor_report = lost_work(out, supervisor)
        finally:
            lock.release()
    else:
        # Connect first: a refused client (TLS, address) writes nothing.
        with (nullcontext(client) if client is not None else
              connect(args.scheduler, n_workers, args.resource, security)) as client:
            print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr)
            lock = OutputLock(out)
            try:
                result = run(client, n_workers)
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
    if times.get("writer_teacher"):
        print(f"time in workers, response model: engine start "
              f"{times['writer_engine_start']:.1f} s, writing {times['writer_teacher']:.1f} s, "
              f"committing {times['writer_write']:.1f} s (summed over units)", file=sys.stderr)
    if times:
        print(f"time in workers: engine start {times['engine_start']:.1f} s, teacher "
              f"{times['teacher']:.1f} s, encoding and writing {times['write']:.1f} s (summed "
              "over units)", file=sys.stderr)
    if supervisor_report:
        print(supervisor_report, file=sys.stderr)
    return 0


def _files(folder: Path) -> list[Path]:
    """A model folder's files, hidden ones aside."""
    return [f for f in folder.rglob("*") if f.is_file() and
            not any(part.startswith(".") for part in f.relative_to(folder).parts)]


def _job(args, teacher: Path, corpus, fields, sampling, k: int, max_length: int,
         response_model: Path | None = None):
    """The Job: everything that changes the output, the teacher, the input and the response
    model by content."""
    from softlabels.generate.fingerprint import fingerprint_files
    from softlabels.generate.inputs import PIECE_BYTES
    from softlabels.generate.plan import Job
    from softlabels.generate.publish import vllm_version

    print(f"hashing teacher {teacher} and input {args.input} ...", file=sys.stderr)
    return Job(
        teacher_hash=fingerprint_files(_files(teacher), teacher, args.rehash),
        input_fingerprint=corpus.fingerprint(args.rehash),
        k=k,
        max_length=max_length,
        unit_tokens=args.unit_tokens,
        logprob_step=args.logprob_step,
        draws=args.samples,
        sample_temperature=args.sample_temperature,
        seed=args.seed,
        shard_tokens=args.shard_tokens,
        stride=0 if args.stride in (None, max_length) else args.stride,
        piece_bytes=PIECE_BYTES,
        fields=repr(fields),
        sampling=repr(sampling) if sampling else "",
        response_model=fingerprint_files(_files(response_model), response_model, args.rehash)
        if response_model else "",
        engine=json.dumps({"dtype": args.dtype, "engine_args": sorted(args.engine_arg),
                           "vllm": vllm_version(), "trust_remote_code": args.trust_remote_code}),
    )


def _run(args, client, out, job, engine, corpus, fields, sampling, tok, vocab_size, cpu,
         n_workers, supervisor=None, writer=None):
    """Claim the folder for the job, run it, publish: -> (manifest, plan, times); with
    --dry-run, plan (and calibrate) only: -> None."""
    from softlabels.data.store import is_url, store
    from softlabels.generate import objects
    from softlabels.generate.cluster import cpu_groups, gpu_groups
    from softlabels.generate.driver import Driver, run_job
    from softlabels.generate.plan import claim
    from softlabels.generate.publish import publish_dataset

    if is_url(out):
        objects.claim(store(out), job)
    else:
        claim(out, job)
    local = not (args.scheduler or args.cluster)  # embedded workers: bind cores or GPUs
    driver = Driver(client, out, job, engine, sampling, workers=n_workers,
                    resource=args.resource, retries=args.retries, rehash=args.rehash,
                    cpu_binds=cpu_groups(n_workers) if (cpu and local) else (),
                    gpu_binds=gpu_groups(n_workers, args.tensor_parallel_size)
                    if (not cpu and local) else (),
                    supervisor=supervisor,
                    # a URL's job: remote workers may not see a local input; the client plans
                    client_plans=is_url(out) and not local and not is_url(args.input),
                    writer=writer)
    plan = run_job(driver, corpus, fields, dry_run=args.dry_run, calibrate=args.calibrate)
    if plan is None:
        return None
    m = publish_dataset(out, job, plan, tok, vocab_size, Path(args.teacher), args.input,
                        Path(args.response_model) if args.response_model else None)
    return m, plan, driver.times


def embedded_workers(args) -> int:
    """The embedded cluster's workers: --workers, or one per GPU (per TP group), 1 on a CPU."""
    from softlabels.generate.engine import on_cpu

    return args.workers or _default_workers(on_cpu(), args.tensor_parallel_size)


def _default_workers(cpu: bool, tensor_parallel: int) -> int:
    """One engine per GPU (or per tensor-parallel group); one on a CPU machine: two engines
    pinned to one core each were 7 % faster per unit on 2 cores but no faster end to end (two
    engine starts) and hold two copies of the model (BENCHMARKS.md)."""
    if cpu:
        return 1
    import torch

    return max(1, torch.cuda.device_count() // tensor_parallel)
