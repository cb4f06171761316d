"""Backward of torch.ops.beacon.attention: beacon::attention_backward and the autograd formula.

Everything is checked against an independent reference: attention with the explicit boolean
mask table of docs/activation-beacon.md (beacon_ops.reference.beacon_mask, written apart from beacon_mask.h),
differentiated by PyTorch's autograd. The attention around the mask is written here so that
its gradients stay finite for rows that see no key.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

from beacon_ops import beacon_attention, beacon_attention_backward
from beacon_ops.positions import MASK_KINDS
from beacon_ops.reference import beacon_mask
from accuracy_rule import assert_within_twice_baseline
from conftest import DEVICES

MODES = MASK_KINDS  # the original modes and the newer variant's kinds


# ------------------------------------------------------------------------------------------
# The reference: explicit mask from the table of docs/activation-beacon.md, plain PyTorch attention.

@dataclass
class Seq:
    """One sequence of a step: cache lengths after the append, and its query count."""
    mem: int
    raw: int
    beacon: int
    ratio: int
    n_q: int


@dataclass
class Case:
    seqs: list[Seq]
    heads: int = 2
    kv_heads: int = 1
    dim: int = 4
    mode: str = "step-expansion"
    attend_previous: bool = True
    slack: int = 2  # unused cache slots after the longest sequence
    scale: float = 0.0  # 0: head_dim ** -0.5

    def __post_init__(self):
        if not self.scale:
            self.scale = self.dim ** -0.5

    @property
    def capacity(self) -> int:
        return max(s.mem + s.raw + s.beacon for s in self.seqs) + self.slack

    @property
    def total_q(self) -> int:
        return sum(s.n_q for s in self.seqs)


def spec_mask(s: Seq, capacity: int, mode: str, attend_previous: bool) -> torch.Tensor:
    """[n_q, capacity] bool: the documented mask of beacon_ops.reference, padded to capacity."""
    mask = beacon_mask(s.mem, s.raw, s.beacon, s.ratio, s.n_q, mode, attend_previous)
    return torch.nn.functional.pad(mask, (0, capacity - mask.shape[1]), value=False)


def reference_attention(q, k_cache, v_cache, case: Case):
    """(out, lse) in the inputs' dtype; rows that see nothing get out 0 and lse +inf."""
    outs, lses = [], []
    start = 0
    group = case.heads // case.kv_heads
    for b, s in enumerate(case.seqs):
        qs = q[start: start + s.n_q].transpose(0, 1)                      # [H, n, D]
        start += s.n_q
        keys = k_cache[b].repeat_interleave(group, dim=0)                 # [H, C, D]
        values = v_cache[b].repeat_interleave(group, dim=0)
        mask = spec_mask(s, case.capacity, case.mode, case.attend_previous).to(q.device)
        row_any = mask.any(-1, keepdim=True)
        scores = case.scale * qs @ keys.transpose(1, 2)                   # [H, n, C]
        scores = scores.masked_fill(~mask, float("-inf"))
        scores = torch.where(row_any, scores, torch.zeros_like(scores))  # keeps grads finite
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        probs = torch.exp(scores - lse) * mask
        outs.append((probs @ values).transpose(0, 1))
        lses.append(torch.where(row_any, lse, float("inf")).squeeze(-1).transpose(0, 1))
    return torch.cat(outs), torch.cat(lses)


def make_inputs(case: Case, dtype=torch.float32, device="cpu", seed=0):
    """q, k_cache, v_cache and the int32 length tensors of the case."""
    g = torch.Generator().manual_seed(seed)
    shape_kv = (len(case.seqs), case.kv_heads, case.capacity, case.dim)
    q = torch.randn(case.total_q, case.heads, case.dim, generator=g)
    k = torch.randn(shape_kv, generator=g)
    v = torch.randn(shape_kv, generator=g)
    cu = [0]
    for s in case.seqs:
        cu.append(cu[-1] + s.n_q)

    def ints(values):
        return torch.tensor(values, dtype=torch.int32, device=device)

    lengths = (ints(cu), ints([s.mem for s in case.seqs]), ints([s.raw for s in case.seqs]),
               ints([s.beacon for s in case.seqs]), ints([s.ratio for s in case.seqs]))
    return (q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)), lengths


def skip_without_backward_kernel(device: str) -> None:
    """CUDA cases wait (visibly) for a CUDA kernel of beacon::attention_backward."""
    key = "CPU" if device == "cpu" else device.upper()
    if not torch._C._dispatch_has_kernel_for_dispatch_key("beacon::attention_backward", key):
        pytest.skip(f"no {key} kernel for beacon::attention_backward in this build")


