"""A minimal Llama with Activation Beacon, in the spirit of gpt-fast's ``model.py``.

The model is an ordinary Llama (RMSNorm, RoPE with optional Llama-3/linear scaling, grouped KV
heads, SwiGLU MLP, tied or untied LM head, optional attention biases); Mistral and Qwen2 are this
model with other config keys (:mod:`beacon_ops.checkpoints` reads them). Activation Beacon (``docs/activation-beacon.md``)
adds, per layer, ``self_attn.beacon_{q,k,v,o}_proj`` (which of the four exist is configurable;
beacon rows use the layer's own projection for the others) and one model-level
``beacon_embed_tokens`` row. Beacons share the norms, the MLP, RoPE and the LM head.

:meth:`Llama.step` is the one forward pass: it runs a step of new raw tokens per sequence
through a :class:`~beacon_ops.kv_cache.KVCache`, which decides the step's beacons (a step that
fills a window also carries that window's beacons) and compacts afterwards. The same step
serves inference (the condensed cache, or the plain full/sliding cache) and training (the
differentiable :class:`~beacon_ops.training_cache.TrainingKVCache`). Reading whole documents,
generation and the loss are in :mod:`beacon_ops.generation`; checkpoints in
:mod:`beacon_ops.checkpoints`; the beacon settings (:class:`BeaconConfig`, re-exported here) in
:mod:`beacon_ops.beacon_config`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .beacon_config import BEACON_PROJS, BeaconConfig
from .linear import Linear, linear
from .kv_cache import KVCache, StepPlan
from .memory_reading import merge_by_lse
from .norm import norm
from .positions import default_inv_freq

__all__ = ["LlamaConfig", "BeaconConfig", "Llama", "rope_inv_freq", "check_token_ids", "BEACON_PROJS"]


@dataclass
class LlamaConfig:
    """Shape and numerics of a Llama (names follow Hugging Face's ``LlamaConfig``)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3"|"linear", "factor", ...}
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    rope_interleaved: bool = False  # llama.cpp row layout (pairs (2i, 2i+1)) instead of rotate-half
    attention_bias: tuple[str, ...] = ()  # projections with a bias: Qwen2 ("q", "k", "v"), all 4 or none

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        bad = set(self.attention_bias) - set(BEACON_PROJS)
        if bad:
            raise ValueError(f"attention_bias may only contain {BEACON_PROJS}, got {sorted(bad)}")
        self.attention_bias = tuple(p for p in BEACON_PROJS if p in self.attention_bias)

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([int(e)] if isinstance(e, int) else [int(x) for x in e])


def rope_inv_freq(config: LlamaConfig) -> Tensor:
    """RoPE inverse frequencies (fp32) with the config's scaling, as Hugging Face computes them."""
    inv = default_inv_freq(config.head_dim, config.rope_theta)
    sc = config.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / sc["factor"]
    if kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        lo_wave, hi_wave = old / lo, old / hi
        wave = 2 * math.pi / inv
        out = torch.where(wave > lo_wave, inv / factor, inv)
        smooth = (old / wave - lo) / (hi - lo)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wave < hi_wave) * ~(wave > lo_wave)
        return torch.where(medium, smoothed, out)
    raise ValueError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3)")


