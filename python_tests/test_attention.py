"""torch.ops.beacon.attention (via beacon_ops.beacon_attention) against the explicit-mask
reference (beacon_ops.reference), causal SDPA, opcheck, torch.compile and bad input."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.attention.bias import causal_lower_right

from beacon_ops import beacon_attention
from beacon_ops.positions import MASK_KINDS
from beacon_ops.reference import reference_attention

from accuracy_rule import assert_within_twice_baseline, max_error
from conftest import DEVICES

MODES = MASK_KINDS  # the original modes and the newer variant's kinds
LOW = (torch.bfloat16, torch.float16)


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu: torch.Tensor
    mem: torch.Tensor
    raw: torch.Tensor
    beacon: torch.Tensor
    ratio: torch.Tensor
    max_q: int

    def args(self):
        return (self.q, self.k, self.v, self.cu, self.mem, self.raw, self.beacon, self.ratio)


def make_case(device, dtype, mem, raw, beacon, ratio, nq, heads=4, kv_heads=2, head_dim=32,
              extra_capacity=5, seed=0) -> Case:
    """Random step. Cache slots past each sequence's length are NaN: the op must not read them."""
    g = torch.Generator().manual_seed(seed)
    batch = len(mem)
    cap = max(m + r + b for m, r, b in zip(mem, raw, beacon)) + extra_capacity
    k = torch.full((batch, kv_heads, cap, head_dim), float("nan"))
    v = torch.full_like(k, float("nan"))
    for b in range(batch):
        n = mem[b] + raw[b] + beacon[b]
        k[b, :, :n] = torch.randn(kv_heads, n, head_dim, generator=g)
        v[b, :, :n] = torch.randn(kv_heads, n, head_dim, generator=g)
    cu = [0]
    for n in nq:
        cu.append(cu[-1] + n)
    q = torch.randn(cu[-1], heads, head_dim, generator=g)

    def i32(x):
        return torch.tensor(x, dtype=torch.int32, device=device)

    return Case(q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), i32(cu), i32(mem),
                i32(raw), i32(beacon), i32(ratio), max(nq) if nq else 0)


def check(case: Case, mode="step-expansion", attend_previous=True, softmax_scale=None):
    out, lse = beacon_attention(*case.args(), max_seqlen_q=case.max_q, mode=mode,
                                attend_previous=attend_previous, softmax_scale=softmax_scale)
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    assert lse.shape == case.q.shape[:2] and lse.dtype == torch.float32
    kw = dict(mode=mode, attend_previous=attend_previous, softmax_scale=softmax_scale)
    ref = reference_attention(*case.args(), **kw)
    if case.q.dtype == torch.float32:
        assert max_error(out, ref.out) <= 2e-5, max_error(out, ref.out)
    else:
        base = reference_attention(*case.args(), compute_dtype=case.q.dtype, **kw)
        assert_within_twice_baseline(out, ref.out, base.out, 1e-4)
    torch.testing.assert_close(lse.cpu(), ref.lse, atol=1e-4, rtol=1e-5)
    return out, lse


# --- every mode / attend_previous, windows with and without beacons -----------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("attend_previous", [True, False])
def test_modes_window_completing(device, mode, attend_previous):
    # Three sequences: window completing with beacons, mid-window chunk, first window.
    c = make_case(device, torch.float32, mem=[40, 17, 0], raw=[64, 50, 32], beacon=[16, 0, 8],
                  ratio=[4, 8, 4], nq=[80, 20, 40])
    check(c, mode, attend_previous)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ratio", [1, 2, 4, 8, 16, 32, 64, 128])
