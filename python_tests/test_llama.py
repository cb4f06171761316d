"""The minimal Llama with Activation Beacon (beacon_ops/llama.py).

References: transformers' LlamaForCausalLM on the same weights (inputs no longer than the
window, ratio 0 at any length, full attention), and the from-scratch windowed algorithm of
``beacon_reference.py`` (keys cached before RoPE, re-rotated every step, explicit masks) for the
beacon path. Tiny random models in fp32; SmolLM2 (real checkpoint) on ~1K tokens.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from beacon_ops.checkpoints import load_llama
from beacon_ops.generation import decode_step, generate, prefill, ratio_for_length, sample, sequence_loss
from beacon_ops.llama import BeaconConfig, Llama

from beacon_reference import reference_logits
from llama_helpers import (LLAMA3_SCALING, hf_twin, smollm2_hf, smollm2_or_skip, smollm2_tokens,
                           tiny_config, tiny_model)

MODES = ["segmentation", "step-expansion", "full-coverage"]
TINY_TOL = 1e-4


def _ids(n: int, vocab: int = 101, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids[None]).logits[0]


def _ref(model: Llama, ids: torch.Tensor) -> torch.Tensor:
    b = model.beacon
    return reference_logits(model.state_dict(), model.config, ids.tolist(), window=b.window,
                            stride=b.stride, ratio=b.ratio, mode=b.mode,
                            attend_previous=b.attend_previous, beacon_params=b.beacon_params)


# --- the base model: transformers on the same weights ---------------------------------------------
@pytest.mark.parametrize("tied,scaling", [(False, None), (True, LLAMA3_SCALING)], ids=["untied", "tied-llama3"])
def test_full_attention_matches_transformers(tied, scaling):
    model = tiny_model(tiny_config(tie_word_embeddings=tied, rope_scaling=scaling), window=16)
    hf = hf_twin(model)
    seqs = [_ids(70, seed=1), _ids(29, seed=2)]  # batch 2, different lengths, several chunks
    out = prefill(model, seqs, logits="all", attention="full")
    for o, x in zip(out, seqs):
        assert (o - _hf_logits(hf, x)).abs().max() <= TINY_TOL


@pytest.mark.parametrize("mode", MODES)
def test_beacon_input_within_window_is_base_model(mode):
    # no window fills: no beacon, the base model exactly (trap 3)
    model = tiny_model(window=32, ratio=4, mode=mode)
    hf = hf_twin(model)
    seqs = [_ids(31, seed=3), _ids(12, seed=4)]
    out = prefill(model, seqs, logits="all")
    for o, x in zip(out, seqs):
        assert (o - _hf_logits(hf, x)).abs().max() <= TINY_TOL


@pytest.mark.parametrize("stride", [16, 8], ids=["S=W", "S<W"])
def test_ratio_zero_any_length_is_base_model(stride):
    model = tiny_model(tiny_config(rope_scaling=LLAMA3_SCALING), window=16, stride=stride, ratio=0)
    hf = hf_twin(model)
    seqs = [_ids(75, seed=5), _ids(40, seed=6)]
    out = prefill(model, seqs, logits="all")
    for o, x in zip(out, seqs):
        assert (o - _hf_logits(hf, x)).abs().max() <= TINY_TOL


def test_ratio_zero_generation_is_base_model():
    # greedy continuation across several window boundaries, batch 2 of different lengths:
    # same tokens as transformers, and each step's logits equal transformers' on the sequence
    model = tiny_model(window=8, stride=4, ratio=0)
    hf = hf_twin(model)
    prompts = [_ids(13, seed=7), _ids(6, seed=8)]
    new = generate(model, prompts, max_new_tokens=12, eos_token_id=[])
    for p, n in zip(prompts, new):
        full = torch.cat([p, torch.tensor(n)])
        ref = _hf_logits(hf, full)
        assert n == ref[len(p) - 1:-1].argmax(-1).tolist()
    # teacher-forced decode: logits of every decode step
    prefill(model, prompts, extra_tokens=12)
    for t in range(12):
        got = decode_step(model, [int(new[0][t]), int(new[1][t])])
        for b, p in enumerate(prompts):
            ref = _hf_logits(hf, torch.cat([p, torch.tensor(new[b][:t + 1])]))[-1]
            assert (got[b] - ref).abs().max() <= TINY_TOL


# --- the beacon path: the from-scratch windowed reference -----------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("window,stride,ratio", [(16, 16, 4), (16, 8, 2), (16, 8, 8), (12, 12, 3)],
                         ids=["W16S16r4", "W16S8r2", "W16S8r8", "W12S12r3"])
def test_beacon_prefill_matches_reference(mode, window, stride, ratio):
    model = tiny_model(window=window, stride=stride, ratio=ratio, mode=mode)
    seqs = [_ids(window + 3 * stride + 5, seed=9), _ids(window + stride + 3, seed=10)]  # >= 3 windows
    out = prefill(model, seqs, logits="all")
    for o, x in zip(out, seqs):
        assert (o - _ref(model, x)).abs().max() <= TINY_TOL


def test_beacons_change_the_output():
    # the beacon tests above would notice a wrong beacon path: later windows differ from r = 0
    x = _ids(60, seed=11)
    with_beacons = prefill(tiny_model(window=16, ratio=4), [x], logits="all")[0]
    without = prefill(tiny_model(window=16, ratio=0), [x], logits="all")[0]
    assert (with_beacons[:16] - without[:16]).abs().max() <= TINY_TOL
    assert (with_beacons[16:] - without[16:]).abs().max() > 100 * TINY_TOL


@pytest.mark.parametrize("attend_previous,params", [(False, ("q", "k", "v", "o")), (True, ("q", "v"))],
                         ids=["no-attend-previous", "beacon-qv-only"])
def test_beacon_options_match_reference(attend_previous, params):
    model = tiny_model(window=16, ratio=4, attend_previous=attend_previous, beacon_params=params)
    assert model.model.layers[0].self_attn.beacon_k_proj is None or "k" in params
    x = _ids(70, seed=12)
    assert (prefill(model, [x], logits="all")[0] - _ref(model, x)).abs().max() <= TINY_TOL


@pytest.mark.parametrize("mode", MODES)
def test_beacon_generation_across_windows_matches_reference(mode):
    # one token per step; the step that fills a window carries the beacons, then compaction
    model = tiny_model(window=8, stride=4, ratio=2, mode=mode)
    prompts = [_ids(11, seed=13), _ids(5, seed=14)]
    cont = [_ids(14, seed=15).tolist(), _ids(14, seed=16).tolist()]
    prefill(model, prompts, extra_tokens=14)
    steps = [decode_step(model, [cont[0][t], cont[1][t]]) for t in range(14)]
    for b, p in enumerate(prompts):
        ref = _ref(model, torch.cat([p, torch.tensor(cont[b])]))
        got = torch.stack([s[b] for s in steps])
        assert (got - ref[len(p):]).abs().max() <= TINY_TOL
    # greedy generate = the reference's argmax chain
    new = generate(model, [prompts[0]], max_new_tokens=10, eos_token_id=[])[0]
    ref = _ref(model, torch.cat([prompts[0], torch.tensor(new)]))
    assert new == ref[len(prompts[0]) - 1:-1].argmax(-1).tolist()


def test_decode_skips_finished_sequences():
    model = tiny_model(window=8, ratio=2)
    prompts = [_ids(9, seed=17), _ids(7, seed=18)]
    prefill(model, prompts, extra_tokens=4)
    decode_step(model, [5, None])
    got = decode_step(model, [6, 7])
    ref0 = _ref(model, torch.cat([prompts[0], torch.tensor([5, 6])]))[-1]
    ref1 = _ref(model, torch.cat([prompts[1], torch.tensor([7])]))[-1]
    assert (got[0] - ref0).abs().max() <= TINY_TOL and (got[1] - ref1).abs().max() <= TINY_TOL


def test_generation_stops_at_eos():
    model = tiny_model(window=8, ratio=2)
    p = _ids(10, seed=19)
    free = generate(model, [p], max_new_tokens=6, eos_token_id=[])[0]
    stop = free[2]
    assert generate(model, [p], max_new_tokens=6, eos_token_id=stop)[0] == free[:free.index(stop) + 1]


def test_sampling_top_p_keeps_the_nucleus():
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(logits[0], -1)  # 0.705, 0.259, 0.035, 0.013
    draws = sample(logits, temperature=1.0, top_p=0.9, generator=g)
    assert set(draws.tolist()) == {0, 1}  # the smallest prefix with mass >= 0.9
    frac0 = (draws == 0).float().mean().item()
    assert abs(frac0 - (p[0] / (p[0] + p[1])).item()) < 0.05
    assert sample(logits[:3], temperature=0.7, top_p=0.5, generator=g).tolist() == [0, 0, 0]
    assert sample(logits[:1]).tolist() == [0]


# --- loss --------------------------------------------------------------------------------------------
def test_loss_shifts_labels_once_over_the_whole_sequence():
    model = tiny_model(window=16, stride=8, ratio=4)
    model.logits_chunk = 5  # exercise the chunked logits
    seqs = [_ids(50, seed=20), _ids(33, seed=21)]
    labels = [x.clone() for x in seqs]
    labels[0][:20] = -100  # only targets from position 20 on
    with torch.no_grad():
        loss = sequence_loss(model, seqs, labels)
    total, count = 0.0, 0
    for x, lb in zip(seqs, labels):
        ref = _ref(model, x)[:-1]
        tgt = lb[1:]
        keep = tgt != -100
        total += F.cross_entropy(ref[keep], tgt[keep], reduction="sum").item()
        count += int(keep.sum())
    assert math.isclose(loss.item(), total / count, rel_tol=1e-5)


# --- bad input -------------------------------------------------------------------------------------
def test_bad_input_is_named():
    model = tiny_model(window=8, ratio=2)
    with pytest.raises(ValueError, match="token ids must lie in"):
        prefill(model, [[1, 2, 101]])
    with pytest.raises(ValueError, match="token ids must lie in"):
        prefill(model, [[1, -1]])
    with pytest.raises(ValueError, match="empty"):
        prefill(model, [[]])
    with pytest.raises(ValueError, match="empty batch"):
        prefill(model, [])
    with pytest.raises(ValueError, match="S % r"):
        BeaconConfig(window=8, stride=6, ratio=4)
    with pytest.raises(ValueError, match="mode"):
        BeaconConfig(mode="sideways")
    with pytest.raises(ValueError, match="stride"):
        BeaconConfig(window=8, stride=9)
    with pytest.raises(RuntimeError, match="prefill first"):
        decode_step(tiny_model(window=8, ratio=2), [1])
    prefill(model, [[1, 2, 3]])
    with pytest.raises(ValueError, match="tokens"):
        decode_step(model, [1, 2])
    with pytest.raises(ValueError, match="labels"):
        sequence_loss(model, [[1, 2, 3]], [[1, 2]])


def test_warns_when_positions_pass_max_pos():
    model = tiny_model(tiny_config(max_position_embeddings=24), window=8, ratio=0)
    with pytest.warns(RuntimeWarning, match="max_position_embeddings"):
        prefill(model, [_ids(40, seed=22)])
    model = tiny_model(tiny_config(max_position_embeddings=24), window=8, ratio=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prefill(model, [_ids(40, seed=22)])  # memory 2 per window: positions stay < 24


def test_memory_is_condensed():
    model = tiny_model(window=16, ratio=8)
    prefill(model, [_ids(16 * 5 + 3, seed=23)])
    c = model.session.cache
    assert (c.host_mem_len[0], c.host_raw_len[0]) == (5 * 2, 3)


# --- SmolLM2 (real checkpoint) -------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol():
    path = smollm2_or_skip()
    ours = load_llama(path, BeaconConfig(window=512, ratio=0)).eval()
    hf = smollm2_hf()
    ids = smollm2_tokens()
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    return ours, hf, ids, ref


@pytest.mark.slow
def test_smollm2_matches_transformers(smol):
    ours, hf, ids, ref = smol
    # the beacon path with ratio 0 over 3 windows of 512, and full attention: the base model
    full = prefill(ours, [ids[:300]], logits="all", attention="full")[0]  # a prefix: causal
    assert (full - ref[:300]).abs().max() <= 1e-3
    beacon = prefill(ours, [ids], logits="all")[0]
    assert (beacon - ref).abs().max() <= 1e-3


@pytest.mark.slow
def test_smollm2_generation_matches_transformers(smol):
    ours, hf, ids, ref = smol
    prompt = ids[:500]  # the window (512) fills during generation
    new = generate(ours, [prompt], max_new_tokens=20, eos_token_id=[])[0]
    with torch.no_grad():
        ref = hf(torch.cat([prompt, torch.tensor(new)])[None]).logits[0]
    assert new == ref[len(prompt) - 1:-1].argmax(-1).tolist()


def test_adapt_ratio_per_sequence():
    # adapt-N (``docs/activation-beacon.md``, section 6) with max_pos 64, W 16, N 16: maxlen(r) = 48 r + 16 (maxlen(0) = 64)
    model = tiny_model(tiny_config(max_position_embeddings=64), window=16, ratio=None, adapt_n=16)
    seqs = [_ids(100, seed=24), _ids(40, seed=25)]  # 116 tokens -> r = 4; 56 tokens -> r = 0
    out = prefill(model, seqs, logits="all")
    assert model.session.cache.host_ratio == [4, 0]
    for o, x, r in zip(out, seqs, (4, 0)):
        ref = reference_logits(model.state_dict(), model.config, x.tolist(), window=16, stride=16,
                               ratio=r, mode=model.beacon.mode)
        assert (o - ref).abs().max() <= TINY_TOL


def test_adapt_context_caps_the_context_adapt_n_plans_for():
    # max_pos 64 capped at 40, W 16, N 16: maxlen(r) = 24 r + 16 (cap 40; uncapped 48 r + 16)
    model = tiny_model(tiny_config(max_position_embeddings=64), window=16, ratio=None, adapt_n=16,
                       adapt_context=40)
    assert [ratio_for_length(model, n) for n in (20, 60, 100, 180)] == [0, 4, 8, 8]
    seqs = [_ids(100, seed=27)]  # 116 tokens: r = 8 (uncapped: 4)
    out = prefill(model, seqs, logits="all")
    assert model.session.cache.host_ratio == [8]
    ref = reference_logits(model.state_dict(), model.config, seqs[0].tolist(), window=16, stride=16,
                           ratio=8, mode=model.beacon.mode)
    assert (out[0] - ref).abs().max() <= TINY_TOL
    big = tiny_model(tiny_config(max_position_embeddings=64), window=16, ratio=None, adapt_n=16,
                     adapt_context=1000)  # above the model's context: the model's context
    assert ratio_for_length(big, 100) == 4
    with pytest.raises(ValueError, match="adapt_context must exceed the window 16"):
        BeaconConfig(window=16, adapt_context=16)


def test_adapt_ratio_that_does_not_divide_the_stride_is_named():
    model = tiny_model(tiny_config(max_position_embeddings=64), window=16, stride=12, ratio=None, adapt_n=16)
    with pytest.raises(ValueError, match="ratio=8 does not divide the stride 12"):
        prefill(model, [_ids(300, seed=26)])  # 316 tokens: 48 r + 16 >= 316 -> r = 8
