"""CondensedKVCache and adapt_ratio: step plans, a whole read against the official scheme
(un-rotated keys kept in lists, rotated at their positions every step), carry-over with S < W,
reset, capacity_for, bytes_in_use, and rejected calls that change nothing."""
from __future__ import annotations

import random

import pytest
import torch

import beacon_ops
from beacon_ops import CondensedKVCache, adapt_ratio
from cache_reference import rotate_at
from conftest import DEVICES


# ---------------------------------------------------------------------------------------------
# adapt-N (``docs/activation-beacon.md``, section 6): Llama-2, max_pos 4096, window 1024.
@pytest.mark.parametrize("length, ratio", [
    (1, 0), (3072, 0), (3073, 2), (6144, 2), (6145, 4), (12288, 4), (12289, 8), (24576, 8),
    (24577, 16), (49152, 16), (49153, 32), (98304, 32), (98305, 64), (196608, 64), (196609, 128),
    (400_000, 128), (10**7, 128),
])
def test_adapt_ratio_llama2_boundaries(length, ratio):
    assert adapt_ratio(length, max_pos=4096, window=1024) == ratio


def test_adapt_ratio_other_settings():
    # n is the generation allowance: with n = 0 the whole of max_pos is for the prompt.
    assert adapt_ratio(4096, 4096, 1024, n=0) == 0 and adapt_ratio(4097, 4096, 1024, n=0) == 2
    # SmolLM2: max_pos 8192, W 2048: maxlen(2) = 14336.
    assert adapt_ratio(14336 - 1024, 8192, 2048) == 2 and adapt_ratio(14336 - 1023, 8192, 2048) == 4
    assert adapt_ratio(10**6, 4096, 1024, ratios=(0, 4, 16)) == 16
    with pytest.raises(ValueError, match="window"):
        adapt_ratio(100, 1024, 1024)


# ---------------------------------------------------------------------------------------------
def make_cache(device, **kw):
    args = dict(num_layers=2, batch_size=2, num_kv_heads=2, head_dim=8, capacity=40, window=8)
    args.update(kw)
    return CondensedKVCache(args.pop("num_layers"), args.pop("batch_size"), args.pop("num_kv_heads"),
                            args.pop("head_dim"), args.pop("capacity"), device=device, **args)


@pytest.mark.parametrize("device", DEVICES)
def test_begin_step_plans(device):
    cache = make_cache(device, stride=8)
    cache.set_ratio(0, 4)
    p = cache.begin_step([3, 8])  # sequence 1 (ratio 0) fills its window: no beacons
    assert p.num_raw == [3, 8] and p.num_beacons == [0, 0] and p.num_new == [3, 8]
    assert p.completes_window == [False, True] and p.max_seqlen_q == 8
    assert p.cu_seqlens.tolist() == [0, 3, 11] and p.cu_seqlens.dtype == torch.int32
    assert p.positions.tolist() == [0, 1, 2] + list(range(8))
    assert p.cu_seqlens.device.type == p.positions.device.type == torch.device(device).type
    assert cache.room(0) == 5 and cache.room(1) == 0
    cache.compact()  # sequence 1: r = 0, its 8 raw tokens become memory
    assert (cache.host_mem_len, cache.host_raw_len) == ([0, 8], [3, 0])
    p = cache.begin_step([5, 1])  # sequence 0 completes with r = 4: 2 beacons after its raw tokens
    assert p.num_beacons == [2, 0] and p.num_new == [7, 1] and p.completes_window == [True, False]
    assert p.cu_seqlens.tolist() == [0, 7, 8]
    # Spec section 3: raw positions 3..7, beacons at M + (j + 1) r = 4, 8; then 8 + 0.
    assert p.positions.tolist() == [3, 4, 5, 6, 7, 4, 8, 8]
    assert cache.beacon_len.tolist() == cache.host_beacon_len == [2, 0]
    assert cache.raw_len.tolist() == cache.host_raw_len == [8, 1]
    cache.compact()
    assert cache.mem_len.tolist() == cache.host_mem_len == [2, 8]
    assert cache.raw_len.tolist() == cache.host_raw_len == [0, 1]
    p = cache.begin_step([0, 0])
    assert p.num_new == [0, 0] and p.max_seqlen_q == 0 and p.positions.numel() == 0


def spec_position(kind: str, index: int, mem: int, ratio: int, window: int, mode: str) -> int:
    """Spec section 4, written out again for the reference."""
    if kind == "mem":
        return index
    if kind == "raw":
        return mem + index
    return {"segmentation": mem + ratio, "step-expansion": mem + (index + 1) * ratio,
            "full-coverage": mem + window}[mode]