def test_ratios(device, ratio):
    W = 256
    c = make_case(device, torch.float32, mem=[3 * W // ratio], raw=[W], beacon=[W // ratio],
                  ratio=[ratio], nq=[W + W // ratio], heads=2, kv_heads=1, head_dim=64)
    check(c)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_memory_and_memory_only(device):
    # Empty memory (first window), then a step whose only raw token is new (memory + itself).
    c = make_case(device, torch.float32, mem=[0, 300], raw=[33, 1], beacon=[0, 0], ratio=[0, 0],
                  nq=[33, 1])
    check(c)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("group", [1, 3, 5, 7])
def test_gqa_groups(device, group):
    c = make_case(device, torch.float32, mem=[70, 0], raw=[90, 20], beacon=[10, 5], ratio=[9, 4],
                  nq=[30, 25], heads=2 * group, kv_heads=2)
    check(c, "step-expansion")
    check(c, "segmentation", attend_previous=False)


@pytest.mark.parametrize("device", DEVICES)
def test_nine_heads_over_three(device):
    c = make_case(device, torch.float32, mem=[64], raw=[128], beacon=[16], ratio=[8], nq=[144],
                  heads=9, kv_heads=3, head_dim=64)
    check(c)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [1, 2, 3, 4, 6, 7])
@pytest.mark.parametrize("head_dim", [64, 128, 136])
def test_decode(device, dtype, group, head_dim):
    # One query per sequence; different lengths; one sequence's query completes nothing. Groups
    # 1-7: the CPU's few-row kernels per row count (the key counts leave remainders after their
    # key groups and chunks; head_dim 136 leaves an 8-column tail; with AVX2, bf16 at head_dim 64
    # and 128 is read in split column order for groups 1-4 and 6).
    c = make_case(device, dtype, mem=[512, 5, 0, 1025], raw=[97, 1, 64, 3],
                  beacon=[0, 0, 0, 0], ratio=[8, 0, 2, 32], nq=[1, 1, 1, 1], heads=3 * group,
                  kv_heads=3, head_dim=head_dim)
    check(c)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group,head_dim", [(1, 128), (3, 128), (2, 64), (6, 64)])
def test_decode_long_cache(device, dtype, group, head_dim):
    # Caches longer than the CPU's decode key blocks (1,024 keys; 4,096 where bf16 V streams),
    # so the running maxima and sums carry over block boundaries, and a partial last block.
    c = make_case(device, dtype, mem=[9000, 4000], raw=[200, 97], beacon=[0, 0], ratio=[8, 8],
                  nq=[1, 1], heads=2 * group, kv_heads=2, head_dim=head_dim)
    check(c)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_step_completing_a_window(device):
    # The decode step that fills the window: 1 raw token + B beacons.
    c = make_case(device, torch.float32, mem=[96, 10], raw=[64, 30], beacon=[8, 0], ratio=[8, 8],
                  nq=[9, 1], heads=6, kv_heads=2, head_dim=64)
    for mode in MODES:
        check(c, mode)


@pytest.mark.parametrize("device", DEVICES)
def test_odd_sizes(device):
    c = make_case(device, torch.float32, mem=[97, 1025], raw=[1025, 97], beacon=[1, 12],
                  ratio=[1000, 8], nq=[1026, 50], heads=2, kv_heads=1, head_dim=40)
    check(c, "segmentation")
    check(c, "full-coverage", attend_previous=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", [8, 64, 128, 136, 256])
def test_head_dims(device, head_dim):
    c = make_case(device, torch.float32, mem=[20], raw=[40], beacon=[5], ratio=[8], nq=[25],
                  heads=2, kv_heads=2, head_dim=head_dim)
    check(c, softmax_scale=0.05)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(device, dtype):
    c = make_case(device, dtype, mem=[300, 0], raw=[260, 70], beacon=[32, 0], ratio=[8, 0],
                  nq=[292, 70], heads=6, kv_heads=2, head_dim=64)
    check(c)
    check(c, "segmentation", attend_previous=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_running_max_grows_in_later_key_blocks(device, dtype):
    """Later key blocks whose scores pass the earlier blocks' maxima by a little (4-5 log2
    units: the CPU's bf16 update keeps its running maxima, P above 1) and by a lot (~13: that
    block is redone with new maxima), for queries of every tile."""
    c = make_case(device, dtype, mem=[300], raw=[500], beacon=[0], ratio=[0], nq=[500], heads=4,
                  kv_heads=2, head_dim=64, extra_capacity=0)
    k = c.k.float()
    k[:, :, 256:300] *= 2.0   # memory, second block: ~3 nats above the first block's maxima
    k[:, :, 520:600] *= 4.0   # raw keys: ~9 nats above
    k[:, 1, 700:760] *= 3.0   # one KV head only, late raw keys
    c.k = k.to(dtype)
    check(c)
    check(c, "causal")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_sequences_and_batch(device):
    c = make_case(device, torch.float32, mem=[10, 0, 3], raw=[0, 0, 4], beacon=[0, 0, 0],
                  ratio=[0, 0, 0], nq=[0, 0, 4])
    check(c)
    e = make_case(device, torch.float32, mem=[10], raw=[4], beacon=[0], ratio=[0], nq=[0])
    out, lse = beacon_attention(*e.args(), max_seqlen_q=0)
    assert out.shape == (0, 4, 32) and lse.shape == (0, 4)


# --- randomised: at least 200 configurations -------------------------------------------------
@st.composite
def configs(draw):
    batch = draw(st.integers(1, 3))
    kv_heads = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([8, 16, 24, 32]))
    mem, raw, beacon, ratio, nq = [], [], [], [], []
    for _ in range(batch):
        m = draw(st.integers(0, 40))
        r = draw(st.integers(0, 40))
        ra = draw(st.integers(0, 9))
        b = draw(st.integers(0, 10)) if ra > 0 else 0
        n = draw(st.integers(b, r + b))
        mem.append(m), raw.append(r), beacon.append(b), ratio.append(ra), nq.append(n)
    return dict(mem=mem, raw=raw, beacon=beacon, ratio=ratio, nq=nq, heads=kv_heads * group,
                kv_heads=kv_heads, head_dim=head_dim, seed=draw(st.integers(0, 1000)),
                mode=draw(st.sampled_from(MODES)), attend_previous=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16])))


