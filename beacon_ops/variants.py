"""The two variants of Activation Beacon and the mask kind each setting runs with.

``"v1"`` is the algorithm of the first paper and its Llama-2 release (``docs/activation-beacon.md``,
sections 1-8), the default. ``"v3"`` is the newer algorithm behind the released Llama-3, Qwen-2 and
Mistral beacon models (section 9): the memory (sink tokens, then beacons) is always visible,
full-coverage is a plain causal mask with consecutive positions, beacons may be interleaved with
the raw tokens, and ``attend_previous`` only decides, in step-expansion with appended beacons,
whether a beacon sees the earlier beacons of its window.

The kernels know mask kinds (``mode`` of the ops, :data:`beacon_ops.positions.MASK_KINDS`);
:func:`mask_kind` maps a variant's settings onto one.
"""
from __future__ import annotations

import operator

from .positions import check_mode

__all__ = ["VARIANTS", "PLACEMENTS", "check_variant", "check_cache_layout", "mask_kind", "supported_variants"]

VARIANTS: tuple[str, ...] = ("v1", "v3")
"""``v1``: the original algorithm (default); ``v3``: the newer one of the released models."""

PLACEMENTS: tuple[str, ...] = ("append", "interleave")
"""Where a window's beacons go: after its raw tokens, or one after every ``r`` raw tokens (v3)."""


def check_variant(variant: str, placement: str, mode: str, sink_size: int, window: int,
                  stride: int) -> None:
    """Raise ``ValueError`` naming the argument unless the settings form a supported variant.

    v1 appends its beacons and has no sink. v3 has no segmentation and needs ``stride == window``
    (the newer code fails in both); its step-expansion with interleaved beacons is not supported
    (the newer code masks the wrong key columns there, section 9.2). The sink lies inside the
    first window.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    check_mode(mode)
    try:
        sink = operator.index(sink_size)
    except TypeError:
        raise TypeError(f"sink_size must be an integer, got {sink_size!r}") from None
    if sink < 0:
        raise ValueError(f"sink_size must be >= 0, got {sink}")
    if variant == "v1":
        if placement != "append":
            raise ValueError(f"placement={placement!r} needs variant='v3' (v1 appends its beacons)")
        if sink:
            raise ValueError(f"sink_size={sink} needs variant='v3' (v1 has no sink tokens)")
        return
    if mode == "segmentation":
        raise ValueError("mode='segmentation' is not part of variant 'v3' (use 'step-expansion' or "
                         "'full-coverage')")
    if stride != window:
        raise ValueError(f"stride={stride} must equal window={window} in variant 'v3'")
    if placement == "interleave" and mode == "step-expansion":
        raise ValueError("mode='step-expansion' with placement='interleave' is not supported (the "
                         "reference implementation masks the wrong keys there); use "
                         "mode='full-coverage' or placement='append'")
    if sink >= window:
        raise ValueError(f"sink_size={sink} must be smaller than the window {window}")


def check_cache_layout(placement: str, mode: str, sink_size: int, sink_recapture: bool, window: int,
                       owner: str = "") -> None:
    """Raise ``ValueError`` naming the argument unless a cache can lay a window out this way (the
    condensed and the training cache share these rules; ``owner`` prefixes the message).

    Interleaved beacons need the ``causal`` mask kind; the sink lies inside the first window; a
    re-taken sink (``sink_recapture``) is a single entry."""
    if placement not in PLACEMENTS:
        raise ValueError(f"{owner}placement must be one of {PLACEMENTS}, got {placement!r}")
    if int(sink_size) != sink_size or not 0 <= sink_size < window:
        raise ValueError(f"{owner}sink_size must be an integer in [0, window={window}), got {sink_size!r}")
    if sink_recapture and sink_size > 1:
        raise ValueError(f"{owner}sink_recapture needs sink_size 0 or 1, got {sink_size}")
    if placement == "interleave" and mode != "causal":
        raise ValueError(f"{owner}placement='interleave' needs mode='causal', got {mode!r}")


def mask_kind(variant: str, mode: str, attend_previous: bool) -> tuple[str, bool]:
    """``(mode, attend_previous)`` to pass to the attention op for these settings.

    v1: unchanged. v3: full-coverage is ``"causal"`` (either placement); step-expansion is
    ``"step-causal"`` with ``attend_previous`` (beacon j also sees beacons ``0..j-1``) and, without
    it, the original step-expansion with the memory visible.
    """
    if variant == "v1":
        return mode, attend_previous
    if mode == "full-coverage":
        return "causal", True
    if mode == "step-expansion":
        return ("step-causal", True) if attend_previous else ("step-expansion", True)
    raise ValueError(f"mode={mode!r} is not part of variant {variant!r}")


def supported_variants() -> list[str]:
    """One line per variant: the settings it supports (for ``python -m beacon_ops info``)."""
    return ["v1: placement append; modes segmentation, step-expansion, full-coverage; stride <= window; no sink",
            "v3: placement append (modes step-expansion, full-coverage) or interleave (full-coverage); "
            "sink_size >= 0 (1: also re-taken as the released models do, sink_recapture); stride = window"]
