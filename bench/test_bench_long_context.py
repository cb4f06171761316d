"""pytest-benchmark: attention over a whole 16K input, beacon prefill vs full causal SDPA.

Run with ``pytest bench/ --benchmark-only`` (kept out of the default ``pytest python_tests``).
Both tests of a parameter set share the group ``long-context <device> <dtype>``, so the
comparison table shows them side by side; ``extra_info`` carries the exact pair counts
(FLOPs = 4 * head_dim * pairs * heads). Before timing, the beacon test checks the op on the
input's last window against the explicit-mask reference (fp64), so a broken op cannot
produce a fast but meaningless number. CUDA cases skip without a GPU.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from beacon_ops.benchmarks.long_context import (DTYPES, WINDOW, Prefill, causal_pairs,
                                                sdpa_inputs)
from beacon_ops.reference import reference_attention

LENGTH = 16 * 1024
HEAD_DIM = 128


pytestmark = pytest.mark.usefixtures("busy_machine_thread_count")


def _heads(device: str) -> int:
    return 1 if device == "cpu" else 16  # the time ratio does not depend on the head count


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("ratio", [8, 32, 128])
def test_beacon_prefill_attention(benchmark, synced, device: str, ratio: int, dtype: str) -> None:
    heads = _heads(device)
    pre = Prefill(device, DTYPES[dtype], length=LENGTH, ratio=ratio, heads=heads,
                  head_dim=HEAD_DIM)
    last = len(pre.steps) - 1
    q, lens, nq = pre.args[last]
    out, _ = pre.run_step(last)
    ref = reference_attention(q, pre.k, pre.v, *lens, mode="step-expansion")
    if dtype == "fp32":
        tol = 1e-4
    else:  # the project's bf16 rule: 2 x the error of plain PyTorch in bf16, plus eps
        base = reference_attention(q, pre.k, pre.v, *lens, mode="step-expansion",
                                   compute_dtype=q.dtype)
        tol = 2 * (base.out.double() - ref.out).abs().max().item() + 1e-3
    assert (out.cpu().double() - ref.out).abs().max().item() <= tol

    pairs = pre.pairs()
    benchmark.group = f"long-context {LENGTH // 1024}K {device} {dtype}"
    benchmark.extra_info.update(pairs=pairs, gflop=4 * HEAD_DIM * pairs * heads / 1e9,
                                windows=len(pre.steps), heads=heads, window=WINDOW)

    benchmark.pedantic(synced(pre.run_all), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_sdpa_full_causal(benchmark, synced, device: str, dtype: str) -> None:
    heads = _heads(device)
    q, k, v = sdpa_inputs(device, DTYPES[dtype], length=LENGTH, heads=heads, head_dim=HEAD_DIM)
    pairs = causal_pairs(LENGTH)
    benchmark.group = f"long-context {LENGTH // 1024}K {device} {dtype}"
    benchmark.extra_info.update(pairs=pairs, gflop=4 * HEAD_DIM * pairs * heads / 1e9,
                                heads=heads)

    benchmark.pedantic(synced(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
                       rounds=3, warmup_rounds=1)