@settings(max_examples=220, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_fuzz_against_reference(cfg):
    mode, ap, dtype = cfg.pop("mode"), cfg.pop("attend_previous"), cfg.pop("dtype")
    c = make_case("cpu", dtype, **cfg)
    if c.q.shape[0] == 0:
        return
    check(c, mode, ap)


# --- equivalences ------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_causal_sdpa_square(device, dtype):
    n, H, Hkv, d = 300, 6, 2, 64
    c = make_case(device, dtype, mem=[0], raw=[n], beacon=[0], ratio=[0], nq=[n], heads=H,
                  kv_heads=Hkv, head_dim=d, extra_capacity=0)
    out, _ = beacon_attention(*c.args(), max_seqlen_q=n)
    expected = F.scaled_dot_product_attention(
        c.q.transpose(0, 1).float(), c.k[0].float(), c.v[0].float(), is_causal=True,
        enable_gqa=True).transpose(0, 1)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_equals_causal_lower_right_sdpa(device):
    nq, R, H, d = 70, 333, 4, 32
    c = make_case(device, torch.float32, mem=[0], raw=[R], beacon=[0], ratio=[0], nq=[nq], heads=H,
                  kv_heads=H, head_dim=d, extra_capacity=0)
    out, _ = beacon_attention(*c.args(), max_seqlen_q=nq)
    expected = F.scaled_dot_product_attention(
        c.q.transpose(0, 1), c.k[0], c.v[0], attn_mask=causal_lower_right(nq, R)).transpose(0, 1)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)


# --- custom-op machinery -----------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", [
    dict(mem=[5], raw=[8], beacon=[2], ratio=[4], nq=[4], heads=2, kv_heads=1, head_dim=16),
    dict(mem=[0, 9], raw=[6, 3], beacon=[0, 1], ratio=[0, 3], nq=[6, 2], heads=3, kv_heads=3,
         head_dim=8),
    dict(mem=[7], raw=[1], beacon=[0], ratio=[0], nq=[1], heads=4, kv_heads=2, head_dim=32),
])
def test_opcheck(device, cfg):
    c = make_case(device, torch.float32, extra_capacity=0, **cfg)
    torch.library.opcheck(torch.ops.beacon.attention.default,
                          c.args() + (c.max_q, "step-expansion", True, 0.0))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    c = make_case(device, torch.float32, mem=[12], raw=[16], beacon=[4], ratio=[4], nq=[20])

    @torch.compile(fullgraph=True)
    def step(q, k, v, cu, mem, raw, beacon, ratio):
        out, lse = beacon_attention(q * 2.0, k, v, cu, mem, raw, beacon, ratio, max_seqlen_q=20,
                                    mode="segmentation", softmax_scale=0.125)
        return out + 1.0, lse

    out, lse = step(*c.args())
    ref = reference_attention(c.q * 2.0, c.k, c.v, c.cu, c.mem, c.raw, c.beacon, c.ratio,
                              mode="segmentation", softmax_scale=0.125)
    torch.testing.assert_close(out.cpu().double(), ref.out + 1.0, atol=2e-5, rtol=0)
    torch.testing.assert_close(lse.cpu(), ref.lse, atol=1e-4, rtol=1e-5)


