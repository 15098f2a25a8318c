"""Where the work runs: an embedded LocalCluster, an existing Dask cluster (`--scheduler`), or
worker jobs of the cluster's batch scheduler (`--cluster slurm`, through dask-jobqueue).

Security (README, "Security"): whoever can talk to a Dask scheduler can run any Python on its
workers. The embedded cluster therefore listens on loopback only; an external cluster on a shared
network runs with Dask's mutual TLS (`tls://`, each side presenting a certificate signed by the
cluster's CA), and `generate` presents its certificate with --tls-ca-file/--tls-cert/--tls-key or
Dask's own `distributed.comm.tls.*` configuration.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from softlabels.data.errors import UserError


def cpu_groups(n_workers: int) -> tuple[str, ...]:
    """Split this machine's cores into disjoint VLLM_CPU_OMP_THREADS_BIND lists, one per worker.

    With the default "auto" every engine binds the same cores and two workers fight over them.
    """
    cores = sorted(os.sched_getaffinity(0))
    if n_workers > len(cores):
        raise UserError(f"--workers {n_workers} exceeds this machine's {len(cores)} cores")
    per = len(cores) // n_workers
    return tuple(
        ",".join(str(c) for c in cores[i * per : (i + 1) * per]) for i in range(n_workers)
    )


def gpu_groups(n_workers: int, tensor_parallel: int) -> tuple[str, ...]:
    """CUDA_VISIBLE_DEVICES per local worker: disjoint groups of `tensor_parallel` GPUs."""
    import torch

    n = torch.cuda.device_count()
    if n_workers * tensor_parallel > n:
        raise UserError(f"--workers {n_workers} x --tensor-parallel-size {tensor_parallel} "
                        f"needs {n_workers * tensor_parallel} GPUs; this machine has {n}")
    return tuple(",".join(str(g) for g in range(i * tensor_parallel, (i + 1) * tensor_parallel))
                 for i in range(n_workers))


# The nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also switches off glibc's
# adaptive mmap threshold: every large temporary (vLLM's logits) is then mmapped and faulted in
# anew. Measured: the teacher ran 20 % slower. These values restore the adaptive maximum.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "134217728"}


def tls_security(ca_file: str | None, cert: str | None, key: str | None):
    """A distributed.security.Security from the three TLS flags, or None when none is given (then
    Dask's configuration, `distributed.comm.tls.*`, applies as it does for any Dask client)."""
    given = {"--tls-ca-file": ca_file, "--tls-cert": cert, "--tls-key": key}
    if not any(given.values()):
        return None
    missing = [flag for flag, v in given.items() if not v]
    if missing:
        raise UserError(f"{', '.join(missing)} missing: mutual TLS needs the CA certificate, "
                        "this client's certificate and its key")
    for flag, path in given.items():
        if not os.path.isfile(path):
            raise UserError(f"{flag} {path} does not exist")
    from distributed.security import Security

    return Security(tls_ca_file=ca_file, tls_client_cert=cert, tls_client_key=key,
                    require_encryption=True)


def _refusal(scheduler: str, e: BaseException) -> str:
    """What went wrong connecting to an external scheduler, and what to do, in one line."""
    from distributed.comm.core import FatalCommClosedError

    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, TypeError) and "ssl_context" in text:
        return (f"{scheduler} speaks TLS but no certificates were given: pass --tls-ca-file, "
                "--tls-cert and --tls-key (or set distributed.comm.tls.* in Dask's config)")
    if isinstance(e, RuntimeError) and "encryption required" in text:
        return (f"TLS certificates were given but {scheduler} is plain tcp: use the scheduler's "
                "tls:// address (`dask scheduler --protocol tls ...` prints it)")
    # TLS 1.3: a client certificate the scheduler rejects can surface as an alert or as a bare
    # EOF (SSLEOFError), depending on timing
    if isinstance(e, FatalCommClosedError) or (scheduler.startswith("tls://") and "SSL" in text):
        return (f"TLS handshake with {scheduler} failed ({text}): this client's certificate and "
                "the scheduler's must be signed by the CA given in --tls-ca-file")
    if scheduler.startswith("tcp://") and "reset by peer" in text:
        return (f"the scheduler at {scheduler} closed the connection ({text}); if it was "
                "started with --protocol tls, use tls://... and pass --tls-ca-file, --tls-cert "
                "and --tls-key")
    return (f"cannot reach the Dask scheduler at {scheduler} ({text}); start it with "
            "`dask scheduler` and check the address")


