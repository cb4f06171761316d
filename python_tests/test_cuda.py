"""The CUDA kernels (csrc/cuda) against independent references; skipped visibly without a GPU,
or run on the host emulation of the kernels (BEACON_CUDA_EMU=1, make test-cuda-emu; see
cuda_targets.py).

- attention (prefill and split-KV decode) against an explicit-mask fp64 attention whose mask is
  built here from the spec's table (section 3), with FlashAttention's tolerance rule
  ``max|out - ref| <= 2 * max|baseline - ref| + eps`` (baseline = the same masked attention in
  plain PyTorch in the low-precision dtype); stale cache slots past each sequence are NaN, so a
  kernel that reads them fails;
- decode path (max_seqlen_q == 1) against the prefill path on the same inputs;
- CPU op against CUDA op (when the CPU kernels are built in);
- rope_, append_kv, compact_ on CUDA bit-exact against the CPU ops, and against a reference
  written here from the spec's compaction table (section 5);
- the simple CUDA-core path (fp32, other head dims) against the same reference;
- torch.library.opcheck on CUDA, CUDA-graph capture, and clear errors for unsupported input.
"""
from __future__ import annotations

import math
import sys

import pytest
import torch

import beacon_ops  # noqa: F401  (registers torch.ops.beacon)
from beacon_ops.positions import beacon_position, rope_tables
from accuracy_rule import assert_within_twice_baseline, max_error
from cuda_targets import cuda_targets

ops = torch.ops.beacon       # the ops under test: set per target by the fixture below
cpu_ops = torch.ops.beacon   # the CPU kernels (by device: CPU tensors)
DEV = "cuda"                 # where the tensors of the ops under test live
MODES = ("segmentation", "step-expansion", "full-coverage")
NEW_KINDS = ("causal", "step-causal")  # mask kinds of the newer variant (docs section 9.1)
LOW = (torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True, params=cuda_targets())
def target(request, monkeypatch):
    """Runs every case on a GPU, or on the emulation in each schedule (cuda_targets.py)."""
    t = request.param
    if t.emulated and getattr(request.function, "gpu_only", False):
        pytest.skip("needs a real GPU (CUDA graphs, opcheck on CUDA tensors)")
    t.activate(request.node.nodeid)
    monkeypatch.setattr(sys.modules[__name__], "ops", t.ops())
    monkeypatch.setattr(sys.modules[__name__], "DEV", t.device)
    return t


def gpu_only(test):
    """Marks a test that needs a real GPU (CUDA graphs, opcheck on CUDA tensors)."""
    test.gpu_only = True
    return test


# --------------------------------------------------------------------------------------------
# References written from the spec (not from csrc/beacon_mask.h).
def spec_mask(M: int, R: int, B: int, r: int, nq: int, mode: str, attend_previous: bool) -> torch.Tensor:
    """Boolean [nq, M + R + B]: spec section 3's table, queries = the last nq - B raw tokens
    of the window, then the window's B beacons."""
    mask = torch.zeros(nq, M + R + B, dtype=torch.bool)
    n_raw = nq - B
    for i in range(n_raw):
        t = R - n_raw + i
        mask[i, : M + t + 1] = True  # memory + causal raw
    for j in range(B):
        row = n_raw + j
        if mode in NEW_KINDS:  # the newer variant: memory always, then causal, or step ranges
            hi = R if mode == "causal" else min((j + 1) * r, R)
            mask[row, :M + hi] = True
            mask[row, M + R: M + R + j + 1] = True  # beacons 0..j
            continue
        if attend_previous:
            mask[row, :M] = True
        lo, hi = {"segmentation": (j * r, (j + 1) * r), "step-expansion": (0, (j + 1) * r),
                  "full-coverage": (0, R)}[mode]
        hi = min(hi, R)
        lo = min(lo, hi)
        mask[row, M + lo: M + hi] = True
        mask[row, M + R + j] = True  # itself, no other beacon
    return mask


