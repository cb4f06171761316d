"""Trainable beacon parameters and their adapter file (``docs/activation-beacon.md``, section 7).

Only parameters whose name contains ``beacon`` are trained; the LLM is frozen.
:func:`make_beacon_trainable` freezes the model and unfreezes ``model.beacon_embed_tokens`` and
the chosen ``beacon_{q,k,v,o}_proj`` of every layer, either as full matrices or, with
``rank > 0``, as low-rank deltas from the layer's *base* projection (LoRA-style:
``W_beacon = W_base + B @ A`` with ``B = 0`` at the start, so training starts exactly at the
documented initialisation "beacon projection = copy of the base projection", and the saved result
is small). A low-rank delta replaces whatever beacon matrix was loaded (it is a delta from the
base projection, not from a released beacon checkpoint). Optionally a *reader* too
(``reader_rank``, :func:`install_reader`): low-rank maps that change how raw tokens query and
read the condensed memory (:mod:`beacon_ops.memory_reading`), zero at the start, unused by every
input of at most one window.

The adapter file (safetensors) holds only the trained tensors under their model names, e.g.
``model.layers.3.self_attn.beacon_q_proj.lora_A``, with the settings as JSON in the metadata
key ``beacon_ops_adapter``; :func:`load_beacon_adapter` rebuilds the low-rank modules and loads
it into a freshly loaded model.
"""
from __future__ import annotations

import json
import os
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .llama import BEACON_PROJS, BeaconConfig, Llama

__all__ = ["LowRankDelta", "LowRankMap", "install_reader", "make_beacon_trainable", "adapter_tensors",
           "save_beacon_adapter", "load_beacon_adapter", "load_adapter_into_higher_rank", "read_adapter_config",
           "adapter_layout", "adapter_beacon_config",
           "METADATA_KEY"]

METADATA_KEY = "beacon_ops_adapter"


class LowRankDelta(nn.Module):
    """A linear map ``W_base + lora_B @ lora_A`` (``lora_B`` starts at zero).

    ``base`` (the layer's frozen projection) is referenced, not registered, so the model's state
    dict and the adapter hold only ``lora_A`` and ``lora_B``. ``weight`` is the effective matrix
    (the inference path multiplies by it directly); ``forward`` (training) applies the factors.
    """

    def __init__(self, base: nn.Linear, rank: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank must be > 0, got {rank}")
        self.in_features, self.out_features, self.rank = base.in_features, base.out_features, rank
        w = base.weight
        a = torch.empty(rank, self.in_features, dtype=torch.float32)
        bound = 1.0 / math.sqrt(self.in_features)  # nn.Linear's (and LoRA's) default for A
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(w.device, w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=w.dtype, device=w.device))
        object.__setattr__(self, "_base", base)  # not a submodule: frozen, saved with the model

    @property
    def weight(self) -> Tensor:
        return self._base.weight + (self.lora_B @ self.lora_A).to(self._base.weight.dtype)

    @property
    def bias(self) -> Tensor | None:
        """The base projection's bias (not trained)."""
        return self._base.bias

    def forward(self, x: Tensor) -> Tensor:
        # factored: a training step applies a beacon projection to a few rows per window, where
        # building W_base + B A (and its gradient) costs more than x A^T B^T (bf16 step: 5% less)
        return F.linear(x, self._base.weight, self.bias) + F.linear(F.linear(x, self.lora_A), self.lora_B)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class LowRankMap(nn.Module):
    """A map ``x -> lora_B @ lora_A @ x`` with no base (``lora_B`` starts at zero, so the map
    starts as zero): the reader's deltas (:class:`~beacon_ops.llama.Attention`)."""

    def __init__(self, features: int, rank: int, like: Tensor, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"reader rank must be > 0, got {rank}")
        self.features, self.rank = features, rank
        a = torch.empty(rank, features, dtype=torch.float32)
        bound = 1.0 / math.sqrt(features)
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(like.device, like.dtype))
        self.lora_B = nn.Parameter(torch.zeros(features, rank, dtype=like.dtype, device=like.device))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B)

    def extra_repr(self) -> str:
        return f"features={self.features}, rank={self.rank}"


def install_reader(model: Llama, rank: int, seed: int = 0) -> None:
    """Give every layer a reader of ``rank`` (``beacon_reader_q``, ``beacon_reader_o``; zero maps,
    so the model computes what it did); no-op for layers that have one."""
    g = torch.Generator().manual_seed(seed + 1)
    c = model.config
    for layer in model.model.layers:
        at = layer.self_attn
        if at.beacon_reader_q is None:
            w = at.q_proj.weight
            at.beacon_reader_q = LowRankMap(c.num_heads * c.head_dim, rank, w, g)
            at.beacon_reader_o = LowRankMap(c.num_heads * c.head_dim, rank, w, g)


