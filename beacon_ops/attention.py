"""``torch.ops.beacon.attention``: the typed wrapper and its fake (meta) kernel.

Attention of one Activation Beacon step over the condensed cache (README's contract), with the
beacon mask computed inside the kernel (``csrc/beacon_mask.h``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .positions import check_mode

__all__ = ["beacon_attention"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.library.register_fake("beacon::attention")
def _attention_fake(q, k_cache, v_cache, cu_seqlens_q, mem_len, raw_len, beacon_len, ratio,
                    max_seqlen_q, mode, attend_previous, softmax_scale):
    torch._check(q.dim() == 3, lambda: f"q must have shape [total_q, heads, head_dim], got {q.shape}")
    out = q.new_empty(q.shape)
    lse = q.new_empty((q.shape[0], q.shape[1]), dtype=torch.float32)
    return out, lse


def _check_int32_vector(t: Tensor, name: str, size: int, device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} must be on the device of q ({device}), got {t.device}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != size:
        raise ValueError(f"{name} must have shape [{size}], got {tuple(t.shape)}")


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
        mode: ``"segmentation"``, ``"step-expansion"`` (default) or ``"full-coverage"``.
        attend_previous: whether beacons see the memory (spec's ``beacon_attend_previous``).
        softmax_scale: scale of ``q k^T``; ``None`` (or ``<= 0``) means ``1/sqrt(head_dim)``.

    Returns:
        ``(out, lse)``: ``out`` like ``q`` (accumulated in fp32), ``lse`` fp32
        ``[total_q, heads]``, natural log of the softmax denominator of the scaled scores. A
        row that sees no key gets ``out = 0`` and ``lse = +inf``.

    Raises:
        TypeError / ValueError (Python checks) or RuntimeError (kernel checks, including the
        lengths) whose message starts with or names the offending argument.
    """
    if not isinstance(q, Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() != 3:
        raise ValueError(f"q must have shape [total_q, heads, head_dim], got {tuple(q.shape)}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"q must be float32, bfloat16 or float16, got {q.dtype}")
    head_dim = q.shape[2]
    if head_dim % 8 != 0 or not 8 <= head_dim <= 256:
        raise ValueError(f"q head_dim must be a multiple of 8 in [8, 256], got {head_dim}")
    for t, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [batch, kv_heads, capacity, head_dim], "
                             f"got {tuple(t.shape)}")
        if t.shape[3] != head_dim:
            raise ValueError(f"{name} head_dim ({t.shape[3]}) must equal q head_dim ({head_dim})")
        if t.stride(3) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim (stride 1), got strides "
                             f"{t.stride()}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have the shape of k_cache {tuple(k_cache.shape)}, "
                         f"got {tuple(v_cache.shape)}")
    if q.stride(2) != 1:
        raise ValueError(f"q must be contiguous in head_dim (stride 1), got strides {q.stride()}")
    batch, kv_heads = k_cache.shape[0], k_cache.shape[1]
    if q.shape[1] % kv_heads != 0:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k_cache kv_heads ({kv_heads})")
    _check_int32_vector(cu_seqlens_q, "cu_seqlens_q", batch + 1, q.device)
    for t, name in ((mem_len, "mem_len"), (raw_len, "raw_len"), (beacon_len, "beacon_len"),
                    (ratio, "ratio")):
        _check_int32_vector(t, name, batch, q.device)
    if not isinstance(max_seqlen_q, int) or max_seqlen_q < 0:
        raise ValueError(f"max_seqlen_q must be an int >= 0, got {max_seqlen_q!r}")
    check_mode(mode)
    scale = 0.0 if softmax_scale is None else float(softmax_scale)
    return torch.ops.beacon.attention(q, k_cache, v_cache, cu_seqlens_q, mem_len, raw_len,
                                      beacon_len, ratio, max_seqlen_q, mode, bool(attend_previous),
                                      scale)