def check_token_ids(ids: Tensor, vocab_size: int, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` unless every id lies in ``[0, vocab_size)``."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"{what}: token ids must lie in [0, {vocab_size}), got range "
                         f"[{int(ids.min())}, {int(ids.max())}]")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # fp32 statistics; 16-bit: the weight applied in x's dtype, as Hugging Face's LlamaRMSNorm
        return norm(x, self.weight, self.eps)


class MLP(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate = F.silu(self.gate_proj(x), inplace=True)
        return self.down_proj(gate.mul_(self.up_proj(x)))


@dataclass
class _Rows:
    """The packed rows of a step as contiguous runs ``(start, end, is_beacon)``.

    Per sequence the raw rows come first, then its beacons (two runs), or, with interleaved
    beacons, raw runs with one beacon after each. A few runs are sliced (no gathers and
    scatters); many (interleaved beacons) are gathered by index, which costs one copy instead
    of a small matmul per run.
    """

    runs: list[tuple[int, int, bool]]
    _index: tuple[Tensor, Tensor] | None = None
    _raw_mask: dict[tuple[torch.dtype, torch.device], Tensor] = field(default_factory=dict)

    MAX_SLICED_RUNS = 8

    @property
    def has_beacons(self) -> bool:
        return any(b for _, _, b in self.runs)

    @property
    def gathered(self) -> bool:
        """Whether the rows are many runs, handled by index (see the class docstring)."""
        return len(self.runs) > self.MAX_SLICED_RUNS

    def index(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Row indices ``(raw, beacon)``, each in order (int64 on ``device``)."""
        if self._index is None:
            raw = [i for s, e, b in self.runs if not b for i in range(s, e)]
            bea = [i for s, e, b in self.runs if b for i in range(s, e)]
            self._index = (torch.tensor(raw, dtype=torch.long, device=device),
                           torch.tensor(bea, dtype=torch.long, device=device))
        return self._index

    def raw_mask(self, like: Tensor) -> Tensor:
        """``[rows, 1]`` of ``like``'s dtype and device: 1 on raw rows, 0 on beacon rows (built once
        a step, not once a layer)."""
        key = (like.dtype, like.device)
        if key not in self._raw_mask:
            m = torch.ones(like.shape[0], 1, dtype=like.dtype, device=like.device)
            for s, e, b in self.runs:
                if b:
                    m[s:e] = 0
            self._raw_mask[key] = m
        return self._raw_mask[key]

    def raw(self, h: Tensor) -> Tensor:
        """``h``'s raw rows, in order."""
        if self.gathered:
            return h.index_select(0, self.index(h.device)[0])
        parts = [h[s:e] for s, e, b in self.runs if not b]
        return parts[0] if len(parts) == 1 else torch.cat(parts) if parts else h[:0]


def _project(x: Tensor, rows: _Rows, main: nn.Linear, beacon: nn.Linear | None) -> Tensor:
    """``main`` on raw rows, ``beacon`` (when it exists) on beacon rows."""
    if beacon is None or not rows.has_beacons:
        return main(x)
    if rows.gathered:  # out-of-place index_copy: differentiable, every row written once
        raw_i, beacon_i = rows.index(x.device)
        out = x.new_zeros(x.shape[0], main.out_features)
        return out.index_copy(0, raw_i, main(x[raw_i])).index_copy(0, beacon_i, beacon(x[beacon_i]))
    if torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):  # out= is not differentiable,
        # and autocast does not cast into it
        return torch.cat([(beacon if b else main)(x[s:e]) for s, e, b in rows.runs])
    out = x.new_empty(x.shape[0], main.out_features)
    for s, e, is_beacon in rows.runs:
        lin = beacon if is_beacon else main
        if lin.bias is None:
            torch.matmul(x[s:e], lin.weight.t(), out=out[s:e])
        else:
            torch.addmm(lin.bias, x[s:e], lin.weight.t(), out=out[s:e])
    return out


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig, beacon_params: Sequence[str]) -> None:
        super().__init__()
        self.c = c
        q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        shapes = {"q": (c.hidden_size, q_dim), "k": (c.hidden_size, kv_dim),
                  "v": (c.hidden_size, kv_dim), "o": (q_dim, c.hidden_size)}
        for p, (i, o) in shapes.items():
            bias = p in c.attention_bias  # a beacon projection copies its layer's, bias included
            setattr(self, f"{p}_proj", Linear(i, o, bias=bias))
            setattr(self, f"beacon_{p}_proj", Linear(i, o, bias=bias) if p in beacon_params else None)
        # The reader (installed by an adapter that has one, beacon_ops.adapter): low-rank deltas
        # x -> delta on the raw rows' queries for the memory, and on what they read from it.
        self.beacon_reader_q: nn.Module | None = None
        self.beacon_reader_o: nn.Module | None = None

    def forward(self, x: Tensor, layer: int, cache: KVCache, plan: StepPlan, rows: _Rows) -> Tensor:
        c, n = self.c, x.shape[0]
        q = _project(x, rows, self.q_proj, self.beacon_q_proj)
        k = _project(x, rows, self.k_proj, self.beacon_k_proj).view(n, c.num_kv_heads, c.head_dim)
        v = _project(x, rows, self.v_proj, self.beacon_v_proj).view(n, c.num_kv_heads, c.head_dim)
        q_memory = None
        if self.beacon_reader_q is not None:  # before q is rotated (in place)
            raw = rows.raw_mask(q)
            q_memory = (q + raw * self.beacon_reader_q(x)).view(n, c.num_heads, c.head_dim)
        q = cache.rotate_queries(q.view(n, c.num_heads, c.head_dim).contiguous(), plan)
        cache.append(layer, k.contiguous(), v.contiguous(), plan)
        parts = None if q_memory is None else cache.attention_parts(layer, q, q_memory, plan)
        if parts is None:  # no reader, or nothing in memory yet: one pass (the base model's)
            out, _ = cache.attention(layer, q, plan)
        else:  # the memory read with the reader's query, merged with the window's by LSE
            (out_w, lse_w), (out_m, lse_m) = parts
            if self.beacon_reader_o is not None:
                read = out_m.reshape(n, -1)
                out_m = (read + raw.float() * self.beacon_reader_o(read.to(x.dtype)).float()).view_as(out_m)
            out = merge_by_lse(out_w, lse_w, out_m, lse_m)
        return _project(out.reshape(n, -1), rows, self.o_proj, self.beacon_o_proj)


class DecoderLayer(nn.Module):
    def __init__(self, c: LlamaConfig, beacon_params: Sequence[str]) -> None:
        super().__init__()
        self.self_attn = Attention(c, beacon_params)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, h: Tensor, layer: int, cache: KVCache, plan: StepPlan, rows: _Rows) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), layer, cache, plan, rows)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, c: LlamaConfig, beacon_params: Sequence[str]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.beacon_embed_tokens = nn.Embedding(1, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c, beacon_params) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class Llama(nn.Module):
    """Llama with Activation Beacon; see the module docstring.

    ``session`` holds the state of the document(s) being read (:mod:`beacon_ops.generation`
    sets it; the model itself only steps the cache it is given).
    """

    def __init__(self, config: LlamaConfig, beacon: BeaconConfig | None = None) -> None:
        super().__init__()
        self.config = config
        self.beacon = beacon or BeaconConfig()
        self.model = LlamaModel(config, self.beacon.beacon_params)
        self.lm_head = None if config.tie_word_embeddings else Linear(
            config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.session: Any = None
        self.logits_chunk = 512  # rows of logits computed at once (bounds the [rows x vocab] tensor)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def trained_context(self) -> int:
        """Positions the model was trained for: ``max_position_embeddings``, times the factor of
        linear/dynamic RoPE scaling (Llama-3 configs already state the extended length)."""
        sc = self.config.rope_scaling or {}
        factor = sc.get("factor", 1.0) if sc.get("rope_type", sc.get("type")) in ("linear", "dynamic") else 1.0
        return int(self.config.max_position_embeddings * factor)

    def reset(self) -> None:
        """Forget the current document(s): the next read starts from an empty cache."""
        self.session = None

    def logits(self, hidden: Tensor) -> Tensor:
        """LM head on final-norm hidden states."""
        w = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return linear(hidden, w)

    def step(self, cache: KVCache, chunks: Sequence[Tensor], *, checkpoint_layers: bool = False,
             layer_outputs: list[Tensor] | None = None) -> list[Tensor]:
        """One step: ``chunks[b]`` new raw tokens of sequence ``b`` (may be empty), at most
        ``cache.room(b)`` of them.

        Returns, per sequence, the final-norm hidden states of its raw tokens.
        ``checkpoint_layers``: non-reentrant gradient checkpointing of every layer (training).
        ``layer_outputs``: when given, each layer's output at the raw tokens (all sequences'
        rows in order, beacon rows left out) is appended to it (distillation reads them).
        """
        if not any(len(ch) for ch in chunks):
            return [ch.new_empty(0, self.config.hidden_size, dtype=self.dtype) for ch in chunks]
        plan = cache.begin_step([len(ch) for ch in chunks])
        parts, runs, off = [], [], 0
        emb = self.model.embed_tokens
        for bi, ch in enumerate(chunks):
            nb = plan.num_beacons[bi]
            # beacon slots among the sequence's new tokens: after its raw tokens, or interleaved
            slots = plan.beacon_slots[bi] if plan.beacon_slots is not None else range(len(ch), len(ch) + nb)
            raw_emb = emb(ch)
            t = p = 0  # next raw token, next slot
            for slot in [*slots, len(ch) + nb]:
                if slot > p:  # the raw tokens before this beacon
                    parts.append(raw_emb[t:t + slot - p])
                    runs.append((off + p, off + slot, False))
                    t += slot - p
                if slot < len(ch) + nb:
                    if runs and runs[-1][2] and runs[-1][1] == off + slot:  # extend a run of beacons
                        runs[-1] = (runs[-1][0], off + slot + 1, True)
                    else:
                        runs.append((off + slot, off + slot + 1, True))
                    parts.append(self.model.beacon_embed_tokens.weight.to(raw_emb.dtype))
                p = slot + 1
            off += len(ch) + nb
        h = torch.cat(parts)
        rows = _Rows(runs)
        for i, layer in enumerate(self.model.layers):
            if checkpoint_layers:
                h = checkpoint(layer, h, i, cache, plan, rows, use_reentrant=False)
            else:
                h = layer(h, i, cache, plan, rows)
            if layer_outputs is not None:
                layer_outputs.append(rows.raw(h))
        cache.compact()
        h = self.model.norm(rows.raw(h))
        return list(torch.split(h, [len(ch) for ch in chunks]))

    forward = step
