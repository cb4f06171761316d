"""Decode over 4,608 keys at several query rows per K/V stream (GQA groups), one thread.

Each row: the op over copies of the cache in turn (cold K/V, as a model's layers) interleaved
with a 256 MB copy, K/V bytes read per second against the copy's read + written bytes per
second; then the op back to back on one cache (``hot``: K/V from the CPU caches, the kernels'
arithmetic). Usage: ``python bench/decode_rows.py [--dtypes bf16,fp32] [--shapes R/KV/D,...]
[--keys N] [--repeat N]`` (about a minute with the defaults). ``--repeat`` measures each row N
times and prints the medians with their ranges: on the shared machines one measurement of a
sub-millisecond call moves by 10-30%.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from beacon_ops.attention import beacon_attention
from beacon_ops.benchmarks.attention import DTYPES, layer_copies, time_best, time_best_interleaved
from beacon_ops.benchmarks.decode import _decode_inputs

KEYS, RAW = 4608, 512
# (rows per K/V stream, kv heads, head_dim): 3 rows at d 128, SmolLM2's 9 / 3 heads at d 64, 1 row.
SHAPES = ((3, 8, 128), (3, 3, 64), (1, 8, 128))


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """``"4/8/128,3/3/64"`` -> ``[(4, 8, 128), (3, 3, 64)]`` (rows / kv heads / head_dim)."""
    shapes = []
    for item in text.split(","):
        parts = item.split("/")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"{item!r} is not ROWS/KV_HEADS/HEAD_DIM")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="bf16,fp32", help="bf16, fp32 or both (default: both)")
    ap.add_argument("--shapes", type=parse_shapes, default=list(SHAPES),
                    help="ROWS/KV_HEADS/HEAD_DIM,... (default: 3/8/128,3/3/64,1/8/128)")
    ap.add_argument("--keys", type=int, default=KEYS, help=f"keys in the cache (default {KEYS})")
    ap.add_argument("--repeat", type=int, default=1, help="measurements of each row (default 1): medians and ranges")
    args = ap.parse_args()
    dtypes = args.dtypes.split(",")
    if not dtypes or any(d not in DTYPES for d in dtypes):
        ap.error(f"--dtypes: choose from {', '.join(DTYPES)}")
    if args.keys <= RAW:
        ap.error(f"--keys: more than the raw window's {RAW}")
    if args.repeat < 1:
        ap.error("--repeat: at least 1")
    torch.set_num_threads(1)
    src = torch.empty(64 << 20).uniform_()
    dst = torch.empty_like(src)
    for name in dtypes:
        dtype = DTYPES[name]
        for rows, kv_heads, d in args.shapes:
            q, k, v, lens = _decode_inputs("cpu", dtype, rows * kv_heads, kv_heads, d, args.keys - RAW, RAW)
            layers = layer_copies(k, v, src.numel() * src.element_size())

            def op():
                for kl, vl in layers:
                    beacon_attention(q, kl, vl, *lens, max_seqlen_q=1)

            calls, ratios, hots = [], [], []
            for _ in range(args.repeat):
                t = time_best_interleaved({"op": op, "copy": lambda: dst.copy_(src)}, "cpu")
                hots.append(time_best(lambda: beacon_attention(q, k, v, *lens, max_seqlen_q=1), "cpu"))
                calls.append(t["op"] / len(layers))
                kv_gbps = 2 * k.numel() * k.element_size() / calls[-1] / 1e9
                ratios.append(kv_gbps / (2 * src.numel() * src.element_size() / t["copy"] / 1e9))
            print(f"{name} rows {rows} kv_heads {kv_heads} d {d:3d}: {summary(calls, 1e3, '.3f')} ms, "
                  f"K/V / copy {summary(ratios, 1, '.3f')}; back to back {summary(hots, 1e6, '.0f')} us", flush=True)


def summary(values: list[float], scale: float, fmt: str) -> str:
    """One value as is; several as their median and range, ``"0.812 [0.700-0.840]"``."""
    med = format(statistics.median(values) * scale, fmt)
    if len(values) == 1:
        return med
    return f"{med} [{format(min(values) * scale, fmt)}-{format(max(values) * scale, fmt)}]"


if __name__ == "__main__":
    main()
