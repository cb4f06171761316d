"""Beacon attention inside Hugging Face models (beacon_ops/integrations/transformers.py).

Tiny random Llama, Llama-3-scaled, Qwen2 (q/k/v biases) and Mistral models built with
transformers offline. References: transformers' own forward and greedy ``generate`` (inputs no
longer than a window, or ratio 0, are the base model), and our own model loaded from the same
weights through ``save_pretrained`` (with beacons).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from beacon_ops.adapter import save_beacon_adapter
from beacon_ops.checkpoints import load_hf, load_llama
from beacon_ops.generation import generate, prefill, sequence_loss
from beacon_ops.integrations.transformers import from_transformers
from beacon_ops.llama import BeaconConfig
from beacon_ops.training import beacon_loss

from llama_helpers import LLAMA3_SCALING

VOCAB = 97
SHAPE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
             num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
             rope_theta=500.0, rms_norm_eps=1e-5, eos_token_id=3, bos_token_id=1)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(rope_scaling=LLAMA3_SCALING, tie_word_embeddings=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False)),
}


def hf_model(family: str, seed: int = 0, **over):
    """A tiny random transformers model of ``family`` (fp32, eager attention), weights large
    enough that attention patterns (and beacons) matter; ``over`` replaces config fields."""
    cfg_cls, model_cls, extra = FAMILIES[family]
    cfg = getattr(transformers, cfg_cls)(**{**SHAPE, **extra, **over}, attn_implementation="eager")
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(std=0.3 if "embed" in name else 0.15)
    return model


def ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x[None]).logits[0]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    return request.param


def test_wrapper_shares_the_hf_modules(family):
    hf = hf_model(family)
    model = from_transformers(hf, BeaconConfig(window=16, ratio=4))
    ours, theirs = model.model.layers[1].self_attn, hf.model.layers[1].self_attn
    assert ours.q_proj is theirs.q_proj and model.model.embed_tokens is hf.model.embed_tokens
    assert (ours.q_proj.bias is not None) == (family == "qwen2") and ours.o_proj.bias is None
    hf_ids = {id(p) for p in hf.parameters()}
    new = [n for n, p in model.named_parameters() if id(p) not in hf_ids]
    assert new and all("beacon" in n for n in new)  # nothing but the beacon parameters is new
    assert torch.equal(ours.beacon_k_proj.weight, theirs.k_proj.weight)
    if family == "qwen2":
        assert torch.equal(ours.beacon_k_proj.bias, theirs.k_proj.bias)


@pytest.mark.parametrize("n, beacon", [(40, dict(window=64, ratio=4)), (100, dict(window=32, ratio=0))],
                         ids=["one-window", "ratio-0"])
def test_base_model_equals_transformers(family, n, beacon, tmp_path):
    hf = hf_model(family)
    x = ids(n)
    ref = hf_logits(hf, x)
    wrapped = from_transformers(hf, BeaconConfig(**beacon))
    assert max_diff(prefill(wrapped, [x], logits="all")[0], ref) <= 1e-4
    hf.save_pretrained(tmp_path)  # the Hugging Face folder round trip through our loader
    loaded = load_llama(str(tmp_path), BeaconConfig(**beacon)).eval()
    assert max_diff(prefill(loaded, [x], logits="all")[0], ref) <= 1e-4


def test_ratio_zero_generation_equals_transformers(family):
    hf = hf_model(family)
    x = ids(20, seed=1)
    hf.generation_config.eos_token_id = None  # exactly 30 tokens on both sides
    with torch.no_grad():
        ref = hf.generate(x[None], max_new_tokens=30, do_sample=False, pad_token_id=0)[0, 20:].tolist()
    wrapped = from_transformers(hf, BeaconConfig(window=16, ratio=0))
    assert generate(wrapped, [x], 30, eos_token_id=[])[0] == ref


def test_wrapper_with_beacons_equals_own_model(family, tmp_path):
    hf = hf_model(family)
    hf.save_pretrained(tmp_path)
    beacon = BeaconConfig(window=16, ratio=4)
    ours = load_llama(str(tmp_path), beacon).eval()
    wrapped = from_transformers(hf, beacon)
    x = ids(90, seed=2)
    got, want = prefill(wrapped, [x], logits="all")[0], prefill(ours, [x], logits="all")[0]
    assert max_diff(got, want) <= 1e-5
    assert max_diff(want[20:], hf_logits(hf, x)[20:]) > 1e-2  # beacons did change the output
    assert generate(wrapped, [x], 24, eos_token_id=[]) == generate(ours, [x], 24, eos_token_id=[])
    with torch.no_grad():
        assert abs(float(sequence_loss(wrapped, [x]) - sequence_loss(ours, [x]))) <= 1e-5
    a, b = beacon_loss(wrapped, x), beacon_loss(ours, x)
    assert abs(float(a.loss.detach() - b.loss.detach())) <= 1e-5
    a.loss.backward()
    b.loss.backward()
    ga = wrapped.model.layers[0].self_attn.beacon_q_proj.weight.grad
    gb = ours.model.layers[0].self_attn.beacon_q_proj.weight.grad
    assert ga is not None and max_diff(ga, gb) <= 1e-5


def test_adapter_loads_into_the_wrapper(tmp_path):
    hf = hf_model("qwen2")
    hf.save_pretrained(tmp_path / "hf")
    beacon = BeaconConfig(window=16, ratio=2)
    ours = load_llama(str(tmp_path / "hf"), beacon).eval()
    with torch.no_grad():  # a "trained" adapter: beacon parameters moved away from their start
        for name, p in ours.named_parameters():
            if "beacon" in name:
                p.add_(0.05 * torch.randn_like(p))
    save_beacon_adapter(ours, str(tmp_path / "adapter.safetensors"), {"params": ["q", "k", "v", "o"], "rank": 0})
    wrapped = from_transformers(hf, beacon, adapter=str(tmp_path / "adapter.safetensors"))
    x = ids(70, seed=3)
    assert max_diff(prefill(wrapped, [x], logits="all")[0], prefill(ours, [x], logits="all")[0]) <= 1e-5


def test_the_adapter_brings_its_beacon_settings(tmp_path):
    """Without a BeaconConfig, from_transformers reads with the window and layout the adapter was
    trained for (here the newer code's interleaved beacons), and computes what our own model does."""
    import dataclasses

    hf = hf_model("llama")
    hf.save_pretrained(tmp_path / "hf")
    beacon = BeaconConfig(window=16, mode="full-coverage", variant="v3", placement="interleave", sink_size=1)
    ours = load_llama(str(tmp_path / "hf"), beacon).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "beacon" in name:
                p.add_(0.05 * torch.randn_like(p))
    path = str(tmp_path / "adapter.safetensors")
    save_beacon_adapter(ours, path, {"params": ["q", "k", "v", "o"], "rank": 0, "window": 16, "stride": 16,
                                     **beacon.layout()})
    wrapped = from_transformers(hf, adapter=path)
    assert wrapped.beacon == beacon
    ours.beacon = wrapped.beacon = dataclasses.replace(beacon, ratio=2)
    x = ids(70, seed=4)
    assert max_diff(prefill(wrapped, [x], logits="all")[0], prefill(ours, [x], logits="all")[0]) <= 1e-5


def test_bad_models_are_named():
    with pytest.raises(TypeError, match="hf_model"):
        from_transformers(torch.nn.Linear(2, 2))
    cfg = transformers.LlamaConfig(**SHAPE, hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act"):
        from_transformers(transformers.LlamaForCausalLM(cfg))


def _readme_example() -> str:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    m = re.search(r"<!-- transformers-example -->\s*```python\n(.*?)```", readme, re.S)
    assert m, "README.md has no transformers example"
    return m.group(1)


def test_readme_example_runs(tmp_path):
    # the example as written, on a tiny Qwen2 folder with a byte-level tokenizer
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    hf = hf_model("qwen2", vocab_size=256, max_position_embeddings=4096)
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # one token per byte, no merges
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf.save_pretrained(tmp_path)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path)
    text = " ".join(f"line {i}: the quick brown fox jumps over the lazy dog." for i in range(60))
    scope = {"path": str(tmp_path), "long_text": text}  # ~2900 tokens: three windows
    exec(compile(_readme_example(), "README.md", "exec"), scope)
    assert 0 < len(scope["new_ids"][0]) <= 16 and isinstance(scope["answer"], str)  # may stop at EOS
    assert scope["model"].session.cache.host_ratio[0] == 8  # it did read with beacons
