"""``torch.ops.beacon.{rope_, append_kv, compact_}``: typed wrappers, fake kernels."""
from __future__ import annotations

__all__: list[str] = []
