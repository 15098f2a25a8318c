"""Where the work runs: an embedded LocalCluster, or an existing Dask cluster (`--scheduler`)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from data.errors import UserError


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
    threads = max(1, len(os.sched_getaffinity(0)) // n_workers)
    cluster = LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,
        resources={resource: 1},
        dashboard_address="127.0.0.1:0",
        silence_logs=logging.ERROR,
        env={"OMP_NUM_THREADS": str(threads), "VLLM_LOGGING_LEVEL": "ERROR"},
    )
    with cluster, Client(cluster) as client:
        yield client
