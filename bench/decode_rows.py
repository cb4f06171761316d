"""Decode over 4,608 keys at several query rows per K/V stream (GQA groups), one thread.

Each row: the op over copies of the cache in turn (cold K/V, as a model's layers) interleaved
with a 256 MB copy, K/V bytes read per second against the copy's read + written bytes per
second; then the op back to back on one cache (``hot``: K/V from the CPU caches, the kernels'
arithmetic). Usage: ``python bench/decode_rows.py`` (about a minute).
"""
from __future__ import annotations

import torch

from beacon_ops.attention import beacon_attention
from beacon_ops.benchmarks.attention import layer_copies, time_best, time_best_interleaved
from beacon_ops.benchmarks.decode import _decode_inputs

KEYS, RAW = 4608, 512
# (rows per K/V stream, kv heads, head_dim): 3 rows at d 128, SmolLM2's 9 / 3 heads at d 64, 1 row.
SHAPES = ((3, 8, 128), (3, 3, 64), (1, 8, 128))


def main() -> None:
    torch.set_num_threads(1)
    src = torch.empty(64 << 20).uniform_()
    dst = torch.empty_like(src)
    for dtype in (torch.bfloat16, torch.float32):
        for rows, kv_heads, d in SHAPES:
            q, k, v, lens = _decode_inputs("cpu", dtype, rows * kv_heads, kv_heads, d, KEYS - RAW, RAW)
            layers = layer_copies(k, v, src.numel() * src.element_size())

            def op():
                for kl, vl in layers:
                    beacon_attention(q, kl, vl, *lens, max_seqlen_q=1)

            t = time_best_interleaved({"op": op, "copy": lambda: dst.copy_(src)}, "cpu")
            hot = time_best(lambda: beacon_attention(q, k, v, *lens, max_seqlen_q=1), "cpu")
            per_call = t["op"] / len(layers)
            kv_gbps = 2 * k.numel() * k.element_size() / per_call / 1e9
            copy_gbps = 2 * src.numel() * src.element_size() / t["copy"] / 1e9
            name = str(dtype).removeprefix("torch.")
            print(f"{name:8s} rows {rows} kv_heads {kv_heads} d {d:3d}: {per_call * 1e3:.3f} ms, "
                  f"K/V / copy {kv_gbps / copy_gbps:.3f}; back to back {hot * 1e6:.0f} us", flush=True)


if __name__ == "__main__":
    main()