def masked_attention(q, k, v, cu, lens, mode, attend_previous, scale, dtype):
    """Explicit-mask attention per sequence computed in `dtype` (fp64: the reference; bf16/fp16:
    the baseline). Returns (out fp64, lse fp64); rows that see nothing: out 0, lse +inf."""
    total, H, D = q.shape
    G = H // k.shape[1]
    out = torch.zeros(total, H, D, dtype=torch.float64, device=q.device)
    lse = torch.full((total, H), math.inf, dtype=torch.float64, device=q.device)
    for b, (M, R, B, r) in enumerate(lens):
        q0, q1 = cu[b], cu[b + 1]
        if q1 == q0:
            continue
        n = M + R + B
        mask = spec_mask(M, R, B, r, q1 - q0, mode, attend_previous).to(q.device)
        qb = q[q0:q1].transpose(0, 1).to(dtype)                      # [H, nq, D]
        kb = k[b, :, :n].repeat_interleave(G, dim=0).to(dtype)       # [H, n, D]
        vb = v[b, :, :n].repeat_interleave(G, dim=0).to(dtype)
        s = (qb @ kb.transpose(-1, -2)) * scale
        s = s.masked_fill(~mask, -math.inf)
        p = torch.softmax(s.float() if dtype != torch.float64 else s, dim=-1).to(dtype)
        p = torch.nan_to_num(p, nan=0.0)
        out[q0:q1] = (p @ vb).transpose(0, 1).double()
        lse[q0:q1] = torch.logsumexp(s.double(), dim=-1).transpose(0, 1)
    seen = torch.isfinite(lse)
    return out, torch.where(seen, lse, torch.full_like(lse, math.inf))


def make_cache(lens, kv_heads, cap, d, dtype, device=None, seed=0):
    device = device or DEV
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(len(lens), kv_heads, cap, d, generator=g).to(dtype)
    v = torch.randn(len(lens), kv_heads, cap, d, generator=g).to(dtype)
    for b, (M, R, B, _) in enumerate(lens):  # stale slots: NaN must never reach the output
        k[b, :, M + R + B:] = float("nan")
        v[b, :, M + R + B:] = float("nan")
    return k.to(device), v.to(device)


def int32(xs, device=None):
    device = device or DEV
    return torch.tensor(xs, dtype=torch.int32, device=device)


def run_attention(q, k, v, cu, lens, mode, attend_previous, max_seqlen_q, scale=0.0, on=None):
    """on: the op namespace (default: the ops under test)."""
    dev = q.device
    cols = list(zip(*lens)) if lens else ([], [], [], [])
    return (on or ops).attention(q, k, v, int32(cu, dev), int32(cols[0], dev), int32(cols[1], dev), int32(cols[2], dev),
                         int32(cols[3], dev), max_seqlen_q, mode, attend_previous, scale)


def check_rule(out, lse, q, k, v, cu, lens, mode, attend_previous, scale, eps=1e-4):
    ref_o, ref_l = masked_attention(q, k, v, cu, lens, mode, attend_previous, scale, torch.float64)
    base_o, base_l = masked_attention(q, k, v, cu, lens, mode, attend_previous, scale, q.dtype)
    _, base_err = assert_within_twice_baseline(out, ref_o, base_o, eps, "out")
    fin = torch.isfinite(ref_l)
    assert torch.equal(torch.isfinite(lse.double()), fin)  # +inf exactly where nothing is seen
    assert_within_twice_baseline(lse.double()[fin], ref_l[fin], base_l[fin], eps, "lse")
    return ref_o, base_err


