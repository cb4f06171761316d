"""The Llama in the newer variant (BeaconConfig(variant="v3")): interleaved or appended beacons,
sink tokens, causal full-coverage and the newer step-expansion, through the condensed cache,
against the from-scratch reference of ``beacon_reference_v3.py`` (pre-RoPE stores re-rotated at
every call, explicit masks), against transformers where the variant must equal the base model,
and against outputs of the newer official implementation stored in
``data/beacon_v3_reference_outputs.json``."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from beacon_ops.checkpoints import load_beacon_checkpoint
from beacon_ops.condensed_cache import CondensedKVCache
from beacon_ops.generation import decode_step, generate, prefill

from beacon_reference_v3 import ReferenceV3
from llama_helpers import hf_twin, tiny_config, tiny_model

TOL = 1e-4


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _model(**beacon):
    beacon.setdefault("beacon_params", ("q", "k", "v"))  # the released setting
    return tiny_model(variant="v3", **beacon)


def _reference(model) -> ReferenceV3:
    b = model.beacon
    return ReferenceV3(model.state_dict(), model.config, window=b.window, ratio=b.ratio,
                       placement=b.placement, mode=b.mode, attend_previous=b.attend_previous,
                       sink=b.sink_size, beacon_params=b.beacon_params, recapture=b.sink_recapture)


def _max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape
    return (got - want).abs().max().item()


# --- prefill: several windows, batch of sequences at different phases -----------------------------
@pytest.mark.parametrize("ratio", [2, 4])
@pytest.mark.parametrize("sink", [0, 1, 2])
def test_interleave_full_coverage_prefill(ratio, sink):
    model = _model(window=16, ratio=ratio, placement="interleave", mode="full-coverage", sink_size=sink)
    seqs = [_ids(61, seed=1), _ids(16, seed=2), _ids(11, seed=3)]  # 3 windows + a tail, exactly 1, short
    out = prefill(model, [torch.tensor(s) for s in seqs], logits="all")
    for o, s in zip(out, seqs):
        assert _max_err(o, _reference(model)(s)) <= TOL


@pytest.mark.parametrize("mode,attend_previous", [("full-coverage", True), ("step-expansion", True),
                                                  ("step-expansion", False)])
@pytest.mark.parametrize("sink", [0, 1])
def test_append_prefill(mode, attend_previous, sink):
    model = _model(window=16, ratio=4, mode=mode, attend_previous=attend_previous, sink_size=sink)
    seqs = [_ids(53, seed=4), _ids(35, seed=5)]
    out = prefill(model, [torch.tensor(s) for s in seqs], logits="all")
    for o, s in zip(out, seqs):
        assert _max_err(o, _reference(model)(s)) <= TOL


def test_qwen2_biases():
    # Qwen2: q/k/v biases, which the beacon projections carry too
    model = tiny_model(tiny_config(attention_bias=("q", "k", "v")), variant="v3", window=16, ratio=2,
                       placement="interleave", mode="full-coverage", beacon_params=("q", "k", "v"))
    assert model.model.layers[0].self_attn.beacon_k_proj.bias is not None
    s = _ids(45, seed=15)
    assert _max_err(prefill(model, [torch.tensor(s)], logits="all")[0], _reference(model)(s)) <= TOL


def test_gqa_and_qkvo_beacon_params():
    model = tiny_model(tiny_config(num_heads=6, num_kv_heads=1), variant="v3", window=12, ratio=3,
                       placement="interleave", mode="full-coverage", sink_size=1)
    s = _ids(40, seed=6)
    assert _max_err(prefill(model, [torch.tensor(s)], logits="all")[0], _reference(model)(s)) <= TOL


# --- generation across window edges: every decode step's logits -----------------------------------
@pytest.mark.parametrize("placement,mode,sink", [("interleave", "full-coverage", 0),
                                                 ("interleave", "full-coverage", 1),
                                                 ("append", "step-expansion", 1)])
def test_decode_steps_match_reference(placement, mode, sink):
    model = _model(window=8, ratio=2, placement=placement, mode=mode, sink_size=sink)
    prompts = [_ids(13, seed=7), _ids(5, seed=8)]
    cont = [_ids(14, seed=9), _ids(14, seed=10)]
    refs = [_reference(model) for _ in prompts]
    prefill(model, [torch.tensor(p) for p in prompts], extra_tokens=14)
    for b, p in enumerate(prompts):
        refs[b](p)
    for t in range(14):
        got = decode_step(model, [cont[0][t], cont[1][t]])
        for b in range(2):
            assert _max_err(got[b], refs[b]([cont[b][t]])[-1]) <= TOL, (t, b)


def test_greedy_generation_is_the_reference_argmax_chain():
    model = _model(window=8, ratio=2, placement="interleave", mode="full-coverage", sink_size=1)
    prompt = _ids(19, seed=11)
    new = generate(model, [torch.tensor(prompt)], max_new_tokens=12, eos_token_id=[])[0]
    ref = _reference(model)(prompt + new)
    assert new == ref[len(prompt) - 1:-1].argmax(-1).tolist()


# --- what must (not) equal the base model ---------------------------------------------------------
@pytest.mark.parametrize("sink", [0, 1])
def test_ratio_zero_interleave_is_base_model(sink):
    model = _model(window=16, ratio=0, placement="interleave", mode="full-coverage", sink_size=sink)
    hf = hf_twin(model)
    x = torch.tensor(_ids(50, seed=12))
    with torch.no_grad():
        want = hf(x[None]).logits[0]
    assert _max_err(prefill(model, [x], logits="all")[0], want) <= TOL


def test_interleaved_short_input_differs_from_base_model_after_r_tokens():
    # docs section 9: beacons go into a window that is not full, so only the first r tokens are
    # the base model's
    model = _model(window=16, ratio=4, placement="interleave", mode="full-coverage")
    hf = hf_twin(model)
    x = torch.tensor(_ids(12, seed=13))
    with torch.no_grad():
        want = hf(x[None]).logits[0]
    got = prefill(model, [x], logits="all")[0]
    assert _max_err(got[:4], want[:4]) <= TOL
    assert (got[4:] - want[4:]).abs().max().item() > 100 * TOL


# --- the cache's bookkeeping ----------------------------------------------------------------------
def test_interleaved_cache_lengths_and_capacity():
    cache = CondensedKVCache(1, 1, 1, 8, CondensedKVCache.capacity_for(22, 8, ratio=2, sink_size=1,
                                                                        placement="interleave"),
                             window=8, mode="causal", placement="interleave", sink_size=1)
    cache.set_ratio(0, 2)
    plan = cache.begin_step([3])           # t t B t
    assert plan.beacon_slots == [[2]] and plan.positions.tolist() == [0, 1, 2, 3]
    assert cache.raw_len.tolist() == [4] and cache.beacon_len.tolist() == [0]
    plan = cache.begin_step([5])           # t B t t B t t B
    assert plan.beacon_slots == [[1, 4, 7]] and plan.positions.tolist() == list(range(4, 12))
    cache.compact()                        # sink (entry 0) + 4 beacons
    assert (cache.host_mem_len, cache.host_raw_len, cache.host_inner_beacons) == ([5], [0], [0])
    plan = cache.begin_step([1])
    assert plan.positions.tolist() == [5]
    with pytest.raises(ValueError, match="ratio is set at the start of a window"):
        cache.set_ratio(0, 4)
    for n in (7, 6):                       # fill the cache to its computed capacity exactly
        cache.compact()
        cache.begin_step([min(n, cache.room(0))])
    assert max(cache.slots_in_use(0), 0) <= cache.capacity


@pytest.mark.parametrize("kw,match", [
    (dict(placement="side"), "placement must be one of"),
    (dict(placement="interleave", mode="step-expansion"), "placement='interleave' needs mode='causal'"),
    (dict(sink_size=8), r"sink_size must be an integer in \[0, window=8\)"),
    (dict(sink_size=1, stride=4), "stride=4 must equal window=8"),
])
def test_cache_settings_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        CondensedKVCache(1, 1, 1, 8, 32, window=8, **{"mode": "causal", **kw})


# --- training: the differentiable cache with the newer mask kinds ----------------------------------
@pytest.mark.parametrize("attention", ["op", "masked"])
@pytest.mark.parametrize("mode,attend_previous", [("full-coverage", True), ("step-expansion", True)])
def test_beacon_loss_matches_reference(attention, mode, attend_previous):
    from beacon_ops.training import beacon_loss

    model = _model(window=8, ratio=2, mode=mode, attend_previous=attend_previous)
    ids = _ids(30, seed=14)
    logits = _reference(model)(ids)
    want = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
    got = beacon_loss(model, torch.tensor(ids), attention=attention)
    assert abs(got.loss.item() - want.item()) <= TOL


def test_gathered_and_sliced_rows_agree(monkeypatch):
    # many interleaved beacon rows are projected by index; the same step sliced run by run
    from beacon_ops.llama import _Rows

    model = _model(window=16, ratio=2, placement="interleave", mode="full-coverage", sink_size=1)
    x = [torch.tensor(_ids(40, seed=16)), torch.tensor(_ids(23, seed=17))]
    gathered = prefill(model, x, logits="all")
    monkeypatch.setattr(_Rows, "MAX_SLICED_RUNS", 10**6)
    sliced = prefill(model, x, logits="all")
    for g, s in zip(gathered, sliced):
        assert _max_err(g, s) <= 1e-5


# --- the newer official implementation's own outputs ----------------------------------------------
# Prompt logits, loss and greedy ids that the reference code (source commit and run settings in the
# file) produced with the random weights of tiny_model(seed); only these numbers are stored.
_OFFICIAL = json.loads((Path(__file__).parent / "data" / "beacon_v3_reference_outputs.json").read_text())


def _official_case_model(case: dict, sink_recapture: bool = True):
    config = tiny_config(attention_bias=("q", "k", "v")) if case["family"] == "qwen2" else tiny_config()
    ratio = dict(ratio=case["ratio"]) if case["adapt"] is None else \
        dict(ratio=None, adapt_n=case["adapt"]["n"], adapt_ratios=tuple(case["adapt"]["ratios"]))
    model = tiny_model(config, seed=case["seed"], variant="v3", window=case["window"],
                       placement=case["placement"], mode=case["mode"],
                       attend_previous=case["attend_previous"], sink_size=case["sink_size"],
                       beacon_params=("q", "k", "v"), sink_recapture=sink_recapture and case["sink_size"] == 1,
                       **ratio)
    weight_sum = sum(p.double().sum().item() for p in model.state_dict().values())
    assert weight_sum == pytest.approx(case["weight_sum"], rel=1e-9), \
        "tiny_model(seed) no longer draws the weights the stored outputs were made with"
    return model


@pytest.mark.parametrize("case", _OFFICIAL["cases"], ids=lambda c: c["name"])
def test_prompt_matches_official_implementation(case):
    model = _official_case_model(case)
    x = torch.tensor(case["prompt"])
    logits = prefill(model, [x], logits="all")[0]
    assert _max_err(logits[:, _OFFICIAL["logit_columns"]], torch.tensor(case["logits"])) <= TOL
    assert _max_err(torch.logsumexp(logits, -1), torch.tensor(case["logsumexp"])) <= TOL
    loss = torch.nn.functional.cross_entropy(logits[:-1], x[1:]).item()
    assert abs(loss - case["loss"]) <= TOL


@pytest.mark.parametrize("case", _OFFICIAL["cases"], ids=lambda c: c["name"])
def test_greedy_ids_match_official_implementation(case):
    model = _official_case_model(case)  # a sink of 1 re-taken as the released models do
    new = generate(model, [torch.tensor(case["prompt"])], max_new_tokens=len(case["greedy"]),
                   eos_token_id=[])[0]
    assert new == case["greedy"]


@pytest.mark.parametrize("case", [c for c in _OFFICIAL["cases"] if c["name"] in (
    "llama-interleave-full-coverage-r4-sink1-len40", "qwen2-interleave-full-coverage-r2-sink0-len40",
    "llama-append-step-expansion-noprev-r4-sink1-len37")], ids=lambda c: c["name"])
def test_training_loss_matches_official_implementation(case):
    """The differentiable training path (its own cache) reproduces the reference code's loss."""
    from beacon_ops.training import beacon_loss

    with torch.no_grad():
        loss = beacon_loss(_official_case_model(case), torch.tensor(case["prompt"])).loss.item()
    assert abs(loss - case["loss"]) <= TOL