def op_kwargs(case: Case) -> dict:
    return dict(max_seqlen_q=max(s.n_q for s in case.seqs), mode=case.mode,
                attend_previous=case.attend_previous, softmax_scale=case.scale)


# A window that completes this step (8 raw + 2 beacons over 3 memory slots, r = 4) batched
# with a plain chunk over memory (3 raw queries of 5 cached), a decode step, and a decode
# step that completes a window (1 raw + its 3 beacons, r = 2).
VARLEN = [Seq(mem=3, raw=8, beacon=2, ratio=4, n_q=10), Seq(mem=2, raw=5, beacon=0, ratio=2, n_q=3)]
DECODE = [Seq(mem=4, raw=3, beacon=0, ratio=0, n_q=1), Seq(mem=2, raw=6, beacon=3, ratio=2, n_q=4)]


# ------------------------------------------------------------------------------------------
# gradcheck (fp64): the backward op against finite differences of the fp64 reference forward.

class _ReferenceForwardOpBackward(torch.autograd.Function):
    """Forward: the fp64 reference. Backward: beacon::attention_backward."""

    @staticmethod
    def forward(ctx, q, k, v, case, lengths):
        out, lse = reference_attention(q, k, v, case)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.case, ctx.lengths = case, lengths
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = beacon_attention_backward(dout, q, k, v, out, lse.float(), *ctx.lengths,
                                               **op_kwargs(ctx.case))
        return dq, dk, dv, None, None


GRADCHECK_CASES = {
    "varlen-memory": lambda mode, ap: Case(VARLEN, heads=2, kv_heads=1, mode=mode,
                                           attend_previous=ap),
    "decode": lambda mode, ap: Case(DECODE, heads=2, kv_heads=2, mode=mode, attend_previous=ap),
    "gqa-9-3": lambda mode, ap: Case([Seq(mem=2, raw=4, beacon=2, ratio=2, n_q=6)], heads=9,
                                     kv_heads=3, dim=2, mode=mode, attend_previous=ap),
}


@pytest.mark.parametrize("attend_previous", [True, False])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(GRADCHECK_CASES))
def test_gradcheck_fp64(name, mode, attend_previous):
    case = GRADCHECK_CASES[name](mode, attend_previous)
    (q, k, v), lengths = make_inputs(case, torch.float64)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda q, k, v: _ReferenceForwardOpBackward.apply(q, k, v, case, lengths), (q, k, v),
        fast_mode=True)


# ------------------------------------------------------------------------------------------
# Through torch.ops.beacon.attention (the registered autograd formula).

def grads_of_op(case, inputs, lengths, dout, dlse=None):
    q, k, v = (t.detach().clone().requires_grad_() for t in inputs)
    out, lse = beacon_attention(q, k, v, *lengths, **op_kwargs(case))
    # dout None: the loss is out.sum(), whose gradient reaches the op as an expanded tensor.
    loss = out.sum() if dout is None else (out.float() * dout).sum()
    if dlse is not None:
        loss = (0 if dout is None else loss) + (torch.where(torch.isinf(lse), 0.0, lse)
                                                 * dlse).sum()
    loss.backward()
    return q.grad, k.grad, v.grad


def grads_of_reference(case, inputs, lengths, dout, dlse=None, dtype=torch.float64):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in inputs)
    out, lse = reference_attention(q, k, v, case)
    loss = out.double().sum() if dout is None else (out.double() * dout.double()).sum()
    if dlse is not None:
        loss = ((0 if dout is None else loss)
                + (torch.where(torch.isinf(lse), 0.0, lse).double() * dlse.double()).sum())
    loss.backward()
    # A loss on lse alone does not reach v: its gradient is zero.
    return tuple(t.grad if t.grad is not None else torch.zeros_like(t) for t in (q, k, v))


