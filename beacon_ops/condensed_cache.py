"""CondensedKVCache: the preallocated, in-place condensed KV cache of Activation Beacon.

Per layer and sequence the cache holds ``[memory | raw of the current window | beacons of the
current window]`` from slot 0 (the contract of README.md); after every full window,
:meth:`CondensedKVCache.compact` turns the window's beacons into memory and drops its raw
tokens, in place, for all layers at once (``docs/activation-beacon.md``, sections 4-5). One K and one V tensor hold every
layer; nothing is reallocated while a sequence is read.

A step of the model::

    plan = cache.begin_step(num_raw)          # lengths, positions, beacons of completing windows
    for layer in range(num_layers):
        cache.rotate_queries(q, plan)         # q: [total, heads, head_dim], raw then beacons
        cache.append(layer, k, v, plan)       # k rotated on the way
        out, lse = cache.attention(layer, q, plan)
    cache.compact()                           # sequences whose window is full

Lengths live twice: int32 tensors on the cache's device (read by the kernels) and host lists
(``host_*``) that this class uses to validate every call before a kernel runs, so the CUDA
kernels never synchronise to read lengths and a rejected call changes nothing.
"""
from __future__ import annotations

import operator
from typing import Sequence

import torch
from torch import Tensor

from .attention import beacon_attention
from .cache_ops import append_kv, compact_, rope_
from .huge_pages import zeros_huge
from .kv_cache import StepPlan, check_ratio, interleaved_beacon_slots, memory_entries
from .memory_reading import beacons_see_memory, dense_attention
from .positions import check_mask_kind, default_inv_freq, rope_tables, slot_position, step_positions
from .variants import check_cache_layout

__all__ = ["RATIOS", "adapt_ratio", "StepPlan", "CondensedKVCache"]

RATIOS: tuple[int, ...] = (0, 2, 4, 8, 16, 32, 64, 128)
"""The condensing ratios of adapt-N (``docs/activation-beacon.md``, section 6); 0 means no beacons."""

_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def adapt_ratio(total_len: int, max_pos: int, window: int, n: int = 1024,
                ratios: Sequence[int] = RATIOS) -> int:
    """Condensing ratio chosen by adapt-N (``docs/activation-beacon.md``, section 6).

    ``total_len`` is the number of input tokens known when the sequence's first window fills
    (the whole prompt at prefill) and ``n`` the allowance for generation. Returns the smallest
    ``r`` in ``ratios`` with ``maxlen(r) >= total_len + n``, where
    ``maxlen(r) = (max_pos - window) * r + window`` and ``maxlen(0) = max_pos``; the largest
    ratio when none suffices. ``max_pos`` is the model's trained context (multiply it by a RoPE
    scaling factor first if the model has one, as the newer official code does).
    Example (Llama-2, max_pos 4096, window 1024): up to 3072 tokens 0, up to 6144 2, ..., up to
    196608 64, beyond 128.
    """
    if window < 1 or max_pos <= window:
        raise ValueError(f"adapt_ratio: need 1 <= window < max_pos, got window={window}, max_pos={max_pos}")
    if total_len < 0 or n < 0:
        raise ValueError(f"adapt_ratio: total_len and n must be >= 0, got {total_len} and {n}")
    if not ratios or any(r < 0 for r in ratios):
        raise ValueError(f"adapt_ratio: ratios must be a non-empty list of ratios >= 0, got {ratios!r}")
    need = total_len + n
    for r in sorted(ratios):
        maxlen = max_pos if r == 0 else (max_pos - window) * r + window
        if maxlen >= need:
            return r
    return max(ratios)


