"""Small helpers the benchmarks share: the repository root, the commit a result was measured at, and
device timing (a synchronised timer, and the floors a result is compared with: copy bandwidth, GEMM
throughput, the round trip any CUDA route pays).

Benchmarks import this module (``sys.path`` holds ``benchmarks/`` when one runs as a script), never each other.
"""

from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "git_commit", "sync", "timeit", "best_time", "copy_bandwidth", "gemm_flops", "round_trip_floor"]


def git_commit() -> str:
    """The short commit id of the checkout ("" where git cannot say)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=False).stdout.strip()
    except OSError:
        return ""


def sync(dev: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on a CPU."""
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, dev: torch.device, rounds: int = 5, warmup: int = 2, stat=statistics.median) -> float:
    """``stat`` (median) of the seconds of ``rounds`` timed calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(dev)
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        ts.append(time.perf_counter() - t0)
    return stat(ts)


def best_time(fn, dev: torch.device, rounds: int, warmup: int = 2) -> float:
    """Fewest seconds of ``rounds`` timed calls after ``warmup`` calls (for the floors: the tightest one seen)."""
    return timeit(fn, dev, rounds=rounds, warmup=warmup, stat=min)


def copy_bandwidth(dev: torch.device, nbytes: int) -> float:
    """Bytes/s of a large device-local copy, counting bytes read + written: the fastest of 7 copies (on the
    shared 2-core VM the median of 5 moved between 19 and 34 GB/s from run to run)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev).normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / best_time(lambda: dst.copy_(src), dev, rounds=7)


def gemm_flops(dev: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in ``dtype`` (the compute ceiling of the score GEMM)."""
    n = 8192 if dev.type == "cuda" else 2048
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    return 2 * n ** 3 / best_time(lambda: a @ b, dev, rounds=5 if dev.type == "cuda" else 3, warmup=1)


def round_trip_floor(dev: torch.device) -> float:
    """Seconds of the least any route pays on ``dev`` besides reading keys: on CUDA one graph replay
    of a one-element kernel, its 16 ids + 16 scores copied to pinned host memory, and a sync (what
    ``RouterIndex.route`` does around its work); 0 on a CPU."""
    if dev.type != "cuda":
        return 0.0
    x = torch.zeros(32, device=dev)
    host = torch.empty(32, pin_memory=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        x.add_(1)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        x.add_(1)
        host.copy_(x, non_blocking=True)
    return timeit(g.replay, dev, rounds=200, warmup=20)