# --- bad input ---------------------------------------------------------------------------------
def _good(device="cpu"):
    return make_case(device, torch.float32, mem=[4, 2], raw=[8, 3], beacon=[2, 0], ratio=[4, 0],
                     nq=[4, 3], extra_capacity=0)


def _call(c, **kw):
    args = dict(zip(("q", "k_cache", "v_cache", "cu_seqlens_q", "mem_len", "raw_len",
                     "beacon_len", "ratio"), c.args()))
    opts = dict(max_seqlen_q=c.max_q, mode="step-expansion")
    for name, val in kw.items():
        (opts if name in opts or name in ("attend_previous", "softmax_scale") else args)[name] = val
    return beacon_attention(*args.values(), **opts)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,make,match", [
    ("q rank", lambda c: dict(q=c.q[0]), "q must have shape"),
    ("k rank", lambda c: dict(k_cache=c.k[0]), "k_cache must have shape"),
    ("v shape", lambda c: dict(v_cache=c.v[:, :, :-1]), "v_cache must have k_cache's shape"),
    ("head_dim mismatch", lambda c: dict(k_cache=c.k[..., :16], v_cache=c.v[..., :16]),
     "k_cache head_dim"),
    ("head_dim not multiple of 8",
     lambda c: dict(q=c.q[..., :12], k_cache=c.k[..., :12], v_cache=c.v[..., :12]),
     "head_dim must be a multiple"),
    ("heads not multiple", lambda c: dict(q=c.q[:, :3]), "kv_heads"),
    ("k dtype", lambda c: dict(k_cache=c.k.double()), "k_cache must have q's dtype"),
    ("v dtype", lambda c: dict(v_cache=c.v.half()), "v_cache must have q's dtype"),
    ("q dtype", lambda c: dict(q=c.q.double()), "q must be bfloat16, float16 or float32"),
    ("q stride", lambda c: dict(q=c.q.transpose(1, 2).contiguous().transpose(1, 2)),
     "q must be contiguous in head_dim"),
    ("k stride", lambda c: dict(k_cache=c.k.transpose(2, 3).contiguous().transpose(2, 3)),
     "k_cache must be contiguous in head_dim"),
    ("cu dtype", lambda c: dict(cu_seqlens_q=c.cu.long()), "cu_seqlens_q must be int32"),
    ("cu shape", lambda c: dict(cu_seqlens_q=c.cu[:-1]), "cu_seqlens_q must have shape"),
    ("mem dtype", lambda c: dict(mem_len=c.mem.long()), "mem_len must be int32"),
    ("raw shape", lambda c: dict(raw_len=c.raw[:1]), "raw_len must have shape"),
    ("beacon dtype", lambda c: dict(beacon_len=c.beacon.float()), "beacon_len must be int32"),
    ("ratio shape", lambda c: dict(ratio=c.ratio[None]), "ratio must have shape"),
    ("unknown mode", lambda c: dict(mode="diagonal"), "mode must be one of"),
    ("max_seqlen_q negative", lambda c: dict(max_seqlen_q=-1), "max_seqlen_q"),
])
def test_bad_input_python_checks(device, name, make, match):
    c = _good(device)
    with pytest.raises((TypeError, ValueError), match=match):
        _call(c, **make(c))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,lens,match", [
    ("beyond capacity", dict(raw=[9, 3], nq=[5, 3]), r"exceeds the k_cache capacity"),
    ("negative mem", dict(mem=[-1, 2]), r"mem_len\[0\] must be >= 0"),
    ("negative raw", dict(raw=[8, -1], nq=[4, 0]), r"raw_len\[1\] must be >= 0"),
    ("negative beacon", dict(beacon=[2, -1]), r"beacon_len\[1\] must be >= 0"),
    ("negative ratio", dict(ratio=[4, -2]), r"ratio\[1\] must be >= 0"),
    ("ratio 0 with beacons", dict(ratio=[0, 0]), r"ratio\[0\] must be > 0 when beacon_len\[0\]"),
    ("too few queries for beacons", dict(nq=[1, 3]), r"cu_seqlens_q: sequence 0 has 1 queries"),
    ("too many queries", dict(nq=[4, 4]), r"cu_seqlens_q: sequence 1 has 4 queries"),
    ("max_seqlen_q too small", dict(max_q=3), r"max_seqlen_q \(3\)"),
    ("cu not starting at 0", dict(cu=[1, 5, 8]), r"cu_seqlens_q must start at 0"),
    ("cu not ending at total", dict(cu=[0, 4, 6]), r"cu_seqlens_q must end at total_q"),
    ("cu decreasing", dict(cu=[0, 8, 7]), r"cu_seqlens_q must be non-decreasing"),
])
def test_bad_lengths_named(device, name, lens, match):
    if device == "cuda":
        pytest.skip("lengths are validated on the host by CondensedKVCache for CUDA")
    c = _good(device)
    base = dict(mem=[4, 2], raw=[8, 3], beacon=[2, 0], ratio=[4, 0], nq=[4, 3])
    base.update({k: v for k, v in lens.items() if k in base})
    i32 = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    cu = lens.get("cu")
    if cu is None:
        cu = [0]
        for n in base["nq"]:
            cu.append(cu[-1] + n)
    q = c.q.new_zeros(cu[-1] if "cu" not in lens else 7, *c.q.shape[1:])
    with pytest.raises(RuntimeError, match=match):
        beacon_attention(q, c.k, c.v, i32(cu), i32(base["mem"]), i32(base["raw"]),
                         i32(base["beacon"]), i32(base["ratio"]),
                         max_seqlen_q=lens.get("max_q", max(base["nq"]) + 8))


