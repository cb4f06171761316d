"""Peak memory of a block of code: the CUDA allocator's peak on the GPU, the kernel's
resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) on the CPU."""
from __future__ import annotations

import gc
import re
from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["reset_peak", "read_peak", "peak_memory"]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1))


def reset_peak(device: str) -> float:
    """Reset the peak-memory counter of ``device``; returns the current level in bytes."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return float(torch.cuda.memory_allocated())
    # Give freed heap pages back to the OS first (loading a checkpoint leaves hundreds of MB of
    # free but resident heap), so that the block's allocations show in the resident set.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS") * 1024.0


def read_peak(device: str) -> float:
    """Peak bytes since :func:`reset_peak`: allocated CUDA memory, or the process's resident set."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated())
    return _status_kb("VmHWM") * 1024.0


@contextmanager
def peak_memory(device: str) -> Iterator[dict[str, float]]:
    """Peak memory of the block: ``peak_mib`` above the level at its start and, on the CPU,
    ``peak_rss_mib`` (the whole process's peak resident set)."""
    out: dict[str, float] = {}
    base = reset_peak(device)
    try:
        yield out
    finally:
        peak = read_peak(device)
        out["peak_mib"] = (peak - base) / 2**20
        if not device.startswith("cuda"):
            out["peak_rss_mib"] = peak / 2**20
