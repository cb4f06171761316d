"""A plain KV cache (full or sliding-window causal attention) implementing :class:`~beacon_ops.kv_cache.KVCache`.

The baseline of the demo and of ``eval-ppl``, and the path that must reproduce the base model
(Hugging Face's ``LlamaForCausalLM``) exactly. Same calls as :class:`~beacon_ops.CondensedKVCache`
(``begin_step``, ``rotate_queries``, ``append``, ``attention``, ``compact``), so
:class:`~beacon_ops.llama.Llama` runs one loop for every kind of attention. No beacons: every
token has its absolute position. With ``sliding_window=w`` a query sees only the last ``w`` keys
(itself included) and older keys are dropped, so memory stays bounded ("plain sliding window of
W raw tokens, no memory"). Attention is ``scaled_dot_product_attention`` with an explicit mask.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .cache_ops import rope_
from .huge_pages import zeros_huge
from .kv_cache import StepPlan
from .positions import default_inv_freq, rope_tables

__all__ = ["FullKVCache", "FullStepPlan"]


FullStepPlan = StepPlan
"""A :class:`FullKVCache` step has the same plan as a condensed one (no beacons)."""


class FullKVCache:
    """Keys (rotated at absolute positions) and values of every layer, ``[layers, batch, kv, cap, d]``.

    ``capacity``: the longest sequence (prompt + generated tokens); with a sliding window the
    cache holds at most ``sliding_window - 1 + chunk`` entries instead. ``chunk``: raw tokens per
    prefill step (``room``).
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int,
                 capacity: int, *, chunk: int = 1024, sliding_window: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 inv_freq: Tensor | None = None, rope_interleaved: bool = False) -> None:
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
        self.chunk = chunk
        self.window = sliding_window
        self.capacity = capacity
        slots = capacity if sliding_window is None else min(capacity, sliding_window - 1 + chunk)
        shape = (num_layers, batch_size, num_kv_heads, slots, head_dim)
        self.k = zeros_huge(shape, dtype=dtype, device=device)  # on huge pages (CPU): huge_pages.py
        self.v = zeros_huge(shape, dtype=dtype, device=device)
        self.length = [0] * batch_size  # tokens seen (absolute position of the next one)
        self.start = [0] * batch_size   # absolute position of slot 0 (sliding window)
        if inv_freq is None:
            inv_freq = default_inv_freq(head_dim)
        self.cos, self.sin = rope_tables(inv_freq.to(device), capacity + 1)
        self.interleaved = rope_interleaved
        self.plan: FullStepPlan | None = None

    def room(self, b: int) -> int:
        return min(self.chunk, self.capacity - self.length[b])

    def has_ratio(self, b: int) -> bool:
        """Always: a plain cache has no beacons (ratio 0)."""
        return True

    def set_ratio(self, b: int, r: int) -> None:
        if r != 0:
            raise ValueError(f"set_ratio: a plain KV cache has no beacons, the ratio must be 0, got {r}")

    def max_position(self) -> int:
        return max(self.length) - 1

    def begin_step(self, num_raw: Sequence[int]) -> FullStepPlan:
        if len(num_raw) != len(self.length):
            raise ValueError(f"num_raw: expected {len(self.length)} entries, got {len(num_raw)}")
        for b, n in enumerate(num_raw):
            if n < 0 or self.length[b] + n > self.capacity:
                raise ValueError(f"num_raw[{b}]={n}: sequence {b} holds {self.length[b]} of "
                                 f"{self.capacity} tokens (cache too small)")
        positions = [p for b, n in enumerate(num_raw) for p in range(self.length[b], self.length[b] + n)]
        cu = [0]
        for n in num_raw:
            cu.append(cu[-1] + n)
        dev = self.k.device
        if self.window is not None:  # drop keys no query of this step can see
            for b, n in enumerate(num_raw):
                drop = max(0, (self.length[b] - self.start[b]) - (self.window - 1))
                if n and drop:
                    held = self.length[b] - self.start[b]
                    self.k[:, b, :, :held - drop] = self.k[:, b, :, drop:held].clone()
                    self.v[:, b, :, :held - drop] = self.v[:, b, :, drop:held].clone()
                    self.start[b] += drop
        self.old_length = list(self.length)
        self.length = [l + n for l, n in zip(self.length, num_raw)]
        self.plan = StepPlan(torch.tensor(cu, dtype=torch.int32, device=dev), list(num_raw),
                                 [0] * len(num_raw), list(num_raw), [False] * len(num_raw),
                                 max(num_raw), torch.tensor(positions, dtype=torch.int32, device=dev))
        return self.plan

    def rotate_queries(self, q: Tensor, plan: FullStepPlan) -> Tensor:
        rope_(q, plan.positions, self.cos, self.sin, self.interleaved)
        return q

    def append(self, layer: int, k_new: Tensor, v_new: Tensor, plan: FullStepPlan) -> None:
        k_rot = k_new.contiguous().clone()
        rope_(k_rot, plan.positions, self.cos, self.sin, self.interleaved)
        cu = plan.cu_seqlens.tolist()
        for b, n in enumerate(plan.num_new):
            if n:
                s0 = self.old_length[b] - self.start[b]
                self.k[layer, b, :, s0:s0 + n] = k_rot[cu[b]:cu[b + 1]].transpose(0, 1)
                self.v[layer, b, :, s0:s0 + n] = v_new[cu[b]:cu[b + 1]].transpose(0, 1)

    def attention_parts(self, layer: int, q: Tensor, q_memory: Tensor, plan: FullStepPlan) -> None:
        """None: a plain cache holds no condensed memory (its steps are :meth:`attention` alone)."""
        return None

    def attention(self, layer: int, q: Tensor, plan: FullStepPlan,
                  softmax_scale: float | None = None) -> tuple[Tensor, None]:
        """Causal (optionally sliding-window) attention; returns ``(out, None)`` (no LSE)."""
        out = torch.empty_like(q)
        cu = plan.cu_seqlens.tolist()
        for b, n in enumerate(plan.num_new):
            if not n:
                continue
            held = self.length[b] - self.start[b]
            qpos = torch.arange(self.old_length[b], self.length[b], device=q.device)[:, None]
            kpos = torch.arange(self.start[b], self.length[b], device=q.device)[None, :]
            mask = kpos <= qpos
            if self.window is not None:
                mask &= kpos > qpos - self.window
            qb = q[cu[b]:cu[b + 1]].transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(qb, self.k[layer, b, :, :held][None],
                                               self.v[layer, b, :, :held][None], attn_mask=mask,
                                               scale=softmax_scale, enable_gqa=True)
            out[cu[b]:cu[b + 1]] = o[0].transpose(0, 1)
        return out, None

    def compact(self) -> None:
        """Nothing to condense in a plain cache."""

    def reset(self, b: int | None = None) -> None:
        for i in range(len(self.length)) if b is None else [b]:
            self.length[i] = self.start[i] = 0

    def bytes_in_use(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
