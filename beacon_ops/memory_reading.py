"""Attention split at the memory boundary: the condensed memory read with the raw tokens' own
queries, the window with the usual ones, the two merged by their log-sum-exp.

Why: with the base model frozen, a raw token reads the beacons with the query it would use for
the raw tokens they replaced, and passes what comes back through the same output path. A
*reader* (trained low-rank deltas on the raw rows' memory queries and on what they read from
the memory, :class:`~beacon_ops.llama.Attention`) changes only that. Attention over keys
``[memory | window]`` is exactly the LSE-weighted sum of attention over each part, so with zero
deltas the split equals one pass (up to rounding), and a step without memory (every input of
at most one window) never takes this path: it stays bit-identical to the base model.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dense_attention", "merge_by_lse", "beacons_see_memory"]


def beacons_see_memory(mode: str, attend_previous: bool) -> bool:
    """Whether beacon rows attend to the memory (the newer kinds always; else ``attend_previous``)."""
    return attend_previous or mode in ("causal", "step-causal")


def dense_attention(q: Tensor, k: Tensor, v: Tensor, scale: float,
                    visible: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Softmax attention of ``q`` ``[n, heads, d]`` over ``k``, ``v`` ``[kv_heads, m, d]`` (query
    head ``h`` reads KV head ``h // (heads // kv_heads)``), in fp32 and differentiable.

    ``visible``: optional bool ``[n, m]`` (True: the row sees the key). Returns ``(out, lse)``:
    fp32 ``[n, heads, d]`` and ``[n, heads]``; a row that sees no key gets ``out = 0`` and
    ``lse = -inf`` (so that :func:`merge_by_lse` gives it no weight).
    """
    n, heads, d = q.shape
    kv_heads, m = k.shape[0], k.shape[1]
    g = heads // kv_heads
    qf = q.float().reshape(n, kv_heads, g, d).permute(1, 0, 2, 3).reshape(kv_heads, n * g, d)
    s = torch.bmm(qf, k.float().transpose(1, 2)) * scale                # [kv_heads, n * g, m]
    if visible is not None:
        see = visible.repeat_interleave(g, dim=0)[None]                 # [1, n * g, m]
        s = s.masked_fill(~see, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                    # [kv_heads, n * g]
    empty = torch.isinf(lse)
    p = torch.exp(s - torch.where(empty, 0.0, lse).unsqueeze(-1))       # exp(-inf) = 0 where empty
    out = torch.bmm(p, v.float())                                       # [kv_heads, n * g, d]
    out = out.reshape(kv_heads, n, g, d).permute(1, 0, 2, 3).reshape(n, heads, d)
    lse = torch.where(empty, float("-inf"), lse).reshape(kv_heads, n, g).permute(1, 0, 2).reshape(n, heads)
    return out, lse


def merge_by_lse(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tensor:
    """Attention over two disjoint key sets from each one's ``(out, lse)`` (``lse = -inf``: the
    part saw nothing). Returns the merged output in ``out_a``'s dtype (computed in fp32)."""
    lse = torch.logaddexp(lse_a, lse_b)
    lse = torch.where(torch.isinf(lse), 0.0, lse)   # rows that see neither part: both weights 0
    wa = torch.exp(lse_a - lse).unsqueeze(-1)
    wb = torch.exp(lse_b - lse).unsqueeze(-1)
    return (wa * out_a.float() + wb * out_b.float()).to(out_a.dtype)
