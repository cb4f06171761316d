"""Autograd for ``torch.ops.beacon.attention`` and the op that computes its gradients.

``beacon::attention_backward`` is FlashAttention-2's backward with the beacon mask: the
probabilities are recomputed from the saved log-sum-exp tile by tile, so training never holds a
``[queries x keys]`` tensor. Importing this module (``import beacon_ops`` does) registers the
autograd formula, so ``out.sum().backward()`` works through ``beacon_attention`` and under
``torch.compile``.

Gradients flow to ``q``, ``k_cache`` and ``v_cache`` (``dk_cache``/``dv_cache`` are zero in
slots no query attends); the integer tensors get none. A gradient of ``lse`` is honoured too
(it adds ``P * dlse`` to the score gradient), at the price of one extra forward and backward
call; the usual loss, through ``out`` only, pays nothing for it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .op_arguments import require_tensors, scalar_scale

__all__ = ["beacon_attention_backward"]


def beacon_attention_backward(
    dout: Tensor, q: Tensor, k_cache: Tensor, v_cache: Tensor, out: Tensor, lse: Tensor,
    cu_seqlens_q: Tensor, mem_len: Tensor, raw_len: Tensor, beacon_len: Tensor, ratio: Tensor,
    *, max_seqlen_q: int, mode: str = "step-expansion", attend_previous: bool = True,
    softmax_scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``beacon_attention`` with respect to ``q``, ``k_cache`` and ``v_cache``.

    Args:
        dout: gradient of the loss with respect to ``out``, ``[total_q, heads, head_dim]``.
        q, k_cache, v_cache, cu_seqlens_q, mem_len, raw_len, beacon_len, ratio, max_seqlen_q,
            mode, attend_previous: exactly as passed to the forward ``beacon_attention``
            (the condensed-cache contract of README.md).
        out, lse: the forward's outputs (``lse`` fp32 natural log, ``+inf`` for rows that see
            no key; such rows contribute nothing).
        softmax_scale: the forward's scale; ``None`` (or ``<= 0``, as in the forward) means
            ``head_dim ** -0.5``.

    Raises:
        TypeError / ValueError / RuntimeError naming the offending argument, as the forward
        (the same native checks, plus ``dout``, ``out`` and ``lse``).

    Returns:
        ``(dq, dk_cache, dv_cache)`` shaped and typed like ``q``, ``k_cache``, ``v_cache``
        (accumulated in fp32). For grouped KV heads ``dk_cache``/``dv_cache`` sum over the
        query heads of each group; cache slots no query attends get zero.
    """
    require_tensors("beacon_attention_backward", dout=dout, q=q, k_cache=k_cache, v_cache=v_cache, out=out,
                    lse=lse, cu_seqlens_q=cu_seqlens_q, mem_len=mem_len, raw_len=raw_len, beacon_len=beacon_len,
                    ratio=ratio)
    return torch.ops.beacon.attention_backward(
        dout, q, k_cache, v_cache, out, lse, cu_seqlens_q, mem_len, raw_len, beacon_len, ratio,
        max_seqlen_q, mode, bool(attend_previous), scalar_scale("beacon_attention_backward", softmax_scale))


def _setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
    (q, k_cache, v_cache, cu_seqlens_q, mem_len, raw_len, beacon_len, ratio, max_seqlen_q, mode,
     attend_previous, softmax_scale) = inputs
    out, lse = output
    ctx.save_for_backward(q, k_cache, v_cache, out, lse, cu_seqlens_q, mem_len, raw_len,
                          beacon_len, ratio)
    ctx.options = (max_seqlen_q, mode, attend_previous, softmax_scale)
    # Unused outputs then arrive as None: the common loss (through `out` only) skips the
    # extra work that a gradient of `lse` needs.
    ctx.set_materialize_grads(False)


def _backward(ctx: Any, dout: Tensor | None, dlse: Tensor | None) -> tuple:
    (q, k_cache, v_cache, out, lse, cu_seqlens_q, mem_len, raw_len, beacon_len,
     ratio) = ctx.saved_tensors
    max_seqlen_q, mode, attend_previous, scale = ctx.options
    lengths = (cu_seqlens_q, mem_len, raw_len, beacon_len, ratio)
    no_grads = (None,) * 9  # cu_seqlens_q .. softmax_scale
    if dout is None and dlse is None:
        return (None, None, None) + no_grads
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = torch.ops.beacon.attention_backward(
        dout, q, k_cache, v_cache, out, lse, *lengths, max_seqlen_q, mode, attend_previous,
        scale)
    if dlse is not None:
        if scale <= 0:  # the ops' convention for the default scale
            scale = q.shape[-1] ** -0.5
        # d lse_i / d s_ij = P_ij, so dS gains P_ij * dlse_i:
        #   dq_i += scale * dlse_i * sum_j P_ij k_j     (attention with values = keys)
        #   dk_j += scale * sum_i P_ij (dlse_i q_i)     (the dV of a backward with dout = dlse q)
        dlse = torch.where(torch.isinf(lse), 0.0, dlse).unsqueeze(-1)  # rows that see nothing
        attn_k, _ = torch.ops.beacon.attention(
            q, k_cache, k_cache, *lengths, max_seqlen_q, mode, attend_previous, scale)
        dq = dq + (scale * dlse * attn_k.float()).to(dq.dtype)
        weighted_q = (dlse * q.float()).to(q.dtype)
        _, _, pq = torch.ops.beacon.attention_backward(
            weighted_q, q, k_cache, v_cache, out, lse, *lengths, max_seqlen_q, mode,
            attend_previous, scale)
        dk = dk + scale * pq
    need = ctx.needs_input_grad
    return ((dq if need[0] else None), (dk if need[1] else None),
            (dv if need[2] else None)) + no_grads


torch.library.register_autograd("beacon::attention", _backward, setup_context=_setup_context)