@pytest.mark.parametrize("case", [c for c in _OFFICIAL["cases"] if "known_difference" in c], ids=lambda c: c["name"])
def test_plain_sink_differs_from_official_on_short_prompts(case):
    model = _official_case_model(case, sink_recapture=False)
    new = generate(model, [torch.tensor(case["prompt"])], max_new_tokens=len(case["greedy"]),
                   eos_token_id=[])[0]
    assert new != case["greedy"]


# --- the sink re-taken while the first window is read (sink_recapture) ---------------------------
@pytest.mark.parametrize("placement,mode,attend_previous,ratio,prompt_len", [
    ("interleave", "full-coverage", True, 2, 5), ("append", "step-expansion", True, 4, 3),
    ("append", "step-expansion", False, 2, 6), ("interleave", "full-coverage", True, 0, 4),
    ("interleave", "full-coverage", True, 4, 8)])
def test_sink_recapture_decode_steps_match_reference(placement, mode, attend_previous, ratio, prompt_len):
    model = _model(window=8, ratio=ratio, placement=placement, mode=mode, attend_previous=attend_previous,
                   sink_size=1, sink_recapture=True)
    prompts = [_ids(prompt_len, seed=30), _ids(11, seed=31)]  # a short first step, and a full one
    cont = [_ids(20, seed=32), _ids(20, seed=33)]
    refs = [_reference(model) for _ in prompts]
    got = prefill(model, [torch.tensor(p) for p in prompts], logits="all", extra_tokens=20)
    for b, p in enumerate(prompts):
        assert _max_err(got[b], refs[b](p)) <= TOL
    for t in range(20):
        got = decode_step(model, [cont[0][t], cont[1][t]])
        for b in range(2):
            assert _max_err(got[b], refs[b]([cont[b][t]])[-1]) <= TOL, (t, b)