# Step shapes: (M, R, B, r) per sequence and its query count (spec section 2).
#  0: a chunk that completes the window (W = 64, r = 16: 64 raw + 4 beacons), memory of 96;
#  1: a chunk in the middle of a window (20 new raw tokens of 50), memory 32;
#  2: stride 32 < window 64 (r = 8: 4 beacons over the first 32 raw), the 32 new raw + beacons;
#  3: an idle sequence (no queries this step).
PREFILL_LENS = [(96, 64, 4, 16), (32, 50, 0, 16), (8, 64, 4, 8), (10, 5, 0, 4)]
PREFILL_NQ = [68, 20, 36, 0]


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("attend_previous", [True, False])
@pytest.mark.parametrize("group", [1, 3])
def test_prefill_against_masked_reference(dtype, d, mode, attend_previous, group):
    kv_heads, cap = 2, 200
    k, v = make_cache(PREFILL_LENS, kv_heads, cap, d, dtype)
    cu = [0]
    for n in PREFILL_NQ:
        cu.append(cu[-1] + n)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(cu[-1], kv_heads * group, d, generator=g).to(dtype).to(DEV, copy=True)
    out, lse = run_attention(q, k, v, cu, PREFILL_LENS, mode, attend_previous, max(PREFILL_NQ))
    assert out.shape == q.shape and out.dtype == dtype and lse.dtype == torch.float32
    check_rule(out, lse, q, k, v, cu, PREFILL_LENS, mode, attend_previous, 1 / math.sqrt(d))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("mode", NEW_KINDS)
@pytest.mark.parametrize("group", [1, 3])
def test_newer_variant_kinds_against_masked_reference(dtype, d, mode, group):
    # The prefill shapes (tensor-core path for bf16, the simple path for fp32), then decode steps,
    # one of which completes a window (1 raw token + 4 beacons over a sink and earlier beacons).
    kv_heads, cap = 2, 200
    for lens, nq in ((PREFILL_LENS, PREFILL_NQ), ([(9, 64, 4, 16), (5, 30, 0, 8)], [5, 1])):
        k, v = make_cache(lens, kv_heads, cap, d, dtype)
        cu = [0]
        for n in nq:
            cu.append(cu[-1] + n)
        g = torch.Generator().manual_seed(2)
        q = torch.randn(cu[-1], kv_heads * group, d, generator=g).to(dtype).to(DEV, copy=True)
        out, lse = run_attention(q, k, v, cu, lens, mode, False, max(nq))
        if dtype == torch.float32:
            ref_o, _ = masked_attention(q, k, v, cu, lens, mode, False, 1 / math.sqrt(d), torch.float64)
            assert (out.double() - ref_o).abs().max().item() <= 1e-5
        else:
            check_rule(out, lse, q, k, v, cu, lens, mode, False, 1 / math.sqrt(d))


@pytest.mark.parametrize("d", [64, 128])
def test_prefill_long_memory_many_tiles_and_scale(d):
    # Several hundred memory keys (many fully visible tiles), a window of 256 completed with
    # r = 32, GQA group 4, an explicit softmax scale.
    lens = [(700, 256, 8, 32), (130, 77, 0, 32)]
    nq = [264, 77]
    k, v = make_cache(lens, 2, 1000, d, torch.bfloat16)
    q = torch.randn(sum(nq), 8, d).to(torch.bfloat16).to(DEV, copy=True)
    cu = [0, nq[0], nq[0] + nq[1]]
    out, lse = run_attention(q, k, v, cu, lens, "step-expansion", True, max(nq), scale=0.05)
    check_rule(out, lse, q, k, v, cu, lens, "step-expansion", True, 0.05)


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 20])
def test_decode_matches_reference_and_prefill_path(dtype, d, group):
    # One query per sequence (decode), one idle sequence; long memory so the keys are split.
    lens = [(700, 33, 0, 16), (0, 1, 0, 0), (5, 7, 0, 2), (64, 64, 0, 8)]
    nq = [1, 1, 0, 1]
    kv_heads = 2
    k, v = make_cache(lens, kv_heads, 1024, d, dtype)
    cu = [0, 1, 2, 2, 3]
    q = torch.randn(3, kv_heads * group, d).to(dtype).to(DEV, copy=True)
    dec_o, dec_l = run_attention(q, k, v, cu, lens, "step-expansion", True, 1)
    pre_o, pre_l = run_attention(q, k, v, cu, lens, "step-expansion", True, 2)  # an upper bound: prefill
    ref_o, base_err = check_rule(dec_o, dec_l, q, k, v, cu, lens, "step-expansion", True, 1 / math.sqrt(d))
    check_rule(pre_o, pre_l, q, k, v, cu, lens, "step-expansion", True, 1 / math.sqrt(d))
    assert max_error(dec_o, pre_o) <= 2 * base_err + 1e-4
    assert torch.allclose(dec_l, pre_l, rtol=0, atol=1e-3)