def test_mismatched_devices_named():
    c = _good("cpu")
    with pytest.raises(ValueError, match="k_cache must be on q's device"):
        _call(c, k_cache=c.k.to("meta"))
    with pytest.raises(ValueError, match="mem_len must be on q's device"):
        _call(c, mem_len=c.mem.to("meta"))


# --- every instruction-set path of the CPU kernel (chosen once per process from the CPU, capped by
# BEACON_OPS_CPU_ISA, so each is checked in a subprocess) -----------------------------------------
ISA_LEVELS = ("portable", "avx2", "avx512", "avx512bf16", "amx")

_ISA_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import beacon_ops
from test_attention import make_case, check
print(beacon_ops.build_info()["cpu_isa"], beacon_ops.build_info()["cpu_fp32_gemm"], beacon_ops.build_info()["cpu_decode"])
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    # GEMM tiles (partial blocks, GQA 3, head_dim 72: not a multiple of 16 or 32)
    c = make_case("cpu", dtype, mem=[300, 7], raw=[260, 70], beacon=[32, 0], ratio=[8, 0],
                  nq=[292, 70], heads=6, kv_heads=2, head_dim=72)
    check(c)
    check(c, "segmentation", attend_previous=False)
    for d in (64, 128):  # full blocks of the vector kernels, and decode (few-row tiles)
        c = make_case("cpu", dtype, mem=[700, 37], raw=[300, 1], beacon=[40, 0], ratio=[8, 0],
                      nq=[340, 1], heads=8, kv_heads=2, head_dim=d)
        check(c)
        c = make_case("cpu", dtype, mem=[1000, 3], raw=[3, 1], beacon=[0, 0], ratio=[0, 0],
                      nq=[1, 1], heads=4, kv_heads=4, head_dim=d)
        check(c)
        # decode over more than two decode key blocks (1024 keys), 1 and 2 rows
        c = make_case("cpu", dtype, mem=[2300, 1030], raw=[5, 1], beacon=[0, 0], ratio=[0, 0],
                      nq=[1, 1], heads=4, kv_heads=2, head_dim=d)
        check(c)
        # 4 rows (GQA 4) and SmolLM2's 3 over three key blocks, an odd key count (bf16 P V by
        # pairs of keys)
        for heads, kv_heads in ((8, 2), (9, 3)):
            c = make_case("cpu", dtype, mem=[2301], raw=[4], beacon=[0], ratio=[0],
                          nq=[1], heads=heads, kv_heads=kv_heads, head_dim=d)
            check(c)
    # decode tiles of 3, 5, 6 and 7 rows (GQA 3 with one and two tokens, GQA 5 and 7), head_dim 96
    # and 32; key counts that leave a partial group of keys in every kernel; head_dim 192 and 256
    # (the AMX decode's Q tiles reloaded per chunk)
    for heads, kv_heads, nq, d in ((6, 2, [2, 1], 96), (5, 1, [1, 1], 32), (7, 1, [1, 1], 64),
                                   (6, 3, [1, 2], 192), (4, 1, [1, 1], 256)):
        c = make_case("cpu", dtype, mem=[517, 37], raw=[6, 2], beacon=[0, 0], ratio=[0, 0],
                      nq=nq, heads=heads, kv_heads=kv_heads, head_dim=d)
        check(c)
