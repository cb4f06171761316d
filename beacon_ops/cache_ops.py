"""``torch.ops.beacon.{rope_, append_kv, compact_}``: typed wrappers, fake kernels.

The ops work on the condensed-cache contract of README.md: one K and one V tensor
``[layers, batch, kv_heads, capacity, head_dim]`` (the attention and append ops take a layer's
view ``[batch, kv_heads, capacity, head_dim]``), per-sequence int32 lengths ``mem_len``,
``raw_len``, ``beacon_len`` and ``ratio`` on the cache's device, and fp32 RoPE tables
``[rows, head_dim / 2]`` from :func:`beacon_ops.positions.rope_tables`. Keys are cached rotated
at the positions of :mod:`beacon_ops.positions`.

All three ops mutate their cache/length arguments in place and return nothing. They validate
every argument before writing anything, so a call that raises leaves everything as it was. The
CPU kernels read lengths directly; the CUDA kernels do not synchronise to read them, so on a GPU
the lengths must be valid: :class:`beacon_ops.CondensedKVCache` checks them against its host
shadows before calling.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .positions import check_mode

__all__: list[str] = ["rope_", "append_kv", "compact_"]


def rope_(x: Tensor, positions: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> None:
    """Rotate ``x`` ``[tokens, heads, head_dim]`` in place by RoPE at int32 ``positions [tokens]``.

    ``cos``/``sin`` are fp32 tables ``[rows, head_dim / 2]`` (every position must be ``< rows``).
    ``interleaved=False`` pairs element ``i`` with ``i + head_dim / 2`` (rotate-half, Hugging Face
    checkpoints); ``True`` pairs ``2i`` with ``2i + 1`` (GGUF / Meta). Computed in fp32 and
    rounded once to ``x``'s dtype (float32, float16 or bfloat16).
    """
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
    check_mode(mode)
    torch.ops.beacon.compact_(k_cache, v_cache, mem_len, raw_len, beacon_len, ratio, cos, sin,
                              window, stride, mode, interleaved)


# Fake kernels: the ops return nothing and only mutate their inputs, whose metadata is unchanged.
# They check what is known without data (devices, ranks, dtypes), so that a call mixing devices
# (e.g. a meta length tensor) fails clearly instead of dispatching to this no-op.
def _check_devices(op: str, ref_name: str, ref: Tensor, others: dict[str, Tensor]) -> None:
    for name, t in others.items():
        torch._check(t.device == ref.device,
                     lambda: f"{op}: {name} must be on {ref_name}'s device {ref.device}, got {t.device}")


def _check_int32(op: str, tensors: dict[str, Tensor]) -> None:
    for name, t in tensors.items():
        torch._check(t.dtype == torch.int32 and t.dim() == 1,
                     lambda: f"{op}: {name} must be an int32 vector, got {t.dtype} {tuple(t.shape)}")


@torch.library.register_fake("beacon::rope_")
def _rope_fake(x: Tensor, positions: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> None:
    torch._check(x.dim() == 3, lambda: f"rope_: x must be [tokens, heads, head_dim], got {tuple(x.shape)}")
    _check_devices("rope_", "x", x, {"positions": positions, "cos": cos, "sin": sin})
    _check_int32("rope_", {"positions": positions})
    return None


@torch.library.register_fake("beacon::append_kv")
def _append_kv_fake(k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor, cu_seqlens: Tensor,
                    mem_len: Tensor, raw_len: Tensor, beacon_len: Tensor, positions: Tensor, cos: Tensor,
                    sin: Tensor, interleaved: bool) -> None:
    torch._check(k_cache.dim() == 4, lambda: f"append_kv: k_cache must be 4-D, got {tuple(k_cache.shape)}")
    ints = {"cu_seqlens": cu_seqlens, "mem_len": mem_len, "raw_len": raw_len, "beacon_len": beacon_len,
            "positions": positions}
    _check_devices("append_kv", "k_cache", k_cache,
                   {"v_cache": v_cache, "k_new": k_new, "v_new": v_new, "cos": cos, "sin": sin, **ints})
    _check_int32("append_kv", ints)
    return None


@torch.library.register_fake("beacon::compact_")
def _compact_fake(k_cache: Tensor, v_cache: Tensor, mem_len: Tensor, raw_len: Tensor, beacon_len: Tensor,
                  ratio: Tensor, cos: Tensor, sin: Tensor, window: int, stride: int, beacon_mode: str,
                  interleaved: bool) -> None:
    torch._check(k_cache.dim() == 5, lambda: f"compact_: k_cache must be 5-D, got {tuple(k_cache.shape)}")
    ints = {"mem_len": mem_len, "raw_len": raw_len, "beacon_len": beacon_len, "ratio": ratio}
    _check_devices("compact_", "k_cache", k_cache, {"v_cache": v_cache, "cos": cos, "sin": sin, **ints})
    _check_int32("compact_", ints)
    return None
