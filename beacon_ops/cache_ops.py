"""``torch.ops.beacon.{rope_, append_kv, compact_}``: typed wrappers.

The ops work on the condensed-cache contract of README.md: one K and one V tensor
``[layers, batch, kv_heads, capacity, head_dim]`` (the attention and append ops take a layer's
view ``[batch, kv_heads, capacity, head_dim]``), per-sequence int32 lengths ``mem_len``,
``raw_len``, ``beacon_len`` and ``ratio`` on the cache's device, and fp32 RoPE tables
``[rows, head_dim / 2]`` from :func:`beacon_ops.positions.rope_tables`. Keys are cached rotated
at the positions of :mod:`beacon_ops.positions`.

All three ops mutate their cache/length arguments in place and return nothing. They validate
every argument before writing anything (natively, ``csrc/op_checks.h``; their meta kernels for
``torch.compile`` run the same checks), so a call that raises leaves everything as it was. The
CPU kernels read lengths directly; the CUDA kernels do not synchronise to read them, so on a GPU
the lengths must be valid: :class:`beacon_ops.CondensedKVCache` checks them against its host
shadows before calling.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .op_arguments import require_tensors

__all__: list[str] = ["rope_", "append_kv", "compact_"]


def rope_(x: Tensor, positions: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> None:
    """Rotate ``x`` ``[tokens, heads, head_dim]`` in place by RoPE at int32 ``positions [tokens]``.

    ``cos``/``sin`` are fp32 tables ``[rows, head_dim / 2]`` (every position must be ``< rows``).
    ``interleaved=False`` pairs element ``i`` with ``i + head_dim / 2`` (rotate-half, Hugging Face
    checkpoints); ``True`` pairs ``2i`` with ``2i + 1`` (GGUF / Meta). Computed in fp32 and
    rounded once to ``x``'s dtype (float32, float16 or bfloat16).
    """
    require_tensors("rope_", x=x, positions=positions, cos=cos, sin=sin)
    torch.ops.beacon.rope_(x, positions, cos, sin, interleaved)


def append_kv(
    k_cache: Tensor,
    v_cache: Tensor,
    k_new: Tensor,
    v_new: Tensor,
    cu_seqlens: Tensor,
    mem_len: Tensor,
    raw_len: Tensor,
    beacon_len: Tensor,
    positions: Tensor,
    cos: Tensor,
    sin: Tensor,
    interleaved: bool = False,
) -> None:
    """Write a step's keys (rotated) and values into each sequence's last slots.

    ``k_cache``/``v_cache``: a layer's view ``[batch, kv_heads, capacity, head_dim]``.
    ``k_new``/``v_new``: the step's packed tokens ``[total, kv_heads, head_dim]`` (per sequence
    its new raw tokens, then its beacons), ``cu_seqlens`` int32 ``[batch + 1]``. Lengths already
    count the step's tokens: sequence ``b``'s ``n`` tokens go to slots ``[end - n, end)``,
    ``end = mem_len + raw_len + beacon_len``. Keys are rotated at ``positions [total]`` on the
    way (as :meth:`CondensedKVCache.begin_step` computes them); values are copied bit-exactly.
    """
    require_tensors("append_kv", k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new,
                    cu_seqlens=cu_seqlens, mem_len=mem_len, raw_len=raw_len, beacon_len=beacon_len,
                    positions=positions, cos=cos, sin=sin)
    torch.ops.beacon.append_kv(k_cache, v_cache, k_new, v_new, cu_seqlens, mem_len, raw_len,
                               beacon_len, positions, cos, sin, interleaved)


def compact_(
    k_cache: Tensor,
    v_cache: Tensor,
    mem_len: Tensor,
    raw_len: Tensor,
    beacon_len: Tensor,
    ratio: Tensor,
    cos: Tensor,
    sin: Tensor,
    *,
    window: int,
    stride: int,
    mode: str,
    interleaved: bool = False,
) -> None:
    """Compact every sequence whose window is full, in all layers at once (spec section 5).

    ``k_cache``/``v_cache``: the whole cache ``[layers, batch, kv_heads, capacity, head_dim]``.
    For a sequence with ``raw_len == window`` and ratio ``r > 0`` the window's ``stride / r``
    beacons move to the end of memory (keys re-rotated from their creation position to their
    memory slot), the ``window - stride`` carried raw tokens follow them (keys re-rotated by the
    shift), and the rest is dropped: ``mem_len += stride / r``, ``raw_len = window - stride``,
    ``beacon_len = 0``. With ``r = 0`` the first ``stride`` raw tokens become memory in place
    (nothing moves): ``mem_len += stride``. Other sequences are untouched.
    """
    require_tensors("compact_", k_cache=k_cache, v_cache=v_cache, mem_len=mem_len, raw_len=raw_len,
                    beacon_len=beacon_len, ratio=ratio, cos=cos, sin=sin)
    torch.ops.beacon.compact_(k_cache, v_cache, mem_len, raw_len, beacon_len, ratio, cos, sin,
                              window, stride, mode, interleaved)
