"""The CUDA backward of beacon attention (csrc/cuda/attention_bwd.cuh) against independent
references; on a GPU, or on the host emulation of the kernels (BEACON_CUDA_EMU=1, make
test-cuda-emu) in each schedule of cuda_targets.py, where races between threads or blocks and
reads of stale cache slots fail the run.

- fp32 (the generic kernels) against fp64 autograd through the explicit-mask reference of
  test_attention_backward.py, in every mode, with GQA, varlen sequences with memory, decode
  rows, a window completed by a decode step and an idle sequence; and against the CPU op;
- bf16/fp16 at head dims 64 and 128 (the compiled instantiations) with FlashAttention's
  tolerance rule ``max|grad - ref| <= 2 * max|baseline - ref| + eps`` (baseline: the reference
  in the low-precision dtype), and against the CPU op by the same rule;
- rows the forward found fully masked get dq 0 and add nothing; cache slots no row attends
  (stale slots are NaN) get gradient 0; results are bit-identical across thread schedules
  (no atomics);
- bad input raises a clear error. (Training through the op on a GPU: test_training.py.)
"""
from __future__ import annotations

import pytest
import torch

import beacon_ops  # noqa: F401  (registers torch.ops.beacon)
from accuracy_rule import assert_within_twice_baseline, max_error
from cuda_targets import cuda_targets
from test_attention_backward import (MODES, Case, Seq, grads_of_reference, make_inputs, op_kwargs,
                                     random_grads, reference_attention)


@pytest.fixture(params=cuda_targets())
def target(request):
    """A GPU, or the emulation in one schedule (cuda_targets.py)."""
    t = request.param
    t.activate(request.node.nodeid)
    return t


def _cpu_has_backward() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("beacon::attention_backward", "CPU")


def run_backward(target, case, inputs, lengths, dout, out, lse, view=None):
    """The op under test on the target's device; gradients back on the CPU. ``view``: a map
    from argument name (dout, q, k_cache, v_cache) to a function applied on the device."""
    dev = target.device
    args = [t.to(dev, copy=True) for t in (dout, *inputs, out, lse, *lengths)]
    for i, name in enumerate(("dout", "q", "k_cache", "v_cache")):
        if view and name in view:
            args[i] = view[name](args[i])
    kw = op_kwargs(case)
    grads = target.ops().attention_backward(*args, kw["max_seqlen_q"], kw["mode"], kw["attend_previous"],
                                           kw["softmax_scale"])
    return tuple(g.cpu() for g in grads)


def forward_cpu(case, inputs, lengths):
    """(out, lse) of the step: the CPU op where built, else the reference (fp32 lse)."""
    if torch._C._dispatch_has_kernel_for_dispatch_key("beacon::attention", "CPU"):
        kw = op_kwargs(case)
        return torch.ops.beacon.attention(*inputs, *lengths, kw["max_seqlen_q"], kw["mode"],
                                          kw["attend_previous"], kw["softmax_scale"])
    out, lse = reference_attention(*inputs, case)
    return out, lse.float()


def poison_stale_slots(case, inputs):
    """Cache slots past each sequence's keys become NaN: a kernel that reads them fails."""
    _, k, v = inputs
    for b, s in enumerate(case.seqs):
        end = s.mem + s.raw + s.beacon
        k[b, :, end:] = float("nan")
        v[b, :, end:] = float("nan")


# Varlen with memory (a window completed this step: 24 raw + 3 beacons over 20 memory slots,
# more than one 16-key tile), a chunk in the middle of a window, an idle sequence, a decode
# step that completes a window (1 raw + 3 beacons) and a plain decode row.
STEP = [Seq(mem=20, raw=24, beacon=3, ratio=8, n_q=27), Seq(mem=5, raw=9, beacon=0, ratio=4, n_q=4),
        Seq(mem=7, raw=3, beacon=0, ratio=2, n_q=0), Seq(mem=3, raw=6, beacon=3, ratio=2, n_q=4),
        Seq(mem=4, raw=3, beacon=0, ratio=0, n_q=1)]


@pytest.mark.parametrize("attend_previous", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_fp32_against_fp64_autograd_and_cpu(target, mode, attend_previous):
    case = Case(STEP, heads=6, kv_heads=2, dim=8, mode=mode, attend_previous=attend_previous, slack=3)
    inputs, lengths = make_inputs(case, torch.float32)
    dout, _ = random_grads(case, inputs)
    out, lse = forward_cpu(case, inputs, lengths)
    poisoned = tuple(t.clone() for t in inputs)
    poison_stale_slots(case, poisoned)
    got = run_backward(target, case, poisoned, lengths, dout, out, lse)
    want = grads_of_reference(case, inputs, lengths, dout)
    for name, g, w in zip(("dq", "dk_cache", "dv_cache"), got, want):
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5, msg=name)
    if _cpu_has_backward():
        cpu = beacon_ops.beacon_attention_backward(dout, *inputs, out, lse, *lengths, **op_kwargs(case))
        for name, g, c in zip(("dq", "dk_cache", "dv_cache"), got, cpu):
            torch.testing.assert_close(g, c, atol=1e-5, rtol=1e-5, msg=name)


