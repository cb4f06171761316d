"""TrainingKVCache: a differentiable, out-of-place KV cache for beacon training.

The inference caches write K/V in place, so no gradient flows from one window to the next.
Training needs the memory *not* detached (``docs/activation-beacon.md``, section 7): the loss of
window ``w`` sends gradients into the beacons of every earlier window. This cache implements
:class:`~beacon_ops.kv_cache.KVCache` with new tensors at every step (``torch.cat``), so
:meth:`beacon_ops.llama.Llama.step` runs unchanged and autograd sees the whole read.

Scheme: keys are rotated once, at the positions of :func:`~beacon_ops.positions.step_positions`
(raw token ``t`` at ``M + t``, beacon ``j`` at the mode's beacon position; with interleaved
beacons every entry of the window at ``M`` + its index, as in the condensed cache). Memory slot
``i`` always has position ``i``, so when a window is compacted the *pre-RoPE* keys of the
entries it keeps (:func:`~beacon_ops.kv_cache.memory_entries`: the sink on the first
compaction, then the beacons, or the raw tokens with ratio 0) are rotated at ``M, M + 1, ...``
and appended to the memory; nothing in the memory is ever rotated again. This equals the
inference cache's "rotate by the position difference" up to fp32 rounding (rotations compose).

One sequence (batch 1), stride = window. A step reads a whole window, or (appended beacons, no
``sink_recapture``) part of one: the raw tokens read so far wait in the cache, rotated, until the
step that completes the window (so the first window's raw tokens, which depend on no trainable
parameter, can be read without autograd and only its last token and beacons with it). The ratio
of each full window (of every window, with interleaved beacons, which partial windows get too)
is set with :meth:`TrainingKVCache.set_ratio` before its first step and holds for that window
only. The last window's appended beacons are skipped (nothing reads them); its interleaved ones
are read by the raw tokens after them. Ratio 0 on a full window keeps its raw keys as memory
(the base model). With ``sink_recapture`` a window is read in one step, so it only changes a
first window condensed with ratio 0: its first entry stays in front of it. Every layer operation
reads its inputs from the step's plan, never from the cache's current state, so a layer can be
recomputed by gradient checkpointing after the cache has moved on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .attention import beacon_attention
from .kv_cache import StepPlan, check_ratio, interleaved_beacon_slots, memory_entries
from .masks import step_mask
from .memory_reading import beacons_see_memory, dense_attention
from .positions import check_mask_kind, rotate, step_positions
from .variants import check_cache_layout

__all__ = ["TrainingKVCache", "TrainingStepPlan", "has_attention_backward"]


def has_attention_backward(device: torch.device | str) -> bool:
    """Whether ``beacon::attention_backward`` has a kernel for ``device``'s type."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "beacon::attention_backward", key)


@dataclass
class TrainingStepPlan(StepPlan):
    """A step of :class:`TrainingKVCache`: one window, with the memory it reads."""

    mem_len: int = 0
    raw_len: int = 0                        # keys the op sees as raw (interleaved: the window's entries)
    beacon_len: int = 0                     # keys the op sees as beacons (appended beacons)
    ratio: int = 0
    memory: list[int] = field(default_factory=list)  # the step's entries that join the memory
    mem_k: list[Tensor] = field(default_factory=list)  # per layer [kv_heads, M, head_dim]
    mem_v: list[Tensor] = field(default_factory=list)
    pending: list[tuple[Tensor, ...]] = field(default_factory=list)  # the window's earlier raw tokens
    mask: Tensor | None = None              # [R + B, M + R + B] for the masked backend
    new: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = field(default_factory=dict)
    """Per layer: the step's pre-RoPE keys and values, and the layer's whole keys and values."""


