"""``bench decode``: one token over the condensed cache vs one token over a full KV cache.

A context of L tokens with condensing ratio r and window W leaves memory ``L / r`` beacons plus
the raw tokens of the current window; a plain KV cache holds all L. Both are timed with the same
op (a full cache is the op with every key visible: memory L - raw, ratio 0), plus SDPA over the
full cache for scale. Op time only (no projections). Decode is memory-bound, so the table also
gives the KV bytes read per second against a plain copy (read + write bytes per second) and
against a read-only stream (``torch.sum`` of the copy's source buffer: what decode does to K and
V), their calls interleaved with the op's at the same thread count. Each op timing runs over
``layers`` copies of the cache in turn, as many as fill the copy's source buffer
(``attention.layer_copies``: as a model's layers, each call's K/V cold and the code warm; timed
alone right after the copy, a call also paid ~0.4 ms for reloading the Python and dispatcher
code from memory). The condensed cache is also
timed with its calls back to back (``hot_ms``): a cache that small stays in the CPU caches between
calls, so this is the kernels' arithmetic rather than memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention import beacon_attention
from .attention import layer_copies, time_best, time_best_interleaved


def _decode_inputs(device, dtype, heads, kv_heads, d, mem, raw):
    n = mem + raw
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, kv_heads, n, d, generator=g).to(device, dtype)
    v = torch.randn(1, kv_heads, n, d, generator=g).to(device, dtype)
    q = torch.randn(1, heads, d, generator=g).to(device, dtype)

    def i32(x):
        return torch.tensor(x, dtype=torch.int32, device=device)

    return q, k, v, (i32([0, 1]), i32([mem]), i32([raw]), i32([0]), i32([0]))


def run(device: str, quick: bool) -> dict:
    """Decode over a condensed cache vs a full cache of the same context (bf16 and fp32)."""
    heads, kv_heads, d = 32, 8, 128  # Llama-like GQA
    context = 32 * 1024 if quick else 128 * 1024
    ratio, raw = 32, 512
    mem = context // ratio
    src = torch.empty(64 << 20, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    copy_bytes = 2 * src.numel() * src.element_size()
    rows = []
    speedup: dict[str, float] = {}
    # Also on one thread (cpu): on the loaded shared machines a sub-millisecond call that waits
    # for a second pool thread is measured at a scheduler tick (~8 ms), not at its cost.
    thread_counts = [torch.get_num_threads()] + ([1] if device == "cpu" else [])
    default_threads = torch.get_num_threads()
    for threads in thread_counts:
        torch.set_num_threads(threads)
        try:
            for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
                res = {}
                for cache, (m, r_len) in (("condensed", (mem, raw)), ("full", (context - raw, raw))):
                    q, k, v, lens = _decode_inputs(device, dtype, heads, kv_heads, d, m, r_len)
                    kv_bytes = 2 * k.numel() * k.element_size()
                    layers = layer_copies(k, v, src.numel() * src.element_size())
                    n_layers = len(layers)

                    def op():
                        for kl, vl in layers:
                            beacon_attention(q, kl, vl, *lens, max_seqlen_q=1)

                    times = time_best_interleaved(
                        {"op": op, "copy": lambda: dst.copy_(src), "read": lambda: src.sum()}, device)
                    t = times["op"] / n_layers
                    copy = copy_bytes / times["copy"] / 1e9
                    read = src.numel() * src.element_size() / times["read"] / 1e9
                    row = {"threads": threads, "dtype": name, "cache": cache, "keys": m + r_len,
                           "layers": n_layers, "op_ms": t * 1e3, "kv_gbps": kv_bytes / t / 1e9, "copy_gbps": copy,
                           "kv_gbps_vs_copy": kv_bytes / t / 1e9 / copy, "read_gbps": read,
                           "kv_gbps_vs_read": kv_bytes / t / 1e9 / read}
                    if cache == "condensed":
                        row["hot_ms"] = time_best(
                            lambda: beacon_attention(q, k, v, *lens, max_seqlen_q=1), device) * 1e3
                    if cache == "full" and threads == default_threads:
                        qs = q.transpose(0, 1)[None]
                        t_sdpa = time_best(lambda: F.scaled_dot_product_attention(
                            qs, k, v, enable_gqa=True), device)
                        row["sdpa_ms"] = t_sdpa * 1e3
                    rows.append(row)
                    res[cache] = t
                    del q, k, v, layers
                key = name if threads == default_threads else f"{name}_1thread"
                speedup[key] = res["full"] / res["condensed"]
        finally:
            torch.set_num_threads(default_threads)
    return {"rows": rows, "speedup_condensed_vs_full": speedup,
            "config": {"context": context, "ratio": ratio, "raw": raw, "memory": mem,
                       "heads": heads, "kv_heads": kv_heads, "head_dim": d}}