@contextmanager
def connect(scheduler: str | None, n_workers: int, resource: str, security=None) -> Iterator:
    """Yield a distributed.Client; an embedded cluster lives exactly as long as the block."""
    from distributed import Client, LocalCluster

    if scheduler:
        kw = {"security": security} if security is not None else {}
        try:
            client = Client(scheduler, timeout="30s", **kw)
        except (OSError, TypeError, RuntimeError) as e:
            raise UserError(_refusal(scheduler, e)) from e
        with client:
            yield client
        return
    if security is not None:
        raise UserError("--tls-* options are for an external cluster (--scheduler tls://...); "
                        "the embedded cluster listens on loopback only")
    import dask

    threads = max(1, len(os.sched_getaffinity(0)) // n_workers)
    # glibc reads MALLOC_* at process start, so they must be in the pre-spawn environment
    spawn_env = {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in MALLOC_ENV.items()}
    # non-daemonic workers: a tensor-parallel engine starts one child process per rank
    with dask.config.set({**spawn_env, "distributed.worker.daemon": False}):
        cluster = LocalCluster(
            host="127.0.0.1",  # scheduler, workers and nannies: loopback only
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            resources={resource: 1},
            memory_limit=0,  # an engine's memory is unmanaged; Dask would pause the worker
            dashboard_address="127.0.0.1:0",
            silence_logs=logging.ERROR,
            # VLLM_HOST_IP: a multi-process engine's own rendezvous stays on loopback too
            env={"OMP_NUM_THREADS": str(threads), "VLLM_LOGGING_LEVEL": "ERROR",
                 "VLLM_HOST_IP": "127.0.0.1"},
        )
    with cluster, Client(cluster) as client:
        yield client


BATCH_SYSTEMS = ("slurm", "pbs", "sge", "lsf")  # dask-jobqueue's; only Slurm is tested


@dataclass(frozen=True)
class BatchOptions:
    """What `generate --cluster KIND` asks the batch scheduler for; None: Dask's `jobqueue`
    configuration (~/.config/dask/jobqueue.yaml) decides, as for any dask-jobqueue user."""

    kind: str
    workers: int  # worker jobs kept running, one teacher engine each
    queue: str | None = None
    walltime: str | None = None
    memory: str | None = None
    cores: int | None = None
    gpus: int = 0  # per worker job (Slurm: --gres=gpu:N)
    job_extra: tuple[str, ...] = ()  # more scheduler directives, without their prefix
    scheduler_host: str | None = None  # where the scheduler listens: the workers reach it there
    worker_timeout: float = 600.0  # no worker started by then: say why and stop


def _batch_kwargs(o: BatchOptions, resource: str, state: Path, cores: int) -> dict:
    """dask-jobqueue's keyword arguments: ours where the user gave a flag, the rest from the
    jobqueue configuration. One worker process per job, its own process (no nanny): it may start
    vLLM's rank processes, and glibc reads the malloc settings from the job's environment."""
    import dask

    host = o.scheduler_host or dask.config.get(f"jobqueue.{o.kind}.scheduler-options",
                                               {}).get("host") or _my_address()
    env = {**MALLOC_ENV, "OMP_NUM_THREADS": str(cores), "VLLM_LOGGING_LEVEL": "ERROR",
           "TOKENIZERS_PARALLELISM": "false"}
    kw = {"processes": 1, "cores": cores, "nanny": False,
          "memory": o.memory or dask.config.get(f"jobqueue.{o.kind}.memory") or "16GiB",
          "queue": o.queue, "walltime": o.walltime,
          "job_name": job_name(state),
          "worker_extra_args": [*dask.config.get(f"jobqueue.{o.kind}.worker-extra-args", []),
                                "--resources", f"{resource}=1", "--memory-limit", "0"],
          "job_script_prologue": [*dask.config.get(f"jobqueue.{o.kind}.job-script-prologue",
                                                   []),
                                  *(f"export {k}={v}" for k, v in env.items())],
          "job_extra_directives": [*dask.config.get(f"jobqueue.{o.kind}.job-extra-directives",
                                                    []),
                                   *([f"--gres=gpu:{o.gpus}"] if o.gpus and o.kind == "slurm"
                                     else []), *o.job_extra],
          "scheduler_options": {**dask.config.get(f"jobqueue.{o.kind}.scheduler-options", {}),
                                "host": host, "dashboard_address": f"{host}:0"},
          "shared_temp_directory": str(state / "tls"),
          "log_directory": dask.config.get(f"jobqueue.{o.kind}.log-directory") or
          str(state / "worker-logs"),
          "python": dask.config.get(f"jobqueue.{o.kind}.python") or sys.executable}
    return {k: v for k, v in kw.items() if v is not None}


def job_name(state: Path) -> str:
    """The worker jobs' name: softlabels-<output folder>, for squeue and people."""
    return f"softlabels-{state.parent.name}"[:64]


def _my_address() -> str:
    """This host's address on the network its name resolves to (where worker jobs reach it)."""
    import socket

    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


@contextmanager
def batch_cluster(o: BatchOptions, resource: str, state: Path, security=None
                  ) -> Iterator[tuple]:
    """Yield (client, supervisor) of a dask-jobqueue cluster of `o.workers` worker jobs; every
    job it submitted is cancelled when the block ends, however it ends (SIGTERM included)."""
    import signal

    import dask_jobqueue
    from distributed import Client
    from distributed.security import Security

    if o.kind not in BATCH_SYSTEMS:
        raise UserError(f"--cluster {o.kind}: choose from {', '.join(BATCH_SYSTEMS)}")
    import dask

    cores = o.cores or dask.config.get(f"jobqueue.{o.kind}.cores") or 1
    (state / "tls").mkdir(parents=True, exist_ok=True)
    security = security or Security.temporary()  # mutual TLS, certificates made for this run
    cls = getattr(dask_jobqueue, f"{o.kind.upper()}Cluster")
    # Jobs ending early is routine on a batch cluster (walltime, preemption): let a unit outlive
    # more lost workers than Dask's default of 3 before it is called a failure (generate keeps
    # at most two units on a worker, so one loss touches few)
    with dask.config.set({"distributed.scheduler.allowed-failures": 20}):
        cluster = cls(**_batch_kwargs(o, resource, state, cores), security=security,
                      protocol="tls://")
    client = None
    previous = signal.signal(signal.SIGTERM, _interrupt)  # walltime, scancel of generate itself
    try:
        if o.kind == "slurm":
            _test_submission(cluster.job_script(), state)
        client = Client(cluster, security=security)
        supervisor = Supervisor(cluster, o, job_name(state))
        supervisor.start()
        try:
            yield client, supervisor
        finally:
            supervisor.stop()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if client is not None:
            client.close()
        cluster.close()  # cancels every job it submitted


def _test_submission(script: str, state: Path) -> None:
    """Ask Slurm whether it would take the worker job (`sbatch --test-only`, nothing queued):
    one it refuses (memory or cores no node has, an unknown partition) would be refused at
    every scale() inside dask-jobqueue, a logged traceback, and the run would wait the whole
    --worker-timeout for a job that was never queued."""
    import subprocess

    path = state / "test-job.sh"
    path.write_text(script)
    try:
        p = subprocess.run(["sbatch", "--test-only", str(path)], capture_output=True, text=True,
                           timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"--cluster slurm: sbatch cannot be run here ({e})") from e
    finally:
        path.unlink(missing_ok=True)
    if p.returncode:
        said = " ".join((p.stderr.strip().splitlines() or ["no reason given"])[-1].split())
        raise UserError(f"--cluster slurm: sbatch refuses the worker job ({said}); change "
                        "--worker-memory, --worker-cores, --gpus-per-worker, --queue, --walltime "
                        "or --job-extra (--print-job-script shows the job)")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def job_script(o: BatchOptions, resource: str, state: Path) -> str:
    """The script each worker job runs, made without submitting anything."""
    import dask_jobqueue
    from distributed.security import Security

    (state / "tls").mkdir(parents=True, exist_ok=True)
    cls = getattr(dask_jobqueue, f"{o.kind.upper()}Cluster")
    import dask

    with cls(**_batch_kwargs(o, resource, state, o.cores or
                             dask.config.get(f"jobqueue.{o.kind}.cores") or 1),
             security=Security.temporary(), protocol="tls://") as cluster:
        return cluster.job_script()


LIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
        "RESIZING", "SIGNALING", "STAGE_OUT")  # Slurm's states of a job not (yet) ended


