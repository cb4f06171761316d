"""Argument checks the typed op wrappers run before calling ``torch.ops.beacon.*``.

The ops validate every argument themselves (``csrc/op_checks.h``, one path per op for the CPU,
CUDA and meta kernels); the wrappers only catch what the dispatcher would report less clearly,
such as ``None`` or a list where a tensor belongs. And the one routing question the decode-step
ops share: is this call a decode step's, for the CPU op, or torch's?
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

__all__ = ["require_tensors", "scalar_scale", "few_cpu_rows_outside_autograd"]


def require_tensors(op: str, **tensors: object) -> None:
    """Raise ``TypeError`` naming the first argument of ``op`` that is not a ``torch.Tensor``."""
    for name, value in tensors.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")


def scalar_scale(op: str, softmax_scale: float | None) -> float:
    """The ops' ``softmax_scale`` argument: ``None`` becomes 0.0 (the ops' "1/sqrt(head_dim)");
    a value that is not a real number raises ``TypeError`` naming it (its range is the op's)."""
    if softmax_scale is None:
        return 0.0
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"{op}: softmax_scale must be a real number or None, got {type(softmax_scale).__name__}")
    return float(softmax_scale)


def few_cpu_rows_outside_autograd(x: Tensor, max_rows: int, *others: Tensor | None) -> bool:
    """Whether ``x`` is a decode step's input for a CPU op: on the CPU, 1 to ``max_rows`` rows of
    its last dimension, outside CPU autocast, with nothing among ``x`` and ``others`` (``None``
    skipped) to differentiate."""
    return (x.device.type == "cpu" and x.dim() > 0 and 0 < x.numel() <= max_rows * x.shape[-1]
            and not torch.is_autocast_enabled("cpu")
            and not (torch.is_grad_enabled()
                     and any(t is not None and t.requires_grad for t in (x, *others))))
