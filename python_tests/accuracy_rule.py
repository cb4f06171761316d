"""FlashAttention's accuracy rule, the one check of every result that is not computed in fp64.

A result ``out`` passes when ``max|out - ref| <= 2 * max|baseline - ref| + eps``: ``ref`` is an
fp64 reference and ``baseline`` the same reference computed the way ``out`` is (in its low
precision, or along its path), so a kernel may round at most twice as badly as plain PyTorch
would. Dependency-free (torch only), so any test can import it.
"""
from __future__ import annotations

import torch
from torch import Tensor


def max_error(a: Tensor | float, b: Tensor | float) -> float:
    """``max|a - b|`` in fp64 on the CPU (0.0 for empty tensors)."""
    a, b = torch.as_tensor(a).double().cpu(), torch.as_tensor(b).double().cpu()
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item() if a.numel() else 0.0


def assert_within_twice_baseline(out: Tensor | float, ref: Tensor | float, baseline: Tensor | float,
                                 eps: float, what: str = "") -> tuple[float, float]:
    """Assert the rule for ``out``; returns its error and the baseline's (both against ``ref``)."""
    err, base = max_error(out, ref), max_error(baseline, ref)
    assert err <= 2 * base + eps, f"{what + ': ' if what else ''}error {err} > 2 * baseline error {base} + {eps}"
    return err, base