def _install_low_rank(model: Llama, params: Sequence[str], rank: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for i, layer in enumerate(model.model.layers):
        at = layer.self_attn
        for p in params:
            if getattr(at, f"beacon_{p}_proj") is None:
                raise ValueError(f"params: the model has no beacon_{p}_proj (BeaconConfig.beacon_params="
                                 f"{model.beacon.beacon_params})")
            cur = getattr(at, f"beacon_{p}_proj")
            if isinstance(cur, LowRankDelta):
                continue
            setattr(at, f"beacon_{p}_proj", LowRankDelta(getattr(at, f"{p}_proj"), rank, g))


def make_beacon_trainable(model: Llama, params: Sequence[str] = BEACON_PROJS, rank: int = 0,
                          seed: int = 0, reader_rank: int = 0) -> list[tuple[str, nn.Parameter]]:
    """Freeze ``model`` except ``beacon_embed_tokens`` and ``beacon_{p}_proj`` for ``p`` in ``params``.

    ``rank > 0``: those projections become :class:`LowRankDelta` of that rank (``A`` drawn from
    a generator seeded with ``seed``). ``reader_rank > 0``: every layer also gets a reader
    (:func:`install_reader`), trained too. Returns the trainable ``(name, parameter)`` pairs;
    every name contains ``beacon``.
    """
    if reader_rank < 0:
        raise ValueError(f"reader_rank must be >= 0, got {reader_rank}")
    bad = set(params) - set(BEACON_PROJS)
    if bad:
        raise ValueError(f"params may only contain {BEACON_PROJS}, got {sorted(bad)}")
    for p in params:
        if getattr(model.model.layers[0].self_attn, f"beacon_{p}_proj") is None:
            raise ValueError(f"params: the model has no beacon_{p}_proj (BeaconConfig.beacon_params="
                             f"{model.beacon.beacon_params})")
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    if rank:
        _install_low_rank(model, params, rank, seed)
    if reader_rank:
        install_reader(model, reader_rank, seed)
    wanted = ("model.beacon_embed_tokens.",) + tuple(f".beacon_{p}_proj." for p in params) + (
        (".beacon_reader_q.", ".beacon_reader_o.") if reader_rank else ())
    out = []
    for name, prm in model.named_parameters():
        train = any(w in name for w in wanted)
        prm.requires_grad_(train)
        if train:
            out.append((name, prm))
    return out


def cast_frozen_projections(model: Llama, dtype: torch.dtype) -> int:
    """Store the weights of ``model``'s frozen linear projections in ``dtype``; returns how many.

    For training under autocast to ``dtype``: autocast casts an fp32 weight on every call unless
    it requires grad (its cast cache keeps only those), so a frozen base would be re-cast for
    every matmul of every window (measured ~20% of a bf16 CPU step). Converted once, the weights
    are what autocast would have passed anyway. Norms, embeddings (the tied LM head) and the
    trained beacon parameters keep their dtype; a :class:`LowRankDelta` adds its delta to the
    converted base. The model then runs only under autocast (fp32 inputs meet ``dtype`` weights).
    """
    n = 0
    for mod in model.modules():
        if isinstance(mod, nn.Linear) and not mod.weight.requires_grad and mod.weight.dtype != dtype:
            mod.weight.data = mod.weight.data.to(dtype)
            if mod.bias is not None and not mod.bias.requires_grad:
                mod.bias.data = mod.bias.data.to(dtype)
            n += 1
    return n


SHIPPED_ADAPTER = "smollm2_beacon_late_w256_r37.safetensors"
"""The trained SmolLM2-135M-Instruct adapter under ``beacon_ops/assets`` (provenance in its README)."""


def shipped_adapter_path() -> str | None:
    """Path of the shipped SmolLM2 adapter, or None when the package was installed without it."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", SHIPPED_ADAPTER)
    return path if os.path.exists(path) else None


def adapter_tensors(model: Llama) -> dict[str, Tensor]:
    """The trainable (``requires_grad``) parameters by name, detached CPU copies."""
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters()
            if p.requires_grad}


def save_beacon_adapter(model: Llama, path: str, config: dict[str, Any]) -> None:
    """Write the trainable beacon parameters to ``path`` (safetensors) with ``config`` as metadata.

    ``config`` must say ``params`` (the trained projections) and ``rank`` (0 = full matrices).
    """
    from safetensors.torch import save_file

    for k in ("params", "rank"):
        if k not in config:
            raise ValueError(f"config must contain {k!r}")
    tensors = adapter_tensors(model)
    if not tensors:
        raise ValueError("model has no trainable parameters (call make_beacon_trainable first)")
    save_file(tensors, path, metadata={METADATA_KEY: json.dumps(config, sort_keys=True)})


def read_adapter_config(path: str) -> dict[str, Any]:
    """The JSON settings stored in an adapter file."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if METADATA_KEY not in meta:
        raise ValueError(f"{path!r} is not a beacon_ops adapter (no {METADATA_KEY!r} metadata)")
    return json.loads(meta[METADATA_KEY])


def adapter_layout(config: dict[str, Any]) -> dict[str, Any]:
    """The beacon layout (:meth:`BeaconConfig.layout`) an adapter was trained with, from its
    settings (:func:`read_adapter_config`). Adapters written before the layout was stored name
    only the mode and ``attend_previous``: the rest is the default (v1, appended beacons, no sink)."""
    return {k: config.get(k, v) for k, v in BeaconConfig().layout().items()}


def adapter_beacon_config(config: dict[str, Any], **overrides: Any) -> BeaconConfig:
    """The :class:`BeaconConfig` an adapter was trained for, from its settings
    (:func:`read_adapter_config`): its window, stride, layout (:func:`adapter_layout`) and the
    context adapt-N plans for; ``overrides`` (e.g. ``ratio=8``) replace any of them."""
    settings = {"window": int(config["window"]), "stride": config.get("stride"),
                "adapt_context": config.get("adapt_context"), **adapter_layout(config)}
    return BeaconConfig(**{**settings, **overrides})


def load_beacon_adapter(model: Llama, path: str, *, trainable: bool = False) -> dict[str, Any]:
    """Load an adapter written by :func:`save_beacon_adapter` into ``model`` (in place).

    Rebuilds the low-rank modules when the adapter has ``rank > 0``, then copies every tensor
    (strict: unknown names or shape mismatches raise ``ValueError``). ``trainable=True`` also
    sets ``requires_grad`` as :func:`make_beacon_trainable` does (for resuming). Returns the
    adapter's config.
    """
    cfg = read_adapter_config(path)
    params, rank, reader = tuple(cfg["params"]), int(cfg["rank"]), int(cfg.get("reader_rank", 0))
    if trainable:
        make_beacon_trainable(model, params, rank, reader_rank=reader)
    else:
        if rank:
            _install_low_rank(model, params, rank, 0)
        if reader:
            install_reader(model, reader)
    _copy_adapter_tensors(model, path, grow=False)
    return cfg


def low_rank_dim(name: str) -> int | None:
    """The rank dimension of a low-rank factor, by its parameter name: 0 for a ``lora_A`` (rank x
    in), 1 for a ``lora_B`` (out x rank), None for any other tensor."""
    return {".lora_A": 0, ".lora_B": 1}.get(name[name.rfind("."):])


def _copy_adapter_tensors(model: Llama, path: str, *, grow: bool) -> None:
    """Copy the adapter file's tensors into ``model``'s parameters of the same names, every name
    and shape checked before anything is copied (a failed call leaves the model as it was).
    ``grow``: a ``lora_A`` / ``lora_B`` may have fewer rows / columns than the model's; it fills
    the first ones, and ``B``'s other columns are zeroed."""
    from safetensors.torch import load_file

    own = dict(model.named_parameters())
    tensors = load_file(path)
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise ValueError(f"adapter {path!r} has tensors the model lacks: {unknown[:6]}")

    def rank_dim(name: str) -> int | None:  # the factor's rank dimension, when it may grow
        return low_rank_dim(name) if grow else None

    for name, t in tensors.items():
        o, dim = own[name], rank_dim(name)
        fits = (o.shape == t.shape if dim is None else
                o.shape[1 - dim] == t.shape[1 - dim] and o.shape[dim] >= t.shape[dim])
        if not fits:
            raise ValueError(f"adapter tensor {name!r}: shape {tuple(t.shape)} does not fit model shape "
                             f"{tuple(o.shape)}" + (" (the model's rank must be >= the adapter's)" if grow else ""))
    with torch.no_grad():
        for name, t in tensors.items():
            o, dim = own[name], rank_dim(name)
            if dim is None:
                o.copy_(t)
                continue
            o.narrow(dim, 0, t.shape[dim]).copy_(t)
            if dim == 1:  # B's added columns: zero, so the added rank adds nothing yet
                o.narrow(1, t.shape[1], o.shape[1] - t.shape[1]).zero_()


def load_adapter_into_higher_rank(model: Llama, path: str) -> dict[str, Any]:
    """Copy a low-rank adapter of rank ``r`` into ``model``'s low-rank deltas of rank ``R >= r``.

    ``lora_A``'s first ``r`` rows and ``lora_B``'s first ``r`` columns take the adapter's
    values; the other rows of ``A`` keep their random draw and the other columns of ``B`` stay
    zero, so the model computes exactly what the adapter did while training can use the added
    rank (growing an adapter's capacity without starting over). ``model`` must already have the
    deltas (:func:`make_beacon_trainable` with the higher rank). Returns the adapter's config.
    """
    cfg = read_adapter_config(path)
    rank = int(cfg["rank"])
    if rank <= 0:
        raise ValueError(f"adapter {path!r} has rank {rank}: only low-rank adapters can be grown")
    _copy_adapter_tensors(model, path, grow=True)
    return cfg
