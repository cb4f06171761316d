"""``torch.ops.beacon.rms_norm``: Llama's RMSNorm in one call.

torch's ``F.rms_norm`` (and Hugging Face's ``LlamaRMSNorm``) is several operations, each a
dispatch and an allocation; on the one row of a decode step that overhead is the whole cost, and
SmolLM2 normalises 61 times a step. The op does it in one pass over the row
(``csrc/cpu/rms_norm.cpp``). Its checks and meta (fake) kernel are native (``csrc/op_checks.h``,
``csrc/meta.cpp``); its autograd is registered here.

Model code calls :func:`norm` where it would normalise: the op for a few rows on the CPU outside
autograd and autocast, :func:`torch_rms_norm` (the same rounding, torch's kernels) for everything
else (prefill, training, GPUs).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .op_arguments import few_cpu_rows_outside_autograd, require_tensors

__all__ = ["rms_norm", "norm", "torch_rms_norm", "RMS_NORM_OP_MAX_ROWS"]

# Rows up to which norm() takes the op: a decode step's. A prompt's hundreds of rows amortise
# torch's dispatches, and keep torch's kernels.
RMS_NORM_OP_MAX_ROWS = 4

_OP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``x / sqrt(mean(x**2, -1) + eps) * weight`` on the CPU, in one call.

    Args:
        x: ``[..., dim]``, float32, float64, bfloat16 or float16, contiguous in its last dim.
        weight: ``[dim]`` of ``x``'s dtype and device.
        eps: added to the mean square; finite, >= 0.

    Returns:
        ``x``'s shape and dtype. The mean square is summed in double; fp32 and fp64 compute
        ``(x * r) * weight``; bf16 and fp16 round ``x * r`` to ``x``'s dtype, then
        ``weight * that`` (fp32 products), as Hugging Face's ``LlamaRMSNorm`` does: like
        :func:`torch_rms_norm` up to the last bits of ``r``.

    Raises:
        TypeError (dtype, not a tensor) or ValueError (shape, device, strides, eps) naming the
        argument. CPU tensors only (no CUDA kernel: :func:`norm` takes torch's there).
    """
    require_tensors("beacon.rms_norm", x=x, weight=weight)
    return torch.ops.beacon.rms_norm(x, weight, float(eps))


def torch_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama's RMSNorm with torch's kernels: ``F.rms_norm`` in fp32; for 16-bit ``x`` the
    statistics in fp32 and the weight applied in ``x``'s dtype, as Hugging Face's
    ``LlamaRMSNorm``."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Llama's RMSNorm of ``x`` (``[..., dim]``) with ``weight``: :func:`rms_norm` for at most
    :data:`RMS_NORM_OP_MAX_ROWS` rows on the CPU, of ``weight``'s dtype (fp32, bf16, fp16), with
    nothing to differentiate or autocast; :func:`torch_rms_norm` otherwise."""
    if (not few_cpu_rows_outside_autograd(x, RMS_NORM_OP_MAX_ROWS, weight)
            or x.dtype != weight.dtype or x.dtype not in _OP_DTYPES or x.stride(-1) != 1):
        return torch_rms_norm(x, weight, eps)
    return _op(x, weight, eps)


def _setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _backward(ctx: Any, dy: Tensor) -> tuple:
    # y = x r w with r = (mean(x^2) + eps)^(-1/2): dx = r (dy w) - x r^3 mean(dy w x), dw = sum(dy x r)
    x, weight = ctx.saved_tensors
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, g = x.to(acc), dy.to(acc)
    r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + ctx.eps)
    dx = dw = None
    if ctx.needs_input_grad[0]:
        gw = g * weight.to(acc)
        dx = (r * gw - xf * r.pow(3) * (gw * xf).mean(-1, keepdim=True)).to(x.dtype)
    if ctx.needs_input_grad[1]:
        dw = (g * xf * r).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
    return dx, dw, None


torch.library.register_autograd("beacon::rms_norm", _backward, setup_context=_setup_context)

_op = torch.ops.beacon.rms_norm.default
