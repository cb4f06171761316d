"""Independent references for the cache-op tests: RoPE rotations written from their formulas
(Hugging Face's ``apply_rotary_pos_emb`` for rotate-half, the complex product for interleaved),
and a torch.cat compaction."""
from __future__ import annotations

import torch
from torch import Tensor
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

LOW_PRECISION = (torch.float16, torch.bfloat16)


def rotate_at(x: Tensor, positions: Tensor, cos_t: Tensor, sin_t: Tensor, interleaved: bool,
              dtype: torch.dtype = torch.float64) -> Tensor:
    """``x [n, heads, D]`` rotated at ``positions [n]`` (>= 0), computed in ``dtype``.

    With ``dtype`` the input's low precision this is the "plain PyTorch in low precision"
    baseline (tables cast to it, like Hugging Face does).
    """
    pos = positions.long().cpu()
    c = cos_t.cpu()[pos].to(dtype)  # [n, D/2]
    s = sin_t.cpu()[pos].to(dtype)
    xx = x.cpu().to(dtype)
    if not interleaved:
        cos_full = torch.cat([c, c], dim=-1)  # Hugging Face layout [n, D]
        sin_full = torch.cat([s, s], dim=-1)
        out, _ = apply_rotary_pos_emb(xx, xx, cos_full, sin_full, unsqueeze_dim=1)
        return out
    # GGUF / Meta: (x0 + i x1) * (cos + i sin) for consecutive pairs.
    x0, x1 = xx[..., 0::2], xx[..., 1::2]
    c, s = c[:, None, :], s[:, None, :]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)


def tables(head_dim: int, rows: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """fp32 cos/sin tables [rows, head_dim/2] for Llama's default inverse frequencies."""
    from beacon_ops.positions import rope_tables

    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    return rope_tables(inv_freq, rows)