class OfficialReference:
    """The official scheme for one sequence: un-rotated keys and values in Python lists per
    layer, compaction by list operations, keys rotated at their positions when compared."""

    def __init__(self, layers: int):
        self.mem = [[] for _ in range(layers)]
        self.raw = [[] for _ in range(layers)]
        self.beacons = [[] for _ in range(layers)]

    def compact(self, window: int, stride: int, ratio: int) -> None:
        for layer in range(len(self.mem)):
            self.mem[layer] += self.beacons[layer] if ratio > 0 else self.raw[layer][:stride]
            self.raw[layer] = self.raw[layer][stride:]
            self.beacons[layer] = []


def check_against_reference(cache: CondensedKVCache, refs: list[OfficialReference]) -> None:
    for b, ref in enumerate(refs):
        M, R, B = cache.host_mem_len[b], cache.host_raw_len[b], cache.host_beacon_len[b]
        assert (len(ref.mem[0]), len(ref.raw[0]), len(ref.beacons[0])) == (M, R, B)
        assert cache.mem_len[b].item() == M and cache.raw_len[b].item() == R and cache.beacon_len[b].item() == B
        r = cache.host_ratio[b]
        pos = ([spec_position("mem", i, M, r, cache.window, cache.mode) for i in range(M)]
               + [spec_position("raw", t, M, r, cache.window, cache.mode) for t in range(R)]
               + [spec_position("beacon", j, M, r, cache.window, cache.mode) for j in range(B)])
        if not pos:
            continue
        for layer in range(cache.num_layers):
            entries = ref.mem[layer] + ref.raw[layer] + ref.beacons[layer]
            k0 = torch.stack([e[0] for e in entries])  # [slots, heads, D]
            v = torch.stack([e[1] for e in entries])
            n = len(entries)
            assert torch.equal(cache.v[layer, b, :, :n].cpu(), v.transpose(0, 1))
            want = rotate_at(k0, torch.tensor(pos), cache.cos.cpu(), cache.sin.cpu(), cache.rope_interleaved)
            got = cache.k[layer, b, :, :n].cpu().transpose(0, 1).double()
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window, stride, ratios, mode, interleaved", [
    (8, 8, (4, 0), "step-expansion", False),
    (8, 4, (2, 4), "segmentation", True),      # S < W: 4 raw tokens carried from window to window
    (6, 2, (1, 0), "full-coverage", False),
    (8, 6, (2, 3), "step-expansion", True),
])
def test_whole_read_matches_official_scheme(device, window, stride, ratios, mode, interleaved):
    """Random chunked steps (prefill chunks and decode tokens) for two sequences with their own
    ratios and phases; after every step and every compaction the cache equals the official
    scheme: values bit-exact, keys = un-rotated key rotated once at its current position."""
    rng = random.Random(window * 100 + stride)
    gen = torch.Generator().manual_seed(window + stride)
    layers, heads, D, batch = 2, 2, 8, 2
    cache = make_cache(device, num_layers=layers, batch_size=batch, num_kv_heads=heads, head_dim=D, capacity=64,
                       window=window, stride=stride, mode=mode, rope_interleaved=interleaved)
    refs = [OfficialReference(layers) for _ in range(batch)]
    for b, r in enumerate(ratios):
        cache.set_ratio(b, r)
    fed = [0, 0]
    while min(fed) < 24:
        num_raw = [min(cache.room(b), rng.choice([0, 1, 1, 3, window])) for b in range(batch)]
        plan = cache.begin_step(num_raw)
        total = sum(plan.num_new)
        q = torch.randn(total, 4, D, generator=gen)
        q0 = q.clone()
        q_dev = q.to(device)
        cache.rotate_queries(q_dev, plan)
        torch.testing.assert_close(q_dev.cpu().double(), rotate_at(q0, plan.positions.cpu(), cache.cos.cpu(),
                                                                   cache.sin.cpu(), interleaved), atol=1e-5, rtol=0)
        for layer in range(layers):
            k0 = torch.randn(total, heads, D, generator=gen)
            v = torch.randn(total, heads, D, generator=gen)
            cache.append(layer, k0.to(device), v.to(device), plan)
            start = 0
            for b in range(batch):
                n_raw, n_b = plan.num_raw[b], plan.num_beacons[b]
                refs[b].raw[layer] += [(k0[i], v[i]) for i in range(start, start + n_raw)]
                refs[b].beacons[layer] += [(k0[i], v[i]) for i in range(start + n_raw, start + n_raw + n_b)]
                start += n_raw + n_b
        check_against_reference(cache, refs)
        full = [cache.host_raw_len[b] == window for b in range(batch)]
        cache.compact()
        for b in range(batch):
            if full[b]:
                refs[b].compact(window, stride, cache.host_ratio[b])
            fed[b] += num_raw[b]
        check_against_reference(cache, refs)
    assert max(cache.host_mem_len) > 0


