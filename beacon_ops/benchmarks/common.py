"""Timing helpers shared by the benchmarks: medians of repeated runs, device-synchronised."""
from __future__ import annotations

import os
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


def busy_machine_threads() -> tuple[int | None, str]:
    """``(1, reason)`` when the 1-minute load average is at least the CPU count, else
    ``(None, "")``: on a busy machine parallel regions wait for descheduled threads (profiled
    here: 2-25x slower with 2 threads on 2 shared cores), so benchmarks run single-threaded."""
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load >= cpus:
        return 1, f"load average {load:.1f} >= {cpus} CPUs"
    return None, ""


def print_table(rows: list[dict], columns: dict[str, str] | None = None) -> None:
    """Print a list of flat dicts as an aligned text table; with ``columns`` (key -> header),
    only those keys, in that order, under those headers."""
    if not rows:
        return
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    if columns:
        cols = [k for k in columns if k in cols]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    heads = [columns.get(c, c) if columns else c for c in cols]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(heads)]
    print("  ".join(h.rjust(w) for h, w in zip(heads, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def print_value(name: str, value) -> None:
    """Print a summary figure: a list of dicts as a table, a dict of dicts (metric -> {case:
    value}) as a table with one row per metric, anything else on one line."""
    if isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
        print(f"{name}:")
        print_table(value)
    elif (isinstance(value, dict) and value
          and all(isinstance(x, dict) and x for x in value.values())):
        print(f"{name}:")
        print_table([{"": metric, **cases} for metric, cases in value.items()])
    elif isinstance(value, dict):
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in value.items()))
    else:
        print(f"{name}: {value}")
