"""``torch.ops.beacon.decode_linear``: ``F.linear`` for the few rows of a decode step.

A decode step multiplies one row per sequence by every weight matrix of the model, so its time
is the time to stream the weights from memory. torch's one-row ``F.linear`` reads them well
below that on some CPUs (bf16 on an AMX Xeon, fp32 on AMD Zen 4); the op reads each weight
once, in long sequential runs, with fp32 accumulation (``csrc/cpu/decode_linear.cpp``). Its
checks and meta (fake) kernel are native (``csrc/op_checks.h``, ``csrc/meta.cpp``); its autograd
is registered here.

Model code calls :func:`linear` where it would call ``F.linear``: the op for a few rows on the
CPU outside autograd and autocast, ``F.linear`` for everything else (prefill, training, GPUs).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .op_arguments import few_cpu_rows_outside_autograd, require_tensors

__all__ = ["decode_linear", "linear", "Linear", "DECODE_LINEAR_MAX_ROWS"]

# Rows up to which linear() takes the op. Each weight block is reused from L1 for every row, so
# a few rows cost one pass over the weights; a long prompt belongs to the BLAS GEMM.
DECODE_LINEAR_MAX_ROWS = 4


def decode_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` on the CPU, streaming ``weight`` once (decode steps).

    Args:
        x: ``[rows, in_features]``, float32, bfloat16 or float16, contiguous in its last dim.
        weight: ``[out_features, in_features]`` of ``x``'s dtype and device, contiguous in its
            last dim (rows may be strided).
        bias: ``[out_features]`` of ``x``'s dtype, or ``None``.

    Returns:
        ``[rows, out_features]`` in ``x``'s dtype: fp32 sums (bf16 by AVX-512-BF16 dot
        products where the CPU has them), the bias added in fp32, rounded once, like
        ``F.linear`` up to the order of the sums.

    Raises:
        TypeError (dtype, not a tensor) or ValueError (shape, device, strides) naming the
        argument. CPU tensors only (no CUDA kernel: use ``F.linear`` there).
    """
    require_tensors("beacon.decode_linear", x=x, weight=weight)
    if bias is not None:
        require_tensors("beacon.decode_linear", bias=bias)
    return torch.ops.beacon.decode_linear(x, weight, bias)


def _setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx: Any, dy: Tensor) -> tuple:
    x, weight = ctx.saved_tensors
    dx = dy @ weight if ctx.needs_input_grad[0] else None
    dw = dy.t() @ x if ctx.needs_input_grad[1] else None
    db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return dx, dw, db


torch.library.register_autograd("beacon::decode_linear", _backward, setup_context=_setup_context)


_op = torch.ops.beacon.decode_linear.default


def _op_dtypes() -> frozenset[torch.dtype]:
    """The dtypes :func:`linear` gives the op: fp32 only where the op's fp32 path is its kernel
    (elsewhere it would call torch's BLAS anyway, after a detour of ~10 us a call)."""
    from . import _C  # loaded by the package before the ops layer

    fp32 = _C.build_info().get("cpu_decode_linear_fp32") == "kernel"
    return frozenset({torch.bfloat16, torch.float16} | ({torch.float32} if fp32 else set()))


_OP_DTYPES = _op_dtypes()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, through :func:`decode_linear` where it is faster: ``x`` on
    the CPU with at most :data:`DECODE_LINEAR_MAX_ROWS` rows (``[rows, in]``, or one token's
    ``[..., in]``), of ``weight``'s dtype (bf16, fp16, and fp32 where the op's fp32 path is its
    kernel: ``build_info()["cpu_decode_linear_fp32"]``), and nothing to differentiate or
    autocast."""
    in_features = x.shape[-1]
    if (not few_cpu_rows_outside_autograd(x, DECODE_LINEAR_MAX_ROWS, weight, bias)
            or x.dtype != weight.dtype or x.dtype not in _OP_DTYPES
            or weight.stride(-1) != 1 or (bias is not None and bias.dtype != x.dtype)):
        return F.linear(x, weight, bias)
    if x.dim() == 2 and x.stride(-1) == 1:
        return _op(x, weight, bias)
    return _op(x.reshape(-1, in_features).contiguous(), weight, bias).view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`linear` (same parameters, same state dict)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
