"""``python -m beacon_ops bench compaction``: in-place compaction against a copy and torch.cat.

A Llama-2-7B-shaped cache (32 layers x 8 KV heads x head_dim 128, batch 1) holds 3072 memory
slots and one full window (W = S = 1024) with its S / r beacons; ``compact_`` moves the beacons
(keys re-rotated) behind the memory in all layers at once. Measured side by side in one run:

- the compaction's bytes moved per second (read + write of every moved K and V row) against a
  plain ``copy_`` of the same rows from the same places (no rotation), measured now;
- its time against rebuilding every layer with ``torch.cat(memory, beacons, carried)`` as the
  official code does (keys there are stored un-rotated, so the rebuild rotates nothing).

Each timed compaction first restores the lengths (three tiny copies); the time of that restore
alone is measured too and subtracted. ``quick`` uses 4 layers instead of 32 (the per-layer work
is the same; the table says how many layers ran).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..cache_ops import compact_
from ..positions import default_inv_freq, rope_tables
from .common import sync, time_fn

HEADS, HEAD_DIM, MEMORY, WINDOW = 8, 128, 3072, 1024


@dataclass
class CompactionCase:
    """A filled cache and the three contenders (see the module docstring)."""

    moved_bytes: int
    restore: Callable[[], None]      # lengths back to "window full" (nothing else changes)
    compact: Callable[[], None]      # compact_ of all layers (call restore() first)
    plain_copy: Callable[[], None]   # copy_ of the same rows, no rotation
    cat_rebuild: Callable[[], list]  # torch.cat(memory, beacons, carried) per layer, K and V
    check: Callable[[], None]        # asserts the lengths after a compaction


def make_case(device: str, dtype: torch.dtype, layers: int, ratio: int, stride: int = WINDOW) -> CompactionCase:
    """Memory 3072 + a full window (W = 1024, stride ``stride``) with its stride / ratio beacons."""
    beacons = stride // ratio
    cap = MEMORY + WINDOW + beacons
    shape = (layers, 1, HEADS, cap, HEAD_DIM)
    k = torch.randn(shape, device=device, dtype=torch.float32).to(dtype)
    v = torch.randn(shape, device=device, dtype=torch.float32).to(dtype)
    i32 = lambda x: torch.tensor([x], dtype=torch.int32, device=device)  # noqa: E731
    full = [i32(MEMORY), i32(WINDOW), i32(beacons)]
    mem_len, raw_len, beacon_len, ratio_t = i32(0), i32(0), i32(0), i32(ratio)
    inv_freq = default_inv_freq(HEAD_DIM).to(device)
    cos, sin = rope_tables(inv_freq, cap + WINDOW + 1)

    def restore() -> None:
        for dst, src in zip((mem_len, raw_len, beacon_len), full):
            dst.copy_(src)

    def compact() -> None:
        compact_(k, v, mem_len, raw_len, beacon_len, ratio_t, cos, sin, window=WINDOW, stride=stride,
                 mode="step-expansion")

    def cat_rebuild() -> list[torch.Tensor]:
        out = []
        for cache in (k, v):
            for layer in range(layers):
                c = cache[layer]
                out.append(torch.cat([c[:, :, :MEMORY], c[:, :, MEMORY + WINDOW:MEMORY + WINDOW + beacons],
                                      c[:, :, MEMORY + stride:MEMORY + WINDOW]], dim=2))
        return out

    # The copy baseline moves the same rows from the same places with copy_ (no rotation); the
    # carried rows go to a scratch tensor because copy_ refuses overlapping source/destination.
    scratch = torch.empty_like(k[:, :, :, :WINDOW - stride]), torch.empty_like(v[:, :, :, :WINDOW - stride])

    def plain_copy() -> None:
        for cache, carried in zip((k, v), scratch):
            cache[:, :, :, MEMORY:MEMORY + beacons].copy_(cache[:, :, :, MEMORY + WINDOW:MEMORY + WINDOW + beacons])
            if stride < WINDOW:
                carried.copy_(cache[:, :, :, MEMORY + stride:MEMORY + WINDOW])

    def check() -> None:
        assert raw_len.item() == WINDOW - stride and mem_len.item() == MEMORY + beacons

    moved_rows = 2 * layers * HEADS * (beacons + WINDOW - stride)  # K and V rows that move
    moved_bytes = 2 * moved_rows * HEAD_DIM * k.element_size()     # each read once, written once
    return CompactionCase(moved_bytes, restore, compact, plain_copy, cat_rebuild, check)


def _case(device: str, dtype: torch.dtype, layers: int, ratio: int, stride: int) -> dict:
    case = make_case(device, dtype, layers, ratio, stride)

    def restore_and_compact() -> None:
        case.restore()
        case.compact()

    restore_and_compact()
    sync(device)
    case.check()
    t_restore = time_fn(case.restore, device)
    t_compact = max(time_fn(restore_and_compact, device) - t_restore, 1e-9)
    t_copy = time_fn(case.plain_copy, device)
    t_cat = time_fn(case.cat_rebuild, device, min_time=0.5, max_reps=10)
    moved = case.moved_bytes
    del case
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "ratio": ratio,
        "stride": stride,
        "layers": layers,
        "moved_MB": moved / 1e6,
        "compact_ms": t_compact * 1e3,
        "compact_GBps": moved / t_compact / 1e9,
        "copy_GBps": moved / t_copy / 1e9,
        "frac_of_copy": t_copy / t_compact,
        "cat_rebuild_ms": t_cat * 1e3,
        "speedup_vs_cat": t_cat / t_compact,
        "restore_ms": t_restore * 1e3,
    }


def run(device: str, quick: bool) -> dict:
    """Compaction benchmark; see the module docstring. Returns ``rows`` and a summary.

    On the CPU every contender runs on one thread (``BEACON_BENCH_THREADS`` overrides): on a
    shared 2-core machine, timings of parallel regions are dominated by other processes'
    scheduling (8-16 ms stalls), and one thread keeps the side-by-side ratios meaningful.
    """
    import os

    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(int(os.environ.get("BEACON_BENCH_THREADS", "1")))
    try:
        return _run(device, quick)
    finally:
        torch.set_num_threads(threads)


def _run(device: str, quick: bool) -> dict:
    layers = 4 if quick else 32
    dtypes = (torch.bfloat16, torch.float32) if device == "cpu" else (torch.float16, torch.bfloat16, torch.float32)
    rows = []
    for dtype in dtypes:
        for ratio in (8, 32):
            rows.append(_case(device, dtype, layers, ratio, WINDOW))
    # One S < W row: 512 carried raw tokens shift down (memmove order) and are re-rotated.
    rows.append(_case(device, torch.bfloat16, layers, 8, WINDOW // 2))
    main = [r for r in rows if r["stride"] == WINDOW]
    return {
        "rows": rows,
        "shape": f"{layers} layers x {HEADS} kv heads x head_dim {HEAD_DIM}, memory {MEMORY}, window {WINDOW}, "
                 "batch 1" + (" (quick: 4 layers instead of 32)" if quick else ""),
        "min_frac_of_copy": min(r["frac_of_copy"] for r in main),
        "min_speedup_vs_cat": min(r["speedup_vs_cat"] for r in main),
        "targets": "frac_of_copy >= 0.7, speedup_vs_cat > 1",
        "threads": torch.get_num_threads() if device == "cpu" else None,
    }
