"""Small CUDA calls for compute-sanitizer (memcheck / racecheck), run by bench/gpu_check.sh.

Covers the prefill kernel (boundary, full and skipped tiles; GQA group 3; beacons), the split-KV
decode kernels, the simple fp32 path, the backward (tensor-core and generic kernels), rope_,
append_kv and compact_ (carried-raw shift in several rounds). Sizes are
tiny: the sanitizers slow kernels down by orders of magnitude.
"""
from __future__ import annotations

import torch

import beacon_ops  # noqa: F401  (registers torch.ops.beacon)


def main() -> None:
    dev = "cuda"
    torch.manual_seed(0)
    ops = torch.ops.beacon
    for dtype, d in ((torch.bfloat16, 64), (torch.float16, 128)):
        batch, kvh, group, cap = 2, 2, 3, 320
        k = torch.randn(batch, kvh, cap, d, device=dev, dtype=dtype)
        v = torch.randn_like(k)
        # seq 0: M=96, R=64 (window full, r=16 -> B=4), 68 queries; seq 1: M=0, R=40, 40 queries.
        mem = torch.tensor([96, 0], dtype=torch.int32, device=dev)
        raw = torch.tensor([64, 40], dtype=torch.int32, device=dev)
        bea = torch.tensor([4, 0], dtype=torch.int32, device=dev)
        rat = torch.tensor([16, 16], dtype=torch.int32, device=dev)
        cu = torch.tensor([0, 68, 108], dtype=torch.int32, device=dev)
        q = torch.randn(108, kvh * group, d, device=dev, dtype=dtype)
        for mode in ("segmentation", "step-expansion", "full-coverage"):
            out, lse = ops.attention(q, k, v, cu, mem, raw, bea, rat, 68, mode, True, 0.0)
            ops.attention_backward(torch.randn_like(out), q, k, v, out, lse, cu, mem, raw, bea, rat, 68, mode,
                                   True, 0.0)
        # The generic backward (fp32).
        out, lse = ops.attention(q.float(), k.float(), v.float(), cu, mem, raw, bea, rat, 68, "step-expansion",
                                 True, 0.0)
        ops.attention_backward(torch.randn_like(out), q.float(), k.float(), v.float(), out, lse, cu, mem, raw, bea,
                               rat, 68, "step-expansion", True, 0.0)
        # The simple CUDA-core path (fp32).
        ops.attention(q.float(), k.float(), v.float(), cu, mem, raw, bea, rat, 68, "segmentation", False, 0.0)
        # Decode: one query per sequence (one sequence idle).
        cu1 = torch.tensor([0, 1, 1], dtype=torch.int32, device=dev)
        ops.attention(q[:1].contiguous(), k, v, cu1, mem, raw, torch.zeros_like(bea), rat, 1,
                      "step-expansion", True, 0.0)

        # Cache ops: W=16, S=8, r=2 -> B=4, 8 carried raw tokens shifted by 4 (two rounds).
        layers, W, S = 2, 16, 8
        kc = torch.randn(layers, batch, kvh, 64, d, device=dev, dtype=dtype)
        vc = torch.randn_like(kc)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d))
        cos, sin = beacon_ops.positions.rope_tables(inv_freq, 128)
        m = torch.tensor([8, 3], dtype=torch.int32, device=dev)
        r = torch.tensor([W, 5], dtype=torch.int32, device=dev)
        b = torch.tensor([4, 0], dtype=torch.int32, device=dev)
        ratio = torch.tensor([2, 2], dtype=torch.int32, device=dev)
        kn = torch.randn(6, kvh, d, device=dev, dtype=dtype)
        vn = torch.randn_like(kn)
        cun = torch.tensor([0, 4, 6], dtype=torch.int32, device=dev)
        pos = torch.arange(6, dtype=torch.int32, device=dev)
        ops.append_kv(kc[0], vc[0], kn, vn, cun, m, r, b, pos, cos, sin, False)
        ops.rope_(kn, pos, cos, sin, True)
        ops.compact_(kc, vc, m, r, b, ratio, cos, sin, W, S, "step-expansion", False)
    torch.cuda.synchronize()
    print("sanitizer_case: done")


if __name__ == "__main__":
    main()
