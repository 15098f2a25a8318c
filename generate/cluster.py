"""Where the work runs: an embedded LocalCluster, or an existing Dask cluster (`--scheduler`)."""

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


@contextmanager
def connect(scheduler: str | None, n_workers: int, resource: str) -> Iterator:
    """Yield a distributed.Client; an embedded cluster lives exactly as long as the block."""
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as e:
            raise UserError(
                f"cannot reach the Dask scheduler at {scheduler} ({e}); start it with "
                "`dask scheduler` and check the address"
            ) from e
        with client:
            yield client
        return
    import dask

    threads = max(1, len(os.sched_getaffinity(0)) // n_workers)
    # glibc reads MALLOC_* at process start, so they must be in the pre-spawn environment
    spawn_env = {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in MALLOC_ENV.items()}
    with dask.config.set(spawn_env):
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            resources={resource: 1},
            memory_limit=0,  # an engine's memory is unmanaged; Dask would pause the worker
            dashboard_address="127.0.0.1:0",
            silence_logs=logging.ERROR,
            env={"OMP_NUM_THREADS": str(threads), "VLLM_LOGGING_LEVEL": "ERROR"},
        )
    with cluster, Client(cluster) as client:
        yield client