@pytest.mark.parametrize("device", DEVICES)
def test_reset_one_sequence(device):
    cache = make_cache(device, stride=4)
    cache.set_ratio(0, 2)
    cache.set_ratio(1, 4)
    plan = cache.begin_step([8, 8])
    for layer in range(2):
        cache.append(layer, torch.randn(19, 2, 8, device=device), torch.randn(19, 2, 8, device=device), plan)
    cache.compact()
    k, v = cache.k.clone(), cache.v.clone()
    cache.reset(0)
    assert (cache.host_mem_len, cache.host_raw_len, cache.host_beacon_len, cache.host_ratio) == (
        [0, 1], [0, 4], [0, 0], [0, 4])
    assert cache.mem_len.tolist() == [0, 1] and cache.raw_len.tolist() == [0, 4] and cache.ratio.tolist() == [0, 4]
    assert torch.equal(cache.k, k) and torch.equal(cache.v, v)  # data of sequence 1 untouched
    assert cache.room(0) == 8 and cache.room(1) == 4
    plan = cache.begin_step([2, 0])  # sequence 0 starts over at position 0
    assert plan.positions.tolist() == [0, 1]
    cache.reset()
    assert cache.host_mem_len == [0, 0] and cache.bytes_in_use() == 0


def simulate_read(length: int, window: int, stride: int, ratio: int, capacity: int, seed: int) -> None:
    """Read `length` tokens in random chunks through a one-sequence cache (raises on overflow)."""
    rng = random.Random(seed)
    cache = CondensedKVCache(1, 1, 1, 2, capacity, window=window, stride=stride)
    cache.set_ratio(0, ratio)
    left = length
    while left:
        n = min(left, cache.room(0), rng.choice([1, 2, window]))
        cache.begin_step([n])  # raises ValueError when the capacity is too small
        left -= n
        cache.compact()


@pytest.mark.parametrize("length, window, stride, ratio", [
    (1, 8, 8, 0), (7, 8, 8, 4), (8, 8, 8, 4), (9, 8, 8, 4), (100, 8, 8, 4), (100, 8, 8, 0), (101, 8, 4, 2),
    (57, 12, 6, 3), (64, 16, 8, 8), (33, 8, 2, 1), (200, 32, 32, 32), (45, 10, 5, 5), (46, 10, 10, 0),
])
def test_capacity_for_is_exact(length, window, stride, ratio):
    cap = CondensedKVCache.capacity_for(length, window, stride, ratio)
    for seed in range(3):
        simulate_read(length, window, stride, ratio, cap, seed)
    if cap > 1:
        with pytest.raises(ValueError, match="capacity"):
            simulate_read(length, window, stride, ratio, cap - 1, 0)


def test_capacity_for_by_hand():
    # Llama-2 setting, 4 windows, r = 8: peak before the 4th compaction = 3 * 128 + 1024 + 128.
    assert CondensedKVCache.capacity_for(4096, 1024, None, 8) == 1536
    # r = 0 keeps every token.
    assert CondensedKVCache.capacity_for(5000, 1024, None, 0) == 5000
    # A trailing partial window of 1000 raw tokens after 4 windows at r = 32 ends at 4 * 32 + 1000
    # slots, below the peak before the 4th compaction, 3 * 32 + 1024 + 32.
    assert CondensedKVCache.capacity_for(4096 + 1000, 1024, None, 32) == 1152
    # r = 0 with a trailing partial window: everything is kept.
    assert CondensedKVCache.capacity_for(4096 + 1000, 1024, 512, 0) == 5096
    # extra_tokens (e.g. the generation budget) pass through the same windows.
    assert CondensedKVCache.capacity_for(4000, 1024, 1024, 8, extra_tokens=96) == 1536


def test_bytes_in_use():
    cache = CondensedKVCache(3, 2, 4, 16, 30, window=8, dtype=torch.bfloat16)
    assert cache.bytes_in_use() == 0
    assert cache.bytes_allocated() == 2 * 3 * 2 * 4 * 30 * 16 * 2
    cache.set_ratio(1, 2)
    cache.begin_step([5, 8])  # 5 + (8 raw + 4 beacons) slots
    per_slot = 2 * 3 * 4 * 16 * 2  # K and V, layers, heads, head_dim, bytes per bf16
    assert cache.bytes_in_use() == 17 * per_slot
    cache.compact()  # sequence 1 keeps its 4 beacons
    assert cache.bytes_in_use() == 9 * per_slot


