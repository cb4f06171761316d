"""A minimal Llama with Activation Beacon, in the spirit of gpt-fast's ``model.py``.

The model is an ordinary Llama (RMSNorm, RoPE with optional Llama-3/linear scaling, grouped KV
heads, SwiGLU MLP, tied or untied LM head). Activation Beacon (``shared/docs/activation-beacon.md``)
adds, per layer, ``self_attn.beacon_{q,k,v,o}_proj`` (which of the four exist is configurable;
beacon rows use the layer's own projection for the others) and one model-level
``beacon_embed_tokens`` row. Beacons share the norms, the MLP, RoPE and the LM head.

All attention goes through a cache object with the :class:`~beacon_ops.CondensedKVCache` API:
``begin_step`` (count the step's raw tokens, decide its beacons), ``rotate_queries``, ``append``
(keys/values of the step), ``attention`` and, after the last layer, ``compact``. The same loop
serves the beacon cache (``torch.ops.beacon.*``) and :class:`~beacon_ops.full_cache.FullKVCache`
(plain full or sliding-window attention, used as a baseline and for the HF-equivalence tests).

A step packs the new tokens of every sequence (``cu_seqlens``): per sequence its raw tokens, then
its beacons when the step completes its window. Step sizes come from the cache (``room``): a
window takes ``W`` raw tokens, later windows ``S`` (stride), so prefill runs window by window and
generation (one token per step) completes windows exactly as prefill does: the step that fills a
window also carries that window's beacons, and compaction follows.

Choices the spec leaves open (written down here):
* condensing ratio: fixed (``BeaconConfig.ratio = r``) or adapt-N (``ratio=None``): decided once
  per sequence when its first window fills, from ``L`` = tokens known then (its whole prompt at
  prefill) with ``adapt_n`` tokens allowed for generation; a ratio that does not divide the
  stride is an error.
* ``forward(ids, labels)`` returns the mean next-token loss over raw tokens, labels shifted once
  over the whole sequence; beacon rows get no logits, and logits are computed in chunks only for
  positions that have a target.
* A warning is issued once per cache when a RoPE position exceeds ``max_position_embeddings``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LlamaConfig", "BeaconConfig", "Llama", "rope_inv_freq"]

BEACON_PROJS = ("q", "k", "v", "o")


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

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def eos_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([int(e)] if isinstance(e, int) else [int(x) for x in e])


@dataclass
class BeaconConfig:
    """Activation Beacon settings (spec sections 3-6).

    ``ratio``: a fixed condensing ratio (0 = no beacons, the base model) or None for adapt-N with
    ``adapt_n`` (spec section 6). ``beacon_params``: which of q/k/v/o have beacon copies.
    """

    window: int = 1024
    stride: int | None = None
    mode: str = "step-expansion"
    attend_previous: bool = True
    ratio: int | None = None
    adapt_n: int = 1024
    beacon_params: tuple[str, ...] = BEACON_PROJS

    def __post_init__(self) -> None:
        from .positions import check_mode

        self.stride = self.window if self.stride is None else self.stride
        check_mode(self.mode)
        if not 0 < self.stride <= self.window:
            raise ValueError(f"stride must lie in [1, window={self.window}], got {self.stride}")
        if self.ratio is not None:
            check_ratio(self.ratio, self.stride)
        bad = set(self.beacon_params) - set(BEACON_PROJS)
        if bad:
            raise ValueError(f"beacon_params may only contain {BEACON_PROJS}, got {sorted(bad)}")
        self.beacon_params = tuple(p for p in BEACON_PROJS if p in self.beacon_params)


def check_ratio(ratio: int, stride: int) -> None:
    """Raise ``ValueError`` unless ``ratio`` is 0 or a positive divisor of ``stride``."""
    if ratio < 0 or (ratio > 0 and stride % ratio):
        raise ValueError(f"ratio={ratio} does not divide the stride {stride} (S % r must be 0); "
                         "each beacon condenses exactly r raw tokens")


def rope_inv_freq(config: LlamaConfig) -> Tensor:
    """RoPE inverse frequencies (fp32) with the config's scaling, as Hugging Face computes them."""
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:  # one fused kernel; same math as below
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # fp32 statistics, then the weight in the input dtype, as in Hugging Face's LlamaRMSNorm
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class MLP(nn.Module):
    def __init__(self, c: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate = F.silu(self.gate_proj(x), inplace=True)
        return self.down_proj(gate.mul_(self.up_proj(x)))


@dataclass
class _Rows:
    """The packed rows of a step as contiguous runs ``(start, end, is_beacon)``.

    Per sequence the raw rows come first, then its beacons, so a step has at most two runs per
    sequence; slicing runs avoids gathers and scatters.
    """

    runs: list[tuple[int, int, bool]]

    @property
    def has_beacons(self) -> bool:
        return any(b for _, _, b in self.runs)

    def raw(self, h: Tensor) -> Tensor:
        """``h``'s raw rows, in order."""
        parts = [h[s:e] for s, e, b in self.runs if not b]
        return parts[0] if len(parts) == 1 else torch.cat(parts) if parts else h[:0]


def _project(x: Tensor, rows: _Rows, main: nn.Linear, beacon: nn.Linear | None) -> Tensor:
    """``main`` on raw rows, ``beacon`` (when it exists) on beacon rows."""
    if beacon is None or not rows.has_beacons:
        return main(x)
    if torch.is_grad_enabled():  # out= is not differentiable
        return torch.cat([(beacon if b else main)(x[s:e]) for s, e, b in rows.runs])
    out = x.new_empty(x.shape[0], main.out_features)
    for s, e, is_beacon in rows.runs:
        torch.matmul(x[s:e], (beacon if is_beacon else main).weight.t(), out=out[s:e])
    return out


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig, beacon_params: Sequence[str]) -> None:
        super().__init__()
        self.c = c
        q_dim, kv_dim = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        shapes = {"q": (c.hidden_size, q_dim), "k": (c.hidden_size, kv_dim),
                  "v": (c.hidden_size, kv_dim), "o": (q_dim, c.hidden_size)}
        for p, (i, o) in shapes.items():
            setattr(self, f"{p}_proj", nn.Linear(i, o, bias=False))
            setattr(self, f"beacon_{p}_proj", nn.Linear(i, o, bias=False) if p in beacon_params else None)

    def forward(self, x: Tensor, layer: int, cache: Any, plan: Any, rows: _Rows) -> Tensor:
        c, n = self.c, x.shape[0]
        q = _project(x, rows, self.q_proj, self.beacon_q_proj).view(n, c.num_heads, c.head_dim)
        k = _project(x, rows, self.k_proj, self.beacon_k_proj).view(n, c.num_kv_heads, c.head_dim)
        v = _project(x, rows, self.v_proj, self.beacon_v_proj).view(n, c.num_kv_heads, c.head_dim)
        q = q.contiguous()
        cache.rotate_queries(q, plan)
        cache.append(layer, k.contiguous(), v.contiguous(), plan)
        out, _ = cache.attention(layer, q, plan)
        return _project(out.reshape(n, -1), rows, self.o_proj, self.beacon_o_proj)


