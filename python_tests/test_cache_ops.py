"""torch.ops.beacon.{rope_, append_kv, compact_} against independent references.

Data movement is checked bit-exactly (values always; keys when nothing rotates); rotated keys
against the un-rotated key rotated once at its final position (fp64, Hugging Face's formula or
the interleaved one), within 1e-5 in fp32 and the FlashAttention rule in fp16/bf16. Every
rejected call must name the bad argument and leave every tensor exactly as it was.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from beacon_ops import append_kv, compact_, rope_
from beacon_ops.positions import MASK_KINDS, slot_position, step_positions
from accuracy_rule import assert_within_twice_baseline
from cache_reference import LOW_PRECISION, rotate_at, tables
from conftest import DEVICES

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FP32_TOL = 1e-5
BAD_CALL = (RuntimeError, ValueError, IndexError, TypeError)


def check_rotated(out: torch.Tensor, x: torch.Tensor, positions: torch.Tensor, cos, sin, interleaved: bool):
    """``out`` ~ ``x`` (un-rotated, exact in out's dtype) rotated once at ``positions``."""
    ref = rotate_at(x, positions, cos, sin, interleaved)
    if out.dtype == torch.float32:
        torch.testing.assert_close(out.double().cpu(), ref, atol=FP32_TOL, rtol=0)
    else:
        baseline = rotate_at(x.to(out.dtype), positions, cos, sin, interleaved, dtype=out.dtype)
        assert_within_twice_baseline(out, ref, baseline, 1e-3)


def snapshot(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


def assert_unchanged(tensors, saved) -> None:
    for t, s in zip(tensors, saved):
        assert torch.equal(t.cpu().view(torch.uint8) if t.is_floating_point() else t.cpu(),
                           s.cpu().view(torch.uint8) if s.is_floating_point() else s.cpu())


# ---------------------------------------------------------------------------------------------
# rope_
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("head_dim", [8, 64, 128])
def test_rope_matches_independent_rotation(device, dtype, interleaved, head_dim):
    gen = torch.Generator().manual_seed(head_dim + interleaved)
    n, heads = 37, 3
    cos, sin = tables(head_dim, 300)
    x0 = torch.randn(n, heads, head_dim, generator=gen).to(dtype)
    positions = torch.randint(0, 300, (n,), generator=gen, dtype=torch.int32)
    x = x0.to(device, copy=True)
    rope_(x, positions.to(device), cos.to(device), sin.to(device), interleaved)
    check_rotated(x, x0.float(), positions, cos, sin, interleaved)


@pytest.mark.parametrize("device", DEVICES)
def test_rope_rejects_bad_arguments(device):
    cos, sin = tables(8, 16)
    cos, sin = cos.to(device), sin.to(device)
    x = torch.randn(4, 2, 8, device=device)
    pos = torch.tensor([0, 3, 15, 2], dtype=torch.int32, device=device)
    cases = [
        ("positions\\[2\\] = 16", lambda: rope_(x, torch.tensor([0, 3, 16, 2], dtype=torch.int32, device=device),
                                                 cos, sin)),
        ("positions\\[1\\] = -1", lambda: rope_(x, torch.tensor([0, -1, 1, 2], dtype=torch.int32, device=device),
                                                 cos, sin)),
        ("positions must be int32", lambda: rope_(x, pos.long(), cos, sin)),
        ("positions must have shape", lambda: rope_(x, pos[:3], cos, sin)),
        ("cos must be float32", lambda: rope_(x, pos, cos.double(), sin)),
        ("sin must have shape", lambda: rope_(x, pos, cos, sin[:, :2])),
        ("cos must have shape", lambda: rope_(x[:, :, :6].contiguous(), pos, cos, sin)),  # tables for head_dim 8
        ("head_dim must be even", lambda: rope_(x[:, :, :7].contiguous(), pos, cos, sin)),
        ("x must be contiguous", lambda: rope_(x.transpose(0, 1).contiguous().transpose(0, 1), pos, cos, sin)),
        ("x must have shape", lambda: rope_(x[0], pos, cos, sin)),
        ("x must be float32", lambda: rope_(x.to(torch.int32), pos, cos, sin)),
        ("positions must be on x's device", lambda: rope_(x, pos.to("meta"), cos, sin)),
    ]
    saved = snapshot(x, pos, cos, sin)
    for name, call in cases:
        if device != "cpu" and name.startswith("positions\\["):
            continue  # values on the GPU are not read by the op (no synchronisation)
        with pytest.raises(BAD_CALL, match=name):
            call()
            pytest.fail(f"accepted: {name}")
        assert_unchanged([x, pos, cos, sin], saved)


# ---------------------------------------------------------------------------------------------
# append_kv
@dataclass
class AppendCase:
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    k_new: torch.Tensor
    v_new: torch.Tensor
    cu_seqlens: torch.Tensor
    mem_len: torch.Tensor
    raw_len: torch.Tensor
    beacon_len: torch.Tensor
    positions: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor

    def args(self, interleaved: bool = False) -> tuple:
        return (self.k_cache, self.v_cache, self.k_new, self.v_new, self.cu_seqlens, self.mem_len, self.raw_len,
                self.beacon_len, self.positions, self.cos, self.sin, interleaved)


def make_append_case(gen, dtype, device, seqs, heads=2, head_dim=8, cap=24, window=8, mode="step-expansion"):
    """seqs: (mem, raw, beacon, ratio, n) per sequence, lengths after the step."""
    batch = len(seqs)
    cos, sin = tables(head_dim, cap + window + 1)
    mem, raw, bea, rat, num = (list(c) for c in zip(*seqs))
    positions = step_positions(mem, raw, bea, rat, num, window, mode)
    total = sum(num)
    cu = torch.tensor([0] + torch.tensor(num).cumsum(0).tolist(), dtype=torch.int32)
    i32 = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    return AppendCase(
        k_cache=torch.randn(batch, heads, cap, head_dim, generator=gen).to(dtype).to(device),
        v_cache=torch.randn(batch, heads, cap, head_dim, generator=gen).to(dtype).to(device),
        k_new=torch.randn(total, heads, head_dim, generator=gen).to(dtype).to(device),
        v_new=torch.randn(total, heads, head_dim, generator=gen).to(dtype).to(device),
        cu_seqlens=cu.to(device), mem_len=i32(mem), raw_len=i32(raw), beacon_len=i32(bea),
        positions=positions.to(device), cos=cos.to(device), sin=sin.to(device))


APPEND_SEQS = [(3, 5, 0, 2, 2), (0, 8, 4, 2, 12), (6, 2, 0, 0, 0), (2, 8, 2, 4, 5), (0, 1, 0, 0, 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_append_kv_writes_last_slots(device, dtype, interleaved):
    gen = torch.Generator().manual_seed(7)
    c = make_append_case(gen, dtype, device, APPEND_SEQS)
    k_before, v_before = c.k_cache.clone(), c.v_cache.clone()
    append_kv(*c.args(interleaved))
    k_exp, v_exp = k_before.cpu().clone(), v_before.cpu().clone()
    written = torch.zeros(c.k_cache.shape[:3], dtype=torch.bool)
    start = 0
    for b, (mem, raw, bea, _, n) in enumerate(APPEND_SEQS):
        end = mem + raw + bea
        v_exp[b, :, end - n:end] = c.v_new[start:start + n].cpu().transpose(0, 1)
        written[b, :, end - n:end] = True
        k_got = c.k_cache[b, :, end - n:end].transpose(0, 1)
        check_rotated(k_got, c.k_new[start:start + n].float(), c.positions[start:start + n].cpu(), c.cos.cpu(),
                      c.sin.cpu(), interleaved)
        start += n
    assert torch.equal(c.v_cache.cpu(), v_exp)  # values bit-exact, every other slot untouched
    assert torch.equal(c.k_cache.cpu()[~written], k_exp[~written])


@pytest.mark.parametrize("device", DEVICES)
def test_append_kv_rejects_bad_arguments(device):
    gen = torch.Generator().manual_seed(3)
    c = make_append_case(gen, torch.float32, device, APPEND_SEQS)
    i32 = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    bad = {
        "capacity": dict(mem_len=i32([3, 0, 6, 2, 24])),             # 24 + 1 > 24 slots
        "cu_seqlens": dict(raw_len=i32([5, 8, 2, 1, 1])),            # 5 new tokens, raw + beacons = 3
        "cu_seqlens[0]": dict(cu_seqlens=c.cu_seqlens + 1),
        "cu_seqlens[5]": dict(cu_seqlens=torch.cat([c.cu_seqlens[:-1], c.cu_seqlens[-1:] - 1])),
        "mem_len[2]": dict(mem_len=i32([3, 0, -1, 2, 0])),
        "beacon_len[1]": dict(beacon_len=i32([0, -4, 0, 2, 0])),
        "mem_len must be int32": dict(mem_len=c.mem_len.long()),
        "raw_len must have shape": dict(raw_len=c.raw_len[:4]),
        "k_new must have the cache dtype": dict(k_new=c.k_new.half()),
        "v_new must have k_new's shape": dict(v_new=c.v_new[:, :1]),
        "k_new must have shape": dict(k_new=c.k_new[:, :1].contiguous(), v_new=c.v_new[:, :1].contiguous()),
        "v_cache must have k_cache's dtype": dict(v_cache=c.v_cache.double()),
        "k_cache must be a layer's view": dict(k_cache=c.k_cache[None]),
        "k_cache must be contiguous": dict(k_cache=c.k_cache.transpose(2, 3).contiguous().transpose(2, 3)),
        "positions[": dict(positions=torch.where(c.positions == 4, 1000, c.positions).to(torch.int32)),
        "positions must have shape": dict(positions=c.positions[:-1]),
        "sin must have shape": dict(sin=c.sin[:, :3]),
        "must not share memory": dict(v_cache=c.k_cache),
        "beacon_len must be on k_cache's device": dict(beacon_len=c.beacon_len.to("meta")),
    }
    names = ["k_cache", "v_cache", "k_new", "v_new", "cu_seqlens", "mem_len", "raw_len", "beacon_len",
             "positions", "cos", "sin"]
    originals = [getattr(c, n) for n in names]
    saved = snapshot(*originals)
    value_checks = {"capacity", "cu_seqlens", "cu_seqlens[0]", "cu_seqlens[5]", "mem_len[2]", "beacon_len[1]",
                    "positions["}
    for message, change in bad.items():
        if device != "cpu" and message in value_checks:
            continue  # lengths on the GPU are checked by CondensedKVCache's host shadows, not the op
        args = [change.get(n, getattr(c, n)) for n in names]
        with pytest.raises(BAD_CALL, match=re.escape(message)):
            append_kv(*args)
            pytest.fail(f"accepted: {message}")
        assert_unchanged(originals, saved)


# ---------------------------------------------------------------------------------------------
# compact_
@dataclass
class CompactCase:
    k: torch.Tensor
    v: torch.Tensor
    k0: torch.Tensor          # un-rotated keys (fp32, exact in the cache dtype) of every slot
    mem_len: torch.Tensor
    raw_len: torch.Tensor
    beacon_len: torch.Tensor
    ratio: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    seqs: list                # (mem, raw, ratio) per sequence
    window: int
    stride: int
    mode: str
    interleaved: bool

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v, self.mem_len, self.raw_len, self.beacon_len, self.ratio, self.cos, self.sin]

    def run(self, **change) -> None:
        t = dict(k=self.k, v=self.v, mem_len=self.mem_len, raw_len=self.raw_len, beacon_len=self.beacon_len,
                 ratio=self.ratio, cos=self.cos, sin=self.sin)
        kw = dict(window=self.window, stride=self.stride, mode=self.mode, interleaved=self.interleaved)
        for name, value in change.items():
            (t if name in t else kw)[name] = value
        compact_(t["k"], t["v"], t["mem_len"], t["raw_len"], t["beacon_len"], t["ratio"], t["cos"], t["sin"], **kw)


def num_beacons(raw: int, ratio: int, window: int, stride: int) -> int:
    return stride // ratio if raw == window and ratio > 0 else 0


def make_compact_case(gen, seqs, *, layers=2, heads=2, head_dim=8, cap=None, window=8, stride=8,
                      mode="step-expansion", interleaved=False, dtype=torch.float32, device="cpu") -> CompactCase:
    """A cache whose live slots hold keys rotated at their slot positions (fp64, rounded once)."""
    batch = len(seqs)
    ends = [m + r + num_beacons(r, rt, window, stride) for m, r, rt in seqs]
    cap = cap if cap is not None else max(ends) + 3
    shape = (layers, batch, heads, cap, head_dim)
    k0 = torch.randn(shape, generator=gen).to(dtype).float()
    k = torch.randn(shape, generator=gen).to(dtype)  # slots beyond the lengths: anything
    v = torch.randn(shape, generator=gen).to(dtype)
    cos, sin = tables(head_dim, cap + window + 1)
    for b, (mem, raw, ratio) in enumerate(seqs):
        end = ends[b]
        if end == 0:
            continue
        pos = torch.tensor([slot_position(s, mem, raw, ratio, window, mode) for s in range(end)])
        x = k0[:, b, :, :end].permute(2, 0, 1, 3).reshape(end, layers * heads, head_dim)
        rot = rotate_at(x, pos, cos, sin, interleaved).to(dtype)
        k[:, b, :, :end] = rot.reshape(end, layers, heads, head_dim).permute(1, 2, 0, 3)
    i32 = lambda vals: torch.tensor(vals, dtype=torch.int32, device=device)  # noqa: E731
    return CompactCase(
        k=k.to(device), v=v.to(device), k0=k0, mem_len=i32([s[0] for s in seqs]), raw_len=i32([s[1] for s in seqs]),
        beacon_len=i32([num_beacons(r, rt, window, stride) for _, r, rt in seqs]), ratio=i32([s[2] for s in seqs]),
        cos=cos.to(device), sin=sin.to(device), seqs=list(seqs), window=window, stride=stride, mode=mode,
        interleaved=interleaved)


def check_compaction(c: CompactCase, k_before: torch.Tensor, v_before: torch.Tensor) -> None:
    """The state after compact_ against a torch.cat rebuild of every full window."""
    W, S = c.window, c.stride
    k_after, v_after = c.k.cpu(), c.v.cpu()
    k_before, v_before = k_before.cpu(), v_before.cpu()
    for b, (mem, raw, ratio) in enumerate(c.seqs):
        kb, vb, ka, va = k_before[:, b], v_before[:, b], k_after[:, b], v_after[:, b]
        lengths = (c.mem_len[b].item(), c.raw_len[b].item(), c.beacon_len[b].item(), c.ratio[b].item())
        if raw < W or ratio == 0:
            # Not full: untouched. Full with r = 0: memory absorbs S raw slots in place.
            assert torch.equal(ka, kb) and torch.equal(va, vb), f"sequence {b} changed"
            want = (mem, raw, 0, ratio) if raw < W else (mem + S, W - S, 0, 0)
            assert lengths == want, f"sequence {b}: lengths {lengths}, want {want}"
            continue
        nb = S // ratio
        assert lengths == (mem + nb, W - S, 0, ratio), f"sequence {b}: lengths {lengths}"
        new_end = mem + nb + W - S
        # Memory: bit-identical. Values: exactly the torch.cat rebuild.
        assert torch.equal(ka[:, :, :mem], kb[:, :, :mem]) and torch.equal(va[:, :, :mem], vb[:, :, :mem])
        v_ref = torch.cat([vb[:, :, :mem], vb[:, :, mem + W:mem + W + nb], vb[:, :, mem + S:mem + W]], dim=2)
        assert torch.equal(va[:, :, :new_end], v_ref)
        # Moved keys: the un-rotated key rotated once at its new position (= its new slot).
        k0 = c.k0[:, b]
        k0_moved = torch.cat([k0[:, :, mem + W:mem + W + nb], k0[:, :, mem + S:mem + W]], dim=2)
        n_moved = new_end - mem
        if n_moved == 0:
            continue
        L, H, _, D = k0.shape
        got = ka[:, :, mem:new_end].permute(2, 0, 1, 3).reshape(n_moved, L * H, D)
        x = k0_moved.permute(2, 0, 1, 3).reshape(n_moved, L * H, D)
        check_rotated(got, x, torch.arange(mem, new_end), c.cos.cpu(), c.sin.cpu(), c.interleaved)


def seq_states(window: int, stride: int):
    """Strategy for one sequence's (mem, raw, ratio)."""
    ratios = [0] + [r for r in range(1, stride + 1) if stride % r == 0]
    return st.tuples(st.integers(0, 12), st.one_of(st.just(window), st.integers(0, window)),
                     st.sampled_from(ratios))


@st.composite
def compact_configs(draw):
    window = draw(st.integers(1, 12))
    stride = draw(st.integers(1, window))
    seqs = draw(st.lists(seq_states(window, stride), min_size=1, max_size=4))
    return dict(seqs=seqs, window=window, stride=stride, layers=draw(st.integers(1, 2)),
                heads=draw(st.integers(1, 3)), head_dim=draw(st.sampled_from([2, 4, 8])),
                mode=draw(st.sampled_from(MASK_KINDS)), interleaved=draw(st.booleans()),
                extra=draw(st.integers(0, 3)), seed=draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=compact_configs())
def test_compact_random_varlen_batches(cfg):
    gen = torch.Generator().manual_seed(cfg.pop("seed"))
    ends = [m + r + num_beacons(r, rt, cfg["window"], cfg["stride"]) for m, r, rt in cfg["seqs"]]
    c = make_compact_case(gen, cfg.pop("seqs"), cap=max(ends) + cfg.pop("extra"), **cfg)
    k_before, v_before = c.k.clone(), c.v.clone()
    c.run()
    check_compaction(c, k_before, v_before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MASK_KINDS)
@pytest.mark.parametrize("window, stride", [(8, 8), (8, 4), (12, 6)])
def test_compact_dtypes_and_modes(device, dtype, mode, window, stride):
    gen = torch.Generator().manual_seed(window * stride)
    r = 2
    seqs = [(0, window, r), (5, window, stride), (3, window - 1, r), (7, window, 0), (2, window, 1)]
    for interleaved in (False, True):
        c = make_compact_case(gen, seqs, window=window, stride=stride, mode=mode, interleaved=interleaved,
                              dtype=dtype, device=device, heads=3, head_dim=16, layers=3)
        k_before, v_before = c.k.clone(), c.v.clone()
        c.run()
        check_compaction(c, k_before, v_before)


@pytest.mark.parametrize("device", DEVICES)
def test_compact_llama_sized_window(device):
    """W = 64, S = 48 (16 carried), r = 4 (12 beacons), head_dim 128, memory 20: long shifts."""
    gen = torch.Generator().manual_seed(11)
    c = make_compact_case(gen, [(20, 64, 4), (0, 64, 16), (9, 30, 4)], window=64, stride=48, head_dim=128,
                          layers=2, heads=2, device=device)
    k_before, v_before = c.k.clone(), c.v.clone()
    c.run()
    check_compaction(c, k_before, v_before)


def test_compact_without_full_windows_is_a_no_op():
    gen = torch.Generator().manual_seed(5)
    c = make_compact_case(gen, [(4, 3, 2), (0, 0, 0)], window=8, stride=8)
    saved = snapshot(*c.tensors())
    c.run()
    assert_unchanged(c.tensors(), saved)


@pytest.mark.parametrize("device", DEVICES)
def test_compact_rejects_bad_arguments(device):
    gen = torch.Generator().manual_seed(9)
    # Sequence 0 full (r = 2, 4 beacons), 1 not full, 2 full with r = 0.
    c = make_compact_case(gen, [(3, 8, 2), (1, 5, 4), (2, 8, 0)], window=8, stride=8, cap=20, device=device)
    i32 = lambda v: torch.tensor(v, dtype=torch.int32, device=device)  # noqa: E731
    cases = {
        "mem_len \\+ raw_len \\+ beacon_len": dict(mem_len=i32([9, 1, 2])),    # 9 + 8 + 4 > 20
        "beacon_len\\[0\\]": dict(beacon_len=i32([3, 0, 0])),                   # must be 8 / 2
        "beacon_len\\[2\\]": dict(beacon_len=i32([4, 0, 1])),                   # r = 0: no beacons
        "beacon_len\\[1\\]": dict(beacon_len=i32([4, 2, 0])),                   # window not full
        "mem_len\\[1\\]": dict(mem_len=i32([3, -1, 2])),
        "raw_len\\[1\\]": dict(raw_len=i32([8, 9, 8])),
        "raw_len\\[2\\]": dict(raw_len=i32([8, 5, -2])),
        "ratio\\[1\\]": dict(ratio=i32([2, 3, 0])),                             # 3 does not divide 8
        "ratio\\[0\\]": dict(ratio=i32([-2, 4, 0])),
        "mem_len must be int32": dict(mem_len=c.mem_len.long()),
        "ratio must have shape": dict(ratio=c.ratio[:2]),
        "v_cache must have k_cache's dtype": dict(v=c.v.half()),
        "v_cache must have k_cache's shape": dict(v=c.v[:, :, :1].contiguous()),
        "k_cache must be the whole cache": dict(k=c.k[0], v=c.v[0]),
        "k_cache must be float32": dict(k=c.k.to(torch.int16), v=c.v.to(torch.int16)),
        "k_cache must be contiguous": dict(k=c.k.transpose(3, 4).contiguous().transpose(3, 4)),
        "cos/sin tables have 2 rows": dict(cos=c.cos[:2], sin=c.sin[:2]),
        "cos must be float32": dict(cos=c.cos.double()),
        "cos and sin must have the same rows": dict(sin=c.sin[:5]),
        "stride": dict(stride=9),
        "window": dict(window=0),
        "mode": dict(mode="sliding"),
        "must not share memory": dict(v=c.k),
        "ratio must be on k_cache's device": dict(ratio=c.ratio.to("meta")),
    }
    saved = snapshot(*c.tensors())
    value_checks = [m for m in cases if m.startswith(("mem_len \\", "beacon_len\\[", "mem_len\\[", "raw_len\\[",
                                                    "ratio\\[", "cos/sin tables"))]
    for message, change in cases.items():
        if device != "cpu" and message in value_checks:
            continue  # lengths on the GPU are checked by CondensedKVCache's host shadows, not the op
        with pytest.raises(BAD_CALL, match=message):
            c.run(**change)
            pytest.fail(f"accepted: {message}")
        assert_unchanged(c.tensors(), saved)


# ---------------------------------------------------------------------------------------------
# opcheck: schemas (mutations declared), fake kernels, autograd registration, AOT dispatch.
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_all_cache_ops(device):
    gen = torch.Generator().manual_seed(1)
    c = make_compact_case(gen, [(3, 8, 2), (1, 5, 4), (2, 8, 0)], window=8, stride=4, device=device)
    torch.library.opcheck(torch.ops.beacon.compact_.default,
                          (c.k, c.v, c.mem_len, c.raw_len, c.beacon_len, c.ratio, c.cos, c.sin, 8, 4,
                           "step-expansion", False))
    a = make_append_case(gen, torch.float32, device, APPEND_SEQS)
    torch.library.opcheck(torch.ops.beacon.append_kv.default, a.args(True))
    x = torch.randn(5, 3, 8, device=device)
    torch.library.opcheck(torch.ops.beacon.rope_.default,
                          (x, a.positions[:5], a.cos, a.sin, False))


def test_ops_compile_with_fake_kernels():
    """The fake kernels let torch.compile trace a step that rotates, appends and compacts."""
    gen = torch.Generator().manual_seed(2)
    c = make_compact_case(gen, [(3, 8, 2), (1, 5, 4)], window=8, stride=8)
    ref = make_compact_case(torch.Generator().manual_seed(2), [(3, 8, 2), (1, 5, 4)], window=8, stride=8)

    def step(k, v, mem, raw, bea, ratio, cos, sin):
        compact_(k, v, mem, raw, bea, ratio, cos, sin, window=8, stride=8, mode="step-expansion")

    torch.compile(step, fullgraph=True, backend="aot_eager")(*c.tensors())
    step(*ref.tensors())
    assert_unchanged(c.tensors(), ref.tensors())


# ---------------------------------------------------------------------------------------------
# The CPU row kernels have portable, AVX2, AVX-512 and AVX-512-BF16 implementations (chosen at run time,
# capped by BEACON_OPS_CPU_ISA, cpu_isa.h): they must agree bit for bit, special values included (NaN
# payloads aside: only where NaNs are must agree).
_ISA_SCRIPT = r"""
import sys
import torch
import beacon_ops
from beacon_ops.positions import rope_tables

out = {}
g = torch.Generator().manual_seed(0)
specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -3e-39, 3e38, -3e38,
                         1e-45, 65504.0, 1e-7])
for D in (16, 128):
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))
    cos, sin = rope_tables(inv, 64)
    base = torch.randn(40, 3, D, generator=g) * 3
    flat = base.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[:10 * specials.numel()]] = specials.repeat(10)
    base[:2] = torch.randn(2, 3, D, generator=g) * 1e-39  # whole rows of denormals: denormal results
    pos = torch.randint(0, 64, (40,), generator=g, dtype=torch.int32)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for il in (False, True):
            x = base.to(dtype)
            beacon_ops.rope_(x, pos, cos, sin, il)
            out[f"rope {D} {dtype} {il}"] = x
            for mode in ("segmentation", "step-expansion"):
                k = torch.randn(2, 2, 2, 30, D, generator=g).to(dtype)
                k.view(-1)[: specials.numel()] = specials.to(dtype)
                k[0, 0, 0, 18:] *= 1e-39  # beacons of sequence 0 (slots 15..20), heads 0: denormals
                v = torch.randn(2, 2, 2, 30, D, generator=g).to(dtype)
                i32 = lambda vals: torch.tensor(vals, dtype=torch.int32)
                beacon_ops.compact_(k, v, i32([3, 1]), i32([12, 12]), i32([6, 3]), i32([1, 2]), cos, sin,
                                    window=12, stride=6, mode=mode, interleaved=il)
                out[f"compact {D} {dtype} {il} {mode}"] = k
torch.save(out, sys.argv[1])
"""


@pytest.mark.slow
def test_cpu_isa_paths_agree_bit_for_bit(tmp_path):
    import os
    import subprocess
    import sys

    isas = ("portable", "avx2", "avx512", "avx512bf16", "amx")
    procs = {isa: subprocess.Popen([sys.executable, "-c", _ISA_SCRIPT, str(tmp_path / f"{isa}.pt")],
                                   env=dict(os.environ, BEACON_OPS_CPU_ISA=isa)) for isa in isas}
    assert all(p.wait(timeout=300) == 0 for p in procs.values())
    results = {isa: torch.load(tmp_path / f"{isa}.pt") for isa in isas}
    for isa in isas[1:]:
        for key, want in results["portable"].items():
            got = results[isa][key]
            nan = want.isnan()
            assert torch.equal(got.isnan(), nan), f"{isa} {key}: NaNs differ"
            bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[want.dtype]
            assert torch.equal(got.view(bits)[~nan], want.view(bits)[~nan]), f"{isa} {key}: bits differ"
