"""Activation Beacon settings: :class:`BeaconConfig` (``docs/activation-beacon.md``, sections 3-6
and 9) and the names of the beacon projections.

Kept apart from the model (:mod:`beacon_ops.llama`, which re-exports both) because the caches,
the checkpoint readers and the commands need the settings without the modules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .kv_cache import check_ratio
from .positions import check_mode
from .variants import check_variant, mask_kind

__all__ = ["BeaconConfig", "BEACON_PROJS", "LAYOUT_FIELDS"]

BEACON_PROJS = ("q", "k", "v", "o")


# The fields of BeaconConfig that trained beacon parameters depend on (BeaconConfig.layout).
LAYOUT_FIELDS = ("mode", "attend_previous", "variant", "placement", "sink_size", "sink_recapture")


@dataclass
class BeaconConfig:
    """Activation Beacon settings (``docs/activation-beacon.md``, sections 3-6).

    ``ratio``: a fixed condensing ratio (0 = no beacons, the base model) or None for adapt-N with
    ``adapt_n`` (section 6) over the model's trained context, or over ``adapt_context`` positions
    when that is smaller: an adapter trained on short memories sets it, so that adapt-N picks the
    ratio that keeps memory + window within what it was trained to read. ``beacon_params``: which
    of q/k/v/o have beacon copies.

    ``variant``: ``"v1"`` (sections 3-5, the default) or ``"v3"``, the newer rules of the released
    beacon models (section 9), with ``placement`` (``"append"`` or ``"interleave"``) and
    ``sink_size`` (tokens of the first window kept in front of the memory); see
    :mod:`beacon_ops.variants` for what each combination means and which are rejected.
    ``sink_recapture`` (v3, ``sink_size=1``): the sink as the newer reference implementation, and
    so its released models, take it: re-taken at every step until the first window is condensed
    (section 9; :class:`~beacon_ops.condensed_cache.CondensedKVCache`). It differs from the plain
    sink only for inputs whose first window is read in more than one step (prompts shorter than a
    window); :meth:`from_checkpoint_config` turns it on for checkpoints with a sink.
    """

    window: int = 1024
    stride: int | None = None
    mode: str = "step-expansion"
    attend_previous: bool = True
    ratio: int | None = None
    adapt_n: int = 1024
    beacon_params: tuple[str, ...] = BEACON_PROJS
    variant: str = "v1"
    placement: str = "append"
    sink_size: int = 0
    adapt_ratios: tuple[int, ...] | None = None  # adapt-N candidates (None: the paper's, section 6)
    adapt_context: int | None = None  # adapt-N's context cap (None: the model's trained context)
    sink_recapture: bool = False

    def __post_init__(self) -> None:
        self.stride = self.window if self.stride is None else self.stride
        check_mode(self.mode)
        if not 0 < self.stride <= self.window:
            raise ValueError(f"stride must lie in [1, window={self.window}], got {self.stride}")
        check_variant(self.variant, self.placement, self.mode, self.sink_size, self.window, self.stride)
        if self.sink_recapture and self.sink_size != 1:
            raise ValueError(f"sink_recapture needs sink_size=1 (the released setting), got {self.sink_size}")
        if self.ratio is not None:
            check_ratio(self.ratio, self.stride)
        bad = set(self.beacon_params) - set(BEACON_PROJS)
        if bad:
            raise ValueError(f"beacon_params may only contain {BEACON_PROJS}, got {sorted(bad)}")
        self.beacon_params = tuple(p for p in BEACON_PROJS if p in self.beacon_params)
        if self.adapt_context is not None and not self.window < self.adapt_context:
            raise ValueError(f"adapt_context must exceed the window {self.window}, got {self.adapt_context}")
        if self.adapt_ratios is not None:
            if not self.adapt_ratios:
                raise ValueError("adapt_ratios must be None or a non-empty list of ratios")
            for r in self.adapt_ratios:
                check_ratio(r, self.stride, "adapt_ratios: ratio")
            self.adapt_ratios = tuple(int(r) for r in self.adapt_ratios)

    @classmethod
    def from_checkpoint_config(cls, config: dict[str, Any]) -> "BeaconConfig":
        """Settings from the ``beacon_*`` keys of an official beacon checkpoint's ``config.json``.

        ``beacon_window``, ``beacon_stride``, ``beacon_attn`` (mode), ``beacon_attend_prev``,
        ``beacon_param``, ``beacon_ratio`` (one ratio: fixed; several: adapt-N over them with the
        N of ``beacon_ratio_mix = "adapt-N"``, else 1024) and, from the newer code (variant v3,
        recognised by ``beacon_pos`` or ``beacon_sink_size``), ``beacon_pos`` (placement) and
        ``beacon_sink_size`` (a sink of 1 with ``sink_recapture``, as the released models were
        trained). Raises ``ValueError`` naming a key that is missing or unsupported.
        """
        if "beacon_window" not in config:
            raise ValueError("config: beacon_window is missing (not a beacon checkpoint's config)")
        newer = "beacon_pos" in config or "beacon_sink_size" in config
        ratios = config.get("beacon_ratio", [2, 4, 8])
        ratios = [ratios] if isinstance(ratios, int) else list(ratios)
        if not ratios:
            raise ValueError("config: beacon_ratio is an empty list")
        mix = str(config.get("beacon_ratio_mix", "adapt-1024"))
        adapt_n = int(mix.split("-", 1)[1]) if mix.startswith("adapt-") else 1024
        return cls(window=int(config["beacon_window"]), stride=config.get("beacon_stride"),
                   mode=config.get("beacon_attn", "full-coverage" if newer else "step-expansion"),
                   attend_previous=bool(config.get("beacon_attend_prev", True)),
                   ratio=ratios[0] if len(ratios) == 1 else None, adapt_n=adapt_n,
                   adapt_ratios=tuple(ratios) if len(ratios) > 1 else None,
                   beacon_params=tuple(config.get("beacon_param", BEACON_PROJS)),
                   variant="v3" if newer else "v1",
                   placement=config.get("beacon_pos", "interleave") if newer else "append",
                   sink_size=int(config.get("beacon_sink_size", 0)),
                   sink_recapture=newer and int(config.get("beacon_sink_size", 0)) == 1)

    def layout(self) -> dict[str, Any]:
        """The settings that fix how beacons are placed, masked and positioned (mode,
        ``attend_previous``, variant, placement, sink): what trained beacon parameters depend on,
        stored in an adapter and taken by the commands that load it (:data:`LAYOUT_FIELDS`)."""
        return {k: getattr(self, k) for k in LAYOUT_FIELDS}

    def layout_text(self) -> str:
        """The layout in a few words, e.g. ``"mode step-expansion"`` or ``"mode full-coverage,
        interleaved beacons, sink 1 (v3)"``."""
        parts = [f"mode {self.mode}"]
        if not self.attend_previous:
            parts.append("no attend-previous")
        if self.placement == "interleave":
            parts.append("interleaved beacons")
        if self.sink_size:
            parts.append(f"sink {self.sink_size}")
        return ", ".join(parts) + (f" ({self.variant})" if self.variant != "v1" else "")

    @property
    def attention_mask_kind(self) -> tuple[str, bool]:
        """``(mode, attend_previous)`` for the attention op and the caches (mask kind of
        :func:`beacon_ops.variants.mask_kind`)."""
        return mask_kind(self.variant, self.mode, self.attend_previous)
