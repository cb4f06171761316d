"""Checkpoint loading (beacon_ops/checkpoints.py): Hugging Face folders, GGUF files, tokenizer.

References: transformers (it writes the HF folders and loads SmolLM2's GGUF itself, with its own
q/k un-permutation), llama.cpp's documented q/k permutation, and ``gguf.GGUFWriter`` for tiny
GGUF files written here.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

# GGUF reading and writing need the `gguf` package (a demo extra; absent on some GPU boxes).
gguf = pytest.importorskip("gguf")

from beacon_ops.checkpoints import (
    config_from_hf, load_checkpoint, load_gguf, load_hf, load_llama, load_weights, permute_rope_rows, tokenizer_from_gguf,
    unpermute_rope_rows,
)
from beacon_ops.generation import prefill
from beacon_ops.llama import BeaconConfig, Llama

from llama_helpers import hf_twin, long_text, smollm2_hf, smollm2_or_skip, tiny_config, tiny_model

TOL = 1e-4


def _ids(n: int, seed: int = 0, vocab: int = 101) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


# --- Hugging Face folders --------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_hf_folder_sharded_roundtrip(tmp_path, tied):
    model = tiny_model(tiny_config(tie_word_embeddings=tied), window=16, ratio=0)
    hf = hf_twin(model)
    hf.save_pretrained(tmp_path, max_shard_size="40KB", safe_serialization=True)
    assert (tmp_path / "model.safetensors.index.json").exists()  # really sharded
    config, state = load_hf(str(tmp_path))
    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "tie_word_embeddings", "rope_theta", "max_position_embeddings"):
        assert getattr(config, field) == getattr(model.config, field), field
    for name, t in hf.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        assert torch.equal(state[name], t), name
    loaded = load_llama(str(tmp_path), BeaconConfig(window=16, ratio=0))
    x = _ids(40)
    with torch.no_grad():
        ref = hf(x[None]).logits[0]
    assert (prefill(loaded, [x], logits="all")[0] - ref).abs().max() <= TOL


def test_missing_beacon_parameters_are_initialised_from_the_base(tmp_path):
    model = tiny_model(window=16, ratio=4)
    base = {k: v for k, v in model.state_dict().items() if "beacon" not in k}
    fresh = Llama(model.config, model.beacon)
    load_weights(fresh, base)
    a = fresh.model.layers[1].self_attn
    assert torch.equal(a.beacon_q_proj.weight, a.q_proj.weight)
    assert torch.equal(a.beacon_o_proj.weight, a.o_proj.weight)
    eos = model.config.eos_token_id
    assert torch.equal(fresh.model.beacon_embed_tokens.weight[0], fresh.model.embed_tokens.weight[eos])
    # a checkpoint that has them keeps them (the released checkpoint's names)
    load_weights(fresh, model.state_dict())
    assert torch.equal(fresh.model.layers[1].self_attn.beacon_k_proj.weight,
                       model.model.layers[1].self_attn.beacon_k_proj.weight)


def test_bad_checkpoints_are_named(tmp_path):
    model = tiny_model(window=16, ratio=4)
    sd = model.state_dict()
    fresh = Llama(model.config, model.beacon)
    with pytest.raises(ValueError, match="unknown tensors.*model.layers.0.self_attn.q_bias"):
        load_weights(fresh, {**sd, "model.layers.0.self_attn.q_bias": torch.zeros(3)})
    with pytest.raises(ValueError, match="missing tensors.*model.layers.1.mlp.up_proj.weight"):
        load_weights(fresh, {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_weights(fresh, {k: v for k, v in sd.items() if k != "lm_head.weight"})
    bad = dict(sd)
    bad["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(5, 48)
    with pytest.raises(ValueError, match=r"k_proj.weight.*\(5, 48\).*\(16, 48\)"):
        load_weights(fresh, bad)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(str(tmp_path))
    hf_twin(model).save_pretrained(tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_hf(str(tmp_path))
    with pytest.raises(ValueError, match="neither"):
        load_checkpoint(str(tmp_path / "weights.bin"))


# --- q/k permutation of llama.cpp ---------------------------------------------------------------
def test_permutation_is_llama_cpp_and_invertible():
    heads, hd = 3, 8
    w = torch.randn(heads * hd, 5)
    p = permute_rope_rows(w, heads)
    # llama.cpp: within a head, row 2i is rotate-half row i and row 2i+1 is row i + hd/2
    for h in range(heads):
        for i in range(hd // 2):
            assert torch.equal(p[h * hd + 2 * i], w[h * hd + i])
            assert torch.equal(p[h * hd + 2 * i + 1], w[h * hd + hd // 2 + i])
    assert torch.equal(unpermute_rope_rows(p, heads), w)


@pytest.mark.parametrize("ratio", [0, 4])
def test_interleaved_rope_with_permuted_rows_is_the_same_model(ratio):
    model = tiny_model(window=16, ratio=ratio)
    c = model.config
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("q_proj.weight"):
            v = permute_rope_rows(v, c.num_heads)
        elif k.endswith("k_proj.weight"):
            v = permute_rope_rows(v, c.num_kv_heads)
        sd[k] = v
    inter = Llama(tiny_config(rope_interleaved=True), model.beacon)
    load_weights(inter, sd)
    x = _ids(60, seed=3)  # several windows: compaction re-rotates interleaved pairs too
    assert (prefill(inter, [x], logits="all")[0] - prefill(model, [x], logits="all")[0]).abs().max() <= TOL


_HF_SHAPE = dict(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                 num_attention_heads=6, num_key_value_heads=2)


def test_config_families_and_rope_parameters():
    assert config_from_hf({**_HF_SHAPE, "model_type": "qwen2"}).attention_bias == ("q", "k", "v")
    assert config_from_hf({**_HF_SHAPE, "model_type": "mistral", "sliding_window": 8}).attention_bias == ()
    assert config_from_hf({**_HF_SHAPE, "model_type": "llama", "attention_bias": True}).attention_bias == tuple("qkvo")
    # transformers 5 keeps theta and scaling in one dict
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 500.0}
    c = config_from_hf({**_HF_SHAPE, "model_type": "llama", "rope_parameters": rope})
    assert c.rope_theta == 500.0 and c.rope_scaling["rope_type"] == "llama3"
    c = config_from_hf({**_HF_SHAPE, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}})
    assert c.rope_theta == 7.0 and c.rope_scaling is None
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        config_from_hf({**_HF_SHAPE, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="mlp_bias"):
        config_from_hf({**_HF_SHAPE, "mlp_bias": True})


# --- GGUF -------------------------------------------------------------------------------------------
def _write_gguf(path, model: Llama, quantize_ffn: bool, arch: str = "llama") -> None:
    """What llama.cpp's converter writes: q/k rows permuted for ``llama`` only, biases as ``*.bias``."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    w.add_eos_token_id(c.eos_token_id)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for k, v in model.state_dict().items():
        if "beacon" in k:
            continue
        if k.startswith("model.layers."):
            i, rest = k[len("model.layers."):].split(".", 1)
            rest, kind = rest.rsplit(".", 1)
            name = f"blk.{i}.{layer[rest]}.{kind}"
        else:
            name = names[k]
        if arch != "llama":
            pass
        elif k.endswith("q_proj.weight"):
            v = permute_rope_rows(v, c.num_heads)
        elif k.endswith("k_proj.weight"):
            v = permute_rope_rows(v, c.num_kv_heads)
        arr = v.numpy().astype(np.float32)
        if quantize_ffn and name.split(".")[-2].startswith("ffn_") and arr.ndim == 2:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_roundtrip_unpermutes_and_dequantises(tmp_path):
    model = tiny_model(tiny_config(hidden_size=64, intermediate_size=96), window=16, ratio=0)
    _write_gguf(tmp_path / "tiny.gguf", model, quantize_ffn=True)
    config, state = load_gguf(str(tmp_path / "tiny.gguf"))
    assert not config.rope_interleaved and not config.tie_word_embeddings
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (2, 6, 2, 8)
    for k, v in model.state_dict().items():
        if "beacon" in k:
            continue
        if ".mlp." in k:
            # Q8_0: half a step (block absmax / 127) plus the fp16 rounding of the block scale
            blocks = v.reshape(-1, 32)
            amax = blocks.abs().amax(1, keepdim=True)
            bound = 0.5 * amax / 127 + amax * 2.0 ** -10
            assert ((state[k].reshape(-1, 32) - blocks).abs() <= bound).all(), k
        else:
            assert torch.equal(state[k], v), k
    # keeping llama.cpp's rows with interleaved RoPE gives the same model
    cfg_i, state_i = load_gguf(str(tmp_path / "tiny.gguf"), unpermute=False)
    assert cfg_i.rope_interleaved
    a = Llama(config, BeaconConfig(window=16, ratio=4))
    load_weights(a, state)
    b = Llama(cfg_i, BeaconConfig(window=16, ratio=4))
    load_weights(b, state_i)
    x = _ids(50, seed=4)
    assert (prefill(a, [x], logits="all")[0] - prefill(b, [x], logits="all")[0]).abs().max() <= TOL


