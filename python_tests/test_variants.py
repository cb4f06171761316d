"""The newer variant's settings (beacon_ops.variants, BeaconConfig) and its two mask kinds in
torch.ops.beacon.attention and its backward, against the fp64 explicit-mask reference
(beacon_ops.reference, written from docs/activation-beacon.md section 9.1 apart from
csrc/beacon_mask.h) and against plain causal attention."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from beacon_ops import beacon_attention
from beacon_ops.llama import BeaconConfig
from beacon_ops.masks import step_mask
from beacon_ops.positions import MASK_KINDS, step_positions
from beacon_ops.reference import beacon_mask, reference_attention
from beacon_ops.variants import mask_kind

from accuracy_rule import assert_within_twice_baseline
from conftest import DEVICES

NEW_KINDS = ("causal", "step-causal")


# --- settings -------------------------------------------------------------------------------------
def test_default_is_the_original_variant():
    b = BeaconConfig(window=16, ratio=4)
    assert (b.variant, b.placement, b.sink_size) == ("v1", "append", 0)
    assert b.attention_mask_kind == ("step-expansion", True)
    assert BeaconConfig(window=16, mode="full-coverage", attend_previous=False).attention_mask_kind == \
        ("full-coverage", False)


@pytest.mark.parametrize("mode,attend_previous,want", [
    ("full-coverage", True, ("causal", True)),
    ("full-coverage", False, ("causal", True)),          # attend_previous is ignored
    ("step-expansion", True, ("step-causal", True)),
    ("step-expansion", False, ("step-expansion", True)),  # memory visible, beacon sees itself
])
def test_v3_mask_kinds(mode, attend_previous, want):
    assert mask_kind("v3", mode, attend_previous) == want
    b = BeaconConfig(window=16, mode=mode, attend_previous=attend_previous, variant="v3")
    assert b.attention_mask_kind == want
    assert BeaconConfig(window=16, mode="full-coverage", variant="v3", placement="interleave",
                        sink_size=1).attention_mask_kind == ("causal", True)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(variant="v2"), ValueError, "variant must be one of"),
    (dict(variant="v3", placement="before"), ValueError, "placement must be one of"),
    (dict(placement="interleave"), ValueError, "placement='interleave' needs variant='v3'"),
    (dict(sink_size=1), ValueError, "sink_size=1 needs variant='v3'"),
    (dict(variant="v3", sink_size=-1), ValueError, "sink_size must be >= 0"),
    (dict(variant="v3", sink_size=1.5), TypeError, "sink_size must be an integer"),
    (dict(variant="v3", sink_size=16), ValueError, "sink_size=16 must be smaller than the window 16"),
    (dict(variant="v3", mode="segmentation"), ValueError, "mode='segmentation' is not part of variant 'v3'"),
    (dict(variant="v3", stride=8), ValueError, "stride=8 must equal window=16 in variant 'v3'"),
    (dict(variant="v3", placement="interleave", mode="step-expansion"), ValueError,
     "mode='step-expansion' with placement='interleave' is not supported"),
])
def test_bad_settings_are_named(kw, exc, match):
    with pytest.raises(exc, match=match):
        BeaconConfig(window=16, **kw)


def test_info_lists_the_variants(capsys):
    import argparse

    from beacon_ops.commands.info import run

    assert run(argparse.Namespace(json=None)) == 0
    out = capsys.readouterr().out
    assert "v1: placement append" in out and "v3: placement append" in out and "interleave" in out
    assert "causal, step-causal" in out


# --- settings of the released checkpoints (config.json keys) --------------------------------------
LLAMA3_RELEASE = {"beacon_window": 1024, "beacon_stride": 1024, "beacon_attn": "full-coverage",
                  "beacon_ratio": [2, 4, 8], "beacon_ratio_mix": "adapt-1024", "beacon_param": ["q", "k", "v"],
                  "beacon_pos": "interleave", "beacon_sink_size": 1, "beacon_attend_prev": True}


def test_from_checkpoint_config_newer_release():
    b = BeaconConfig.from_checkpoint_config(LLAMA3_RELEASE)
    assert (b.variant, b.placement, b.mode, b.sink_size, b.window, b.stride) == \
        ("v3", "interleave", "full-coverage", 1, 1024, 1024)
    assert (b.ratio, b.adapt_ratios, b.adapt_n, b.beacon_params) == (None, (2, 4, 8), 1024, ("q", "k", "v"))
    assert b.attention_mask_kind == ("causal", True)
    fixed = BeaconConfig.from_checkpoint_config({**LLAMA3_RELEASE, "beacon_ratio": [4]})
    assert (fixed.ratio, fixed.adapt_ratios) == (4, None)


def test_from_checkpoint_config_original_code():
    b = BeaconConfig.from_checkpoint_config({"beacon_window": 1024, "beacon_stride": 1024,
                                             "beacon_attn": "step-expansion", "beacon_ratio": [2, 4, 8],
                                             "beacon_param": ["q", "k", "v", "o"]})
    assert (b.variant, b.placement, b.mode, b.sink_size) == ("v1", "append", "step-expansion", 0)


@pytest.mark.parametrize("change,exc,match", [
    (dict(beacon_window=None), ValueError, "beacon_window is missing"),
    (dict(beacon_pos="side"), ValueError, "placement must be one of"),
    (dict(beacon_attn="segmentation"), ValueError, "mode='segmentation' is not part of variant 'v3'"),
    (dict(beacon_ratio=[2, 3]), ValueError, "adapt_ratios: ratio=3 does not divide the stride 1024"),
])
def test_from_checkpoint_config_bad_keys(change, exc, match):
    config = {k: v for k, v in {**LLAMA3_RELEASE, **change}.items() if v is not None}
    with pytest.raises(exc, match=match):
        BeaconConfig.from_checkpoint_config(config)


@pytest.mark.parametrize("length,want", [(14336, 2), (14337, 4), (28672, 4), (28673, 8), (10**6, 8)])
def test_release_adapt_ratio_table(length, want):
    # docs: Llama-3 release, max_pos 8192, window 1024, ratios [2, 4, 8], adapt-1024
    from beacon_ops.condensed_cache import adapt_ratio
    from beacon_ops.generation import ratio_for_length

    from llama_helpers import tiny_config, tiny_model

    model = tiny_model(tiny_config(max_position_embeddings=8192), window=1024, variant="v3",
                       mode="full-coverage", placement="interleave", adapt_ratios=(2, 4, 8))
    assert ratio_for_length(model, length) == want == adapt_ratio(length, 8192, 1024, 1024, (2, 4, 8))


# --- positions: docs/activation-beacon.md section 9.1 (W = 16, r = 4) ------------------------------
def _beacon_positions(kind: str, mem: int) -> list[int]:
    W, r = 16, 4
    return step_positions([mem], [W], [W // r], [r], [W // r], W, kind).tolist()


def test_v3_append_positions():
    # step-expansion with attend_previous: the beacon after raw (j+1) r - 1 and j earlier beacons
    assert _beacon_positions("step-causal", 0) == [4, 9, 14, 19]
    assert _beacon_positions("step-causal", 4) == [8, 13, 18, 23]
    # without attend_previous: the original step-expansion positions
    assert _beacon_positions("step-expansion", 0) == [4, 8, 12, 16]
    # full-coverage: plain consecutive slots after the window's raw tokens
    assert _beacon_positions("causal", 0) == [16, 17, 18, 19]
    assert _beacon_positions("causal", 6) == [22, 23, 24, 25]


# --- masks: the reference's rows, written out by hand for W = 8, r = 4, M = 2 ----------------------
def test_v3_masks_by_hand():
    # keys: m0 m1 | t0..t7 | b0 b1; rows b0, b1 (the raw rows are causal in every kind)
    step_causal = [[1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 0],
                   [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]]
    causal = [[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0],
              [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]]
    # step-expansion of the newer variant without attend_previous: memory visible, no other beacon
    step_expansion = [[1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 0],
                      [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1]]
    for kind, ap, want in (("step-causal", False, step_causal), ("causal", False, causal),
                           ("step-expansion", True, step_expansion)):
        m = beacon_mask(2, 8, 2, 4, 10, kind, ap)
        assert m[8:].int().tolist() == want, kind
        assert torch.equal(m[:8], torch.ones(8, 12, dtype=torch.bool).tril(2)), kind
        assert torch.equal(step_mask(2, 8, 2, 4, 10, kind, ap), m), kind


def test_new_kinds_ignore_attend_previous():
    for kind in NEW_KINDS:
        assert torch.equal(beacon_mask(3, 8, 4, 2, 12, kind, True), beacon_mask(3, 8, 4, 2, 12, kind, False))


# --- the op against the fp64 reference ------------------------------------------------------------
def _case(device, mem, raw, beacon, ratio, nq, heads, kv_heads, head_dim=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = len(mem)
    cap = max(m + r + b for m, r, b in zip(mem, raw, beacon)) + 3
    k = torch.full((batch, kv_heads, cap, head_dim), float("nan"), dtype=torch.float64)
    v = torch.full_like(k, float("nan"))
    for b in range(batch):
        n = mem[b] + raw[b] + beacon[b]
        k[b, :, :n] = torch.randn(kv_heads, n, head_dim, generator=g, dtype=torch.float64)
        v[b, :, :n] = torch.randn(kv_heads, n, head_dim, generator=g, dtype=torch.float64)
    cu = [0]
    for n in nq:
        cu.append(cu[-1] + n)
    q = torch.randn(cu[-1], heads, head_dim, generator=g, dtype=torch.float64)

    def i32(x):
        return torch.tensor(x, dtype=torch.int32, device=device)

    lengths = (i32(cu), i32(mem), i32(raw), i32(beacon), i32(ratio))
    return (q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)), lengths, max(nq)


def _window_steps(sink: int, ratio: int, window: int = 32, windows_before: int = 2):
    """Three sequences of one step: a window completing over sink + earlier beacons, a chunk in
    the middle of a window, and a decode step that completes a window (1 raw + its beacons)."""
    B = window // ratio
    mem = sink + windows_before * B
    return dict(mem=[mem, sink + B, mem], raw=[window, 20, window], beacon=[B, 0, B],
                ratio=[ratio, ratio, ratio], nq=[window + B, 7, 1 + B])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", NEW_KINDS)
@pytest.mark.parametrize("ratio", [2, 4, 8])
@pytest.mark.parametrize("sink", [0, 1, 2])
@pytest.mark.parametrize("group", [1, 3])
def test_forward_matches_fp64_reference(device, kind, ratio, sink, group):
    (q, k, v), lengths, max_q = _case(device, heads=2 * group, kv_heads=2, **_window_steps(sink, ratio))
    out, lse = beacon_attention(q, k, v, *lengths, max_seqlen_q=max_q, mode=kind, attend_previous=False)
    ref = reference_attention(q, k, v, *lengths, mode=kind, attend_previous=False)
    assert (out.cpu().double() - ref.out).abs().max().item() <= 2e-5
    torch.testing.assert_close(lse.cpu(), ref.lse, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", NEW_KINDS)
def test_forward_low_precision(device, dtype, kind):
    (q, k, v), lengths, max_q = _case(device, heads=4, kv_heads=2, head_dim=64, dtype=dtype,
                                      **_window_steps(1, 4, window=64))
    out, _ = beacon_attention(q, k, v, *lengths, max_seqlen_q=max_q, mode=kind)
    ref = reference_attention(q, k, v, *lengths, mode=kind).out
    base = reference_attention(q, k, v, *lengths, mode=kind, compute_dtype=dtype).out
    assert_within_twice_baseline(out, ref, base, 1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", NEW_KINDS)
@pytest.mark.parametrize("ratio", [2, 8])
@pytest.mark.parametrize("sink", [0, 1, 2])
@pytest.mark.parametrize("group", [1, 3])
def test_backward_matches_fp64_autograd(device, kind, ratio, sink, group):
    if not torch._C._dispatch_has_kernel_for_dispatch_key(
            "beacon::attention_backward", "CPU" if device == "cpu" else device.upper()):
        pytest.skip(f"no {device} kernel for beacon::attention_backward in this build")
    inputs, lengths, max_q = _case(device, heads=2 * group, kv_heads=2, **_window_steps(sink, ratio))
    g = torch.Generator().manual_seed(7)
    dout = torch.randn(inputs[0].shape, generator=g, dtype=torch.float64)
    dlse = torch.randn(inputs[0].shape[:2], generator=g, dtype=torch.float64)
    q, k, v = (t.detach().clone().requires_grad_() for t in inputs)
    out, lse = beacon_attention(q, k, v, *lengths, max_seqlen_q=max_q, mode=kind)
    ((out.double().cpu() * dout).sum() + (lse.double().cpu() * dlse).sum()).backward()
    # the reference in fp64; unused cache slots hold NaN, so its inputs are zeroed there
    # (the op must give them zero gradient, checked below)
    used = torch.zeros(k.shape[0], 1, k.shape[2], 1, dtype=torch.bool)
    for b, n in enumerate((lengths[1] + lengths[2] + lengths[3]).tolist()):
        used[b, :, :n] = True
    rq, rk, rv = (t.detach().cpu().double() for t in inputs)
    rk, rv = (torch.where(used, t, 0.0).requires_grad_() for t in (rk, rv))
    rq.requires_grad_()
    ref = reference_attention(rq, rk, rv, *lengths, mode=kind)
    ((ref.out * dout).sum() + (ref.lse.double() * dlse).sum()).backward()
    for name, got, want in (("dq", q.grad, rq.grad), ("dk", k.grad, rk.grad), ("dv", v.grad, rv.grad)):
        torch.testing.assert_close(got.cpu().double(), want, atol=1e-5, rtol=1e-5, msg=name)
    assert not k.grad.cpu()[~used.expand_as(k.grad.cpu())].any()


@pytest.mark.parametrize("device", DEVICES)
def test_causal_kind_is_causal_attention(device):
    """Independent of the mask tables: "causal" equals PyTorch's causal (lower-right) attention
    over all of a sequence's keys, beacons included."""
    (q, k, v), lengths, max_q = _case(device, heads=6, kv_heads=2, head_dim=32,
                                      mem=[9], raw=[32], beacon=[8], ratio=[4], nq=[40])
    out, _ = beacon_attention(q, k, v, *lengths, max_seqlen_q=max_q, mode="causal")
    n = 9 + 32 + 8
    kk = k[0, :, :n].repeat_interleave(3, 0)[None]
    vv = v[0, :, :n].repeat_interleave(3, 0)[None]
    want = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kk, vv,
                                          attn_mask=causal_lower_right(40, n))[0].transpose(0, 1)
    assert (out - want).abs().max().item() <= 2e-5


def test_unknown_kind_is_named():
    assert MASK_KINDS[-2:] == NEW_KINDS
    inputs, lengths, _ = _case("cpu", heads=2, kv_heads=1, mem=[0], raw=[4], beacon=[0], ratio=[0], nq=[4])
    with pytest.raises(ValueError, match="mode must be one of .*'causal', 'step-causal', got 'interleave'"):
        beacon_attention(*inputs, *lengths, max_seqlen_q=4, mode="interleave")
