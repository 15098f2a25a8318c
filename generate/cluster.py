"""Where the work runs: an embedded LocalCluster, or an existing Dask cluster (`--scheduler`).

Security (README, "Security"): whoever can talk to a Dask scheduler can run any Python on its
workers. The embedded cluster therefore listens on loopback only; an external cluster on a shared
network runs with Dask's mutual TLS (`tls://`, each side presenting a certificate signed by the
cluster's CA), and `generate` presents its certificate with --tls-ca-file/--tls-cert/--tls-key or
Dask's own `distributed.comm.tls.*` configuration.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

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
