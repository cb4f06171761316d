"""Decode over K/V on 4 KB pages against the same K/V on 2 MB pages (beacon_ops.huge_pages), one thread.

One query row per kv head (8 kv heads, d 128), fp32 and bf16, at 3,584 and 32,768 keys. Each
figure: the op over copies of the cache in turn (cold K/V, as a model's layers), K/V bytes read per
second, and a 256 MB copy's read + written bytes per second with its buffers on either kind of page;
the four calls interleaved (``time_best_interleaved``). Usage: ``python bench/huge_pages.py``
(about a minute).
"""
from __future__ import annotations

import torch

from beacon_ops.attention import beacon_attention
from beacon_ops.benchmarks.attention import DTYPES, time_best_interleaved
from beacon_ops.benchmarks.decode import _decode_inputs
from beacon_ops.huge_pages import clone_huge, zeros_huge

RAW = 512


def main() -> None:
    torch.set_num_threads(1)
    src = torch.empty(32 << 20).uniform_()
    dst = torch.empty_like(src)
    src_huge, dst_huge = clone_huge(src), zeros_huge(src.shape, dtype=src.dtype, device="cpu")
    copy_bytes = 2 * src.numel() * src.element_size()
    for keys in (3584, 32768):
        for name in ("fp32", "bf16"):
            q, k, v, lens = _decode_inputs("cpu", DTYPES[name], 8, 8, 128, keys - RAW, RAW)
            kv_bytes = 2 * k.numel() * k.element_size()
            n = max(1, (256 << 20) // kv_bytes)
            small = [(k.clone(), v.clone()) for _ in range(n)]
            huge = [(clone_huge(k), clone_huge(v)) for _ in range(n)]

            def over(layers):
                def op():
                    for kl, vl in layers:
                        beacon_attention(q, kl, vl, *lens, max_seqlen_q=1)
                return op

            t = time_best_interleaved({"op": over(small), "op_huge": over(huge),
                                       "copy": lambda: dst.copy_(src),
                                       "copy_huge": lambda: dst_huge.copy_(src_huge)}, "cpu")
            op, op_h = (kv_bytes * n / t[x] / 1e9 for x in ("op", "op_huge"))
            cp, cp_h = (copy_bytes / t[x] / 1e9 for x in ("copy", "copy_huge"))
            print(f"{name} {keys:6d} keys: op {op:5.1f} -> {op_h:5.1f} GB/s ({op_h / op:.2f}x), "
                  f"copy {cp:5.1f} -> {cp_h:5.1f} GB/s ({cp_h / cp:.2f}x); op / copy {op / cp:.2f} "
                  f"(4 KB pages), {op_h / cp_h:.2f} (2 MB pages)", flush=True)


if __name__ == "__main__":
    main()