class TrainingKVCache:
    """Out-of-place K/V of one sequence, window by window (see the module docstring).

    Args:
        num_layers, num_kv_heads, head_dim: the model's shape.
        length: tokens of the sequence (the last window's beacons are skipped).
        window: raw tokens per window ``W`` (= stride).
        mode, attend_previous: the beacon attention settings (the op's mask kind).
        placement, sink_size, sink_recapture: as in
            :class:`~beacon_ops.condensed_cache.CondensedKVCache` (interleaved beacons need the
            ``causal`` mask kind).
        inv_freq: RoPE inverse frequencies ``[head_dim / 2]``; ``rope_interleaved``: pair layout.
        attention: ``"op"`` (``beacon_attention``, mask in the kernel) or ``"masked"`` (PyTorch
            ``scaled_dot_product_attention`` with :func:`~beacon_ops.masks.step_mask`).
        dtype, device: of the (initially empty) memory.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, length: int, *,
                 window: int, mode: str = "step-expansion", attend_previous: bool = True,
                 inv_freq: Tensor, rope_interleaved: bool = False, attention: str = "op",
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 placement: str = "append", sink_size: int = 0, sink_recapture: bool = False) -> None:
        if attention not in ("op", "masked"):
            raise ValueError(f"attention must be 'op' or 'masked', got {attention!r}")
        if window < 1 or length < 1:
            raise ValueError(f"window and length must be >= 1, got {window} and {length}")
        check_cache_layout(placement, mode, sink_size, sink_recapture, window)
        self.placement, self.sink_size = placement, int(sink_size)
        self.sink_recapture = bool(sink_recapture) and self.sink_size > 0
        self.num_layers, self.length, self.window = num_layers, length, window
        self.mode, self.attend_previous = check_mask_kind(mode), attend_previous
        self.inv_freq, self.rope_interleaved = inv_freq, rope_interleaved
        self.backend, self.device = attention, torch.device(device)
        empty = torch.zeros(num_kv_heads, 0, head_dim, device=self.device, dtype=dtype)
        self.mem_k = [empty] * num_layers
        self.mem_v = [empty] * num_layers
        self.mem_len = 0
        self.seen = 0                 # raw tokens read so far
        # per layer (pre-RoPE k, v [P, kv_heads, head_dim], rotated keys, values [kv_heads, P,
        # head_dim]) of the current window's P raw tokens read by earlier steps
        self.pending: list[tuple[Tensor, ...]] = []
        self.num_pending = 0
        self.ratio: int | None = None  # the current window's ratio (None: not set)
        self._plan: TrainingStepPlan | None = None

    # --- state (for window checkpointing: a window recomputed from the state it started from) ---
    def state(self) -> tuple[dict[str, Any], list[Tensor]]:
        """``(host state, memory tensors)`` of the cache between two steps."""
        return ({"mem_len": self.mem_len, "seen": self.seen, "ratio": self.ratio, "pending": self.pending,
                 "num_pending": self.num_pending}, self.mem_k + self.mem_v)

    def load_state(self, host: dict[str, Any], memory: Sequence[Tensor]) -> None:
        """Return to a state of :meth:`state`."""
        n = self.num_layers
        self.mem_len, self.seen, self.ratio = host["mem_len"], host["seen"], host["ratio"]
        self.pending, self.num_pending = host["pending"], host["num_pending"]
        self.mem_k, self.mem_v = list(memory[:n]), list(memory[n:])
        self._plan = None

    # --- the KVCache protocol --------------------------------------------------------------------
    def room(self, b: int) -> int:
        return min(self.window - self.num_pending, self.length - self.seen)

    def memory_requires_grad(self) -> bool:
        """Whether anything a raw token of the next step reads (memory, pending raw tokens)
        carries gradients; when not, and beacons are appended, the window's raw tokens depend on
        no trainable parameter."""
        return any(t.requires_grad for t in self.mem_k + self.mem_v) or \
            any(t.requires_grad for entry in self.pending for t in entry)

    def can_split_window(self) -> bool:
        """Whether a window may be read in more than one step (appended beacons without
        ``sink_recapture``, whose first-entry rule assumes one step per window)."""
        return self.placement == "append" and not self.sink_recapture

    def has_ratio(self, b: int) -> bool:
        return self.ratio is not None

    def set_ratio(self, b: int, r: int) -> None:
        """The ratio of the next full (or, interleaved, any) window (0 = keep its raw keys); it must
        divide the window."""
        self.ratio = check_ratio(r, self.window)

    def begin_step(self, num_raw: Sequence[int]) -> TrainingStepPlan:
        (n,) = num_raw
        room = self.room(0)
        if not (1 <= n <= room if self.can_split_window() else n == room):
            whole = "1.." if self.can_split_window() else "whole windows: "
            raise ValueError(f"num_raw: a training step reads {whole}{room} tokens, got {n}")
        p_len = self.num_pending
        full = p_len + n == self.window
        interleave = self.placement == "interleave"
        if (full or interleave) and self.ratio is None:
            raise ValueError("set_ratio: the ratio of a full window (of every window, with interleaved beacons) "
                             "must be set before its step")
        r = self.ratio if full or interleave else 0
        last = self.seen + n >= self.length
        m = self.mem_len
        dev = self.device
        slots = None
        if interleave:  # every entry at the position of its slot, all raw keys to the causal mask
            slots = interleaved_beacon_slots(0, n, r)
            nb = len(slots)
            raw_len, beacon_len = n + nb, 0
            positions = torch.arange(m, m + n + nb, dtype=torch.int32, device=dev)
        else:
            nb = self.window // r if full and r and not last else 0  # nothing reads the last beacons
            raw_len, beacon_len = p_len + n, nb
            positions = step_positions([m], [raw_len], [nb], [r], [n + nb], self.window, self.mode, device=dev)
        memory: list[int] = []
        if full and not last:
            first = self.seen == p_len  # the sequence's first window
            memory = memory_entries(self.window, r, self.placement, sink_size=self.sink_size if first else 0,
                                    recaptured=0 if first and self.sink_recapture else None)
        mask = None
        if self.backend == "masked":
            mask = step_mask(m, raw_len, beacon_len, r, n + nb, self.mode, self.attend_previous, device=dev)
        self._plan = TrainingStepPlan(
            cu_seqlens=torch.tensor([0, n + nb], dtype=torch.int32, device=dev), num_raw=[n],
            num_beacons=[nb], num_new=[n + nb], completes_window=[full], max_seqlen_q=n + nb,
            positions=positions, beacon_slots=None if slots is None else [slots], mem_len=m, raw_len=raw_len,
            beacon_len=beacon_len, ratio=r, memory=memory, mem_k=self.mem_k, mem_v=self.mem_v,
            pending=self.pending, mask=mask)
        return self._plan

    def rotate_queries(self, q: Tensor, plan: StepPlan) -> Tensor:
        return rotate(q, plan.positions, self.inv_freq, self.rope_interleaved)

    def append(self, layer: int, k_new: Tensor, v_new: Tensor, plan: StepPlan) -> None:
        dt = v_new.dtype  # the attention op wants one dtype for q, k and v (autocast may differ)
        k_rot = rotate(k_new, plan.positions, self.inv_freq, self.rope_interleaved).to(dt)
        # [kv_heads, M + R + B, head_dim]: memory | raw (pending, then this step's) | beacons
        keys, vals = [plan.mem_k[layer].to(dt)], [plan.mem_v[layer].to(dt)]
        if plan.pending:
            keys.append(plan.pending[layer][2].to(dt))
            vals.append(plan.pending[layer][3].to(dt))
        keys = torch.cat([*keys, k_rot.transpose(0, 1)], dim=1)
        vals = torch.cat([*vals, v_new.transpose(0, 1)], dim=1)
        plan.new[layer] = (k_new, v_new, keys, vals)

    def attention(self, layer: int, q: Tensor, plan: StepPlan) -> tuple[Tensor, Tensor | None]:
        _, _, keys, vals = plan.new[layer]
        q = q.to(vals.dtype)
        if plan.mask is None:
            return self._op_attention(q, keys, vals, plan, plan.mem_len)
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], vals[None],
                                             attn_mask=plan.mask, enable_gqa=True)[0].transpose(0, 1)
        return out, None

    def _op_attention(self, q: Tensor, keys: Tensor, vals: Tensor, plan: TrainingStepPlan,
                      mem_len: int) -> tuple[Tensor, Tensor]:
        """``beacon_attention`` of the step's queries over ``keys`` / ``vals`` ``[kv_heads, mem_len
        + R + B, head_dim]`` with the plan's lengths."""
        def i32(x: int) -> Tensor:
            return torch.tensor([x], dtype=torch.int32, device=q.device)

        return beacon_attention(q.contiguous(), keys.unsqueeze(0), vals.unsqueeze(0), plan.cu_seqlens,
                                i32(mem_len), i32(plan.raw_len), i32(plan.beacon_len), i32(plan.ratio),
                                max_seqlen_q=q.shape[0], mode=self.mode, attend_previous=self.attend_previous)

    def attention_parts(self, layer: int, q: Tensor, q_memory: Tensor, plan: StepPlan
                        ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]] | None:
        """As :meth:`~beacon_ops.condensed_cache.CondensedKVCache.attention_parts`: ``((out, lse)
        over the window, (out, lse) over the memory)``, ``q_memory`` not yet rotated; None
        without memory."""
        m = plan.mem_len
        if m == 0:
            return None
        _, _, keys, vals = plan.new[layer]
        q = q.to(vals.dtype).contiguous()
        q_memory = self.rotate_queries(q_memory, plan).to(vals.dtype)
        scale = q.shape[-1] ** -0.5
        n = q.shape[0]
        if plan.mask is None:  # the op over the window's keys alone (the cache sliced at the memory)
            out_w, lse_w = self._op_attention(q, keys[:, m:], vals[:, m:], plan, 0)
            lse_w = torch.where(torch.isinf(lse_w), float("-inf"), lse_w)  # the op: +inf = saw nothing
            visible = None  # every row sees the memory, unless the mask kind hides it from beacons
            if not beacons_see_memory(self.mode, self.attend_previous) and plan.beacon_len:
                visible = torch.ones(n, m, dtype=torch.bool, device=q.device)
                visible[n - plan.beacon_len:] = False
        else:
            out_w, lse_w = dense_attention(q, keys[:, m:], vals[:, m:], scale, plan.mask[:, m:])
            out_w = out_w.to(q.dtype)
            visible = plan.mask[:, :m]
        if torch.is_grad_enabled():  # recomputed in the backward: a window would otherwise keep
            # [queries x memory] scores and probabilities of every layer until the loss
            out_m, lse_m = checkpoint(dense_attention, q_memory, keys[:, :m], vals[:, :m], scale, visible,
                                      use_reentrant=False)
        else:
            out_m, lse_m = dense_attention(q_memory, keys[:, :m], vals[:, :m], scale, visible)
        return (out_w, lse_w), (out_m, lse_m)

    def compact(self) -> None:
        """The entries the window keeps (sink, beacons or ratio-0 raw keys) join the memory, their
        keys rotated at their memory slots; a window not yet complete keeps its raw tokens pending."""
        p = self._plan
        if p is None:
            return
        n, m = p.num_raw[0], p.mem_len
        self.seen += n
        self._plan = None
        # new lists throughout: the plan (read again if a layer is recomputed) keeps the old state
        if not p.completes_window[0]:
            if self.seen < self.length:  # the window goes on in the next step
                # keys, vals: memory | the window's raw tokens so far
                self.pending = [(*self._window_entries(p, i), p.new[i][2][:, m:], p.new[i][3][:, m:])
                                for i in range(self.num_layers)]
                self.num_pending += n
            return
        self.mem_k, self.mem_v = list(self.mem_k), list(self.mem_v)
        if p.memory:
            pos = torch.arange(m, m + len(p.memory), dtype=torch.int32, device=self.device)
            for i in range(self.num_layers):
                k, v = self._window_entries(p, i)
                keys, vals = p.new[i][2:]
                mk = rotate(k[p.memory], pos, self.inv_freq, self.rope_interleaved).to(vals.dtype)
                self.mem_k[i] = torch.cat([keys[:, :m], mk.transpose(0, 1)], dim=1)
                self.mem_v[i] = torch.cat([vals[:, :m], v[p.memory].to(vals.dtype).transpose(0, 1)], dim=1)
        self.mem_len += len(p.memory)
        self.pending, self.num_pending = [], 0
        self.ratio = None

    @staticmethod
    def _window_entries(p: TrainingStepPlan, layer: int) -> tuple[Tensor, Tensor]:
        """Pre-RoPE ``(k, v)`` of the window's entries so far: its pending raw tokens, then the step's."""
        k, v = p.new[layer][:2]
        if p.pending:
            k, v = torch.cat([p.pending[layer][0].to(k.dtype), k]), torch.cat([p.pending[layer][1].to(v.dtype), v])
        return k, v

    def max_position(self) -> int:
        inner = self.window // self.ratio if self.placement == "interleave" and self.ratio else 0
        return self.mem_len + self.window + inner - 1

    def bytes_in_use(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.mem_k + self.mem_v)