def test_sink_recapture_cache_lengths():
    cache = CondensedKVCache(1, 1, 1, 8, CondensedKVCache.capacity_for(12, 8, ratio=2, sink_size=1,
                                                                        placement="interleave",
                                                                        sink_recapture=True),
                             window=8, mode="causal", placement="interleave", sink_size=1, sink_recapture=True)
    cache.set_ratio(0, 2)
    plan = cache.begin_step([3])           # t t B t: no sink yet
    assert plan.positions.tolist() == [0, 1, 2, 3] and cache.host_mem_len == [0]
    plan = cache.begin_step([1])           # the sink slot opens: the window moves one position up
    assert plan.positions.tolist() == [5, 6] and cache.host_mem_len == [1]
    plan = cache.begin_step([4])           # completes the window: sink + 4 beacons
    assert plan.positions.tolist() == list(range(7, 13))
    assert cache.slots_in_use(0) == cache.capacity  # the peak: capacity_for counted the sink slot
    cache.compact()
    assert (cache.host_mem_len, cache.host_raw_len, cache.host_inner_beacons) == ([5], [0], [0])
    assert cache.begin_step([4]).positions.tolist() == list(range(5, 11))
    with pytest.raises(ValueError, match="sink_recapture needs sink_size 0 or 1"):
        CondensedKVCache(1, 1, 1, 8, 32, window=8, mode="causal", sink_size=2, sink_recapture=True)
    with pytest.raises(ValueError, match="sink_recapture needs sink_size=1"):
        _model(window=8, ratio=2, placement="interleave", mode="full-coverage", sink_recapture=True)