def _cpu_has(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"beacon::{op}", "CPU")


@pytest.mark.parametrize("max_seqlen_q", [1, 68])
def test_cpu_and_cuda_agree(max_seqlen_q):
    if not _cpu_has("attention"):
        pytest.skip("the CPU attention kernel is not built in")
    if max_seqlen_q == 1:
        lens, nq = [(300, 20, 0, 8), (3, 2, 0, 8)], [1, 1]
    else:
        lens, nq = PREFILL_LENS, PREFILL_NQ
    cu = [0]
    for n in nq:
        cu.append(cu[-1] + n)
    k, v = make_cache(lens, 2, 400, 128, torch.bfloat16, device="cpu")
    k = torch.nan_to_num(k)  # the CPU kernel need not guard stale slots the same way
    v = torch.nan_to_num(v)
    # Seeded like the cache: the bound is within one bf16 step of some draws' differences.
    q = torch.randn(cu[-1], 6, 128, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    cpu_o, cpu_l = run_attention(q, k, v, cu, lens, "segmentation", True, max_seqlen_q, on=cpu_ops)
    gpu_o, gpu_l = run_attention(q.to(DEV, copy=True), k.to(DEV, copy=True), v.to(DEV, copy=True), cu, lens, "segmentation", True, max_seqlen_q)
    ref_o, _ = masked_attention(q.double(), k.double(), v.double(), cu, lens, "segmentation", True,
                                1 / math.sqrt(128), torch.float64)
    base_o, _ = masked_attention(q.to(DEV, copy=True), k.to(DEV, copy=True), v.to(DEV, copy=True), cu, lens, "segmentation", True,
                                 1 / math.sqrt(128), torch.bfloat16)
    assert max_error(gpu_o, cpu_o) <= 2 * max_error(base_o, ref_o) + 1e-4
    assert torch.allclose(gpu_l.cpu(), cpu_l, rtol=0, atol=1e-3)


@gpu_only
def test_attention_cuda_graph_capture():
    lens, nq = [(200, 30, 0, 8), (16, 9, 0, 8)], [1, 1]
    k, v = make_cache(lens, 2, 256, 128, torch.bfloat16)
    q = torch.randn(2, 8, 128).to(torch.bfloat16).to(DEV, copy=True)
    cols = list(zip(*lens))
    args = [q, k, v, int32([0, 1, 2]), int32(cols[0]), int32(cols[1]), int32(cols[2]), int32(cols[3])]
    for mq in (1, 2):
        eager = ops.attention(*args, mq, "step-expansion", True, 0.0)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = ops.attention(*args, mq, "step-expansion", True, 0.0)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1])


@pytest.mark.parametrize("d", [64, 96, 128, 40])
@pytest.mark.parametrize("mode", MODES)
def test_fp32_simple_path_against_reference(d, mode):
    # fp32 runs the simple CUDA-core kernel: fp32 accuracy against the fp64 reference.
    lens, nq = PREFILL_LENS, PREFILL_NQ
    k, v = make_cache(lens, 2, 200, d, torch.float32)
    cu = [0]
    for n in nq:
        cu.append(cu[-1] + n)
    q = torch.randn(cu[-1], 6, d, device=DEV)
    for max_q in (max(nq), 10 * cu[-1]):  # an upper bound, even past total_q, is allowed
        out, lse = run_attention(q, k, v, cu, lens, mode, False, max_q)
        ref_o, ref_l = masked_attention(q, k, v, cu, lens, mode, False, 1 / math.sqrt(d), torch.float64)
        assert (out.double() - ref_o).abs().max().item() <= 1e-5
        torch.testing.assert_close(lse.double(), ref_l, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [96, 80])