class DecoderLayer(nn.Module):
    def __init__(self, c: LlamaConfig, beacon_params: Sequence[str]) -> None:
        super().__init__()
        self.self_attn = Attention(c, beacon_params)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, h: Tensor, layer: int, cache: Any, plan: Any, rows: _Rows) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), layer, cache, plan, rows)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, c: LlamaConfig, beacon_params: Sequence[str]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.beacon_embed_tokens = nn.Embedding(1, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c, beacon_params) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


def _default_cache_cls() -> type:
    from .condensed_cache import CondensedKVCache

    return CondensedKVCache


@dataclass
class _Session:
    """Per-document state of :class:`Llama`: the cache and each sequence's bookkeeping."""

    cache: Any
    ratio: list[int | None]  # decided condensing ratio per sequence (None: not yet)
    seen: list[int] = field(default_factory=list)  # raw tokens processed per sequence
    warned: bool = False


class Llama(nn.Module):
    """Llama with Activation Beacon; see the module docstring.

    ``cache_cls`` builds the cache (default :class:`~beacon_ops.CondensedKVCache`); anything with
    its API works. ``attention="full"`` or ``"sliding"`` switch to
    :class:`~beacon_ops.full_cache.FullKVCache` (plain causal attention, optionally over the last
    ``window`` raw tokens only).
    """

    def __init__(self, config: LlamaConfig, beacon: BeaconConfig | None = None, *,
                 cache_cls: type | None = None) -> None:
        super().__init__()
        self.config = config
        self.beacon = beacon or BeaconConfig()
        self.cache_cls = cache_cls
        self.model = LlamaModel(config, self.beacon.beacon_params)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.session: _Session | None = None
        self.logits_chunk = 512  # rows of logits computed at once (bounds the [rows x vocab] tensor)

    # --- weights ---------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str, beacon: BeaconConfig | None = None, *,
                        dtype: torch.dtype = torch.float32, **kwargs: Any) -> "Llama":
        """Build from a GGUF file or a Hugging Face folder (see :mod:`beacon_ops.checkpoints`)."""
        from .checkpoints import load_checkpoint

        config, state = load_checkpoint(path)
        model = cls(config, beacon, **kwargs)
        model.load_weights(state)
        return model.to(dtype)

    def load_weights(self, state: dict[str, Tensor]) -> None:
        """Load a state dict with Hugging Face names, strictly.

        Beacon parameters missing from ``state`` are initialised from the layer's own projection
        (``beacon_x_proj <- x_proj``) and ``beacon_embed_tokens`` from the EOS embedding row.
        Ignored: ``*.rotary_emb.inv_freq`` buffers (older Llama-2 checkpoints) and ``lm_head.weight``
        when the config ties it to the embeddings.
        Raises ``ValueError`` naming unknown or missing tensors and shape mismatches.
        """
        own = self.state_dict()
        state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")
                 and not (k == "lm_head.weight" and self.lm_head is None)}
        unknown = sorted(set(state) - set(own))
        if unknown:
            raise ValueError(f"checkpoint has unknown tensors: {unknown[:8]}"
                             f"{' ...' if len(unknown) > 8 else ''}")
        full = dict(state)
        if self.lm_head is not None and "lm_head.weight" not in full:
            raise ValueError("checkpoint is missing tensor 'lm_head.weight' (the config does not tie "
                             "the LM head to the embeddings)")
        for name in own:
            if name in full or "beacon" not in name:
                continue
            if name == "model.beacon_embed_tokens.weight":
                emb = full.get("model.embed_tokens.weight")
                eos = self.config.eos_ids
                if emb is not None:
                    if not eos or not 0 <= eos[0] < emb.shape[0]:
                        raise ValueError("cannot initialise beacon_embed_tokens: the config has no "
                                         f"valid eos_token_id (got {self.config.eos_token_id})")
                    full[name] = emb[eos[0]:eos[0] + 1].clone()
            else:
                full[name] = full.get(name.replace("beacon_", ""))
                if full[name] is None:
                    del full[name]
        missing = sorted(set(own) - set(full))
        if missing:
            raise ValueError(f"checkpoint is missing tensors: {missing[:8]}"
                             f"{' ...' if len(missing) > 8 else ''}")
        for name, t in full.items():
            if tuple(t.shape) != tuple(own[name].shape):
                raise ValueError(f"tensor {name!r}: checkpoint shape {tuple(t.shape)} != model shape "
                                 f"{tuple(own[name].shape)}")
        self.load_state_dict({k: v.to(own[k].dtype) for k, v in full.items()}, strict=True)

    # --- caches ----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def reset(self) -> None:
        """Forget the current document(s): the next ``prefill`` starts from an empty cache."""
        self.session = None

    @property
    def trained_context(self) -> int:
        """Positions the model was trained for: ``max_position_embeddings``, times the factor of
        linear/dynamic RoPE scaling (Llama-3 configs already state the extended length)."""
        sc = self.config.rope_scaling or {}
        factor = sc.get("factor", 1.0) if sc.get("rope_type", sc.get("type")) in ("linear", "dynamic") else 1.0
        return int(self.config.max_position_embeddings * factor)

    def _ratio_for_length(self, total: int) -> int:
        b = self.beacon
        if b.ratio is not None:
            return b.ratio
        from .condensed_cache import adapt_ratio

        r = adapt_ratio(total, self.trained_context, b.window, b.adapt_n)
        check_ratio(r, b.stride)
        return r

    def new_cache(self, lengths: Sequence[int], extra_tokens: int = 0, *,
                  attention: str = "beacon") -> None:
        """Start a session for ``len(lengths)`` sequences of these prompt lengths.

        ``attention``: ``"beacon"`` (the condensed cache), ``"full"`` (plain causal attention) or
        ``"sliding"`` (plain attention over the last ``window`` raw tokens, no memory).
        ``extra_tokens``: room for generated tokens.
        """
        c, b = self.config, self.beacon
        longest = max(lengths) + extra_tokens
        if attention == "beacon":
            cls = self.cache_cls or _default_cache_cls()
            # the smallest ratio any sequence can get needs the most room
            r_min = min(self._ratio_for_length(n) for n in lengths)
            cap = cls.capacity_for(longest, b.window, b.stride, r_min, 0)
            cache = cls(c.num_layers, len(lengths), c.num_kv_heads, c.head_dim, cap,
                        window=b.window, stride=b.stride, mode=b.mode,
                        attend_previous=b.attend_previous, dtype=self.dtype, device=self.device,
                        inv_freq=self.inv_freq, rope_interleaved=c.rope_interleaved)
        elif attention in ("full", "sliding"):
            from .full_cache import FullKVCache

            cache = FullKVCache(c.num_layers, len(lengths), c.num_kv_heads, c.head_dim, longest,
                                chunk=b.window, sliding_window=b.window if attention == "sliding" else None,
                                dtype=self.dtype, device=self.device, inv_freq=self.inv_freq,
                                rope_interleaved=c.rope_interleaved)
        else:
            raise ValueError(f"attention must be 'beacon', 'full' or 'sliding', got {attention!r}")
        self.session = _Session(cache, [None] * len(lengths), [0] * len(lengths))

    # --- one step --------------------------------------------------------------------------------
    def _check_ids(self, ids: Tensor, what: str) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"{what}: token ids must lie in [0, {self.config.vocab_size}), got range "
                             f"[{int(ids.min())}, {int(ids.max())}]")

    def _step(self, chunks: list[Tensor], known_len: Sequence[int]) -> list[Tensor]:
        """Run one step: ``chunks[b]`` new raw tokens of sequence ``b`` (may be empty).

        Returns, per sequence, the final-norm hidden states of its raw tokens. ``known_len[b]``
        is the input length known for ``b`` (for adapt-N when its first window fills).
        """
        s = self.session
        cache = s.cache
        if not any(len(ch) for ch in chunks):
            return [ch.new_empty(0, self.config.hidden_size, dtype=self.dtype) for ch in chunks]
        is_beacon = hasattr(cache, "set_ratio")
        if is_beacon:
            for bi, ch in enumerate(chunks):
                if s.ratio[bi] is None and len(ch) and len(ch) >= cache.room(bi):
                    s.ratio[bi] = self._ratio_for_length(known_len[bi])
                if s.ratio[bi] is not None and cache.host_ratio[bi] != s.ratio[bi]:
                    cache.set_ratio(bi, s.ratio[bi])
        plan = cache.begin_step([len(ch) for ch in chunks])
        parts, runs, off = [], [], 0
        emb = self.model.embed_tokens
        for bi, ch in enumerate(chunks):
            nb = plan.num_beacons[bi]
            parts.append(emb(ch))
            if len(ch):
                runs.append((off, off + len(ch), False))
            if nb:
                parts.append(self.model.beacon_embed_tokens.weight.expand(nb, -1))
                runs.append((off + len(ch), off + len(ch) + nb, True))
            off += len(ch) + nb
        h = torch.cat(parts)
        rows = _Rows(runs)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, i, cache, plan, rows)
        cache.compact()
        for bi, ch in enumerate(chunks):
            s.seen[bi] += len(ch)
        self._warn_positions()
        h = self.model.norm(rows.raw(h))
        return list(torch.split(h, [len(ch) for ch in chunks]))

    def _warn_positions(self) -> None:
        s, limit = self.session, self.trained_context
        if s.warned:
            return
        c = s.cache
        # the highest RoPE position held in the cache (memory + raw slots, or absolute positions)
        top = c.max_position() if hasattr(c, "max_position") else max(
            m + r - 1 for m, r in zip(c.host_mem_len, c.host_raw_len))
        if top >= limit:  # trained positions are 0 .. limit - 1
            s.warned = True
            hint = ("the condensed memory outgrew the trained context (use adapt-N or a larger ratio)"
                    if hasattr(c, "set_ratio") else "the input is longer than the trained context")
            warnings.warn(f"RoPE positions reach {top}, beyond the model's max_position_embeddings "
                          f"({limit}): {hint}; quality will degrade", RuntimeWarning, stacklevel=3)

    def logits(self, hidden: Tensor) -> Tensor:
        """LM head on final-norm hidden states."""
        w = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return hidden @ w.t()

    # --- prefill ---------------------------------------------------------------------------------
    @staticmethod
    def _as_list(ids: Tensor | Sequence[Sequence[int]] | Sequence[Tensor]) -> list[Tensor]:
        if isinstance(ids, Tensor):
            if ids.dim() == 1:
                ids = ids[None]
            if ids.dim() != 2:
                raise ValueError(f"ids must be [length] or [batch, length], got shape {tuple(ids.shape)}")
            return [row for row in ids]
        out = [torch.as_tensor(x, dtype=torch.long) for x in ids]
        if not out:
            raise ValueError("ids: empty batch")
        return out

    def _feed(self, seqs: list[Tensor], *, progress: bool | None,
              on_hidden: Callable[[int, int, Tensor], None]) -> None:
        """Feed whole sequences step by step; ``on_hidden(b, start, hidden)`` per sequence chunk."""
        s, cache = self.session, self.session.cache
        pos = [0] * len(seqs)
        known = [s.seen[b] + len(x) for b, x in enumerate(seqs)]
        total = sum(len(x) for x in seqs)
        bar = None
        if progress or (progress is None and total > 4 * self.beacon.window):
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="tok", desc="prefill", leave=False)
        while any(p < len(x) for p, x in zip(pos, seqs)):
            chunks = []
            for b, x in enumerate(seqs):
                n = min(len(x) - pos[b], cache.room(b))
                chunks.append(x[pos[b]:pos[b] + n].to(self.device))
            hidden = self._step(chunks, known)
            for b, hb in enumerate(hidden):
                if len(hb):
                    on_hidden(b, pos[b], hb)
                pos[b] += len(chunks[b])
            if bar is not None:
                bar.update(sum(len(ch) for ch in chunks))
        if bar is not None:
            bar.close()

    @torch.no_grad()
    def prefill(self, ids: Tensor | Sequence[Sequence[int]], *, extra_tokens: int = 0,
                logits: str = "last", attention: str = "beacon",
                progress: bool | None = None) -> list[Tensor] | Tensor:
        """Process prompts (any length; a batch may have different lengths) from an empty cache.

        ``logits``: ``"last"`` -> ``[batch, vocab]`` for each sequence's last token; ``"all"`` ->
        a list of ``[length, vocab]`` (small inputs only); ``"none"`` -> nothing.
        ``extra_tokens`` reserves cache room for that many generated tokens per sequence.
        """
        seqs = self._as_list(ids)
        for b, x in enumerate(seqs):
            if len(x) == 0:
                raise ValueError(f"ids: sequence {b} is empty")
            self._check_ids(x, f"ids[{b}]")
        if logits not in ("last", "all", "none"):
            raise ValueError(f"logits must be 'last', 'all' or 'none', got {logits!r}")
        self.new_cache([len(x) for x in seqs], extra_tokens, attention=attention)
        out: list[list[Tensor]] = [[] for _ in seqs]

        def keep(b: int, start: int, h: Tensor) -> None:
            if logits == "all":
                out[b].append(self._chunked_logits(h))
            elif logits == "last" and start + len(h) == len(seqs[b]):
                out[b].append(self.logits(h[-1:]))

        self._feed(seqs, progress=progress, on_hidden=keep)
        if logits == "none":
            return []
        if logits == "last":
            return torch.cat([o[0] for o in out])
        return [torch.cat(o) for o in out]

    def _chunked_logits(self, h: Tensor) -> Tensor:
        return torch.cat([self.logits(h[i:i + self.logits_chunk]) for i in range(0, len(h), self.logits_chunk)])

    # --- decoding --------------------------------------------------------------------------------
    @torch.no_grad()
    def decode_step(self, tokens: Sequence[int | None]) -> Tensor:
        """Append one token per sequence (None = skip that sequence) after ``prefill``.

        Returns ``[batch, vocab]`` logits of the appended tokens (rows of skipped sequences are
        undefined: NaN). A step that fills a window also processes its beacons, then compacts.
        """
        s = self.session
        if s is None:
            raise RuntimeError("decode_step: call prefill first")
        if len(tokens) != len(s.seen):
            raise ValueError(f"tokens: expected {len(s.seen)} entries (the batch), got {len(tokens)}")
        chunks = [torch.tensor([] if t is None else [int(t)], dtype=torch.long, device=self.device)
                  for t in tokens]
        for b, ch in enumerate(chunks):
            self._check_ids(ch, f"tokens[{b}]")
        known = [n + 1 for n in s.seen]
        hidden = self._step(chunks, known)
        out = torch.full((len(tokens), self.config.vocab_size), float("nan"), dtype=self.dtype,
                         device=self.device)
        for b, hb in enumerate(hidden):
            if len(hb):
                out[b] = self.logits(hb[-1:])[0]
        return out

    @staticmethod
    def sample(logits: Tensor, temperature: float = 0.0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        """Greedy (``temperature == 0``) or temperature + nucleus (top-p) sampling, per row."""
        if temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / temperature, -1)
        if top_p < 1.0:
            sp, si = probs.sort(-1, descending=True)
            drop = sp.cumsum(-1) - sp > top_p  # keep the smallest prefix whose mass reaches top_p
            sp = sp.masked_fill(drop, 0)
            probs = torch.zeros_like(probs).scatter_(-1, si, sp)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    @torch.no_grad()
    def generate(self, ids: Tensor | Sequence[Sequence[int]], max_new_tokens: int, *,
                 temperature: float = 0.0, top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
                 attention: str = "beacon", generator: torch.Generator | None = None,
                 progress: bool | None = None) -> list[list[int]]:
        """Prefill ``ids`` and generate up to ``max_new_tokens`` per sequence.

        Stops a sequence at an EOS token (default: the config's; the EOS is included in the
        output) or at the budget. Returns the new tokens of each sequence.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        eos = set(self.config.eos_ids if eos_token_id is None else
                  ([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id))
        logits = self.prefill(ids, extra_tokens=max_new_tokens, attention=attention, progress=progress)
        n = logits.shape[0]
        out: list[list[int]] = [[] for _ in range(n)]
        active = [max_new_tokens > 0] * n
        while True:
            nxt = self.sample(logits, temperature, top_p, generator).tolist()
            step: list[int | None] = []
            for b in range(n):
                if active[b]:
                    out[b].append(nxt[b])
                    if nxt[b] in eos or len(out[b]) >= max_new_tokens:
                        active[b] = False
                step.append(nxt[b] if active[b] else None)
            if not any(active):
                return out
            logits = self.decode_step(step)

    # --- loss ------------------------------------------------------------------------------------
    def forward(self, ids: Tensor | Sequence[Sequence[int]], labels: Tensor | Sequence[Sequence[int]] | None = None,
                *, attention: str = "beacon", progress: bool | None = None) -> Tensor:
        """Mean next-token cross-entropy over raw tokens (perplexity = exp of it).

        ``labels`` (default: ``ids``) align with ``ids``; they are shifted once over the whole
        sequence (the target of position t is ``labels[t + 1]``), and positions whose target is
        -100 are ignored. Logits are computed only where a target exists, in chunks of
        ``logits_chunk`` rows. Resets the cache (a fresh document). Meant for evaluation (call it
        under ``torch.no_grad()``): the in-place cache ops carry no gradient to earlier windows.
        """
        seqs = self._as_list(ids)
        labs = seqs if labels is None else self._as_list(labels)
        if len(labs) != len(seqs) or any(len(a) != len(b) for a, b in zip(seqs, labs)):
            raise ValueError("labels must have the same shape as ids")
        for b, x in enumerate(seqs):
            if len(x) == 0:
                raise ValueError(f"ids: sequence {b} is empty")
            self._check_ids(x, f"ids[{b}]")
        targets = [torch.cat([lb[1:], lb.new_full((1,), -100)]).to(self.device) for lb in labs]
        self.new_cache([len(x) for x in seqs], attention=attention)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = 0

        def add(b: int, start: int, h: Tensor) -> None:
            nonlocal total, count
            t = targets[b][start:start + len(h)]
            keep = (t != -100).nonzero()[:, 0]
            for i in range(0, len(keep), self.logits_chunk):
                sel = keep[i:i + self.logits_chunk]
                lg = self.logits(h[sel]).float()
                total = total + F.cross_entropy(lg, t[sel], reduction="sum").double()
                count += len(sel)

        self._feed(seqs, progress=progress, on_hidden=add)
        if count == 0:
            raise ValueError("labels: no position has a target (all -100 or length 1)")
        return (total / count).float()
