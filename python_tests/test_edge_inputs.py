"""Edge and bad inputs that once crashed, corrupted or misreported: each has a named test here
(the fuzz suite, test_fuzz.py, covers them and many more at random)."""
from __future__ import annotations

import math

import pytest
import torch

from beacon_ops import CondensedKVCache, append_kv, beacon_attention, beacon_attention_backward, compact_, rope_
from beacon_ops.reference import reference_attention

BAD_CALL = (RuntimeError, ValueError, TypeError, IndexError)


def i32(values):
    return torch.tensor(values, dtype=torch.int32)


def attention_args(heads=2, kv_heads=1, d=8, ratio=2):
    """Two sequences, the first completing its window with 2 beacons."""
    torch.manual_seed(0)
    nq = [5, 3]
    return dict(q=torch.randn(sum(nq), heads, d), k_cache=torch.randn(2, kv_heads, 16, d),
                v_cache=torch.randn(2, kv_heads, 16, d), cu_seqlens_q=i32([0, 5, 8]), mem_len=i32([3, 1]),
                raw_len=i32([6, 4]), beacon_len=i32([2, 0]), ratio=i32([ratio, 0]))


def test_zero_query_heads_give_empty_outputs():
    a = attention_args()
    a["q"] = a["q"][:, :0]
    out, lse = beacon_attention(*a.values(), max_seqlen_q=5)
    assert out.shape == (8, 0, 8) and lse.shape == (8, 0)
    dq, dk, dv = beacon_attention_backward(torch.zeros_like(out), a["q"], a["k_cache"], a["v_cache"], out, lse,
                                           *list(a.values())[3:], max_seqlen_q=5)
    assert dq.shape == a["q"].shape and not dk.any() and not dv.any()


@pytest.mark.parametrize("ratio", [2 ** 30, 2 ** 31 - 1])
@pytest.mark.parametrize("mode", ["segmentation", "step-expansion"])
def test_huge_ratio_matches_the_reference(ratio, mode):
    """(j + 1) * r overflows int32: the mask header works in 64 bits and clips to the raw keys."""
    a = attention_args(ratio=ratio)
    out, lse = beacon_attention(*a.values(), max_seqlen_q=5, mode=mode)
    ref = reference_attention(*a.values(), mode=mode)
    torch.testing.assert_close(out.double(), ref.out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["q", "k_cache", "mem_len", "ratio", "cu_seqlens_q"])
def test_meta_argument_is_named_forward_and_backward(name):
    a = attention_args()
    out, lse = beacon_attention(*a.values(), max_seqlen_q=5)
    a[name] = a[name].to("meta")
    ref = "q" if name != "q" else "k_cache"
    with pytest.raises(ValueError, match=f"({name}|{ref}) must be on"):
        torch.ops.beacon.attention(*a.values(), 5, "step-expansion", True, 0.0)
    with pytest.raises(ValueError, match=f"({name}|{ref}) must be on"):
        torch.ops.beacon.attention_backward(torch.zeros_like(out), a["q"], a["k_cache"], a["v_cache"], out, lse,
                                            *list(a.values())[3:], 5, "step-expansion", True, 0.0)


def test_all_meta_arguments_give_shapes():
    a = {k: v.to("meta") for k, v in attention_args(heads=4, kv_heads=2).items()}
    out, lse = torch.ops.beacon.attention(*a.values(), 5, "segmentation", True, 0.0)
    assert out.shape == (8, 4, 8) and lse.shape == (8, 4) and lse.dtype == torch.float32
    with pytest.raises(ValueError, match="kv_heads"):
        torch.ops.beacon.attention(a["q"][:, :3], *list(a.values())[1:], 5, "segmentation", True, 0.0)


def test_zero_kv_heads_named():
    a = attention_args()
    a["k_cache"], a["v_cache"] = a["k_cache"][:, :0], a["v_cache"][:, :0]
    with pytest.raises(ValueError, match="kv_heads"):
        beacon_attention(*a.values(), max_seqlen_q=5)


