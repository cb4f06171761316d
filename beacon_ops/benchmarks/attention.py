"""``bench attention``: the beacon attention op against SDPA, side by side in one run.

Two steps of one sequence (head_dim 128, 8 q heads over 8 kv heads by default):
- prefill: a window completing (W raw queries + W/r beacon queries, step-expansion) over
  memory M; useful work = exact allowed (query, key) pairs from the reference mask;
- decode: one raw query over memory M + raw R.
Compared with SDPA full causal on square shapes with the same number of keys (GFLOP/s with
the exact causal pair count), SDPA with the materialised beacon mask (time), and a matmul of
similar size (the machine's ceiling, measured in the same run). FLOPs = 4 * head_dim * pairs
per head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention import beacon_attention
from ..reference import allowed_pairs, beacon_mask
from .common import sync, time_fn


def time_best(fn, device: str, min_time: float = 0.3, max_reps: int = 50) -> float:
    """Fastest of repeated runs of ``fn()`` (seconds). The shared 2-core machines are loaded by
    other jobs; a run can only be slowed down by them, so the minimum is the robust statistic
    (``time_fn``'s median swings by 10x under load)."""
    time_fn(fn, device, min_time=0.0, max_reps=1)  # warm-up
    import time

    best, total, reps = float("inf"), 0.0, 0
    while (total < min_time or reps < 3) and reps < max_reps:
        t0 = time.perf_counter()
        fn()
        sync(device)
        dt = time.perf_counter() - t0
        best, total, reps = min(best, dt), total + dt, reps + 1
    return best

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _inputs(device, dtype, heads, kv_heads, d, mem, raw, beacon, ratio, nq):
    cap = mem + raw + beacon
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, kv_heads, cap, d, generator=g).to(device, dtype)
    v = torch.randn(1, kv_heads, cap, d, generator=g).to(device, dtype)
    q = torch.randn(nq, heads, d, generator=g).to(device, dtype)

    def i32(x):
        return torch.tensor(x, dtype=torch.int32, device=device)

    lens = (i32([0, nq]), i32([mem]), i32([raw]), i32([beacon]), i32([ratio]))
    return q, k, v, lens