# --- a released checkpoint's folder, in one call ----------------------------------------------------
def _write_official_folder(folder: Path, case: dict, model, state: dict | None = None, **config_changes) -> None:
    """A Hugging Face folder in the layout of the official code's ``save_pretrained``: the base
    config keys (transformers' config class) plus the ``beacon_*`` keys, one safetensors file with
    the base weights and the beacon parameters under their official names (the project's)."""
    import transformers
    from safetensors.torch import save_file

    c = model.config
    ratios = [case["ratio"]] if case["adapt"] is None else case["adapt"]["ratios"]
    beacon_keys = dict(beacon_window=case["window"], beacon_stride=case["window"], beacon_attn=case["mode"],
                       beacon_ratio=ratios, beacon_ratio_mix="step-random" if case["adapt"] is None
                       else f"adapt-{case['adapt']['n']}", beacon_param=["q", "k", "v"],
                       beacon_embed_init="eos", beacon_sink_size=case["sink_size"],
                       beacon_attend_prev=case["attend_previous"], beacon_pos=case["placement"],
                       beacon_parallel_window=1)
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[case["family"]]
    cls(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        rope_theta=c.rope_theta, max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=False, eos_token_id=c.eos_token_id, bos_token_id=c.bos_token_id,
        **{**beacon_keys, **config_changes}).save_pretrained(folder)
    state = model.state_dict() if state is None else state
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


_RELEASED_LIKE = [c for c in _OFFICIAL["cases"] if c["adapt"] is not None or c["placement"] == "append"][:3]