def random_grads(case, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    q = inputs[0]
    dout = torch.randn(q.shape, generator=g).to(q.device)
    dlse = torch.randn(q.shape[:2], generator=g).to(q.device)
    return dout, dlse


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", ["out", "out+lse"])
@pytest.mark.parametrize("attend_previous", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_fp32_matches_reference(device, mode, attend_previous, loss):
    skip_without_backward_kernel(device)
    # Longer than one tile (64 keys, 32 queries) so that block skipping is exercised.
    seqs = [Seq(mem=40, raw=64, beacon=8, ratio=8, n_q=72), Seq(mem=9, raw=30, beacon=0, ratio=4,
                                                                 n_q=17)]
    case = Case(seqs, heads=4, kv_heads=2, dim=16, mode=mode, attend_previous=attend_previous)
    inputs, lengths = make_inputs(case, torch.float32, device)
    dout, dlse = random_grads(case, inputs)
    if loss == "out":
        dlse = None
    got = grads_of_op(case, inputs, lengths, dout, dlse)
    want = grads_of_reference(case, inputs, lengths, dout, dlse)
    for name, g, w in zip(("dq", "dk_cache", "dv_cache"), got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_default_scale(device):
    """softmax_scale 0 means 1/sqrt(head_dim) in the forward, so also in the backward."""
    skip_without_backward_kernel(device)
    case = Case(VARLEN, heads=2, kv_heads=1, dim=16)
    inputs, lengths = make_inputs(case, torch.float32, device)
    dout, dlse = random_grads(case, inputs)
    want = grads_of_reference(case, inputs, lengths, dout, dlse)
    case.scale = 0.0  # what beacon_attention passes for softmax_scale=None
    got = grads_of_op(case, inputs, lengths, dout, dlse)
    for name, g, w in zip(("dq", "dk_cache", "dv_cache"), got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", ["out.sum", "lse only"])
def test_fp32_expanded_dout_and_lse_only(device, loss):
    """out.sum() hands the op an expanded (stride 0) dout; a loss on lse alone gives no dout."""
    skip_without_backward_kernel(device)
    case = Case(VARLEN, heads=4, kv_heads=2, dim=8, mode="segmentation")
    inputs, lengths = make_inputs(case, torch.float32, device)
    _, dlse = random_grads(case, inputs)
    dlse = dlse if loss == "lse only" else None
    got = grads_of_op(case, inputs, lengths, None, dlse)
    want = grads_of_reference(case, inputs, lengths, None, dlse)
    for name, g, w in zip(("dq", "dk_cache", "dv_cache"), got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5, msg=name)


def check_low_precision_rule(case: Case, dtype: torch.dtype, device: str = "cpu") -> None:
    """max|grad - ref| <= 2 * max|baseline - ref| + eps, baseline = the reference in dtype."""
    inputs, lengths = make_inputs(case, dtype, device)
    dout, _ = random_grads(case, inputs)
    got = grads_of_op(case, inputs, lengths, dout.to(dtype).float())
    want = grads_of_reference(case, inputs, lengths, dout.to(dtype).float())
    base = grads_of_reference(case, inputs, lengths, dout.to(dtype), dtype=dtype)
    for name, g, w, bl in zip(("dq", "dk_cache", "dv_cache"), got, want, base):
        assert g.dtype == dtype, name
        assert_within_twice_baseline(g, w, bl, 1e-3, name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_tolerance_rule(device, dtype):
    """The low-precision rule on a small two-sequence step."""
    skip_without_backward_kernel(device)
    seqs = [Seq(mem=20, raw=48, beacon=6, ratio=8, n_q=54), Seq(mem=5, raw=12, beacon=0, ratio=0,
                                                                 n_q=12)]
    check_low_precision_rule(Case(seqs, heads=6, kv_heads=2, dim=32, mode="step-expansion"), dtype, device)


# Steps for the CPU's bf16 operand path (bf16 dot products; AMX tiles where whole 16s): GQA 3
# (query chunks that start on an odd packed row), a query chunk past 256 tokens, key blocks of
# 64 with a partial (odd) last one, whole and partial 16s of head_dim, an odd capacity.
BF16_TILE_CASES = {
    "gqa3-d64": Case([Seq(mem=70, raw=200, beacon=25, ratio=8, n_q=225),
                      Seq(mem=3, raw=17, beacon=0, ratio=0, n_q=17)], heads=6, kv_heads=2, dim=64, slack=3),
    "chunk-d128": Case([Seq(mem=129, raw=290, beacon=0, ratio=0, n_q=290)], heads=2, kv_heads=2, dim=128),
    "d40-gqa5": Case([Seq(mem=33, raw=64, beacon=8, ratio=8, n_q=72)], heads=5, kv_heads=1, dim=40),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(BF16_TILE_CASES))
def test_bf16_tiles_tolerance_rule(case, mode):
    """The low-precision rule in bf16 on steps whose tiles reach every part of the bf16 operand
    path (and of the fp32 path on CPUs without bf16 dot products), every mask mode."""
    c = dataclasses.replace(BF16_TILE_CASES[case], mode=mode, attend_previous=mode != "segmentation")
    check_low_precision_rule(c, torch.bfloat16)


def test_fully_masked_row_contributes_nothing():
    """A row the forward found fully masked (out 0, lse +inf) gets dq 0 and adds nothing."""
    case = Case(VARLEN, heads=2, kv_heads=1, dim=8)
    (q, k, v), lengths = make_inputs(case, torch.float32)
    out, lse = reference_attention(q, k, v, case)
    dout, _ = random_grads(case, (q,))
    row, head = 4, 1
    out[row, head] = 0.0
    lse[row, head] = float("inf")
    dq, dk, dv = beacon_attention_backward(dout, q, k, v, out, lse, *lengths, **op_kwargs(case))
    assert torch.all(dq[row, head] == 0)
    # Everything else: the reference's gradients without that row's output in the loss.
    dout_without = dout.clone()
    dout_without[row, head] = 0.0
    wq, wk, wv = grads_of_reference(case, (q, k, v), lengths, dout_without)
    wq[row, head] = 0.0
    for name, g, w in (("dq", dq, wq), ("dk_cache", dk, wk), ("dv_cache", dv, wv)):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5, msg=name)


def test_unattended_cache_slots_get_zero_gradient():
    case = Case(VARLEN, heads=2, kv_heads=1, dim=8, slack=5)
    inputs, lengths = make_inputs(case, torch.float32)
    dout, _ = random_grads(case, inputs)
    _, dk, dv = grads_of_op(case, inputs, lengths, dout)
    for b, s in enumerate(case.seqs):
        end = s.mem + s.raw + s.beacon
        assert torch.all(dk[b, :, end:] == 0) and torch.all(dv[b, :, end:] == 0)
        assert dv[b, :, :end].abs().amax(-1).min() > 0  # every used slot is seen by some row


# The CPU backward's two schemes (attention_bwd.cpp, run_backward): one pass, dQ from the dK/dV
# tiles, each (sequence, kv head) one task, where its rounds of tasks beat the other's; otherwise
# the dK/dV pass and a dQ pass over finer tasks. "one": 1 task (one pass on one thread, two
# passes on two); "many": 12 tasks (one pass on either), rows of different lengths and key
# blocks skipped by some query chunks.
SCHEME_CASES = {
    "one": Case([Seq(mem=70, raw=300, beacon=38, ratio=8, n_q=338)], heads=3, kv_heads=1, dim=24),
    "many": Case([Seq(mem=90, raw=64, beacon=16, ratio=4, n_q=80), Seq(mem=3, raw=40, beacon=0, ratio=0, n_q=40),
                  Seq(mem=300, raw=7, beacon=1, ratio=8, n_q=1)], heads=12, kv_heads=4, dim=16),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(SCHEME_CASES))
def test_cpu_backward_schemes(case, dtype):
    """Each scheme against the fp64 reference, and the two against each other: in fp64 they
    agree to its rounding (the reference itself is off by the fp32 lse the op takes)."""
    c = SCHEME_CASES[case]
    (q, k, v), lengths = make_inputs(c, dtype)
    dout, _ = random_grads(c, (q,))
    dout = dout.to(dtype)
    out, lse = reference_attention(q, k, v, c)  # the op's forward takes no fp64
    want = grads_of_reference(c, (q, k, v), lengths, dout)
    before = torch.get_num_threads()
    got = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got[threads] = beacon_attention_backward(dout, q, k, v, out, lse.float(), *lengths, **op_kwargs(c))
    finally:
        torch.set_num_threads(before)
    for name, g1, g2, w in zip(("dq", "dk_cache", "dv_cache"), got[1], got[2], want):
        assert g1.dtype == dtype and g2.dtype == dtype, name
        torch.testing.assert_close(g1.double(), w, atol=1e-5, rtol=1e-5, msg=f"{name}, one thread")
        torch.testing.assert_close(g2.double(), w, atol=1e-5, rtol=1e-5, msg=f"{name}, two threads")
        if dtype == torch.float64:
            torch.testing.assert_close(g1, g2, atol=1e-12, rtol=1e-12, msg=f"{name}: the two schemes")


# ------------------------------------------------------------------------------------------
# Custom-op machinery: opcheck, torch.compile.

def test_opcheck_attention_with_grad():
    case = Case(VARLEN, heads=4, kv_heads=2, dim=8)
    (q, k, v), lengths = make_inputs(case, torch.float32)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    kw = op_kwargs(case)
    torch.library.opcheck(torch.ops.beacon.attention.default,
                          (q, k, v, *lengths, kw["max_seqlen_q"], kw["mode"],
                           kw["attend_previous"], kw["softmax_scale"]))


def test_opcheck_attention_backward():
    case = Case(VARLEN, heads=4, kv_heads=2, dim=8)
    (q, k, v), lengths = make_inputs(case, torch.float32)
    out, lse = reference_attention(q, k, v, case)
    dout, _ = random_grads(case, (q,))
    kw = op_kwargs(case)
    torch.library.opcheck(torch.ops.beacon.attention_backward.default,
                          (dout, q, k, v, out, lse, *lengths, kw["max_seqlen_q"], kw["mode"],
                           kw["attend_previous"], kw["softmax_scale"]))


def test_compile_fullgraph_loss_backward():
    case = Case(VARLEN, heads=4, kv_heads=2, dim=8)
    inputs, lengths = make_inputs(case, torch.float32)
    dout, _ = random_grads(case, inputs)
    kw = op_kwargs(case)

    @torch.compile(fullgraph=True)
    def loss_fn(q, k, v):
        out, _ = torch.ops.beacon.attention(q, k, v, *lengths, kw["max_seqlen_q"], kw["mode"],
                                            kw["attend_previous"], kw["softmax_scale"])
        return (out * dout).sum()

    q, k, v = (t.clone().requires_grad_() for t in inputs)
    loss_fn(q, k, v).backward()
    want = grads_of_reference(case, inputs, lengths, dout)
    for name, g, w in zip(("dq", "dk_cache", "dv_cache"), (q.grad, k.grad, v.grad), want):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument.

def _bad_call(**change):
    case = Case(VARLEN, heads=4, kv_heads=2, dim=8)
    (q, k, v), (cu, mem, raw, bl, ratio) = make_inputs(case, torch.float32)
    out, lse = reference_attention(q, k, v, case)
    args = dict(dout=torch.zeros_like(q), q=q, k_cache=k, v_cache=v, out=out, lse=lse,
                cu_seqlens_q=cu, mem_len=mem, raw_len=raw, beacon_len=bl, ratio=ratio,
                **op_kwargs(case))
    args.update(change)
    return args


@pytest.mark.parametrize("change,name", [
    (lambda a: {"lse": a["lse"].double()}, "lse"),
    (lambda a: {"lse": a["lse"][:, :2]}, "lse"),
    (lambda a: {"dout": a["dout"][:-1]}, "dout"),
    (lambda a: {"out": a["out"].half()}, "out"),
    (lambda a: {"v_cache": a["v_cache"][:, :, :-1]}, "v_cache"),
    (lambda a: {"k_cache": a["k_cache"][:, :, :12], "v_cache": a["v_cache"][:, :, :12]},
     "k_cache"),  # capacity below mem + raw + beacon
    (lambda a: {"q": a["q"][:, :3], "dout": a["dout"][:, :3], "out": a["out"][:, :3],
                "lse": a["lse"][:, :3]}, "kv_heads"),
    (lambda a: {"cu_seqlens_q": torch.tensor([0, 10, 12], dtype=torch.int32)},
     "cu_seqlens_q"),
    (lambda a: {"cu_seqlens_q": a["cu_seqlens_q"].long()}, "cu_seqlens_q"),
    (lambda a: {"raw_len": torch.tensor([7, 5], dtype=torch.int32)}, "cu_seqlens_q"),
    (lambda a: {"ratio": torch.tensor([-1, 2], dtype=torch.int32)}, "ratio"),
    (lambda a: {"ratio": torch.tensor([0, 2], dtype=torch.int32)}, "ratio"),  # beacons need r
    (lambda a: {"mem_len": torch.tensor([3], dtype=torch.int32)}, "mem_len"),
    (lambda a: {"max_seqlen_q": 4}, "max_seqlen_q"),
    (lambda a: {"mode": "sliding"}, "mode"),
])
def test_bad_input_names_argument(change, name):
    args = _bad_call()
    args = _bad_call(**change(args))
    tensors = [args.pop(k) for k in ("dout", "q", "k_cache", "v_cache", "out", "lse",
                                     "cu_seqlens_q", "mem_len", "raw_len", "beacon_len",
                                     "ratio")]
    with pytest.raises((RuntimeError, TypeError, ValueError), match=name):
        beacon_attention_backward(*tensors, **args)
