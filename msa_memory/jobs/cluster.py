"""Dask clients for encode jobs: an existing one, a scheduler address, or a local cluster sized to the machine.

Sizing (no scheduler given):
- GPUs present: one worker process per GPU, one thread each (a worker picks ``cuda:<its index>``).
- CPU only, 1 worker (the default): the worker runs as a thread pool inside this process
  (``processes=False``), so the model loaded on the client for the plan is the same object the
  worker encodes with (loaded once), and torch's intra-op threads use every core.
- CPU only, N > 1 workers (``--workers N``): N processes with one thread each; torch in each is
  limited to ``cores // N`` threads so the workers do not oversubscribe the cores.

The job, not this module, decides what runs where; nothing here imports torch at module level.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from msa_memory.errors import ConfigError, JobError

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["job_client", "cpu_count", "gpu_count", "default_workers"]


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        return max(1, os.cpu_count() or 1)


def gpu_count() -> int:
    try:
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - no torch / broken driver: CPU
        return 0


def default_workers() -> int:
    return gpu_count() or 1


@contextlib.contextmanager
def job_client(
    *, client: Client | None = None, scheduler: str | None = None, workers: int | None = None,
) -> Iterator[tuple[Client, int | None]]:
    """Yield ``(client, torch_threads_per_worker)``; a cluster this function started is closed on exit."""
    if client is not None and scheduler is not None:
        raise ConfigError("Pass either client= or scheduler=, not both.")
    if workers is not None and int(workers) < 1:
        raise ConfigError(f"workers must be >= 1, got {workers!r}.", hint="Use --workers 1 or more.")
    from distributed import Client, LocalCluster

    if client is not None:
        yield client, None
        return
    if scheduler is not None:
        try:
            c = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError) as e:
            raise JobError(
                f"Cannot reach the Dask scheduler at {scheduler!r} ({type(e).__name__}: {e}).",
                hint="Check the address (tcp://HOST:PORT) and that `dask scheduler` is running there.",
            ) from e
        try:
            yield c, None
        finally:
            c.close()
        return
    n_gpu = gpu_count()
    n = int(workers) if workers is not None else (n_gpu or 1)
    if n_gpu == 0 and n == 1:
        cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                               dashboard_address=None)
        threads = None
    else:
        threads = max(1, cpu_count() // n) if n_gpu == 0 else None
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=40)
    c = Client(cluster)
    try:
        yield c, threads
    finally:
        c.close()
        cluster.close()