# (sequences, heads, kv_heads, mode, attend_previous). Prefill: GQA group 3, 108 rows and 76
# keys of the first sequence span several row and key tiles; decode: one query per sequence
# (max_seqlen_q 1), GQA group 8, long memory.
_PREFILL = [Seq(mem=40, raw=32, beacon=4, ratio=8, n_q=36), Seq(mem=6, raw=10, beacon=0, ratio=4, n_q=1)]
LOW_PRECISION_STEPS = {
    "prefill-segmentation": (_PREFILL, 6, 2, "segmentation", False),
    "prefill-full-coverage": (_PREFILL, 6, 2, "full-coverage", True),
    "prefill-step-causal": (_PREFILL, 6, 2, "step-causal", True),
    "decode": ([Seq(mem=150, raw=7, beacon=0, ratio=8, n_q=1), Seq(mem=0, raw=3, beacon=0, ratio=0, n_q=1)], 8, 1,
               "step-expansion", True),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("step", list(LOW_PRECISION_STEPS))
def test_low_precision_tolerance_rule(target, step, dtype, dim):
    seqs, heads, kv_heads, mode, attend_previous = LOW_PRECISION_STEPS[step]
    case = Case(seqs, heads=heads, kv_heads=kv_heads, dim=dim, mode=mode, attend_previous=attend_previous, slack=4)
    inputs, lengths = make_inputs(case, dtype)
    dout, _ = random_grads(case, inputs)
    dout = dout.to(dtype)
    out, lse = forward_cpu(case, inputs, lengths)
    out = out.to(dtype)
    poisoned = tuple(t.clone() for t in inputs)
    poison_stale_slots(case, poisoned)
    got = run_backward(target, case, poisoned, lengths, dout, out, lse)
    want = grads_of_reference(case, inputs, lengths, dout.float())
    base = grads_of_reference(case, inputs, lengths, dout, dtype=dtype)
    base_errs = {}
    for name, g, w, bl in zip(("dq", "dk_cache", "dv_cache"), got, want, base):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        _, base_errs[name] = assert_within_twice_baseline(g, w, bl, 1e-3, name)
    if _cpu_has_backward():
        cpu = beacon_ops.beacon_attention_backward(dout, *inputs, out, lse, *lengths, **op_kwargs(case))
        for name, g, c in zip(("dq", "dk_cache", "dv_cache"), got, cpu):
            assert max_error(g, c) <= 2 * base_errs[name] + 1e-3, name


@pytest.mark.parametrize("dtype,dim", [(torch.bfloat16, 40), (torch.float16, 96)], ids=["bf16-40", "fp16-96"])
def test_generic_path_other_head_dims(target, dtype, dim):
    # Head dims without a tensor-core instantiation run the generic kernels.
    case = Case(STEP, heads=4, kv_heads=2, dim=dim, mode="step-expansion")
    inputs, lengths = make_inputs(case, dtype)
    dout, _ = random_grads(case, inputs)
    dout = dout.to(dtype)
    out, lse = forward_cpu(case, inputs, lengths)
    got = run_backward(target, case, inputs, lengths, dout, out.to(dtype), lse)
    want = grads_of_reference(case, inputs, lengths, dout.float())
    base = grads_of_reference(case, inputs, lengths, dout, dtype=dtype)
    for name, g, w, bl in zip(("dq", "dk_cache", "dv_cache"), got, want, base):
        assert g.dtype == dtype, name
        assert_within_twice_baseline(g, w, bl, 1e-3, name)


def test_fp64_generic_path(target):
    case = Case(STEP, heads=4, kv_heads=1, dim=8, mode="full-coverage", attend_previous=False)
    inputs, lengths = make_inputs(case, torch.float64)
    dout, _ = random_grads(case, inputs)
    out, lse = reference_attention(*inputs, case)
    got = run_backward(target, case, inputs, lengths, dout.double(), out, lse.float())
    want = grads_of_reference(case, inputs, lengths, dout)
    for name, g, w in zip(("dq", "dk_cache", "dv_cache"), got, want):
        assert g.dtype == torch.float64, name
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6, msg=name)  # lse is fp32


