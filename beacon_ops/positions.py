"""RoPE positions of the condensed cache (``docs/activation-beacon.md``, section 4), mirrored by
``csrc/rope.h``, and the RoPE helpers every cache shares.

Positions restart every window. Memory slot ``i`` has position ``i``; raw token ``t`` of the
window has position ``M + t`` (both equal their cache slot); beacon ``j`` of the window has
``M + r`` (segmentation), ``M + (j + 1) * r`` (step-expansion) or ``M + W`` (full-coverage).
The two mask kinds of the newer variant (:mod:`beacon_ops.variants`) give beacons the next
consecutive slot after the raw tokens and the earlier beacons: ``M + W + j`` (``causal``) and
``M + (j + 1) * r + j`` (``step-causal``). A query has the position of the key it appends, so one helper serves queries, the append op
and the compaction op.
"""
from __future__ import annotations

from typing import Sequence

import torch

MODES: tuple[str, ...] = ("segmentation", "step-expansion", "full-coverage")
"""Beacon attention modes, in the order of ``beacon::Mode`` in ``csrc/beacon_mask.h``."""

MASK_KINDS: tuple[str, ...] = MODES + ("causal", "step-causal")
"""Every mask kind the ops take as ``mode``: the three modes under the original rules, then the
newer variant's ``causal`` (its full-coverage, either placement) and ``step-causal`` (its
step-expansion with ``attend_previous``); see :mod:`beacon_ops.variants`."""


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is a known beacon mode, else raise ``ValueError`` naming it."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def check_mask_kind(mode: str) -> str:
    """Return ``mode`` if the ops know it as a mask kind, else raise ``ValueError`` naming it."""
    if mode not in MASK_KINDS:
        raise ValueError(f"mode must be one of {MASK_KINDS}, got {mode!r}")
    return mode


def beacon_position(mem_len: int, j: int, ratio: int, window: int, mode: str) -> int:
    """RoPE position of beacon ``j`` of the current window while it is being created."""
    if mode == "segmentation":
        return mem_len + ratio
    if mode == "step-expansion":
        return mem_len + (j + 1) * ratio
    if mode == "full-coverage":
        return mem_len + window
    if mode == "causal":
        return mem_len + window + j
    if mode == "step-causal":
        return mem_len + (j + 1) * ratio + j
    raise ValueError(f"mode must be one of {MASK_KINDS}, got {mode!r}")


def slot_position(slot: int, mem_len: int, raw_len: int, ratio: int, window: int, mode: str) -> int:
    """RoPE position of the token in cache ``slot`` (lengths after the step's append)."""
    if slot < mem_len + raw_len:
        return slot
    return beacon_position(mem_len, slot - mem_len - raw_len, ratio, window, mode)


def step_positions(
    mem_len: Sequence[int],
    raw_len: Sequence[int],
    beacon_len: Sequence[int],
    ratio: Sequence[int],
    num_new: Sequence[int],
    window: int,
    mode: str,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Positions of a step's packed tokens (queries and the keys they append).

    Lengths are per sequence *after* the step's tokens were counted in (host values, e.g. the
    host shadows of :class:`~beacon_ops.CondensedKVCache`). Sequence ``b`` contributes
    ``num_new[b]`` tokens: its new raw tokens, then its ``beacon_len[b]`` beacons; they occupy
    the last ``num_new[b]`` slots ``[end - num_new[b], end)``, ``end = M + R + B``.

    Returns an int32 tensor ``[sum(num_new)]`` on ``device``.
    """
    check_mask_kind(mode)
    out: list[int] = []
    for m, r_len, b_len, ratio_b, n in zip(mem_len, raw_len, beacon_len, ratio, num_new):
        end = m + r_len + b_len
        if n > r_len + b_len or n < b_len:
            raise ValueError(
                f"num_new={n} must lie in [beacon_len, raw_len + beacon_len] = [{b_len}, {r_len + b_len}]")
        out.extend(slot_position(s, m, r_len, ratio_b, window, mode) for s in range(end - n, end))
    return torch.tensor(out, dtype=torch.int32, device=device)


def default_inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """RoPE inverse frequencies ``theta ** (-2i / head_dim)`` (fp32, ``[head_dim / 2]``), as
    Hugging Face computes them; the only place that computes them (scalings apply on top)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
           interleaved: bool = False) -> torch.Tensor:
    """Out-of-place, differentiable RoPE of ``x`` ``[n, heads, head_dim]`` at ``positions`` ``[n]``.

    Same arithmetic as the ``rope_`` op (fp32 angles ``pos * inv_freq`` as in
    :func:`rope_tables`, rotation in fp32, result in ``x``'s dtype). ``interleaved``: pairs
    ``(2i, 2i+1)`` (GGUF layout) instead of ``(i, i + head_dim/2)``.
    """
    ang = positions.to(torch.float32)[:, None] * inv_freq.float()[None, :]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    xf = x.float()
    if interleaved:
        x0, x1 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    else:
        half = x.shape[-1] // 2
        x0, x1 = xf[..., :half], xf[..., half:]
        out = torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    return out.to(x.dtype)


def rope_tables(inv_freq: torch.Tensor, max_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``[max_pos, head_dim / 2]`` (fp32) for the RoPE kernels.

    Computed like Hugging Face's ``LlamaRotaryEmbedding`` (fp32 product of positions and
    ``inv_freq``, then cos/sin), so rotations match it exactly.
    ``inv_freq`` carries any scaling (Llama-3 style, linear, ...). Rotation by a negative
    position difference uses the row of its absolute value (cos even, sin odd).
    """
    pos = torch.arange(max_pos, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(pos, inv_freq.float())
    return freqs.cos().contiguous(), freqs.sin().contiguous()
