"""Activation Beacon inside an already-loaded Hugging Face ``transformers`` model.

:func:`from_transformers` turns a ``LlamaForCausalLM``, ``MistralForCausalLM`` or
``Qwen2ForCausalLM`` into a :class:`~beacon_ops.llama.Llama` built from the Hugging Face model's
own modules: the embeddings, every layer's q/k/v/o projections (biases included), norms and MLP,
and the LM head are the same module objects, so no weight is copied and both models see any
change to them. Only the beacon parameters are new: ``beacon_{q,k,v,o}_proj`` copied from each
layer's projection and ``beacon_embed_tokens`` from the EOS embedding (the documented
initialisation), or a trained adapter file (:func:`beacon_ops.adapter.load_beacon_adapter`).

The result runs window by window through the condensed cache and the beacon ops like any
:class:`~beacon_ops.llama.Llama`: :func:`beacon_ops.generation.prefill`, ``generate``,
``sequence_loss`` and :func:`beacon_ops.training.beacon_loss` take it unchanged. The Hugging
Face model's own ``forward`` / ``generate`` keep working (they never see the beacon parameters).
Sliding-window settings of Mistral/Qwen2 configs are ignored, as by
:func:`beacon_ops.checkpoints.config_from_hf`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..adapter import adapter_beacon_config, load_beacon_adapter, read_adapter_config
from ..checkpoints import config_from_hf, initial_beacon_embedding
from ..llama import BEACON_PROJS, BeaconConfig, Llama, rope_inv_freq

__all__ = ["from_transformers", "SUPPORTED"]

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
"""Class names of the Hugging Face models :func:`from_transformers` accepts."""


def _copy_linear(src: nn.Linear) -> nn.Linear:
    w = src.weight
    out = nn.Linear(src.in_features, src.out_features, bias=src.bias is not None,
                    device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if src.bias is not None:
            out.bias.copy_(src.bias)
    return out


def from_transformers(hf_model: Any, beacon: BeaconConfig | None = None, *,
                      adapter: str | None = None) -> Llama:
    """A beacon :class:`~beacon_ops.llama.Llama` sharing ``hf_model``'s modules (see the module doc).

    Args:
        hf_model: a loaded ``LlamaForCausalLM``, ``MistralForCausalLM`` or ``Qwen2ForCausalLM``
            (any dtype and device; the beacon parameters follow them).
        beacon: window, stride, ratio, ... (default: with ``adapter``, the settings it was trained
            for, :func:`~beacon_ops.adapter.adapter_beacon_config`; else
            :class:`~beacon_ops.llama.BeaconConfig()`).
        adapter: a beacon adapter file to load over the initial beacon parameters.

    Raises ``TypeError`` for another kind of model and ``ValueError`` for a config this package
    cannot run (e.g. an unsupported RoPE scaling).
    """
    name = type(hf_model).__name__
    if name not in SUPPORTED:
        raise TypeError(f"hf_model: expected one of {SUPPORTED}, got {name}")
    config = config_from_hf(hf_model.config.to_dict())
    if beacon is None and adapter:
        beacon = adapter_beacon_config(read_adapter_config(adapter))
    with torch.device("meta"):  # placeholders only: every module below is replaced
        model = Llama(config, beacon)
    hf = hf_model.model
    model.model.embed_tokens = hf.embed_tokens
    model.model.norm = hf.norm
    model.lm_head = hf_model.lm_head  # tied or not, the module Hugging Face multiplies by
    for ours, theirs in zip(model.model.layers, hf.layers, strict=True):
        ours.input_layernorm = theirs.input_layernorm
        ours.post_attention_layernorm = theirs.post_attention_layernorm
        ours.mlp = theirs.mlp
        for p in BEACON_PROJS:
            proj = getattr(theirs.self_attn, f"{p}_proj")
            setattr(ours.self_attn, f"{p}_proj", proj)
            if p in model.beacon.beacon_params:
                setattr(ours.self_attn, f"beacon_{p}_proj", _copy_linear(proj))
    emb = hf.embed_tokens.weight
    model.model.beacon_embed_tokens = nn.Embedding(1, config.hidden_size, device=emb.device, dtype=emb.dtype)
    with torch.no_grad():
        model.model.beacon_embed_tokens.weight.copy_(initial_beacon_embedding(config, emb))
    model.inv_freq = rope_inv_freq(config).to(emb.device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"hf_model: these tensors have no counterpart in {name}: {left[:6]}")
    model.train(hf_model.training)
    if adapter:
        load_beacon_adapter(model, adapter)
    return model