def test_decreasing_cu_seqlens_named_before_max_seqlen_q():
    a = attention_args()
    a["cu_seqlens_q"] = i32([0, 9, 8])
    a["q"] = torch.randn(8, 2, 8)
    with pytest.raises(RuntimeError, match="cu_seqlens_q must be non-decreasing"):
        beacon_attention(*a.values(), max_seqlen_q=5)


@pytest.mark.parametrize("name", ["q", "mem_len", "ratio"])
def test_none_for_a_tensor_named(name):
    a = attention_args()
    a[name] = None
    with pytest.raises(TypeError, match=name):
        beacon_attention(*a.values(), max_seqlen_q=5)
    with pytest.raises(BAD_CALL, match=name):
        torch.ops.beacon.attention(*a.values(), 5, "step-expansion", True, 0.0)


@pytest.mark.parametrize("scale", [math.inf, -math.inf, math.nan, 1e39, 3.5e38])
def test_softmax_scale_out_of_float32_rejected_forward_and_backward(scale):
    a = attention_args()
    out, lse = beacon_attention(*a.values(), max_seqlen_q=5)
    with pytest.raises(ValueError, match="softmax_scale"):
        beacon_attention(*a.values(), max_seqlen_q=5, softmax_scale=scale)
    with pytest.raises(ValueError, match="softmax_scale"):
        beacon_attention_backward(torch.zeros_like(out), a["q"], a["k_cache"], a["v_cache"], out, lse,
                                  *list(a.values())[3:], max_seqlen_q=5, softmax_scale=scale)


@pytest.mark.parametrize("table", ["cos", "sin"])
def test_rope_rejects_x_overlapping_a_table(table):
    from beacon_ops.positions import rope_tables
    cos, sin = rope_tables(1.0 / (10000.0 ** (torch.arange(0, 8, 2).float() / 8)), 64)
    t = {"cos": cos, "sin": sin}[table]
    x = t.view(-1)[: 4 * 2 * 8].view(4, 2, 8)
    saved = (cos.clone(), sin.clone())
    with pytest.raises(RuntimeError, match=f"x and {table} must not share memory"):
        rope_(x, i32([0, 1, 2, 3]), cos, sin)
    assert torch.equal(cos, saved[0]) and torch.equal(sin, saved[1])


def test_compact_rejects_caches_overlapping_tables_and_lengths_overlapping_ratio():
    cache = CondensedKVCache(1, 1, 1, 8, 16, window=4, stride=4)
    cache.set_ratio(0, 2)
    cache.begin_step([4])
    k_as_cos = cache.k.view(-1)[: cache.cos.numel()].view(cache.cos.shape)
    with pytest.raises(RuntimeError, match="k_cache and cos must not share memory"):
        compact_(cache.k, cache.v, cache.mem_len, cache.raw_len, cache.beacon_len, cache.ratio, k_as_cos,
                 cache.sin, window=4, stride=4, mode="step-expansion")
    with pytest.raises(RuntimeError, match="beacon_len and ratio must not share memory"):
        compact_(cache.k, cache.v, cache.mem_len, cache.raw_len, cache.ratio, cache.ratio, cache.cos, cache.sin,
                 window=4, stride=4, mode="step-expansion")
    assert cache.raw_len.tolist() == [4] and cache.beacon_len.tolist() == [2]


def test_begin_step_that_raises_changes_nothing():
    cache = CondensedKVCache(1, 2, 1, 8, 32, window=4, stride=4)
    cache.set_ratio(0, 2)
    cache.begin_step([4, 1])  # sequence 0 completes its window: 2 beacons pending
    before = (list(cache.host_raw_len), list(cache.host_beacon_len), cache.raw_len.clone(),
              cache.beacon_len.clone())
    for bad in ([0, 1], [1.5, 0], [0, -1], [0]):
        with pytest.raises((ValueError, TypeError)):
            cache.begin_step(bad)
        assert (list(cache.host_raw_len), list(cache.host_beacon_len)) == (before[0], before[1])
        assert torch.equal(cache.raw_len, before[2]) and torch.equal(cache.beacon_len, before[3])