def test_unaligned_views(target):
    # q and dout views whose rows are not 16-byte aligned are copied for the tensor-core path;
    # an unaligned cache view takes the generic path. Both give the aligned inputs' gradients.
    seqs = [Seq(mem=9, raw=20, beacon=2, ratio=8, n_q=22)]
    case = Case(seqs, heads=2, kv_heads=1, dim=64, slack=1)
    (q, k, v), lengths = make_inputs(case, torch.bfloat16)
    dout, _ = random_grads(case, (q,))
    dout = dout.to(torch.bfloat16)
    out, lse = forward_cpu(case, (q, k, v), lengths)
    want = run_backward(target, case, (q, k, v), lengths, dout, out, lse)

    def shifted(t):  # the same values, one element past an aligned address
        s = torch.cat([torch.zeros(1, dtype=t.dtype, device=t.device), t.flatten()])[1:].view(t.shape)
        assert s.data_ptr() % 16 != 0
        return s

    got = run_backward(target, case, (q, k, v), lengths, dout, out, lse, view={"q": shifted, "dout": shifted})
    for name, g, w in zip(("dq", "dk_cache", "dv_cache"), got, want):
        assert torch.equal(g, w), name
    got = run_backward(target, case, (q, k, v), lengths, dout, out, lse,
                       view={"k_cache": shifted, "v_cache": shifted})
    for name, g, w in zip(("dq", "dk_cache", "dv_cache"), got, want):
        assert (g.float() - w.float()).abs().max().item() <= 0.05 * w.float().abs().max().item(), name


def test_masked_rows_and_unattended_slots_get_zero_gradient(target):
    case = Case(STEP, heads=4, kv_heads=2, dim=16, slack=5)
    inputs, lengths = make_inputs(case, torch.float32)
    out, lse = forward_cpu(case, inputs, lengths)
    dout, _ = random_grads(case, inputs)
    row, head = 30, 3  # a raw row of the second sequence, forced to "saw nothing"
    out[row, head] = 0.0
    lse[row, head] = float("inf")
    poisoned = tuple(t.clone() for t in inputs)
    poison_stale_slots(case, poisoned)
    dq, dk, dv = run_backward(target, case, poisoned, lengths, dout, out, lse)
    assert torch.all(dq[row, head] == 0)
    dout_without = dout.clone()
    dout_without[row, head] = 0.0
    wq, wk, wv = grads_of_reference(case, inputs, lengths, dout_without)
    wq[row, head] = 0.0
    for name, g, w in (("dq", dq, wq), ("dk_cache", dk, wk), ("dv_cache", dv, wv)):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5, msg=name)
    for b, s in enumerate(case.seqs):
        end = s.mem + s.raw + s.beacon
        assert torch.all(dk[b, :, end:] == 0) and torch.all(dv[b, :, end:] == 0)
        if s.n_q == 0:  # an idle sequence: no query, no gradient
            assert torch.all(dk[b] == 0) and torch.all(dv[b] == 0)


def test_bit_identical_across_schedules(target):
    if not target.emulated:
        pytest.skip("thread schedules are a property of the emulation")
    from beacon_ops import cuda_emu

    seqs = [Seq(mem=40, raw=32, beacon=4, ratio=8, n_q=36)]
    case = Case(seqs, heads=4, kv_heads=1, dim=64)
    inputs, lengths = make_inputs(case, torch.bfloat16)
    dout, _ = random_grads(case, inputs)
    out, lse = forward_cpu(case, inputs, lengths)
    first = run_backward(target, case, inputs, lengths, dout.to(torch.bfloat16), out.to(torch.bfloat16), lse)
    cuda_emu.set_schedule("random", seed=12345, sm_count=3)
    second = run_backward(target, case, inputs, lengths, dout.to(torch.bfloat16), out.to(torch.bfloat16), lse)
    for g, h in zip(first, second):
        assert torch.equal(g.view(torch.int16), h.view(torch.int16))


def test_errors_name_the_argument(target):
    case = Case([Seq(mem=2, raw=3, beacon=0, ratio=0, n_q=3)], heads=2, kv_heads=1, dim=512)
    inputs, lengths = make_inputs(case, torch.float32)
    out, lse = torch.zeros_like(inputs[0]), torch.zeros(3, 2)
    with pytest.raises(ValueError, match="head_dim"):
        run_backward(target, case, inputs, lengths, torch.zeros_like(out), out, lse)
    with pytest.raises(TypeError, match="lse must be float32"):
        run_backward(target, case, inputs, lengths, torch.zeros_like(out), out, lse.double())

