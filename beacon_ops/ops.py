"""Typed Python wrappers, fake (meta) kernels and autograd for ``torch.ops.beacon``.

The native schemas are in ``csrc/beacon_ops.cpp``; the layout they work on is the
condensed-cache contract of README.md. Each concept has its own module; this one re-exports
them so model code can write ``from beacon_ops.ops import beacon_attention``.
"""
from __future__ import annotations

from .attention import *  # noqa: F401,F403
from .attention import __all__ as _attention_all
from .cache_ops import *  # noqa: F401,F403
from .cache_ops import __all__ as _cache_all
from .linear import decode_linear  # noqa: F401  (also registers its autograd)
from .norm import rms_norm  # noqa: F401  (also registers its autograd)

__all__: list[str] = list(_attention_all) + list(_cache_all) + ["decode_linear", "rms_norm"]
