"""pytest-benchmark suite of the beacon attention op's backward (``pytest bench/ --benchmark-only``).

A training step's attention at SmolLM2-135M's shape: a window of 128 raw tokens and its 16
beacons (r = 8) over a memory of 500 beacons, 9 query / 3 kv heads, head_dim 64; the op's forward
and backward against SDPA's with the materialised beacon mask (the way model code without the op
trains). fp32 and bf16 (on CPUs with AVX-512-BF16 the op's bf16 backward multiplies bf16 operands,
on AMX tiles where it can). CUDA cases skip without a GPU.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from beacon_ops import beacon_attention
from beacon_ops.reference import beacon_mask

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
HEADS, KV_HEADS, D, MEM, RAW, R = 9, 3, 64, 500, 128, 8
BEACON = RAW // R
NQ, N = RAW + BEACON, MEM + RAW + BEACON


def _inputs(device, dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(NQ, HEADS, D, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(1, KV_HEADS, N, D, generator=g).to(device, dtype).requires_grad_()
    v = torch.randn(1, KV_HEADS, N, D, generator=g).to(device, dtype).requires_grad_()
    dout = torch.randn(NQ, HEADS, D, generator=g).to(device, dtype)
    return q, k, v, dout


@pytest.mark.parametrize("dtype", DTYPES)
def test_beacon_attention_forward_backward(benchmark, synced, device, dtype):
    q, k, v, dout = _inputs(device, dtype)
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    lens = (i32([0, NQ]), i32([MEM]), i32([RAW]), i32([BEACON]), i32([R]))

    def step():
        out, _ = beacon_attention(q, k, v, *lens, max_seqlen_q=NQ)
        return torch.autograd.grad(out, (q, k, v), dout)
    benchmark.group = f"train-step-{device}-{str(dtype).split('.')[-1]}"
    benchmark(synced(step))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_masked_forward_backward(benchmark, synced, device, dtype):
    q, k, v, dout = _inputs(device, dtype)
    mask = beacon_mask(MEM, RAW, BEACON, R, NQ).to(device)
    group = HEADS // KV_HEADS

    def step():
        qm = q.transpose(0, 1)[None]
        km, vm = (t.repeat_interleave(group, dim=1) for t in (k, v))
        out = F.scaled_dot_product_attention(qm, km, vm, attn_mask=mask)
        return torch.autograd.grad(out, (q, k, v), dout.transpose(0, 1)[None])
    benchmark.group = f"train-step-{device}-{str(dtype).split('.')[-1]}"
    benchmark(synced(step))
