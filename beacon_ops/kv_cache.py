"""The interface between the model and its KV caches: :class:`KVCache` and :class:`StepPlan`.

:class:`~beacon_ops.llama.Llama` runs every step through an object of this protocol, whatever
the attention: the condensed beacon cache (:class:`~beacon_ops.CondensedKVCache`, in-place ops),
plain full or sliding-window attention (:class:`~beacon_ops.full_cache.FullKVCache`) and the
differentiable training cache (:class:`~beacon_ops.training_cache.TrainingKVCache`). The cache
owns each sequence's condensing ratio (``set_ratio`` / ``has_ratio``); the model never reads a
cache's internals. See ``docs/activation-beacon.md`` for the algorithm.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from torch import Tensor

__all__ = ["KVCache", "StepPlan", "check_ratio", "interleaved_beacon_slots", "memory_entries"]


def check_ratio(ratio: int, stride: int, what: str = "ratio") -> int:
    """Return ``ratio`` if it is 0 or a positive divisor of ``stride``, else raise ``ValueError``.

    Each beacon condenses exactly ``ratio`` raw tokens, so ``stride % ratio`` must be 0.
    """
    if int(ratio) != ratio or ratio < 0 or (ratio > 0 and stride % ratio):
        raise ValueError(f"{what}={ratio} does not divide the stride {stride} (S % r must be 0, r >= 0); "
                         "each beacon condenses exactly r raw tokens")
    return int(ratio)


def interleaved_beacon_slots(raw_before: int, num_raw: int, ratio: int) -> list[int]:
    """Where a step's interleaved beacons lie among its new entries: one beacon after every
    ``ratio``-th raw token of the window, also in a window not yet full (``docs/activation-beacon.md``,
    section 9).

    ``raw_before``: raw tokens the window held before the step; ``num_raw``: the step's raw
    tokens. The step has ``num_raw`` raw tokens plus ``len(result)`` beacons; none for ratio 0.
    """
    if not ratio:
        return []
    rem = raw_before % ratio
    nb = (num_raw + rem) // ratio
    return [p for p in range(num_raw + nb) if p % (ratio + 1) == ratio - rem]


def memory_entries(window: int, ratio: int, placement: str, *, sink_size: int = 0,
                   recaptured: int | None = None) -> list[int]:
    """The entries of a full window (indices in slot order: raw tokens and interleaved beacons, then
    appended beacons) that become memory when it is condensed, in their memory order.

    Its beacons (one after every ``ratio`` raw entries when interleaved, after the ``window`` raw
    entries when appended), or every raw entry with ratio 0. In front of them, on the sequence's
    first compaction, the sink: the entry ``recaptured`` (``sink_recapture``: the first entry of
    the step that completes the window, whatever the ratio), else the first ``sink_size``
    entries when the window has beacons (with ratio 0 the whole window is memory anyway).
    """
    if ratio == 0:
        kept = list(range(window))
    elif placement == "interleave":
        kept = [(j + 1) * (ratio + 1) - 1 for j in range(window // ratio)]
    else:
        kept = [window + j for j in range(window // ratio)]
    if recaptured is not None:
        return [recaptured] + kept
    return list(range(sink_size if ratio else 0)) + kept


@dataclass
class StepPlan:
    """What a cache's ``begin_step`` decided for one step (valid until the next ``begin_step``,
    ``compact`` or ``reset``)."""

    cu_seqlens: Tensor
    """int32 ``[batch + 1]`` on the cache device: prefix sums of ``num_new``."""
    num_raw: list[int]
    """New raw tokens per sequence."""
    num_beacons: list[int]
    """Beacons per sequence (``stride // ratio`` on the step that completes a window with r > 0)."""
    num_new: list[int]
    """``num_raw + num_beacons``: the sequence's queries and appended keys this step."""
    completes_window: list[bool]
    """Whether the step fills the sequence's window (``raw_len == window`` afterwards)."""
    max_seqlen_q: int
    """``max(num_new)`` (0 for an empty step)."""
    positions: Tensor
    """int32 ``[sum(num_new)]`` on the cache device: RoPE positions of the step's tokens."""
    beacon_slots: list[list[int]] | None = None
    """Per sequence, where its beacons lie among its ``num_new`` tokens (interleaved beacons);
    None: after its raw tokens."""


class KVCache(Protocol):
    """What :meth:`beacon_ops.llama.Llama.step` and :mod:`beacon_ops.generation` need of a cache.

    A step::

        plan = cache.begin_step(num_raw)           # per sequence: new raw tokens, its beacons
        for layer in range(num_layers):
            q = cache.rotate_queries(q, plan)      # [total, heads, head_dim], raw then beacons
            cache.append(layer, k, v, plan)        # keys rotated on the way
            out, lse = cache.attention(layer, q, plan)
        cache.compact()                            # sequences whose window is full
    """

    def room(self, b: int) -> int:
        """Raw tokens sequence ``b`` can take in the next step."""
        ...

    def has_ratio(self, b: int) -> bool:
        """Whether sequence ``b``'s condensing ratio is decided (always, without beacons)."""
        ...

    def set_ratio(self, b: int, r: int) -> None:
        """Decide sequence ``b``'s condensing ratio (before the step that fills its window)."""
        ...

    def begin_step(self, num_raw: Sequence[int]) -> StepPlan:
        """Count a step's new raw tokens; decide which sequences get beacons this step."""
        ...

    def rotate_queries(self, q: Tensor, plan: StepPlan) -> Tensor:
        """The step's queries rotated at ``plan.positions`` (in place where the cache can)."""
        ...

    def append(self, layer: int, k_new: Tensor, v_new: Tensor, plan: StepPlan) -> None:
        """Add the step's keys (rotated on the way) and values to layer ``layer``."""
        ...

    def attention(self, layer: int, q: Tensor, plan: StepPlan) -> tuple[Tensor, Tensor | None]:
        """Attention of the step's rotated queries over layer ``layer``: ``(out, lse or None)``."""
        ...

    def attention_parts(self, layer: int, q: Tensor, q_memory: Tensor, plan: StepPlan
                        ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]] | None:
        """The attention split at the memory boundary (:mod:`beacon_ops.memory_reading`):
        ``((out, lse) over the window with q, (out, lse) over the memory with q_memory)``,
        ``q_memory`` not yet rotated; None when the step reads no condensed memory."""
        ...

    def compact(self) -> None:
        """Turn every full window's beacons into memory (no-op for caches without beacons)."""
        ...

    def max_position(self) -> int:
        """The highest RoPE position any key in the cache has."""
        ...

    def bytes_in_use(self) -> int:
        """Bytes of keys and values the cache holds."""
        ...