@pytest.mark.parametrize("device", DEVICES)
def test_rejected_calls_change_nothing(device):
    cache = make_cache(device, capacity=11, stride=8)
    cache.set_ratio(0, 2)
    plan = cache.begin_step([3, 2])
    state = lambda: (cache.host_mem_len[:], cache.host_raw_len[:], cache.host_beacon_len[:],  # noqa: E731
                     cache.host_ratio[:], cache.mem_len.tolist(), cache.raw_len.tolist(),
                     cache.beacon_len.tolist(), cache.ratio.tolist(), cache.k.clone(), cache.v.clone())

    def same(a, b):
        return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))

    before = state()
    cases = [
        (ValueError, "room", lambda: cache.begin_step([6, 0])),        # 3 + 6 > window 8
        (ValueError, "capacity", lambda: cache.begin_step([5, 0])),    # 8 raw + 4 beacons > 11 slots
        (ValueError, "num_raw\\[1\\]", lambda: cache.begin_step([0, -1])),
        (ValueError, "batch_size", lambda: cache.begin_step([1])),
        (ValueError, "set_ratio", lambda: cache.set_ratio(1, 3)),      # does not divide the stride
        (IndexError, "sequence index", lambda: cache.set_ratio(2, 2)),
        (TypeError, "k_new", lambda: cache.append(0, torch.randn(5, 2, 8, device=device, dtype=torch.float64),
                                                  torch.randn(5, 2, 8, device=device), plan)),
        (ValueError, "k_new must have shape", lambda: cache.append(0, torch.randn(4, 2, 8, device=device),
                                                                   torch.randn(4, 2, 8, device=device), plan)),
        (IndexError, "layer", lambda: cache.append(2, torch.randn(5, 2, 8, device=device),
                                                   torch.randn(5, 2, 8, device=device), plan)),
        (ValueError, "q must have shape", lambda: cache.rotate_queries(torch.randn(4, 2, 8, device=device), plan)),
    ]
    for exc, message, call in cases:
        with pytest.raises(exc, match=message):
            call()
            pytest.fail(f"accepted: {message}")
        assert same(state(), before), message
    # A stale plan (begin_step ran again) is refused; a full window must be compacted first.
    cache.begin_step([0, 6])  # sequence 1 (r = 0) fills its window
    with pytest.raises(ValueError, match="plan"):
        cache.append(0, torch.randn(5, 2, 8, device=device), torch.randn(5, 2, 8, device=device), plan)
    with pytest.raises(ValueError, match="compact"):
        cache.begin_step([0, 1])


def test_constructor_validation():
    with pytest.raises(ValueError, match="stride"):
        CondensedKVCache(1, 1, 1, 8, 10, window=4, stride=5)
    with pytest.raises(ValueError, match="head_dim"):
        CondensedKVCache(1, 1, 1, 7, 10, window=4)
    with pytest.raises(TypeError, match="dtype"):
        CondensedKVCache(1, 1, 1, 8, 10, window=4, dtype=torch.int32)
    with pytest.raises(ValueError, match="mode"):
        CondensedKVCache(1, 1, 1, 8, 10, window=4, mode="sliding")
    cache = CondensedKVCache(2, 3, 2, 8, 10, window=4, dtype=torch.float16)
    assert cache.k.shape == (2, 3, 2, 10, 8) and cache.k.dtype == torch.float16 and cache.k.is_contiguous()
    assert cache.cos.shape[0] >= 10 + 4 + 1 and cache.cos.dtype == torch.float32


@pytest.mark.skipif(not hasattr(beacon_ops.attention, "beacon_attention"),
                    reason="beacon_attention (attention helper's branch) is not merged here yet")
def test_attention_passes_the_cache_to_beacon_attention():
    """attention() == beacon_attention on the layer's view with the cache's lengths and settings."""
    from beacon_ops.attention import beacon_attention

    cache = make_cache("cpu", stride=8, mode="segmentation", attend_previous=False)
    cache.set_ratio(0, 4)
    plan = cache.begin_step([8, 3])
    q = torch.randn(sum(plan.num_new), 4, 8)
    cache.rotate_queries(q, plan)
    cache.append(1, torch.randn(13, 2, 8), torch.randn(13, 2, 8), plan)
    out, lse = cache.attention(1, q, plan, softmax_scale=0.3)
    ref_out, ref_lse = beacon_attention(q, cache.k[1], cache.v[1], plan.cu_seqlens, cache.mem_len, cache.raw_len,
                                        cache.beacon_len, cache.ratio, max_seqlen_q=plan.max_seqlen_q,
                                        mode="segmentation", attend_previous=False, softmax_scale=0.3)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
