"""pytest-benchmark suite of the beacon attention op (``pytest bench/ --benchmark-only``).

Prefill (a window completing: W = 1024 raw + 128 beacon queries over memory 3072, r = 8) and
decode (one query over memory 3072 + raw 512), each next to causal SDPA with as many keys and
SDPA with the materialised beacon mask. head_dim 128, 8 q / 8 kv heads. CUDA cases skip without
a GPU. The GFLOP/s figures and ratios of the same run are in ``python -m beacon_ops bench
attention``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from beacon_ops import beacon_attention
from beacon_ops.reference import beacon_mask

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
HEADS, D, W, R, M = 8, 128, 1024, 8, 3072
B = W // R
STEPS = {"prefill": dict(mem=M, raw=W, beacon=B, nq=W + B),
         "decode": dict(mem=M, raw=512, beacon=0, nq=1)}


def _step(device, dtype, mem, raw, beacon, nq):
    g = torch.Generator().manual_seed(0)
    n = mem + raw + beacon
    q = torch.randn(nq, HEADS, D, generator=g).to(device, dtype)
    k = torch.randn(1, HEADS, n, D, generator=g).to(device, dtype)
    v = torch.randn(1, HEADS, n, D, generator=g).to(device, dtype)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    lens = (i32([0, nq]), i32([mem]), i32([raw]), i32([beacon]), i32([R]))
    return q, k, v, lens


def _group(step, device, dtype):
    return f"{step}-{device}-{str(dtype).split('.')[-1]}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("step", list(STEPS))
def test_beacon_attention(benchmark, synced, device, dtype, step):
    q, k, v, lens = _step(device, dtype, **STEPS[step])
    nq = q.shape[0]
    benchmark.group = _group(step, device, dtype)
    benchmark(synced(lambda: beacon_attention(q, k, v, *lens, max_seqlen_q=nq)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("step", list(STEPS))
def test_sdpa_masked(benchmark, synced, device, dtype, step):
    cfg = STEPS[step]
    q, k, v, _ = _step(device, dtype, **cfg)
    mask = beacon_mask(cfg["mem"], cfg["raw"], cfg["beacon"], R, cfg["nq"]).to(device)
    qm = q.transpose(0, 1)[None]
    benchmark.group = _group(step, device, dtype)
    benchmark(synced(lambda: F.scaled_dot_product_attention(qm, k, v, attn_mask=mask)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_causal_same_keys(benchmark, synced, device, dtype):
    n = M + W + B
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, n, D, generator=g).to(device, dtype) for _ in range(3))
    benchmark.group = _group("prefill", device, dtype)
    benchmark(synced(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)))
