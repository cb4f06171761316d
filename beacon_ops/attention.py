"""``torch.ops.beacon.attention``: typed wrapper, fake kernel (filled in by the attention op)."""
from __future__ import annotations

__all__: list[str] = []
