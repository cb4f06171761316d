"""beacon_ops.positions against ``docs/activation-beacon.md`` (section 4 and the worked example of section 3) and
rope_tables against Hugging Face's rotary embedding."""
from __future__ import annotations

import pytest
import torch

from beacon_ops.positions import MODES, beacon_position, check_mode, rope_tables, slot_position, step_positions


def test_worked_example_step_expansion():
    """Spec section 3: W = S = 8, r = 4, two windows; the 'pos' columns of the table."""
    w1 = step_positions([0], [8], [2], [4], [10], window=8, mode="step-expansion")
    assert w1.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 4, 8]
    # Window 2: memory m0, m1 (window 1's beacons), t8..t15 at 2..9, b0' at 6, b1' at 10.
    w2 = step_positions([2], [8], [2], [4], [10], window=8, mode="step-expansion")
    assert w2.tolist() == [2, 3, 4, 5, 6, 7, 8, 9, 6, 10]
    assert w1.dtype == torch.int32


@pytest.mark.parametrize("mode, beacons_w1, beacons_w2", [
    ("segmentation", [4, 4], [6, 6]),        # M + r for all beacons
    ("step-expansion", [4, 8], [6, 10]),     # M + (j + 1) r
    ("full-coverage", [8, 8], [10, 10]),     # M + W for all beacons
])
def test_beacon_positions_all_modes(mode, beacons_w1, beacons_w2):
    assert step_positions([0], [8], [2], [4], [10], 8, mode).tolist()[8:] == beacons_w1
    assert step_positions([2], [8], [2], [4], [10], 8, mode).tolist()[8:] == beacons_w2
    assert [beacon_position(2, j, 4, 8, mode) for j in range(2)] == beacons_w2


def test_chunked_steps_and_batch():
    """A window fed in chunks (3, then 5 completing it) and a packed batch of two sequences."""
    first = step_positions([2], [3], [0], [4], [3], 8, "step-expansion")
    assert first.tolist() == [2, 3, 4]
    second = step_positions([2], [8], [2], [4], [7], 8, "step-expansion")
    assert second.tolist() == [5, 6, 7, 8, 9, 6, 10]
    # Sequence 0: decode step (1 raw token) in a window with memory 5; sequence 1: completing
    # step of a first window with W = 4, r = 2 (1 raw + 2 beacons).
    packed = step_positions([5, 0], [3, 4], [0, 2], [2, 2], [1, 3], 4, "step-expansion")
    assert packed.tolist() == [7, 3, 2, 4]
    # A sequence with no new tokens contributes nothing.
    assert step_positions([5, 0], [3, 1], [0, 0], [0, 0], [0, 1], 4, "segmentation").tolist() == [0]


def test_slots_of_memory_and_raw_are_their_positions():
    for mode in MODES:
        assert [slot_position(s, 3, 4, 2, 4, mode) for s in range(7)] == list(range(7))
        assert slot_position(7, 3, 4, 2, 4, mode) == beacon_position(3, 0, 2, 4, mode)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        check_mode("causal")
    with pytest.raises(ValueError, match="num_new"):
        step_positions([0], [3], [0], [0], [4], 8, "step-expansion")  # more tokens than raw
    with pytest.raises(ValueError, match="num_new"):
        step_positions([0], [8], [2], [4], [1], 8, "step-expansion")  # beacons not appended


def _hf_cos_sin(config, n):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    emb = LlamaRotaryEmbedding(config)
    x = torch.zeros(1, n, 1, dtype=torch.float32)
    cos, sin = emb(x, torch.arange(n)[None])
    return emb, cos[0], sin[0]


@pytest.mark.parametrize("rope", [
    {"rope_theta": 10000.0},                                   # Llama-2
    {"rope_theta": 100000.0},                                  # SmolLM2
    {"rope_theta": 500000.0, "rope_scaling": {                 # Llama-3 style scaling
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}},
])
def test_rope_tables_match_hugging_face(rope):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=128, num_attention_heads=2, max_position_embeddings=4096, **rope)
    emb, hf_cos, hf_sin = _hf_cos_sin(config, 600)
    cos, sin = rope_tables(emb.inv_freq, 600)
    assert cos.shape == (600, 32) and cos.dtype == torch.float32
    # Hugging Face repeats the half table ([c, c]); attention_scaling is 1 for these types.
    assert torch.equal(hf_cos, torch.cat([cos, cos], -1))
    assert torch.equal(hf_sin, torch.cat([sin, sin], -1))