def test_other_head_dims_simple_path(dtype, d):
    k, v = make_cache(PREFILL_LENS, 2, 200, d, dtype)
    cu = [0]
    for n in PREFILL_NQ:
        cu.append(cu[-1] + n)
    q = torch.randn(cu[-1], 4, d).to(dtype).to(DEV, copy=True)
    out, lse = run_attention(q, k, v, cu, PREFILL_LENS, "segmentation", True, max(PREFILL_NQ))
    check_rule(out, lse, q, k, v, cu, PREFILL_LENS, "segmentation", True, 1 / math.sqrt(d))


def test_attention_errors_name_the_argument():
    lens = [(4, 4, 0, 0)]
    k, v = make_cache(lens, 1, 16, 64, torch.bfloat16)
    q = torch.randn(2, 1, 64).to(torch.bfloat16).to(DEV, copy=True)
    with pytest.raises(TypeError, match="q must be bfloat16, float16 or float32"):
        run_attention(q.double(), k.double(), v.double(), [0, 2], lens, "step-expansion", True, 2)
    with pytest.raises(TypeError, match="k_cache must have q's dtype"):
        run_attention(q, k.half(), v, [0, 2], lens, "step-expansion", True, 2)
    with pytest.raises(ValueError, match="head_dim"):
        k512, v512 = make_cache(lens, 1, 16, 512, torch.bfloat16)
        run_attention(torch.randn(2, 1, 512).to(torch.bfloat16).to(DEV, copy=True), k512, v512, [0, 2], lens,
                      "step-expansion", True, 2)
    if DEV != "cpu":  # the emulated ops take CPU tensors: no second device to mix up
        with pytest.raises(RuntimeError, match="mem_len must be on"):
            ops.attention(q, k, v, int32([0, 2]), int32([4], "cpu"), int32([4]), int32([0]), int32([0]), 2,
                          "step-expansion", True, 0.0)
    with pytest.raises(ValueError, match="mode"):
        run_attention(q, k, v, [0, 2], lens, "sliding", True, 2)


@gpu_only
def test_attention_opcheck_cuda():
    lens, nq = [(40, 16, 2, 8), (8, 9, 0, 8)], [18, 3]
    k, v = make_cache(lens, 2, 80, 64, torch.bfloat16)
    k, v = torch.nan_to_num(k), torch.nan_to_num(v)
    q = torch.randn(21, 4, 64).to(torch.bfloat16).to(DEV, copy=True)
    cols = list(zip(*lens))
    args = (q, k, v, int32([0, 18, 21]), int32(cols[0]), int32(cols[1]), int32(cols[2]), int32(cols[3]), 18,
            "step-expansion", True, 0.0)
    torch.library.opcheck(torch.ops.beacon.attention.default, args)


# --------------------------------------------------------------------------------------------
# Cache ops.
def tables(d: int, rows: int, device: str = "cpu"):
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    cos, sin = rope_tables(inv_freq, rows)
    return cos.to(device), sin.to(device)


