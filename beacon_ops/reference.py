"""Plain PyTorch reference of ``torch.ops.beacon.attention``: an explicit boolean mask.

The mask is written here directly from the table of ``docs/activation-beacon.md``,
section 3, independently of ``csrc/beacon_mask.h``, so that tests compare two separate
derivations. Attention is computed in fp64 (or fp32) with that mask. The same mask gives the
exact number of allowed (query, key) pairs, used for FLOP counting (``4 * head_dim * pairs``
per head).

A beacon's raw range is clipped to the raw keys present (``raw_len``); the documented ranges always
lie inside the window, so this matters only for lengths the op accepts but a model never
produces.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from .positions import check_mask_kind, step_positions

__all__ = ["beacon_mask", "reference_attention", "allowed_pairs", "ReferenceResult",
           "worked_example"]


def beacon_mask(mem_len: int, raw_len: int, beacon_len: int, ratio: int, num_queries: int,
                mode: str = "step-expansion", attend_previous: bool = True) -> torch.Tensor:
    """Boolean mask ``[num_queries, mem_len + raw_len + beacon_len]`` of one sequence's step.

    Keys are ``[memory | raw 0..R-1 | beacons 0..B-1]``; the queries are the step's last
    ``num_queries - beacon_len`` raw tokens of the window followed by its ``beacon_len``
    beacons. ``True`` = the query attends to the key. Spec section 3:
    raw token t sees all memory and raw ``0..t``; beacon j sees the memory when
    ``attend_previous``, its raw range (segmentation ``[j r, (j+1) r)``, step-expansion
    ``[0, (j+1) r)``, full-coverage all raw) and itself, and no other beacon.

    The newer variant's kinds (``docs/activation-beacon.md``, section 9.1), where the memory is
    always visible and ``attend_previous`` is not read: ``causal`` (its full-coverage), beacon j
    sees the memory, every raw token and beacons ``0..j``; ``step-causal`` (its step-expansion
    with attend_previous), beacon j sees the memory, raw ``[0, (j+1) r)`` and beacons ``0..j``.
    """
    check_mask_kind(mode)
    M, R, B, r = mem_len, raw_len, beacon_len, ratio
    n_raw_q = num_queries - B
    if n_raw_q < 0 or n_raw_q > R:
        raise ValueError(f"num_queries={num_queries} must lie in [beacon_len, raw_len + beacon_len]")
    mask = torch.zeros(num_queries, M + R + B, dtype=torch.bool)
    for i in range(n_raw_q):
        t = R - n_raw_q + i  # raw index of this query in the window
        mask[i, :M] = True
        mask[i, M:M + t + 1] = True
    for j in range(B):
        row = mask[n_raw_q + j]
        if mode in ("causal", "step-causal"):
            row[:M] = True                            # memory: always
            hi = R if mode == "causal" else min((j + 1) * r, R)
            row[M:M + hi] = True                      # raw: all, or the first (j+1) r
            row[M + R:M + R + j + 1] = True           # beacons 0..j
            continue
        if attend_previous:
            row[:M] = True
        if mode == "segmentation":
            lo, hi = j * r, (j + 1) * r
        elif mode == "step-expansion":
            lo, hi = 0, (j + 1) * r
        else:
            lo, hi = 0, R
        hi = min(hi, R)
        if hi > lo:
            row[M + lo:M + hi] = True
        row[M + R + j] = True
    return mask


def _host(t: torch.Tensor | Sequence[int]) -> list[int]:
    return t.tolist() if isinstance(t, torch.Tensor) else list(t)


def allowed_pairs(cu_seqlens_q, mem_len, raw_len, beacon_len, ratio, mode: str = "step-expansion",
                  attend_previous: bool = True) -> int:
    """Exact number of allowed (query, key) pairs of a step, summed over sequences (per head)."""
    cu = _host(cu_seqlens_q)
    total = 0
    for b, (m, r_len, b_len, ra) in enumerate(zip(_host(mem_len), _host(raw_len),
                                                  _host(beacon_len), _host(ratio))):
        total += int(beacon_mask(m, r_len, b_len, ra, cu[b + 1] - cu[b], mode,
                                 attend_previous).sum())
    return total


class ReferenceResult(NamedTuple):
    out: torch.Tensor     # [total_q, heads, head_dim] in the compute dtype
    lse: torch.Tensor     # [total_q, heads] natural log, +inf for rows that see nothing
    pairs: int            # allowed (query, key) pairs per head


def reference_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        cu_seqlens_q, mem_len, raw_len, beacon_len, ratio, *,
                        mode: str = "step-expansion", attend_previous: bool = True,
                        softmax_scale: float | None = None,
                        compute_dtype: torch.dtype = torch.float64) -> ReferenceResult:
    """Beacon attention of one step with an explicit mask, computed in ``compute_dtype``.

    Arguments follow :func:`beacon_ops.beacon_attention` (lengths may be tensors or lists).
    Pass ``compute_dtype=q.dtype`` for the low-precision baseline of the tolerance rule.
    A row that sees no key gets ``out = 0`` and ``lse = +inf``.
    """
    total_q, H, d = q.shape
    Hkv = k_cache.shape[1]
    group = H // Hkv
    scale = softmax_scale if softmax_scale is not None and softmax_scale > 0 else d ** -0.5
    cu = _host(cu_seqlens_q)
    out = torch.zeros(total_q, H, d, dtype=compute_dtype)
    lse = torch.full((total_q, H), float("inf"), dtype=torch.float32)
    pairs = 0
    for b, (m, r_len, b_len, ra) in enumerate(zip(_host(mem_len), _host(raw_len),
                                                  _host(beacon_len), _host(ratio))):
        nq = cu[b + 1] - cu[b]
        if nq == 0:
            continue
        mask = beacon_mask(m, r_len, b_len, ra, nq, mode, attend_previous)
        pairs += int(mask.sum())
        n_keys = m + r_len + b_len
        qb = q[cu[b]:cu[b + 1]].to("cpu", compute_dtype).transpose(0, 1)            # [H, nq, d]
        kb = k_cache[b, :, :n_keys].to("cpu", compute_dtype).repeat_interleave(group, 0)
        vb = v_cache[b, :, :n_keys].to("cpu", compute_dtype).repeat_interleave(group, 0)
        scores = (qb @ kb.transpose(1, 2)) * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        row_lse = torch.logsumexp(scores.double(), dim=-1)                           # [H, nq]
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        out[cu[b]:cu[b + 1]] = (probs @ vb).transpose(0, 1)
        lse[cu[b]:cu[b + 1]] = torch.where(mask.any(-1), row_lse,
                                           torch.full_like(row_lse, float("inf"))).T.float()
    return ReferenceResult(out, lse, pairs)


def worked_example() -> list[dict]:
    """The worked example of ``docs/activation-beacon.md``, section 3: step-expansion, ``W = S = 8``, ``r = 4``.

    Returns one dict per window with ``mask`` (bool ``[10, keys]``, rows t.. then b0, b1) and
    ``positions`` (int list, the RoPE position of each query row, from
    :func:`beacon_ops.positions.step_positions`). Window 1: no memory, 8 raw, 2 beacons;
    window 2: memory 2 (window 1's beacons), 8 raw, 2 beacons.
    """
    W, r, B = 8, 4, 2
    out = []
    for mem in (0, 2):
        mask = beacon_mask(mem, W, B, r, W + B, "step-expansion", True)
        pos = step_positions([mem], [W], [B], [r], [W + B], W, "step-expansion").tolist()
        out.append({"mask": mask, "positions": pos})
    return out
