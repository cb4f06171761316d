"""torch.ops.beacon.rms_norm and beacon_ops.norm.norm: against fp64 (FlashAttention's accuracy
rule, torch's own RMSNorm as the baseline), the 16-bit rounding of Hugging Face's LlamaRMSNorm,
routing, autograd (gradcheck), opcheck, torch.compile and bad input."""
from __future__ import annotations

import warnings

import pytest
import torch

import beacon_ops.norm as norm_module
from beacon_ops.norm import RMS_NORM_OP_MAX_ROWS, norm, rms_norm, torch_rms_norm

from accuracy_rule import assert_within_twice_baseline

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# SmolLM2's width, one token [1, 1, dim] as in a decode step, a tail of every vector width,
# several leading dims, a prompt's rows, a single element
SHAPES = [(1, 576), (1, 1, 576), (3, 577), (2, 5, 64), (300, 96), (1, 1)]


def case(shape, dtype: torch.dtype, seed: int = 0, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * scale).to(dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(dtype)
    return x, w


def fp64_reference(x, w, eps):
    xd = x.double()
    return xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("eps,scale", [(1e-5, 1.0), (1e-6, 1e-3), (0.0, 30.0)])
def test_against_fp64(shape, dtype, eps, scale):
    x, w = case(shape, dtype, seed=sum(shape), scale=scale)
    got = rms_norm(x, w, eps)
    assert got.dtype == dtype and got.shape == x.shape
    ref = fp64_reference(x, w, eps)
    res = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype] * ref.abs().max().item()
    assert_within_twice_baseline(got, ref, torch_rms_norm(x, w, eps), res, f"{dtype} {shape}")


def test_fp64_and_16_bit_rounding():
    """fp64 to its last bits; bf16 / fp16 round x * r first, then weight * that, as Hugging Face's
    LlamaRMSNorm: with the same r the op matches that two-step rounding bit for bit (r in fp32
    from the fp64 mean square, which the op's double sums reproduce exactly for small integers)."""
    x, w = case((4, 576), torch.float64, seed=1)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), fp64_reference(x, w, 1e-6), atol=1e-15, rtol=1e-14)
    g = torch.Generator().manual_seed(2)
    xi = torch.randint(-8, 9, (3, 64), generator=g).float()  # integer squares: exact sums
    for dtype in (torch.bfloat16, torch.float16):
        x, w = xi.to(dtype), (1 + 0.3 * torch.randn(64, generator=g)).to(dtype)
        r = torch.rsqrt(xi.double().pow(2).mean(-1, keepdim=True) + 1e-5).float()
        want = (w.float() * (xi * r).to(dtype).float()).to(dtype)
        assert torch.equal(rms_norm(x, w, 1e-5), want)


def test_strided_rows_and_empty():
    x, w = case((6, 40), torch.float32, seed=3)
    torch.testing.assert_close(rms_norm(x[::2], w, 1e-5), rms_norm(x[::2].contiguous(), w, 1e-5), atol=0, rtol=0)
    assert rms_norm(x[:0], w, 1e-5).shape == (0, 40)
    assert rms_norm(torch.empty(3, 0), torch.empty(0), 1e-5).shape == (3, 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_norm_routes_few_cpu_rows_to_the_op(monkeypatch, dtype):
    calls = []
    op = norm_module._op

    def counting(x, w, eps):
        calls.append(x.numel() // x.shape[-1])
        return op(x, w, eps)

    monkeypatch.setattr(norm_module, "_op", counting)
    x, w = case((RMS_NORM_OP_MAX_ROWS + 1, 1, 48), dtype)
    with torch.no_grad():
        one = norm(x[:1], w, 1e-5)
        assert calls == [1] and torch.equal(one, rms_norm(x[:1], w, 1e-5))
        many = norm(x, w, 1e-5)  # a prompt's rows: torch's, bit for bit
        assert calls == [1] and torch.equal(many, torch_rms_norm(x, w, 1e-5))
        with warnings.catch_warnings():  # (torch warns that it cannot fuse mixed dtypes)
            warnings.simplefilter("ignore")
            norm(x[:1], w.double(), 1e-5)  # weight of another dtype (promotes): torch's
        norm(x[:1, 0, ::2], w[::2], 1e-5)  # strided last dim
        with torch.autocast("cpu", dtype=torch.bfloat16):
            norm(x[:1], w, 1e-5)
        assert calls == [1]
    out = norm(x[:1], w.clone().requires_grad_(), 1e-5)  # something to differentiate: torch's
    assert calls == [1] and out.grad_fn is not None


def test_autograd():
    x, w = case((3, 2, 24), torch.float64, seed=4)
    torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-5), (x.requires_grad_(), w.requires_grad_()))
    xf, wf = (t.detach().float().requires_grad_() for t in (x, w))
    out = rms_norm(xf, wf, 1e-5)
    dy = torch.randn_like(out)
    got = torch.autograd.grad(out, (xf, wf), dy)
    want = torch.autograd.grad(torch_rms_norm(xf, wf, 1e-5), (xf, wf), dy)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_opcheck():
    x, w = case((2, 3, 40), torch.float32)
    torch.library.opcheck(torch.ops.beacon.rms_norm.default, (x, w, 1e-5))
    torch.library.opcheck(torch.ops.beacon.rms_norm.default, (x.requires_grad_(), w.requires_grad_(), 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiles_without_graph_breaks(dtype):
    x, w = case((1, 1, 24), dtype)
    with torch.no_grad():
        want = norm(x, w, 1e-5)
        got = torch.compile(lambda a, b: norm(a, b, 1e-5), fullgraph=True)(x, w)
    assert torch.equal(got, want)


@pytest.mark.parametrize("args,err,match", [
    (lambda x, w: (x.int(), w.int(), 1e-5), TypeError, "x must be float32"),
    (lambda x, w: (x, w.half(), 1e-5), TypeError, "weight must have x's dtype"),
    (lambda x, w: (x, w[:5], 1e-5), ValueError, "weight must have shape"),
    (lambda x, w: (x, w[None], 1e-5), ValueError, "weight must have shape"),
    (lambda x, w: (x[0, 0], w[:1], 1e-5), ValueError, "x must have at least one dimension"),
    (lambda x, w: (x.transpose(0, 1).contiguous().transpose(0, 1), w, 1e-5), ValueError,
     "x must be contiguous in its last dimension"),
    (lambda x, w: (x, w, -1.0), ValueError, "eps must be finite"),
    (lambda x, w: (x, w, float("nan")), ValueError, "eps must be finite"),
    (lambda x, w: (x, [1.0] * 16, 1e-5), TypeError, "weight must be a torch.Tensor"),
    (lambda x, w: (x, w.to("meta"), 1e-5), ValueError, "weight must be on x's device"),
])
def test_bad_input_names_the_argument(args, err, match):
    x, w = case((2, 16), torch.float32)
    with pytest.raises(err, match=match):
        rms_norm(*args(x, w))


def test_meta_tensors_give_the_same_errors_and_shapes():
    x, w = case((2, 16), torch.float32)
    assert rms_norm(x.to("meta"), w.to("meta"), 1e-5).shape == (2, 16)
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(x.to("meta"), w[:3].to("meta"), 1e-5)