@pytest.mark.parametrize("strided", ["dout", "out", "lse", "all", "expanded dout"])
def test_backward_takes_strided_dout_out_lse(strided):
    """dout, out and lse need not be contiguous (autograd may pass an expanded dout): the result
    is bit-identical to the one for contiguous copies of the same values."""
    a = attention_args(heads=4, kv_heads=2)
    out, lse = beacon_attention(*a.values(), max_seqlen_q=5)
    dout = torch.randn(1, 4, 1).expand_as(out) if strided == "expanded dout" else torch.randn_like(out)
    given = {"dout": dout, "out": out, "lse": lse}
    for name in given:
        if strided in (name, "all"):  # the same values, the last dimension not contiguous
            given[name] = given[name].transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not all(t.is_contiguous() for t in given.values())
    rest = list(a.values())[3:]
    got = beacon_attention_backward(given["dout"], a["q"], a["k_cache"], a["v_cache"], given["out"], given["lse"],
                                    *rest, max_seqlen_q=5)
    want = beacon_attention_backward(dout.contiguous(), a["q"], a["k_cache"], a["v_cache"], out, lse, *rest,
                                     max_seqlen_q=5)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_ratio_zero_named_only_for_a_sequence_with_beacons():
    a = attention_args()  # sequence 0 has 2 beacons (ratio 2), sequence 1 none (ratio 0)
    a["ratio"] = i32([2, 0])
    out, _ = beacon_attention(*a.values(), max_seqlen_q=5)
    torch.testing.assert_close(out.double(), reference_attention(*a.values()).out, atol=1e-5, rtol=1e-5)
    a["ratio"] = i32([0, 0])
    with pytest.raises(BAD_CALL, match="ratio|beacon_len"):
        beacon_attention(*a.values(), max_seqlen_q=5)


def test_append_kv_more_new_tokens_than_raw_and_beacons_named():
    torch.manual_seed(0)
    k, v = torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4)
    cos, sin = torch.ones(8, 2), torch.zeros(8, 2)
    saved = (k.clone(), v.clone())
    with pytest.raises(BAD_CALL, match="raw_len|cu_seqlens"):  # 3 new tokens, raw_len + beacon_len = 2
        append_kv(k, v, torch.randn(3, 1, 4), torch.randn(3, 1, 4), i32([0, 3]), i32([1]), i32([1]), i32([1]),
                  i32([1, 2, 3]), cos, sin)
    assert torch.equal(k, saved[0]) and torch.equal(v, saved[1])


def test_compact_needs_table_rows_only_where_keys_rotate():
    """With ratio 0 nothing moves, so one cos/sin row is enough; with beacons the keys rotate by
    position differences the tables must cover, or compact_ raises and changes nothing."""
    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 1, 8, 4), torch.randn(1, 2, 1, 8, 4)
    cos, sin = torch.ones(1, 2), torch.zeros(1, 2)
    mem, raw, bea = i32([0, 2]), i32([4, 4]), i32([0, 0])
    before = (k.clone(), v.clone())
    compact_(k, v, mem, raw, bea, i32([0, 0]), cos, sin, window=4, stride=4, mode="segmentation")
    assert mem.tolist() == [4, 6] and raw.tolist() == [0, 0] and bea.tolist() == [0, 0]
    assert torch.equal(k, before[0]) and torch.equal(v, before[1])
    mem, raw, bea = i32([0, 2]), i32([4, 4]), i32([2, 0])
    with pytest.raises(IndexError, match="cos/sin tables have 1 rows"):
        compact_(k, v, mem, raw, bea, i32([2, 0]), cos, sin, window=4, stride=4, mode="segmentation")
    assert mem.tolist() == [0, 2] and raw.tolist() == [4, 4] and bea.tolist() == [2, 0]
    assert torch.equal(k, before[0]) and torch.equal(v, before[1])
