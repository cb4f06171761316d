"""Timing helpers shared by the benchmarks: medians of repeated runs, device-synchronised."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, min_time: float = 0.2, max_reps: int = 50,
            warmup: int = 1) -> float:
    """Median wall time in seconds of ``fn()`` over repetitions totalling about ``min_time``."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    total = 0.0
    while (total < min_time or len(times) < 3) and len(times) < max_reps:
        t0 = time.perf_counter()
        fn()
        sync(device)
        dt = time.perf_counter() - t0
        times.append(dt)
        total += dt
    return statistics.median(times)


def matmul_gflops(device: str, n: int = 1024, dtype: torch.dtype = torch.float32) -> float:
    """The machine's ceiling measured now: GFLOP/s of an n x n x n matmul."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, device)
    return 2 * n**3 / t / 1e9


def copy_gbps(device: str, nbytes: int = 256 << 20) -> float:
    """The machine's ceiling measured now: GB/s of a plain tensor copy (read + write counted)."""
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device)
    return 2 * nbytes / t / 1e9
