"""torch.ops.beacon.decode_linear and beacon_ops.linear.linear: against fp64 (FlashAttention's
accuracy rule, F.linear as the baseline), on every CPU instruction-set path, routing, autograd,
opcheck and bad input."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import beacon_ops
import beacon_ops.linear as linear_module
from beacon_ops.linear import DECODE_LINEAR_MAX_ROWS, Linear, decode_linear, linear

from accuracy_rule import assert_within_twice_baseline

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (rows, in, out): SmolLM2's shapes, in not a multiple of 8/16/32 (every tail), a single output,
# outputs not a multiple of the 4-row block, more rows than decode uses
SHAPES = [(1, 576, 1536), (2, 1536, 576), (4, 576, 192), (1, 37, 5), (3, 70, 1), (1, 1, 3), (7, 33, 9),
          (1, 64, 4099)]


def case(rows: int, n_in: int, n_out: int, dtype: torch.dtype, seed: int = 0, bias: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n_in, generator=g).to(dtype)
    w = (torch.randn(n_out, n_in, generator=g) / n_in ** 0.5).to(dtype)
    b = torch.randn(n_out, generator=g).to(dtype) if bias else None
    return x, w, b


def check(x, w, b=None, what: str = "") -> torch.Tensor:
    """The op within twice F.linear's error against fp64 (eps: the output dtype's resolution)."""
    got = decode_linear(x, w, b)
    assert got.dtype == x.dtype and got.shape == (x.shape[0], w.shape[0])
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    eps = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[x.dtype] * max(1.0, ref.abs().max().item())
    assert_within_twice_baseline(got, ref, F.linear(x, w, b), eps, what)
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("rows,n_in,n_out", SHAPES)
def test_against_fp64(rows, n_in, n_out, dtype):
    for bias in (False, True):
        x, w, b = case(rows, n_in, n_out, dtype, seed=rows * 7 + n_in, bias=bias)
        check(x, w, b, f"bias={bias}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_strided_weight_rows_and_x_rows(dtype):
    # weight: a column slice of a wider matrix (rows strided, each row contiguous); x: every other row
    x, w, _ = case(8, 130, 40, dtype, seed=3)
    wide = torch.randn(40, 200).to(dtype)
    wide[:, :130] = w
    check(x[::2], wide[:, :130])
    # zero rows, zero outputs, zero in-features
    assert decode_linear(x[:0], w).shape == (0, 40)
    assert decode_linear(x, w[:0]).shape == (8, 0)
    empty = decode_linear(x[:, :0], w[:, :0], torch.ones(40, dtype=dtype))
    assert torch.equal(empty, torch.ones(8, 40, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_linear_routes_few_cpu_rows_to_the_op(monkeypatch, dtype):
    calls = []
    op = linear_module._op

    def counting(x, w, b=None):
        calls.append(x.shape[0])
        return op(x, w, b)

    monkeypatch.setattr(linear_module, "_op", counting)
    # fp32 goes to the op where its fp32 path is the kernel (else it would be torch's BLAS)
    routed = dtype != torch.float32 or beacon_ops.build_info()["cpu_decode_linear_fp32"] == "kernel"
    assert (dtype in linear_module._OP_DTYPES) == routed
    x, w, b = case(DECODE_LINEAR_MAX_ROWS + 1, 48, 20, dtype, bias=True)
    with torch.no_grad():
        one = linear(x[:1], w, b)
        tok = linear(x[:2, None, :], w, b)  # [..., in]: two tokens of one row each
        assert calls == ([1, 2] if routed else []) and one.shape == (1, 20) and tok.shape == (2, 1, 20)
        torch.testing.assert_close(tok[:, 0], decode_linear(x[:2], w, b), atol=0, rtol=0)
        many = linear(x, w, b)  # a prefill: F.linear, bit for bit
        assert len(calls) == (2 if routed else 0) and torch.equal(many, F.linear(x, w, b))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            linear(x[:1], w, b)
        assert torch.equal(linear(x[:1].double(), w.double()), F.linear(x[:1].double(), w.double()))
        assert len(calls) == (2 if routed else 0)
    wg = w.clone().requires_grad_()
    out = linear(x[:1], wg, b)  # something to differentiate: F.linear
    assert len(calls) == (2 if routed else 0) and out.grad_fn is not None


def test_linear_module_keeps_nn_linear_state():
    torch.manual_seed(0)
    ref = torch.nn.Linear(16, 8)
    mod = Linear(16, 8)
    mod.load_state_dict(ref.state_dict())
    assert isinstance(mod, torch.nn.Linear) and list(mod.state_dict()) == ["weight", "bias"]
    x = torch.randn(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), ref(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64-grads"])
def test_autograd(dtype):
    x, w, b = case(3, 20, 7, torch.float32, seed=5, bias=True)
    x, w, b = (t.double().requires_grad_() if dtype == torch.float64 else t.requires_grad_() for t in (x, w, b))
    if dtype == torch.float64:  # the op takes no fp64: the backward alone, by gradcheck on fp32
        x, w, b = (t.detach().float().requires_grad_() for t in (x, w, b))
    out = decode_linear(x, w, b)
    dy = torch.randn_like(out)
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), dy)
    ex, ew, eb = torch.autograd.grad(F.linear(x, w, b), (x, w, b), dy)
    for g, e in ((gx, ex), (gw, ew), (gb, eb)):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_opcheck():
    x, w, b = case(2, 40, 12, torch.float32, bias=True)
    torch.library.opcheck(torch.ops.beacon.decode_linear.default, (x, w, b))
    torch.library.opcheck(torch.ops.beacon.decode_linear.default, (x, w, None))
    torch.library.opcheck(torch.ops.beacon.decode_linear.default,
                          (x.requires_grad_(), w.requires_grad_(), b.requires_grad_()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiles_without_graph_breaks(dtype):
    mod = Linear(24, 10).to(dtype)
    x = torch.randn(1, 24).to(dtype)
    with torch.no_grad():
        want = mod(x)
        got = torch.compile(mod, fullgraph=True)(x)
    assert torch.equal(got, want)


@pytest.mark.parametrize("args,err,match", [
    (lambda x, w, b: (x.double(), w, None), TypeError, "x must be float32"),
    (lambda x, w, b: (x, w.half(), None), TypeError, "weight must have x's dtype"),
    (lambda x, w, b: (x[None], w, None), ValueError, "x must have shape"),
    (lambda x, w, b: (x, w[:, :5], None), ValueError, "weight must have shape"),
    (lambda x, w, b: (x, w.t().contiguous().t(), None), ValueError, "weight must be contiguous"),
    (lambda x, w, b: (x, w, b[:3]), ValueError, "bias must have shape"),
    (lambda x, w, b: (x, w, b.double()), TypeError, "bias must have x's dtype"),
    (lambda x, w, b: (x, [[1.0]], None), TypeError, "weight must be a torch.Tensor"),
    (lambda x, w, b: (x, w.to("meta"), None), ValueError, "weight must be on x's device"),
])
def test_bad_input_names_the_argument(args, err, match):
    x, w, b = case(2, 16, 16, torch.float32, bias=True)
    with pytest.raises(err, match=match):
        decode_linear(*args(x, w, b))


# --- every instruction-set path (chosen once per process; see test_attention.test_cpu_isa_paths) --
_ISA_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import torch.nn.functional as F
from test_linear import DTYPES, SHAPES, case, check
for dtype in DTYPES:
    for rows, n_in, n_out in SHAPES:
        x, w, b = case(rows, n_in, n_out, dtype, seed=n_out, bias=True)
        got = check(x, w, b)
        if sys.argv[2] == "same" and dtype == torch.float32:
            assert torch.equal(got, F.linear(x, w, b))  # fp32 through torch's own
print("ok")
"""

ISA_LEVELS = ("portable", "avx2", "avx512", "avx512bf16", "amx")


@pytest.mark.parametrize("isa,decode,gemm", [(isa, None, None) for isa in ISA_LEVELS] + [
    ("avx512bf16", "avx2", None), ("avx512bf16", "avx512", None), ("avx2", None, "kernel"),
    ("avx2", None, "blas")], ids=lambda v: str(v))
def test_cpu_isa_paths(isa, decode, gemm):
    detected = beacon_ops.build_info()["cpu_isa_detected"]
    if ISA_LEVELS.index(isa) > ISA_LEVELS.index(detected):
        pytest.skip(f"this CPU's widest level is {detected}")
    env = dict(os.environ, BEACON_OPS_CPU_ISA=isa)
    for name, value in (("BEACON_OPS_CPU_DECODE", decode), ("BEACON_OPS_FP32_GEMM", gemm)):
        env.pop(name, None)
        if value is not None:
            env[name] = value
    here = os.path.dirname(os.path.abspath(__file__))
    same = "same" if isa == "portable" or gemm == "blas" else "-"
    res = subprocess.run([sys.executable, "-c", _ISA_SCRIPT, here, same], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