def test_qwen2_gguf_keeps_rows_and_loads_biases(tmp_path):
    # llama.cpp writes Qwen2 with Hugging Face's rotate-half rows and q/k/v biases
    model = tiny_model(tiny_config(attention_bias=("q", "k", "v")), window=16, ratio=0)
    _write_gguf(tmp_path / "qwen2.gguf", model, quantize_ffn=False, arch="qwen2")
    config, state = load_gguf(str(tmp_path / "qwen2.gguf"))
    assert config.attention_bias == ("q", "k", "v") and not config.rope_interleaved
    assert "model.layers.1.self_attn.k_proj.bias" in state
    for k, v in model.state_dict().items():
        if "beacon" not in k:
            assert torch.equal(state[k], v), k
    loaded = Llama(config, model.beacon)
    load_weights(loaded, state)
    # beacon projections start as copies of the layer's, bias included
    at = loaded.model.layers[0].self_attn
    assert torch.equal(at.beacon_q_proj.bias, at.q_proj.bias) and at.beacon_o_proj.bias is None
    x = _ids(50, seed=5)  # ratio 0: the base model only, so the logits must agree
    assert (prefill(loaded, [x], logits="all")[0] - prefill(model, [x], logits="all")[0]).abs().max() <= TOL


def test_gguf_bad_files_are_named(tmp_path):

    with pytest.raises(FileNotFoundError, match="nothere.gguf"):
        load_gguf(str(tmp_path / "nothere.gguf"))
    w = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "llama")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_feed_forward_length(8)
    w.add_head_count(2)
    w.add_tensor("blk.0.attn_mystery.weight", np.zeros((8, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="blk.0.attn_mystery.weight"):
        load_gguf(str(tmp_path / "odd.gguf"))
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture is 'gpt2'"):
        load_gguf(str(tmp_path / "gpt2.gguf"))


# --- SmolLM2 ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_gguf_weights_equal_transformers():
    path = smollm2_or_skip()
    config, state = load_gguf(path)
    # the model's documented shape (engineering notes)
    assert (config.num_layers, config.hidden_size, config.intermediate_size, config.num_heads,
            config.num_kv_heads, config.head_dim, config.rope_theta, config.max_position_embeddings,
            config.vocab_size, config.tie_word_embeddings) == (30, 576, 1536, 9, 3, 64, 1e5, 8192, 49152, True)
    hf = smollm2_hf().state_dict()
    assert set(state) == set(hf) - {"lm_head.weight"}
    for k, v in state.items():
        assert torch.equal(v, hf[k]), k


@pytest.mark.slow
def test_smollm2_tokenizer_equals_transformers():
    import os

    from transformers import AutoTokenizer

    path = smollm2_or_skip()
    ours = tokenizer_from_gguf(path)
    theirs = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    text = ("The pass key is 68044. Remember it. 68044 is the pass key.\n<|im_start|>user\nhi<|im_end|>\n"
            + long_text()[:30000])
    ids = ours.encode(text)
    assert ids == theirs(text, add_special_tokens=False)["input_ids"]
    assert not ours.add_bos and ids[0] != ours.bos_token_id  # the GGUF says: no BOS
    assert ours.decode(ids) == text
