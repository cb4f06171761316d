"""Argument checks the typed op wrappers run before calling ``torch.ops.beacon.*``.

The ops validate every argument themselves (``csrc/op_checks.h``, one path per op for the CPU,
CUDA and meta kernels); the wrappers only catch what the dispatcher would report less clearly,
such as ``None`` or a list where a tensor belongs.
"""
from __future__ import annotations

import numbers

from torch import Tensor

__all__ = ["require_tensors", "scalar_scale"]


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