@pytest.mark.parametrize("case", _RELEASED_LIKE, ids=lambda c: c["name"])
def test_released_checkpoint_folder_loads_in_one_call(tmp_path, case):
    _write_official_folder(tmp_path, case, _official_case_model(case))
    model = load_beacon_checkpoint(str(tmp_path))
    b = model.beacon
    assert (b.variant, b.placement, b.mode, b.sink_size, b.beacon_params) == \
        ("v3", case["placement"], case["mode"], case["sink_size"], ("q", "k", "v"))
    assert (b.ratio, b.adapt_ratios) == ((case["ratio"], None) if case["adapt"] is None else
                                         (None, tuple(case["adapt"]["ratios"])))
    logits = prefill(model, [torch.tensor(case["prompt"])], logits="all")[0]
    assert _max_err(logits[:, _OFFICIAL["logit_columns"]], torch.tensor(case["logits"])) <= TOL
    new = generate(model, [torch.tensor(case["prompt"])], max_new_tokens=len(case["greedy"]), eos_token_id=[])[0]
    assert new == case["greedy"]
    assert load_beacon_checkpoint(str(tmp_path), ratio=0).beacon.ratio == 0  # an override


def test_released_checkpoint_problems_are_named(tmp_path):
    case = next(c for c in _OFFICIAL["cases"] if c["family"] == "qwen2")
    model = _official_case_model(case)
    state = model.state_dict()
    folder = tmp_path / "missing"
    _write_official_folder(folder, case, model, {k: v for k, v in state.items()
                                          if k != "model.layers.1.self_attn.beacon_v_proj.bias"})
    with pytest.raises(ValueError, match=r"missing.*beacon tensor 'model.layers.1.self_attn.beacon_v_proj.bias' "
                                         r"is missing"):
        load_beacon_checkpoint(str(folder))
    folder = tmp_path / "extra"
    _write_official_folder(folder, case, model, {**state, "model.layers.0.self_attn.beacon_o_proj.weight":
                                          torch.zeros(48, 48)})
    with pytest.raises(ValueError, match=r"model.safetensors: unexpected beacon tensor "
                                         r"'model.layers.0.self_attn.beacon_o_proj.weight'.*\['q', 'k', 'v'\]"):
        load_beacon_checkpoint(str(folder))
    for key, value, match in [("beacon_parallel_window", 2, "beacon_parallel_window=2 is not supported"),
                              ("beacon_attn", "segmentation", "segmentation' is not part of variant 'v3'"),
                              ("beacon_pos", "side", "placement must be one of"),
                              ("beacon_param", ["q", "mlp"], "beacon_params may only contain")]:
        folder = tmp_path / key
        _write_official_folder(folder, case, model, **{key: value})
        with pytest.raises(ValueError, match=f"config.json: .*{match}"):
            load_beacon_checkpoint(str(folder))
    with pytest.raises(ValueError, match=r"config.json: stride=8 must equal window=16"):
        load_beacon_checkpoint(str(tmp_path / "extra"), stride=8)
    hf_twin(_official_case_model(_OFFICIAL["cases"][0])).save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match="config.json: config: beacon_window is missing"):
        load_beacon_checkpoint(str(tmp_path / "base"))


def test_mistral_released_folder_is_the_same_model_code(tmp_path):
    # Mistral is Llama without biases; its sliding window (none here) plays no part with beacons
    import transformers

    model = tiny_model(seed=21, variant="v3", window=16, ratio=2, placement="interleave", mode="full-coverage",
                       sink_size=1, beacon_params=("q", "k", "v"))
    case = dict(family="mistral", window=16, ratio=2, adapt=None, mode="full-coverage", sink_size=1,
                attend_previous=True, placement="interleave")
    _write_official_folder(tmp_path, case, model, sliding_window=None)
    loaded = load_beacon_checkpoint(str(tmp_path))
    assert loaded.config.attention_bias == ()
    assert loaded.beacon == dataclasses.replace(model.beacon, sink_recapture=True)  # a sink of 1: re-taken
    x = _ids(45, seed=22)
    assert _max_err(prefill(loaded, [torch.tensor(x)], logits="all")[0], _reference(model)(x)) <= TOL
    hf = transformers.MistralForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        want = hf(torch.tensor(x)[None]).logits[0]
    base = load_beacon_checkpoint(str(tmp_path), ratio=0, sink_recapture=False)  # a re-taken sink is not the base
    assert _max_err(prefill(base, [torch.tensor(x)], logits="all")[0], want) <= TOL