class Supervisor:
    """Keeps `workers` worker jobs asked for while the job runs: a job that ends (scancel,
    preemption, walltime, a crashed worker), queued or running, is replaced. Slurm's jobs are
    watched with squeue (by the jobs' name, every state, so that an ended job says how it
    ended); other systems through the workers the scheduler loses."""

    def __init__(self, cluster, o: BatchOptions, name: str):
        import threading

        self.cluster, self.o, self.name = cluster, o, name
        self.states: dict[str, tuple[str, str]] = {}  # job id -> (state, reason)
        self.ended: dict[str, str] = {}  # job id of ours -> how it ended
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="softlabels-jobs", daemon=True)

    @property
    def replaced(self) -> int:
        return len(self.ended)

    def start(self) -> None:
        self.cluster.scale(jobs=self.o.workers)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def jobs(self) -> dict[str, str]:
        """{worker name: job id} of the jobs submitted and not known to have ended."""
        return {n: w.job_id for n, w in list(self.cluster.workers.items())
                if getattr(w, "job_id", None)}

    def _query(self) -> dict[str, tuple[str, str]] | None:
        """{job id: (state, reason)} of the jobs of our name Slurm still knows (ended ones for
        MinJobAge, 300 s by default), or None where that cannot be asked."""
        import subprocess

        if self.o.kind != "slurm":
            return None
        p = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i %T %r", "-n", self.name],
                           capture_output=True, text=True)
        if p.returncode:
            return None
        return {i: (st, r) for i, st, r in (
            (line.split(None, 2) + ["", ""])[:3] for line in p.stdout.splitlines())}

    def _run(self) -> None:
        while not self._stop.wait(3.0):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - a failed poll is retried at the next one
                logging.getLogger(__name__).debug("job poll failed", exc_info=True)

    def check(self) -> None:
        jobs = self.jobs()
        states = self._query()
        if states is not None:
            self.states = states
            # a new job gets the lowest free worker name: replace a lost one only once the
            # scheduler has let its worker go, or the new worker is refused ("name taken")
            held = {w["name"] for w in self.cluster.scheduler_info.get("workers", {}).values()}
            for n, i in jobs.items():
                if states.get(i, ("",))[0] in LIVE or n in held:
                    continue
                self.ended[i] = states.get(i, ("ENDED",))[0]  # how it ended, for the report
                self.cluster.worker_spec.pop(n, None)
                w = self.cluster.workers.pop(n, None)
                if w is not None:
                    self.cluster.sync(w.close)
        self.cluster.scale(jobs=self.o.workers)  # up to `workers` again

    def status(self) -> str:
        """'R running, Q queued' from the batch scheduler, or the scheduler's worker count."""
        if self.o.kind == "slurm":
            s = [st for i, (st, _) in self.states.items() if i in self.jobs().values()]
            return f"{s.count('RUNNING')} running, {s.count('PENDING')} queued"
        return f"{len(self.cluster.scheduler_info.get('workers', {}))} running"

    def why_waiting(self) -> str:
        """The batch scheduler's reasons the jobs are not running (Slurm), for messages."""
        reasons = sorted({r for st, r in self.states.values() if st == "PENDING" and r})
        return ", ".join(reasons)

    def report(self) -> str:
        """How the replaced jobs ended, e.g. 'TIMEOUT 2, CANCELLED 1'."""
        how = [st for st in self.ended.values()]
        return ", ".join(f"{st} {how.count(st)}" for st in sorted(set(how)))