def rotate_ref(x: torch.Tensor, delta: int, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate rows x [..., D] by the signed position difference delta (fp64, tables' values)."""
    c = cos[abs(delta)].double()
    s = sin[abs(delta)].double() * (1 if delta >= 0 else -1)
    xd = x.double()
    if interleaved:
        x0, x1 = xd[..., 0::2], xd[..., 1::2]
    else:
        x0, x1 = xd.chunk(2, dim=-1)
    y0, y1 = x0 * c - x1 * s, x1 * c + x0 * s
    if interleaved:
        return torch.stack((y0, y1), dim=-1).flatten(-2)
    return torch.cat((y0, y1), dim=-1)


CACHE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _need_cpu(op: str):
    if not _cpu_has(op):
        pytest.skip(f"the CPU {op} kernel is not built in")


@pytest.mark.parametrize("dtype", CACHE_DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("d", [64, 6])
def test_rope_cuda_bit_exact_vs_cpu(dtype, interleaved, d):
    cos, sin = tables(d, 300)
    x = torch.randn(37, 3, d).to(dtype)
    pos = torch.randint(0, 300, (37,), dtype=torch.int32)
    xg = x.to(DEV, copy=True)
    ops.rope_(xg, pos.to(DEV, copy=True), cos.to(DEV, copy=True), sin.to(DEV, copy=True), interleaved)
    ref = torch.stack([rotate_ref(x[i], int(pos[i]), cos, sin, interleaved) for i in range(37)])
    torch.testing.assert_close(xg.cpu(), ref.to(dtype))  # 1 ulp of dtype: fp32 vs fp64 math
    _need_cpu("rope_")
    cpu_ops.rope_(x, pos, cos, sin, interleaved)
    assert torch.equal(xg.cpu(), x)


@pytest.mark.parametrize("dtype", CACHE_DTYPES, ids=str)
@pytest.mark.parametrize("interleaved", [False, True])
def test_append_kv_cuda_bit_exact_vs_cpu(dtype, interleaved):
    d, heads, cap = 64, 2, 40
    cos, sin = tables(d, 128)
    lens = [(5, 9, 0), (0, 16, 2), (3, 0, 0)]   # (M, R, B) after the step
    n_new = [4, 18, 0]
    cu = [0, 4, 22, 22]
    kc = torch.randn(3, heads, cap, d).to(dtype)
    vc = torch.randn(3, heads, cap, d).to(dtype)
    kn = torch.randn(22, heads, d).to(dtype)
    vn = torch.randn(22, heads, d).to(dtype)
    pos = torch.randint(0, 128, (22,), dtype=torch.int32)
    cols = [int32([x[i] for x in lens], "cpu") for i in range(3)]
    kg, vg = kc.to(DEV, copy=True), vc.to(DEV, copy=True)
    ops.append_kv(kg, vg, kn.to(DEV, copy=True), vn.to(DEV, copy=True), int32(cu), *[c.to(DEV, copy=True) for c in cols], pos.to(DEV, copy=True), cos.to(DEV, copy=True),
                  sin.to(DEV, copy=True), interleaved)
    # Reference from the contract: token i of sequence b goes to slot end - n + i.
    k_ref, v_ref = kc.clone(), vc.clone()
    for b, (M, R, B) in enumerate(lens):
        end = M + R + B
        for i in range(n_new[b]):
            t = cu[b] + i
            k_ref[b, :, end - n_new[b] + i] = rotate_ref(kn[t], int(pos[t]), cos, sin, interleaved).to(dtype)
            v_ref[b, :, end - n_new[b] + i] = vn[t]
    assert torch.equal(vg.cpu(), v_ref)
    torch.testing.assert_close(kg.cpu(), k_ref)  # 1 ulp of dtype: fp32 vs fp64 math
    _need_cpu("append_kv")
    cpu_ops.append_kv(kc, vc, kn, vn, int32(cu, "cpu"), *cols, pos, cos, sin, interleaved)
    assert torch.equal(kg.cpu(), kc) and torch.equal(vg.cpu(), vc)


@pytest.mark.parametrize("dtype", CACHE_DTYPES, ids=str)
def test_rope_and_append_kv_position_zero_copy_exactly(dtype):
    # Position 0 is the identity: the CPU ops copy the row, so must the kernels (rotating by
    # cos 1 / sin 0 turns -0.0 into +0.0 and inf into NaN). Every row also has a later
    # position so both kernel paths run.
    d, heads = 8, 2
    cos, sin = tables(d, 16)
    x = torch.randn(4, heads, d)
    x[0, 0, :4] = torch.tensor([-0.0, float("inf"), -1.0, 3.0])
    x[0, 0, 4:] = torch.tensor([-1.0, 1.0, -0.0, float("-inf")])
    x[2] = x[0]
    x = x.to(dtype)
    pos = torch.tensor([0, 5, 0, 9], dtype=torch.int32)
    xg = x.to(DEV, copy=True)
    ops.rope_(xg, pos.to(DEV, copy=True), cos.to(DEV, copy=True), sin.to(DEV, copy=True), False)
    ref = x.clone()
    cpu_ops.rope_(ref, pos, cos, sin, False)
    assert torch.equal(xg.cpu().view(torch.uint8), ref.view(torch.uint8))  # bits: -0.0 stays -0.0
    assert torch.equal(ref[0].view(torch.uint8), x[0].view(torch.uint8))
    kc = torch.zeros(1, heads, 8, d, dtype=dtype)
    vc = torch.zeros_like(kc)
    kg, vg = kc.to(DEV, copy=True), vc.to(DEV, copy=True)
    lens = [int32([0], "cpu"), int32([4], "cpu"), int32([0], "cpu")]
    ops.append_kv(kg, vg, x.to(DEV, copy=True), x.to(DEV, copy=True), int32([0, 4]),
                  *[t.to(DEV, copy=True) for t in lens], pos.to(DEV, copy=True), cos.to(DEV, copy=True),
                  sin.to(DEV, copy=True), False)
    cpu_ops.append_kv(kc, vc, x, x, int32([0, 4], "cpu"), *lens, pos, cos, sin, False)
    assert torch.equal(kg.cpu().view(torch.uint8), kc.view(torch.uint8))
    assert torch.equal(kc[0, :, 0].view(torch.uint8), x[0].view(torch.uint8))


def compact_ref(k, v, mem, raw, bea, ratio, cos, sin, W, S, mode, interleaved):
    """Spec section 5 on copies (no in-place hazards); returns new (k, v, mem, raw, bea)."""
    k, v = k.clone(), v.clone()
    mem, raw, bea = list(mem), list(raw), list(bea)
    src_k, src_v = k.clone(), v.clone()
    for b in range(len(mem)):
        if raw[b] != W:
            continue
        M, r = mem[b], ratio[b]
        if r > 0:
            B = S // r
            moves = [(M + W + j, M + j, (M + j) - beacon_position(M, j, r, W, mode)) for j in range(B)]
            moves += [(M + t, M + B + (t - S), B - S) for t in range(S, W)]
            for src, dst, delta in moves:
                rot = rotate_ref(src_k[:, b, :, src], delta, cos, sin, interleaved) if delta else src_k[:, b, :, src]
                k[:, b, :, dst] = rot.to(k.dtype)
                v[:, b, :, dst] = src_v[:, b, :, src]
            mem[b] = M + B
        else:
            mem[b] = M + S
        raw[b], bea[b] = W - S, 0
    return k, v, mem, raw, bea


@pytest.mark.parametrize("dtype", CACHE_DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES + NEW_KINDS)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("W,S", [(16, 16), (16, 8), (32, 8)])
def test_compact_cuda_bit_exact_vs_cpu(dtype, mode, interleaved, W, S):
    # (32, 8) with r = 2: B = 4, 24 carried raw tokens shifted down by 4 -> six rounds.
    d, layers, heads, cap = 64, 2, 2, 96
    cos, sin = tables(d, 200)
    r_full = 2
    mem = [8, 3, 20, 0]
    raw = [W, 5, W, W]
    ratio = [r_full, 4, 0, 4]
    bea = [S // r_full, 0, 0, S // 4]
    k = torch.randn(layers, 4, heads, cap, d).to(dtype)
    v = torch.randn(layers, 4, heads, cap, d).to(dtype)
    k_ref, v_ref, m_ref, r_ref, b_ref = compact_ref(k, v, mem, raw, bea, ratio, cos, sin, W, S, mode, interleaved)
    kg, vg = k.to(DEV, copy=True), v.to(DEV, copy=True)
    lens_g = [int32(mem), int32(raw), int32(bea)]
    ops.compact_(kg, vg, *lens_g, int32(ratio), cos.to(DEV, copy=True), sin.to(DEV, copy=True), W, S, mode, interleaved)
    assert [t.cpu().tolist() for t in lens_g] == [m_ref, r_ref, b_ref]
    assert torch.equal(vg.cpu(), v_ref)
    torch.testing.assert_close(kg.cpu(), k_ref)  # 1 ulp of dtype: fp32 vs fp64 math
    _need_cpu("compact_")
    lens_c = [int32(mem, "cpu"), int32(raw, "cpu"), int32(bea, "cpu")]
    cpu_ops.compact_(k, v, *lens_c, int32(ratio, "cpu"), cos, sin, W, S, mode, interleaved)
    assert torch.equal(kg.cpu(), k) and torch.equal(vg.cpu(), v)
    assert [t.tolist() for t in lens_c] == [m_ref, r_ref, b_ref]


@gpu_only
def test_cache_ops_opcheck_cuda():
    d = 64
    cos, sin = tables(d, 64, DEV)
    x = torch.randn(5, 2, d, device=DEV)
    torch.library.opcheck(torch.ops.beacon.rope_.default, (x, int32([0, 1, 2, 3, 4]), cos, sin, False))
    kc = torch.randn(2, 2, 40, d, device=DEV)
    vc = torch.randn_like(kc)
    kn = torch.randn(3, 2, d, device=DEV)
    vn = torch.randn_like(kn)
    torch.library.opcheck(torch.ops.beacon.append_kv.default,
                          (kc, vc, kn, vn, int32([0, 2, 3]), int32([1, 0]), int32([4, 1]), int32([0, 0]),
                           int32([3, 4, 0]), cos, sin, False))
    k5 = torch.randn(2, 2, 2, 40, d, device=DEV)
    v5 = torch.randn_like(k5)
    torch.library.opcheck(torch.ops.beacon.compact_.default,
                          (k5, v5, int32([4, 0]), int32([16, 3]), int32([4, 0]), int32([4, 4]), cos, sin, 16, 16,
                           "step-expansion", False))


@gpu_only
def test_cache_ops_cuda_graph_capture():
    # Lengths live on the device and are never read on the host: append_kv and compact_ can be
    # captured once and replayed; the replay equals the eager call.
    d, W, S = 64, 16, 8
    cos, sin = tables(d, 64, DEV)
    k = torch.randn(2, 2, 2, 48, d, device=DEV).to(torch.bfloat16)
    v = torch.randn_like(k)
    kn = torch.randn(5, 2, d, device=DEV).to(torch.bfloat16)
    vn = torch.randn_like(kn)
    cu, pos = int32([0, 4, 5]), int32([12, 13, 14, 15, 7])
    lens0 = ([4, 2], [W, 8], [S // 2, 0])  # seq 0: its window fills this step (r = 2, 4 beacons)

    def step(kc, vc, lens):
        ops.append_kv(kc[1], vc[1], kn, vn, cu, *lens, pos, cos, sin, False)
        ops.compact_(kc, vc, *lens, int32([2, 2]), cos, sin, W, S, "step-expansion", False)

    ke, ve, lens_e = k.clone(), v.clone(), [int32(x) for x in lens0]
    step(ke, ve, lens_e)
    kg, vg, lens_g = k.clone(), v.clone(), [int32(x) for x in lens0]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(kg, vg, lens_g)
    assert torch.equal(kg, k) and [t.tolist() for t in lens_g] == [list(x) for x in lens0]  # nothing ran yet
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(kg, ke) and torch.equal(vg, ve)
    assert [t.tolist() for t in lens_g] == [t.tolist() for t in lens_e] == [[8, 2], [W - S, 8], [0, 0]]
