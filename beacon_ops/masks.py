"""The beacon attention mask as a tensor, for attention backends without the mask in a kernel.

``torch.ops.beacon.attention`` computes the mask inside its kernel (``csrc/beacon_mask.h``). Where
gradients must go through PyTorch's ``scaled_dot_product_attention`` instead (devices without
a ``beacon::attention_backward`` kernel), :func:`step_mask` builds the same mask explicitly from
index comparisons (rules in ``docs/activation-beacon.md``, section 3). The test suite checks it
against the independent reference of :mod:`beacon_ops.reference`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .positions import check_mask_kind

__all__ = ["step_mask"]


def step_mask(mem_len: int, raw_len: int, beacon_len: int, ratio: int, num_queries: int,
              mode: str = "step-expansion", attend_previous: bool = True,
              device: torch.device | str | None = None) -> Tensor:
    """Boolean mask ``[num_queries, mem_len + raw_len + beacon_len]`` of one sequence's step.

    Keys are ``[memory | raw | beacons]``; queries are the window's last ``num_queries -
    beacon_len`` raw tokens, then its beacons. A raw token sees the memory and the raw tokens up
    to itself; beacon ``j`` sees the memory when ``attend_previous``, its raw range (clipped to
    ``raw_len``) and itself. The newer variant's kinds: ``causal``, every key up to the row's own;
    ``step-causal``, beacon ``j`` sees the memory, raw ``[0, (j+1) r)`` and beacons ``0..j``
    (``attend_previous`` plays no part in either).
    """
    check_mask_kind(mode)
    M, R, B, r = mem_len, raw_len, beacon_len, ratio
    n_raw = num_queries - B
    if not 0 <= n_raw <= R:
        raise ValueError(f"num_queries={num_queries} must lie in [beacon_len, raw_len + beacon_len]")
    key = torch.arange(M + R + B, device=device)[None, :]
    # raw queries: every key before slot M + t + 1, t the query's raw index
    t = torch.arange(R - n_raw, R, device=device)[:, None]
    raw_rows = key < M + t + 1
    j = torch.arange(B, device=device)[:, None]
    if mode == "segmentation":
        lo, hi = j * r, (j + 1) * r
    elif mode in ("step-expansion", "step-causal"):
        lo, hi = torch.zeros_like(j), (j + 1) * r
    else:
        lo, hi = torch.zeros_like(j), torch.full_like(j, R)
    hi = hi.clamp(max=R)
    raw_idx = key - M
    beacon_rows = ((raw_idx >= lo) & (raw_idx < hi) & (key >= M) & (key < M + R)) | (key == M + R + j)
    if mode == "causal":
        beacon_rows = key < M + R + j + 1
    elif mode == "step-causal":
        beacon_rows |= (key < M) | ((key >= M + R) & (key < M + R + j))
    elif attend_previous:
        beacon_rows |= key < M
    return torch.cat([raw_rows, beacon_rows])