class CondensedKVCache:
    """Preallocated K/V cache ``[layers, batch, kv_heads, capacity, head_dim]`` with per-sequence
    ``[memory | raw | beacons]`` regions and in-place compaction (see the module docstring).

    Args:
        num_layers, batch_size, num_kv_heads, head_dim, capacity: the cache's shape; capacity
            is in slots per sequence and layer (see :meth:`capacity_for`).
        window: raw tokens per window ``W``.
        stride: new raw tokens per window after the first, ``S`` (default ``W``); ``W - S`` raw
            tokens are carried from a window to the next.
        mode: the mask kind of the attention op (:data:`~beacon_ops.positions.MASK_KINDS`: a mode
            of the original variant, or ``causal`` / ``step-causal``, see :mod:`beacon_ops.variants`).
        attend_previous: whether beacons see the memory (passed to the attention op).
        dtype: float32, float16 or bfloat16.
        device: where the cache, the length tensors and the RoPE tables live.
        inv_freq: RoPE inverse frequencies ``[head_dim / 2]`` carrying any scaling (default:
            Llama's ``10000 ** (-2i / head_dim)``).
        rope_interleaved: pair layout of RoPE (False: rotate-half, True: interleaved/GGUF).
        placement: ``"append"`` (a full window's beacons follow its raw tokens) or
            ``"interleave"`` (the newer variant, mask kind ``causal``: one beacon after every
            ``r`` raw tokens, also before the window is full; see below).
        sink_size: the newer variant's sink: the first ``sink_size`` entries of each sequence's
            first window stay in front of its memory (``stride == window``).
        sink_recapture: the newer reference implementation's sink (``sink_size=1``), which its
            released models were trained with: until the first window is condensed, every step
            after the first sees a sink in front of the window (positions shifted by one), the
            previous step's first entry, and the sink kept is the first entry of the step that
            completes the first window (with ratio 0 it stays in front of that window too).

    With interleaved beacons a window's entries (raw tokens and the beacons among them) sit in
    order after the memory, every key at the position of its slot; the ops see them all as raw
    keys (``raw_len`` = entries, ``beacon_len`` = 0), which the ``causal`` mask makes exact. The
    plan of a step lists where its beacons go (``StepPlan.beacon_slots``). Compaction of
    interleaved windows, and the first compaction of a sequence with a sink, gather the kept
    keys with tensor indexing and rotate them with ``rope_``; the others use ``compact_``.

    Each sequence starts with ratio 0 (no beacons): set it with :meth:`set_ratio` (e.g. from
    :func:`adapt_ratio`) before its window completes; it is kept for later windows until
    changed or :meth:`reset`.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, capacity: int, *,
                 window: int, stride: int | None = None, mode: str = "step-expansion",
                 attend_previous: bool = True, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", inv_freq: Tensor | None = None,
                 rope_interleaved: bool = False, placement: str = "append", sink_size: int = 0,
                 sink_recapture: bool = False) -> None:
        for name, value, low in (("num_layers", num_layers, 1), ("batch_size", batch_size, 1),
                                 ("num_kv_heads", num_kv_heads, 1), ("head_dim", head_dim, 2),
                                 ("capacity", capacity, 1), ("window", window, 1)):
            if int(value) != value or value < low:
                raise ValueError(f"CondensedKVCache: {name} must be an integer >= {low}, got {value!r}")
        if head_dim % 2:
            raise ValueError(f"CondensedKVCache: head_dim must be even for RoPE, got {head_dim}")
        stride = window if stride is None else stride
        if not 1 <= stride <= window:
            raise ValueError(f"CondensedKVCache: stride must be in [1, window={window}], got {stride}")
        if dtype not in _CACHE_DTYPES:
            raise TypeError(f"CondensedKVCache: dtype must be one of {_CACHE_DTYPES}, got {dtype}")
        check_cache_layout(placement, mode, sink_size, sink_recapture, window, "CondensedKVCache: ")
        if (placement == "interleave" or sink_size) and stride != window:
            raise ValueError(f"CondensedKVCache: stride={stride} must equal window={window} with interleaved "
                             "beacons or a sink")
        self.num_layers, self.batch_size = int(num_layers), int(batch_size)
        self.num_kv_heads, self.head_dim, self.capacity = int(num_kv_heads), int(head_dim), int(capacity)
        self.window, self.stride = int(window), int(stride)
        self.mode = check_mask_kind(mode)
        self.attend_previous = bool(attend_previous)
        self.rope_interleaved = bool(rope_interleaved)
        self.placement, self.sink_size = placement, int(sink_size)
        self.sink_recapture = bool(sink_recapture) and self.sink_size > 0
        self.device = torch.device(device)
        self.dtype = dtype

        shape = (self.num_layers, self.batch_size, self.num_kv_heads, self.capacity, self.head_dim)
        # Zeros, not empty: a slot never written holds no NaN that a bug could leak. On huge pages
        # (CPU): a decode step streams them (huge_pages.py).
        self.k = zeros_huge(shape, dtype=dtype, device=self.device)
        self.v = zeros_huge(shape, dtype=dtype, device=self.device)

        if inv_freq is None:
            inv_freq = default_inv_freq(head_dim)
        if inv_freq.dim() != 1 or inv_freq.numel() != head_dim // 2:
            raise ValueError(f"CondensedKVCache: inv_freq must have shape [head_dim / 2 = {head_dim // 2}], "
                             f"got {tuple(inv_freq.shape)}")
        # The largest position used is about memory + window (a beacon at M + W); compaction
        # rotates by differences up to W.
        self.cos, self.sin = rope_tables(inv_freq.to(self.device), self.capacity + self.window + 1)
        self._neg_sin: Tensor | None = None  # -sin: rotation by a negative difference (python compaction)

        zeros = lambda: torch.zeros(self.batch_size, dtype=torch.int32, device=self.device)  # noqa: E731
        self.mem_len, self.raw_len, self.beacon_len, self.ratio = zeros(), zeros(), zeros(), zeros()
        self.host_mem_len = [0] * self.batch_size
        self.host_raw_len = [0] * self.batch_size
        self.host_beacon_len = [0] * self.batch_size
        self.host_ratio = [0] * self.batch_size
        self.host_inner_beacons = [0] * self.batch_size  # interleaved beacons among the window's entries
        self._ratio_set = [False] * self.batch_size
        # sink_recapture: a sink slot in front of a first window not yet condensed, and the window
        # entry index of each sequence's latest step's first entry
        self._provisional_sink = [False] * self.batch_size
        self._step_first = [0] * self.batch_size
        self._plan: StepPlan | None = None

    # --- per-sequence state ------------------------------------------------------------------
    def _check_seq(self, b: int) -> int:
        try:
            b = operator.index(b)
        except TypeError:
            raise TypeError(f"sequence index b must be an integer, got {b!r}") from None
        if not 0 <= b < self.batch_size:
            raise IndexError(f"sequence index b={b} is outside [0, batch_size={self.batch_size})")
        return b

    def _sync_lengths(self) -> None:
        """Copy the host shadows to the device length tensors."""
        entries = [r + i for r, i in zip(self.host_raw_len, self.host_inner_beacons)]
        for dev, host in ((self.mem_len, self.host_mem_len), (self.raw_len, entries),
                          (self.beacon_len, self.host_beacon_len), (self.ratio, self.host_ratio)):
            dev.copy_(torch.tensor(host, dtype=torch.int32))

    def room(self, b: int) -> int:
        """Raw tokens sequence ``b``'s current window still takes (0 once full: compact first)."""
        return self.window - self.host_raw_len[self._check_seq(b)]

    def set_ratio(self, b: int, r: int) -> None:
        """Set the condensing ratio of sequence ``b``'s current window (and later ones).

        ``r`` must be 0 or a divisor of the stride; the window must not be full yet.
        """
        b = self._check_seq(b)
        try:
            r = operator.index(r)
        except TypeError:
            raise TypeError(f"set_ratio: r must be an integer, got {r!r}") from None
        check_ratio(r, self.stride, "set_ratio: r")
        if self.host_raw_len[b] == self.window:
            raise ValueError(f"set_ratio: sequence {b}'s window is already full; set the ratio before the "
                             "step that completes it (or after compact())")
        if self.placement == "interleave" and self.host_raw_len[b] > 0 and r != self.host_ratio[b]:
            raise ValueError(f"set_ratio: sequence {b}'s window already holds tokens; with interleaved beacons "
                             "the ratio is set at the start of a window")
        self.host_ratio[b] = r
        self.ratio[b] = r
        self._ratio_set[b] = True

    def has_ratio(self, b: int) -> bool:
        """Whether :meth:`set_ratio` was called for sequence ``b`` since it was last reset."""
        return self._ratio_set[self._check_seq(b)]

    def max_position(self) -> int:
        """The highest RoPE position of a memory or raw key (memory slot i has position i)."""
        return max(m + r + i - 1 for m, r, i in zip(self.host_mem_len, self.host_raw_len, self.host_inner_beacons))

    def reset(self, b: int | None = None) -> None:
        """Empty sequence ``b`` (every sequence when None): lengths and ratio back to 0.

        The slots are not cleared (they are never read beyond the lengths).
        """
        seqs = range(self.batch_size) if b is None else [self._check_seq(b)]
        for s in seqs:
            self.host_mem_len[s] = self.host_raw_len[s] = self.host_beacon_len[s] = self.host_ratio[s] = 0
            self.host_inner_beacons[s] = 0
            self._ratio_set[s] = self._provisional_sink[s] = False
        self._sync_lengths()
        self._plan = None

    # --- a step --------------------------------------------------------------------------------
    def begin_step(self, num_raw: Sequence[int]) -> StepPlan:
        """Count a step's new raw tokens (``num_raw[b]``, 0 allowed) into the lengths.

        A sequence whose window this step fills (``raw_len == window``) with ratio ``r > 0``
        also gets ``beacon_len = stride // r`` beacons, which the caller appends after its raw
        tokens (queries and keys: raw tokens, then beacons, per sequence). Raises before changing
        anything when a sequence gets more tokens than its window's :meth:`room` or the cache's
        capacity would be exceeded.
        """
        if len(num_raw) != self.batch_size:
            raise ValueError(f"begin_step: num_raw must have batch_size={self.batch_size} entries, got "
                             f"{len(num_raw)}")
        raws: list[int] = []
        beacons: list[int] = []
        completes: list[bool] = []
        slots: list[list[int]] = []
        for b, n in enumerate(num_raw):
            try:
                n = operator.index(n)  # an integer: 1.5 tokens is a mistake, not 1
            except TypeError:
                raise TypeError(f"begin_step: num_raw[{b}] must be an integer, got {n!r}") from None
            if n < 0:
                raise ValueError(f"begin_step: num_raw[{b}]={n} must be >= 0")
            if self.host_beacon_len[b] > 0:
                raise ValueError(f"begin_step: sequence {b}'s window is full with its beacons appended: call "
                                 "compact() first")
            room = self.room(b)
            if n > room:
                hint = " (the window is full: call compact() first)" if room == 0 else ""
                raise ValueError(f"begin_step: num_raw[{b}]={n} exceeds the room of sequence {b}'s window, "
                                 f"{room}{hint}")
            new_raw = self.host_raw_len[b] + n
            done = n > 0 and new_raw == self.window
            r = self.host_ratio[b]
            if self.placement == "interleave":
                slots.append(interleaved_beacon_slots(self.host_raw_len[b], n, r))
                nb = len(slots[-1])
            else:
                nb = self.stride // r if done and r > 0 else 0
                slots.append(list(range(n, n + nb)))
            need = (self.host_mem_len[b] + new_raw + self.host_inner_beacons[b] + self.host_beacon_len[b] + nb
                    + self._sink_slot_due(b, n))
            if need > self.capacity:
                raise ValueError(f"begin_step: capacity {self.capacity} is too small: sequence {b} needs {need} "
                                 "slots (see CondensedKVCache.capacity_for)")
            raws.append(n)
            beacons.append(nb)
            completes.append(done)
        # Everything is computed from the prospective lengths first; the shadows and the device
        # tensors change only once nothing can raise any more.
        for b, n in enumerate(raws):
            if n and self._recapturing(b):
                entries = self.host_raw_len[b] + self.host_inner_beacons[b]
                if self._sink_slot_due(b, n):  # the first window's second step: room for the sink
                    self._relocate(b, list(range(entries)), list(range(entries)), [1 + i for i in range(entries)])
                    self.host_mem_len[b], self._provisional_sink[b] = 1, True
                if self._provisional_sink[b]:  # the sink: the previous step's first entry
                    self._relocate(b, [1 + self._step_first[b]], [1 + self._step_first[b]], [0])
                self._step_first[b] = entries
        raw_after = [r + n for r, n in zip(self.host_raw_len, raws)]
        num_new = [n + nb for n, nb in zip(raws, beacons)]
        cu = [0]
        for n in num_new:
            cu.append(cu[-1] + n)
        if self.placement == "interleave":
            # every entry at the position of its slot: the ops see the window's entries as raw keys
            inner_after = [i + nb for i, nb in zip(self.host_inner_beacons, beacons)]
            beacon_after = list(self.host_beacon_len)
            pos: list[int] = []
            for m, r_len, i_len, n in zip(self.host_mem_len, raw_after, inner_after, num_new):
                pos.extend(range(m + r_len + i_len - n, m + r_len + i_len))
            positions = torch.tensor(pos, dtype=torch.int32, device=self.device)
        else:
            inner_after = list(self.host_inner_beacons)
            beacon_after = [b_len + nb for b_len, nb in zip(self.host_beacon_len, beacons)]
            positions = step_positions(self.host_mem_len, raw_after, beacon_after, self.host_ratio, num_new,
                                       self.window, self.mode, device=self.device)
        cu_seqlens = torch.tensor(cu, dtype=torch.int32, device=self.device)
        self.host_raw_len[:] = raw_after
        self.host_beacon_len[:] = beacon_after
        self.host_inner_beacons[:] = inner_after
        self._sync_lengths()
        self._plan = StepPlan(
            cu_seqlens=cu_seqlens,
            num_raw=raws, num_beacons=beacons, num_new=num_new, completes_window=completes,
            max_seqlen_q=max(num_new, default=0), positions=positions, beacon_slots=slots)
        return self._plan

    def _check_plan(self, plan: StepPlan, x: Tensor, name: str, heads: int | None) -> None:
        if plan is not self._plan:
            raise ValueError("plan: not the plan of the current step (begin_step was called again, or "
                             "compact()/reset() ran since)")
        total = plan.positions.numel()
        if x.dim() != 3 or x.shape[0] != total or x.shape[2] != self.head_dim or (
                heads is not None and x.shape[1] != heads):
            want = f"[{total}, {heads if heads is not None else 'heads'}, {self.head_dim}]"
            raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
        if x.device != self.device:
            raise ValueError(f"{name} must be on the cache's device {self.device}, got {x.device}")

    def rotate_queries(self, q: Tensor, plan: StepPlan) -> Tensor:
        """Rotate the step's queries ``[total, heads, head_dim]`` in place at ``plan.positions``;
        returns ``q``."""
        self._check_plan(plan, q, "q", None)
        rope_(q, plan.positions, self.cos, self.sin, self.rope_interleaved)
        return q

    def append(self, layer: int, k_new: Tensor, v_new: Tensor, plan: StepPlan) -> None:
        """Write the step's keys (rotated on the way) and values ``[total, kv_heads, head_dim]``
        into layer ``layer``, each sequence's tokens in its last ``num_new`` slots."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer={layer} is outside [0, num_layers={self.num_layers})")
        self._check_plan(plan, k_new, "k_new", self.num_kv_heads)
        self._check_plan(plan, v_new, "v_new", self.num_kv_heads)
        for name, x in (("k_new", k_new), ("v_new", v_new)):
            if x.dtype != self.dtype:
                raise TypeError(f"{name} must have the cache dtype {self.dtype}, got {x.dtype}")
        append_kv(self.k[layer], self.v[layer], k_new, v_new, plan.cu_seqlens, self.mem_len, self.raw_len,
                  self.beacon_len, plan.positions, self.cos, self.sin, self.rope_interleaved)

    def attention(self, layer: int, q: Tensor, plan: StepPlan,
                  softmax_scale: float | None = None) -> tuple[Tensor, Tensor]:
        """Beacon attention of the step's (rotated) queries over layer ``layer``: ``(out, lse)``."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer={layer} is outside [0, num_layers={self.num_layers})")
        self._check_plan(plan, q, "q", None)
        return beacon_attention(q, self.k[layer], self.v[layer], plan.cu_seqlens, self.mem_len, self.raw_len,
                                self.beacon_len, self.ratio, max_seqlen_q=plan.max_seqlen_q, mode=self.mode,
                                attend_previous=self.attend_previous, softmax_scale=softmax_scale)

    def attention_parts(self, layer: int, q: Tensor, q_memory: Tensor, plan: StepPlan,
                        softmax_scale: float | None = None
                        ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]] | None:
        """The step's attention split at the memory boundary (:mod:`beacon_ops.memory_reading`):
        ``((out, lse) over each window, (out, lse) over each memory)``, the window read with the
        rotated ``q``, the memory with ``q_memory`` (same shape, *not yet rotated*: rotated here).
        ``lse`` is fp32 with ``-inf`` for a row that sees no key of that part. None when no
        sequence has memory (then :meth:`attention` is the whole story)."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer={layer} is outside [0, num_layers={self.num_layers})")
        self._check_plan(plan, q, "q", None)
        self._check_plan(plan, q_memory, "q_memory", q.shape[1])
        if not any(self.host_mem_len):
            return None
        q_memory = self.rotate_queries(q_memory.to(q.dtype).contiguous(), plan)
        scale = softmax_scale if softmax_scale and softmax_scale > 0 else self.head_dim ** -0.5
        see = beacons_see_memory(self.mode, self.attend_previous)  # interleaved beacons: causal kinds
        cu = plan.cu_seqlens.tolist()
        win_out, win_lse, mem_out, mem_lse = [], [], [], []
        same_m = len(set(self.host_mem_len)) == 1
        for b in ([None] if same_m else range(self.batch_size)):
            m = self.host_mem_len[0 if b is None else b]
            rows = slice(None) if b is None else slice(cu[b], cu[b + 1])
            seqs = slice(None) if b is None else slice(b, b + 1)
            cu_b = plan.cu_seqlens if b is None else plan.cu_seqlens[b:b + 2] - cu[b]
            o, lse = beacon_attention(q[rows], self.k[layer][seqs, :, m:], self.v[layer][seqs, :, m:], cu_b,
                                      torch.zeros_like(self.mem_len[seqs]), self.raw_len[seqs],
                                      self.beacon_len[seqs], self.ratio[seqs], max_seqlen_q=plan.max_seqlen_q,
                                      mode=self.mode, attend_previous=self.attend_previous,
                                      softmax_scale=softmax_scale)
            win_out.append(o)
            win_lse.append(torch.where(torch.isinf(lse), float("-inf"), lse))  # the op: +inf = saw nothing
        for b in range(self.batch_size):
            m, qm = self.host_mem_len[b], q_memory[cu[b]:cu[b + 1]]
            visible = None  # every row sees the memory, unless the mask kind hides it from beacons
            if not see and plan.num_beacons[b]:
                visible = torch.ones(len(qm), m, dtype=torch.bool, device=self.device)
                visible[len(qm) - plan.num_beacons[b]:] = False
            o, lse = dense_attention(qm, self.k[layer][b, :, :m], self.v[layer][b, :, :m], scale, visible)
            mem_out.append(o)
            mem_lse.append(lse)
        return ((torch.cat(win_out), torch.cat(win_lse)), (torch.cat(mem_out), torch.cat(mem_lse)))

    def compact(self) -> None:
        """Compact every sequence whose window is full, all layers at once; no-op otherwise."""
        full = [b for b in range(self.batch_size) if self.host_raw_len[b] == self.window]
        if not full:
            return
        for b in full:
            r = self.host_ratio[b]
            want = self.stride // r if r > 0 else 0
            if self.host_beacon_len[b] + self.host_inner_beacons[b] != want:
                raise ValueError(f"compact: sequence {b} has a full window with ratio {r} and beacon_len "
                                 f"{self.host_beacon_len[b]}, expected {want} (its beacons were not counted "
                                 "by begin_step)")
        gathered = [b for b in full if self.placement == "interleave" or self._recapturing(b) or (
            self.sink_size and self.host_mem_len[b] == 0 and self.host_ratio[b] > 0)]
        for b in gathered:
            self._compact_by_gather(b)
        if gathered:
            self._sync_lengths()
        if len(gathered) < len(full):
            compact_(self.k, self.v, self.mem_len, self.raw_len, self.beacon_len, self.ratio, self.cos, self.sin,
                     window=self.window, stride=self.stride, mode=self.mode, interleaved=self.rope_interleaved)
        for b in full:
            if b in gathered:
                continue
            r = self.host_ratio[b]
            self.host_mem_len[b] += self.stride // r if r > 0 else self.stride
            self.host_raw_len[b] = self.window - self.stride
            self.host_beacon_len[b] = 0
        self._plan = None

    def _recapturing(self, b: int) -> bool:
        """Whether sequence ``b`` re-takes its sink (``sink_recapture``, first window not condensed)."""
        return self.sink_recapture and (self._provisional_sink[b] or self.host_mem_len[b] == 0)

    def _sink_slot_due(self, b: int, n: int) -> bool:
        """Whether a step of ``n`` raw tokens opens the sink slot in front of ``b``'s first window."""
        return (self.sink_recapture and n > 0 and self.host_mem_len[b] == 0
                and self.host_raw_len[b] + self.host_inner_beacons[b] > 0)

    def _relocate(self, b: int, src: list[int], old: list[int], dst: list[int]) -> None:
        """Copy sequence ``b``'s entries from slots ``src`` (keys at positions ``old``) to slots
        ``dst`` (at positions ``dst``), all layers; every source is read before any write."""
        n = len(src)
        src_t = torch.tensor(src, device=self.device)
        dst_t = torch.tensor(dst, device=self.device)
        keys = self.k[:, b][:, :, src_t]                               # [layers, kv_heads, n, head_dim]
        keys = keys.permute(2, 0, 1, 3).reshape(n, -1, self.head_dim).contiguous()
        delta = [d - o for d, o in zip(dst, old)]
        for sign in (1, -1):
            rows = [i for i, d in enumerate(delta) if d * sign > 0]
            if not rows:
                continue
            if sign < 0 and self._neg_sin is None:
                self._neg_sin = -self.sin
            part = keys[rows].contiguous()
            rope_(part, torch.tensor([abs(delta[i]) for i in rows], dtype=torch.int32, device=self.device),
                  self.cos, self.sin if sign > 0 else self._neg_sin, self.rope_interleaved)
            keys[rows] = part
        keys = keys.reshape(n, self.num_layers, self.num_kv_heads, self.head_dim).permute(1, 2, 0, 3)
        values = self.v[:, b][:, :, src_t]
        self.k[:, b, :, dst_t] = keys
        self.v[:, b, :, dst_t] = values

    def _compact_by_gather(self, b: int) -> None:
        """Compaction of sequence ``b``'s full window (stride == window) where ``compact_`` does not
        apply: interleaved beacons, or a sink kept in front of the first window's beacons.

        The sink entries (the window's first ``sink_size``, first window only) stay where they
        are; beacon ``j`` moves to the memory slot after them, its key rotated by (new - old)
        position; the raw entries are dropped. With ``r = 0`` the memory absorbs the window.
        With ``sink_recapture`` the sink is the completing step's first entry (section 9)."""
        M, W, r = self.host_mem_len[b], self.window, self.host_ratio[b]
        recapture = self._recapturing(b)  # M is 0 or the sink slot (1); the window starts at M
        entries = memory_entries(W, r, self.placement, sink_size=self.sink_size if M == 0 else 0,
                                 recaptured=self._step_first[b] if recapture else None)
        src = [M + e for e in entries]
        # every interleaved entry sits at the position of its slot
        old = src if self.placement == "interleave" else [slot_position(s, M, W, r, W, self.mode) for s in src]
        start = 0 if recapture else M  # a provisional sink slot is re-filled
        dst = [start + i for i in range(len(src))]
        if src != dst:
            self._relocate(b, src, old, dst)
        self.host_mem_len[b] = start + len(dst)
        self.host_raw_len[b] = self.host_beacon_len[b] = self.host_inner_beacons[b] = 0
        self._provisional_sink[b] = False

    # --- sizes -------------------------------------------------------------------------------------
    def slots_in_use(self, b: int) -> int:
        """Slots sequence ``b`` occupies per layer and head: memory + raw + beacons."""
        b = self._check_seq(b)
        return self.host_mem_len[b] + self.host_raw_len[b] + self.host_inner_beacons[b] + self.host_beacon_len[b]

    def bytes_in_use(self) -> int:
        """Bytes of K and V holding live entries (all layers, heads and sequences)."""
        per_slot = 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.k.element_size()
        return per_slot * sum(self.slots_in_use(b) for b in range(self.batch_size))

    def bytes_allocated(self) -> int:
        """Bytes of the preallocated K and V tensors."""
        return 2 * self.k.numel() * self.k.element_size()

    @staticmethod
    def capacity_for(length: int, window: int, stride: int | None = None, ratio: int = 0,
                     extra_tokens: int = 0, *, sink_size: int = 0, placement: str = "append",
                     sink_recapture: bool = False) -> int:
        """Slots per sequence needed to read ``length + extra_tokens`` tokens, exactly.

        ``extra_tokens`` are tokens that follow the input (e.g. the generation budget); they pass
        through the same windows. Assumes :meth:`CondensedKVCache.compact` runs after every step
        that fills a window; the step schedule does not matter. The peak is either just before a
        compaction (memory of the earlier windows + ``W`` raw + ``S / r`` beacons) or at the end
        (memory + the raw tokens of the trailing window, and its beacons when interleaved). A sink
        (``sink_size``) joins the memory at the first compaction; with ``sink_recapture`` it takes
        its slot from the first window's second step on, whatever the ratio.
        """
        stride = window if stride is None else stride
        if window < 1 or not 1 <= stride <= window:
            raise ValueError(f"capacity_for: need 1 <= stride <= window, got window={window}, stride={stride}")
        check_ratio(ratio, stride, "capacity_for: ratio")
        if length < 0 or extra_tokens < 0:
            raise ValueError(f"capacity_for: length and extra_tokens must be >= 0, got {length}, {extra_tokens}")
        total = length + extra_tokens
        inner = (lambda n: n // ratio) if placement == "interleave" and ratio > 0 else (lambda n: 0)
        recapture = sink_recapture and sink_size > 0
        if total < window:
            return total + inner(total) + (sink_size if recapture else 0)
        num_full = 1 + (total - window) // stride
        beacons = stride // ratio if ratio > 0 else 0
        growth = beacons if ratio > 0 else stride  # memory added per window
        sink = sink_size if ratio > 0 or recapture else 0
        before_last_compaction = (num_full - 1) * growth + (sink if num_full > 1 or recapture else 0) + window + beacons
        tail = total - num_full * stride
        at_end = num_full * growth + sink + tail + inner(tail)
        return max(before_last_compaction, at_end)
