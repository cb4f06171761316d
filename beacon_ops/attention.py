"""``torch.ops.beacon.attention``: the typed wrapper.

Attention of one Activation Beacon step over the condensed cache (README's contract), with the
beacon mask computed inside the kernel (``csrc/beacon_mask.h``). The op's checks and its meta
(fake) kernel are native (``csrc/op_checks.h``, ``csrc/meta.cpp``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .op_arguments import require_tensors, scalar_scale

__all__ = ["beacon_attention"]


def beacon_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cu_seqlens_q: Tensor,
                     mem_len: Tensor, raw_len: Tensor, beacon_len: Tensor, ratio: Tensor, *,
                     max_seqlen_q: int, mode: str = "step-expansion", attend_previous: bool = True,
                     softmax_scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Attention of one step over the condensed KV cache, beacon mask in the kernel.

    Per sequence ``b`` the keys are the cache slots ``[memory | raw | beacons]`` =
    ``[0, M) | [M, M + R) | [M + R, M + R + B)`` with ``M, R, B = mem_len[b], raw_len[b],
    beacon_len[b]`` (lengths *after* the step's keys were appended). Its
    ``nq = cu_seqlens_q[b+1] - cu_seqlens_q[b]`` queries are the step's new raw tokens (the last
    ``nq - B`` raw tokens of the window) followed by the window's ``B`` beacons. Mask (spec
    section 3): raw token ``t`` sees the memory and raw ``0..t``; beacon ``j`` sees the memory
    (when ``attend_previous``), its raw range (``segmentation``: ``[j r, (j+1) r)``,
    ``step-expansion``: ``[0, (j+1) r)``, ``full-coverage``: the whole window, clipped to ``R``)
    and itself; no row sees another beacon. Decode is the same op with one query per sequence.
    The newer variant's kinds (``docs/activation-beacon.md``, section 9.1) keep the memory visible
    and ignore ``attend_previous``: ``causal``, every row sees every key up to its own;
    ``step-causal``, beacon ``j`` sees raw ``[0, (j+1) r)`` and beacons ``0..j``.

    Args:
        q: ``[total_q, heads, head_dim]`` packed queries (fp32, bf16 or fp16; head_dim a
            multiple of 8 up to 256), contiguous in head_dim.
        k_cache, v_cache: one layer's ``[batch, kv_heads, capacity, head_dim]``, dtype of ``q``;
            ``heads`` must be a multiple of ``kv_heads`` (GQA/MQA/MHA).
        cu_seqlens_q: int32 ``[batch + 1]``, non-decreasing from 0 to ``total_q``.
        mem_len, raw_len, beacon_len, ratio: int32 ``[batch]``; valid iff all ``>= 0``,
            ``M + R + B <= capacity``, ``B > 0`` only with ``ratio > 0``, and
            ``B <= nq <= R + B``.
        max_seqlen_q: the largest ``nq`` (an upper bound is fine).
        mode: ``"segmentation"``, ``"step-expansion"`` (default), ``"full-coverage"``,
            ``"causal"`` or ``"step-causal"`` (:data:`beacon_ops.positions.MASK_KINDS`).
        attend_previous: whether beacons see the memory (spec's ``beacon_attend_previous``).
        softmax_scale: scale of ``q k^T``, finite and at most float32's largest value;
            ``None`` (or ``<= 0``) means ``1/sqrt(head_dim)``.

    Returns:
        ``(out, lse)``: ``out`` like ``q`` (accumulated in fp32), ``lse`` fp32
        ``[total_q, heads]``, natural log of the softmax denominator of the scaled scores. A
        row that sees no key gets ``out = 0`` and ``lse = +inf``.

    Raises:
        TypeError (dtype, not a tensor), ValueError (shape, device, strides, scalars) or
        RuntimeError (length values, read by the CPU kernel) naming the offending argument.
    """
    require_tensors("beacon_attention", q=q, k_cache=k_cache, v_cache=v_cache, cu_seqlens_q=cu_seqlens_q,
                    mem_len=mem_len, raw_len=raw_len, beacon_len=beacon_len, ratio=ratio)
    scale = scalar_scale("beacon_attention", softmax_scale)
    return torch.ops.beacon.attention(q, k_cache, v_cache, cu_seqlens_q, mem_len, raw_len,
                                      beacon_len, ratio, max_seqlen_q, mode, bool(attend_previous),
                                      scale)