# The backward (fp32 tile products and exp per level) against the fp64 reference: partial key
# and query blocks, GQA 3, head_dim 72, a loss on out and lse.
from test_attention_backward import Case, Seq, make_inputs, random_grads, grads_of_op, grads_of_reference
case = Case([Seq(mem=70, raw=90, beacon=9, ratio=10, n_q=99), Seq(mem=5, raw=40, beacon=0, ratio=0, n_q=40)],
            heads=6, kv_heads=2, dim=72)
inputs, lengths = make_inputs(case, torch.float32)
dout, dlse = random_grads(case, inputs)
for g, w in zip(grads_of_op(case, inputs, lengths, dout, dlse), grads_of_reference(case, inputs, lengths, dout, dlse)):
    torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5)
# bf16: the bf16 operand path at levels avx512bf16 (dot products) and amx (tiles), fp32 below
from test_attention_backward import BF16_TILE_CASES, check_low_precision_rule
for case in BF16_TILE_CASES.values():
    check_low_precision_rule(case, torch.bfloat16)
print("ok")
"""


def _detected_isa() -> str:
    import beacon_ops

    return beacon_ops.build_info()["cpu_isa_detected"]


# Each level with its default fp32 GEMM (BLAS on Intel CPUs at avx512 and above), and the avx512
# level once more with the other one (BEACON_OPS_FP32_GEMM, block_gemm.h), so the AVX-512
# micro-kernel and torch's BLAS both run on any CPU that has AVX-512.
# Also each of the two decode kernel families (BEACON_OPS_CPU_DECODE, cpu_isa.h) at the widest
# levels, whichever this CPU's vendor picks by default.
ISA_CASES = [pytest.param(isa, None, None, id=isa) for isa in ISA_LEVELS] + [
    pytest.param("avx512", "kernel", None, id="avx512-gemm-kernel"),
    pytest.param("avx512", "blas", None, id="avx512-gemm-blas")] + [
    pytest.param(isa, None, dec, id=f"{isa}-decode-{dec}")
    for isa in ("avx512", "avx512bf16", "amx") for dec in ("avx2", "avx512")]


@pytest.mark.parametrize("isa,gemm,decode", ISA_CASES)
def test_cpu_isa_paths(isa, gemm, decode):
    import os
    import subprocess
    import sys

    detected = _detected_isa()
    if ISA_LEVELS.index(isa) > ISA_LEVELS.index(detected):
        pytest.skip(f"this CPU's widest level is {detected}")
    env = dict(os.environ, BEACON_OPS_CPU_ISA=isa)
    env.pop("BEACON_OPS_FP32_GEMM", None)
    if gemm is not None:
        env["BEACON_OPS_FP32_GEMM"] = gemm
    env.pop("BEACON_OPS_CPU_DECODE", None)
    if decode is not None:
        env["BEACON_OPS_CPU_DECODE"] = decode
    here = os.path.dirname(os.path.abspath(__file__))
    res = subprocess.run([sys.executable, "-c", _ISA_SCRIPT, here], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
    level, gemm_used, decode_used = res.stdout.split()[:3]
    assert level == isa  # the cap took effect
    if decode is not None:
        assert decode_used == decode
    expected = {"portable": "aten", "avx2": "blas"}.get(isa, gemm)
    if expected is not None:
        assert gemm_used == expected
    else:
        assert gemm_used in ("blas", "kernel")