def matmul_gflops_best(device: str, dtype: torch.dtype, n: int = 1024) -> float:
    """GFLOP/s of an n x n x n ``torch.matmul`` (the ceiling), fastest run (see time_best).
    On AMD CPUs torch's MKL runs AVX2 fp32 kernels, so the op can exceed this "ceiling"."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / time_best(lambda: a @ b, device) / 1e9


def measure_step(device: str, dtype: torch.dtype, *, heads: int, kv_heads: int, d: int, mem: int,
                 raw: int, beacon: int, ratio: int, nq: int, mode: str = "step-expansion",
                 masked_sdpa: bool = True) -> dict:
    """Times one step of the op, causal SDPA with as many keys, and SDPA with the beacon mask."""
    q, k, v, lens = _inputs(device, dtype, heads, kv_heads, d, mem, raw, beacon, ratio, nq)
    n_keys = mem + raw + beacon
    pairs = allowed_pairs([0, nq], [mem], [raw], [beacon], [ratio], mode)
    t_op = time_best(lambda: beacon_attention(q, k, v, *lens, max_seqlen_q=nq, mode=mode), device)
    gf_op = 4 * d * pairs * heads / t_op / 1e9
    row = {"step": "prefill" if nq > 1 else "decode", "dtype": str(dtype).split(".")[-1],
           "q": nq, "keys": n_keys, "pairs": pairs, "op_ms": t_op * 1e3, "op_gflops": gf_op}

    # SDPA full causal, square, same number of keys (its own flash kernel on the CPU).
    if nq > 1:
        qs = torch.randn(1, heads, n_keys, d, device=device, dtype=dtype)
        ks = torch.randn(1, kv_heads, n_keys, d, device=device, dtype=dtype)
        vs = torch.randn(1, kv_heads, n_keys, d, device=device, dtype=dtype)
        t_causal = time_best(lambda: F.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, enable_gqa=heads != kv_heads), device)
        causal_pairs = n_keys * (n_keys + 1) // 2
        row["sdpa_causal_ms"] = t_causal * 1e3
        row["sdpa_causal_gflops"] = 4 * d * causal_pairs * heads / t_causal / 1e9
        del qs, ks, vs
    else:  # one query that sees every key: plain SDPA over the same keys
        qd, kd, vd = q.transpose(0, 1)[None], k[:, :, :n_keys], v[:, :, :n_keys]
        t_full = time_best(lambda: F.scaled_dot_product_attention(
            qd, kd, vd, enable_gqa=heads != kv_heads), device)
        row["sdpa_causal_ms"] = t_full * 1e3
        row["sdpa_causal_gflops"] = 4 * d * n_keys * heads / t_full / 1e9

    if masked_sdpa:
        mask = beacon_mask(mem, raw, beacon, ratio, nq, mode).to(device)
        qm = q.transpose(0, 1)[None]
        t_masked = time_best(lambda: F.scaled_dot_product_attention(
            qm, k, v, attn_mask=mask, enable_gqa=heads != kv_heads), device)
        row["sdpa_masked_ms"] = t_masked * 1e3
        row["speedup_vs_sdpa_masked"] = t_masked / t_op
    row["ratio_gflops_vs_sdpa_causal"] = gf_op / row["sdpa_causal_gflops"]
    return row


def run(device: str, quick: bool) -> dict:
    """Prefill (W=1024, r=8, memory 3072) and decode (memory 3072 + raw 512), fp32 and bf16."""
    heads, kv_heads, d = 8, 8, 128
    W, r, M = 1024, 8, 3072
    B = W // r
    rows = []
    summary: dict[str, dict[str, float]] = {
        "ratio_gflops_vs_sdpa_causal": {}, "speedup_vs_sdpa_masked": {},
        "ratio_gflops_vs_matmul": {}, "matmul_gflops": {},
        "decode_ratio_gflops_vs_sdpa": {}, "decode_speedup_vs_sdpa": {},
    }
    configs = [(M, W, B, r, W + B)] if quick else [(M, W, B, r, W + B), (3 * M, W, B, r, W + B)]
    for name, dtype in DTYPES.items():
        mm = matmul_gflops_best(device, dtype)
        summary["matmul_gflops"][name] = mm
        for i, (mem, raw, beacon, ratio, nq) in enumerate(configs):
            row = measure_step(device, dtype, heads=heads, kv_heads=kv_heads, d=d, mem=mem,
                               raw=raw, beacon=beacon, ratio=ratio, nq=nq)
            row["ratio_gflops_vs_matmul"] = row["op_gflops"] / mm
            row["sdpa_causal_vs_matmul"] = row["sdpa_causal_gflops"] / mm
            rows.append(row)
            if i == 0:
                summary["ratio_gflops_vs_sdpa_causal"][name] = row["ratio_gflops_vs_sdpa_causal"]
                summary["speedup_vs_sdpa_masked"][name] = row["speedup_vs_sdpa_masked"]
                summary["ratio_gflops_vs_matmul"][name] = row["ratio_gflops_vs_matmul"]
        if device == "cpu":
            # Also on one thread: the shared 2-core machines are loaded by other jobs, and a
            # one-thread ratio is far less disturbed by that than a two-thread one.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                one = measure_step(device, dtype, heads=heads, kv_heads=kv_heads, d=d, mem=M,
                                   raw=W, beacon=B, ratio=r, nq=W + B)
            finally:
                torch.set_num_threads(threads)
            one["step"] = "prefill-1thread"
            rows.append(one)
            summary.setdefault("ratio_gflops_vs_sdpa_causal_1thread", {})[name] = (
                one["ratio_gflops_vs_sdpa_causal"])
            summary.setdefault("speedup_vs_sdpa_masked_1thread", {})[name] = (
                one["speedup_vs_sdpa_masked"])
        dec = measure_step(device, dtype, heads=heads, kv_heads=kv_heads, d=d, mem=M, raw=512,
                           beacon=0, ratio=r, nq=1)
        dec["ratio_gflops_vs_matmul"] = dec["op_gflops"] / mm
        rows.append(dec)
        summary["decode_ratio_gflops_vs_sdpa"][name] = dec["ratio_gflops_vs_sdpa_causal"]
        summary["decode_speedup_vs_sdpa"][name] = dec["sdpa_causal_ms"] / dec["op_ms"]
    return {"rows": rows, "config": {"heads": heads, "kv_heads": kv_heads, "head_dim": d,
                                     "window": W, "ratio": r, "memory": M, "decode_raw": 512,
                                     "mode": "step-expansion"}, **summary}
