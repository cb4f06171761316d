"""A crash-safe fuzzer for ``torch.ops.beacon.*`` and ``CondensedKVCache`` (used by test_fuzz.py).

Every case is generated from ``(op, seed)``: a valid call of the op on small random inputs, then
most often one mutation that makes it invalid (a wrong dtype, shape, device, ``None``, strides,
aliasing, a bad length value, a bad scalar) or an edge case that is still valid (no heads, no
sequences, a huge ratio, a strided cache view, a larger ``max_seqlen_q``). Each case runs through
the typed wrapper or the raw op in a worker process, so a crash or hang is recorded instead of
ending the run, and is classified:

- ``named``: raised, and the message names the offending argument (or one it is checked against);
- ``unnamed``: raised, but the message names no such argument;
- ``correct``: a valid call whose result matches an independent reference (fp64 attention with
  an explicit mask, autograd of it, RoPE from its formula, slot-by-slot append and compaction);
- ``wrong`` (valid call, result differs), ``rejected`` (valid call raised), ``accepted`` (invalid
  call returned), ``state`` (a raised call changed an argument), ``crash``, ``hang``.

Valid calls draw the mode from every mask kind of the ops. Cache schedules (``run_schedule``)
drive ``CondensedKVCache`` (every mask kind; interleaved beacons with ``causal``; sinks of 0-2
entries where the newer variant allows them, a sink of 1 also re-taken) through random steps,
compactions, ratio changes and invalid calls, checking that raised calls change nothing and that
the lengths and attention outputs follow an independent model.

Run as ``python fuzzing.py --worker`` it serves cases read from stdin (one JSON line each).
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import select
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

OPS = ("attention", "attention_backward", "rope_", "append_kv", "compact_")
INTERFACES = ("wrapper", "raw")
FAILURES = ("wrong", "rejected", "accepted", "state", "crash", "hang")
OUTCOMES = ("named", "unnamed", "correct") + FAILURES

# Arguments each argument's sizes or dtype are checked against: an error about a mutated
# argument may name any of these instead (e.g. "v_cache must have k_cache's shape").
_LENGTHS = ("cu_seqlens_q", "mem_len", "raw_len", "beacon_len", "ratio")
PARTNERS: dict[str, dict[str, tuple[str, ...]]] = {
    "attention": {
        "q": ("k_cache", "v_cache", "cu_seqlens_q", "max_seqlen_q"),
        "k_cache": ("q", "v_cache") + _LENGTHS,
        "v_cache": ("k_cache", "q"),
        **{n: ("k_cache", "q", "max_seqlen_q") + _LENGTHS for n in _LENGTHS},
        "max_seqlen_q": ("cu_seqlens_q",),
    },
    "rope_": {"x": ("positions", "cos", "sin"), "positions": ("x", "cos", "sin"), "cos": ("sin", "x", "positions"),
              "sin": ("cos", "x", "positions")},
    "append_kv": {
        "k_cache": ("v_cache", "k_new", "v_new", "cu_seqlens", "mem_len", "raw_len", "beacon_len", "cos", "sin"),
        "v_cache": ("k_cache",), "k_new": ("k_cache", "v_new", "positions", "cu_seqlens"),
        "v_new": ("k_new", "k_cache"), "cu_seqlens": ("k_new", "k_cache", "raw_len", "beacon_len"),
        "mem_len": ("k_cache",), "raw_len": ("k_cache", "cu_seqlens"), "beacon_len": ("k_cache", "cu_seqlens"),
        "positions": ("k_new", "cos", "sin"), "cos": ("sin", "k_cache", "positions"),
        "sin": ("cos", "k_cache", "positions"),
    },
    "compact_": {
        "k_cache": ("v_cache", "mem_len", "raw_len", "beacon_len", "ratio", "cos", "sin"),
        "v_cache": ("k_cache",), "mem_len": ("k_cache", "raw_len", "beacon_len"),
        "raw_len": ("k_cache", "window", "beacon_len"), "beacon_len": ("k_cache", "ratio", "stride"),
        "ratio": ("k_cache", "stride", "beacon_len"), "cos": ("sin", "k_cache", "window"),
        "sin": ("cos", "k_cache"), "window": ("stride", "raw_len", "cos"), "stride": ("window", "ratio"),
    },
}
PARTNERS["attention_backward"] = {
    **PARTNERS["attention"],
    "q": PARTNERS["attention"]["q"] + ("dout", "out", "lse"),
    "dout": ("q",), "out": ("q",), "lse": ("q",),
}
# The wrapper spells some scalar arguments differently from the schema.
_WRAPPER_NAMES = {"beacon_mode": "mode"}


def mask_kinds() -> tuple[str, ...]:
    """Every mask kind the ops and the condensed cache take as ``mode`` (imported lazily: the
    driver process does not import torch)."""
    from beacon_ops.positions import MASK_KINDS
    return MASK_KINDS


@dataclass
class Case:
    op: str
    args: dict[str, Any]                 # schema order
    label: str = "valid"
    bad: str | None = None               # the argument made invalid (None: a valid call)
    extra_names: tuple[str, ...] = ()    # further acceptable names for this mutation
    meta: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Valid calls.
def _i32(values):
    import torch
    return torch.tensor(values, dtype=torch.int32)


def _tables(head_dim: int, rows: int):
    import torch
    inv = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    ang = torch.arange(rows, dtype=torch.float64)[:, None] * inv[None]
    return ang.cos().float().contiguous(), ang.sin().float().contiguous()


def _attention_case(rng: random.Random, backward: bool) -> Case:
    import torch
    batch = rng.choice([1, 1, 2, 3])
    kv_heads, group = rng.choice([1, 2]), rng.choice([1, 2, 3])
    d = rng.choice([8, 16])
    mode = rng.choice(mask_kinds())
    mems, raws, beacons, ratios, nqs = [], [], [], [], []
    for _ in range(batch):
        m, r = rng.randint(0, 6), rng.randint(0, 8)
        ratio = rng.choice([0, 1, 2, 3, 4])
        b = rng.randint(0, 3) if ratio > 0 else 0
        nq = rng.randint(b, r + b)
        mems.append(m), raws.append(r), beacons.append(b), ratios.append(ratio), nqs.append(nq)
    cap = max(m + r + b for m, r, b in zip(mems, raws, beacons)) + rng.randint(0, 3)
    cu = [0]
    for n in nqs:
        cu.append(cu[-1] + n)
    q = torch.randn(cu[-1], kv_heads * group, d)
    k = torch.randn(batch, kv_heads, cap, d)
    v = torch.randn(batch, kv_heads, cap, d)
    args = dict(q=q, k_cache=k, v_cache=v, cu_seqlens_q=_i32(cu), mem_len=_i32(mems), raw_len=_i32(raws),
                beacon_len=_i32(beacons), ratio=_i32(ratios), max_seqlen_q=max(nqs, default=0), mode=mode,
                attend_previous=rng.random() < 0.7, softmax_scale=rng.choice([0.0, 0.0, 0.3, 1.5]))
    if backward:
        args = _with_forward(args)
    return Case("attention_backward" if backward else "attention", args)


def _with_forward(a: dict) -> dict:
    """attention_backward's arguments for attention arguments `a` (forward run by the op)."""
    import torch
    out, lse = torch.ops.beacon.attention(*a.values())
    return dict(dout=torch.randn_like(a["q"]), q=a["q"], k_cache=a["k_cache"], v_cache=a["v_cache"], out=out,
                lse=lse, **{k: a[k] for k in list(a)[3:]})


def _rope_case(rng: random.Random) -> Case:
    import torch
    n, heads, d = rng.randint(0, 6), rng.randint(1, 3), rng.choice([2, 8, 16])
    rows = rng.randint(1, 40)
    cos, sin = _tables(d, rows)
    return Case("rope_", dict(x=torch.randn(n, heads, d), positions=_i32([rng.randrange(rows) for _ in range(n)]),
                              cos=cos, sin=sin, interleaved=rng.random() < 0.5))


def _append_case(rng: random.Random) -> Case:
    import torch
    batch, heads, d = rng.choice([1, 2, 3]), rng.randint(1, 2), rng.choice([4, 8])
    mems, raws, beacons, news = [], [], [], []
    for _ in range(batch):
        m, r, b = rng.randint(0, 5), rng.randint(0, 6), rng.randint(0, 2)
        mems.append(m), raws.append(r), beacons.append(b), news.append(rng.randint(0, r + b))
    cap = max(m + r + b for m, r, b in zip(mems, raws, beacons)) + rng.randint(0, 2)
    cu = [0]
    for n in news:
        cu.append(cu[-1] + n)
    rows = cap + 4
    cos, sin = _tables(d, rows)
    total = cu[-1]
    args = dict(k_cache=torch.randn(batch, heads, cap, d), v_cache=torch.randn(batch, heads, cap, d),
                k_new=torch.randn(total, heads, d), v_new=torch.randn(total, heads, d), cu_seqlens=_i32(cu),
                mem_len=_i32(mems), raw_len=_i32(raws), beacon_len=_i32(beacons),
                positions=_i32([rng.randrange(rows) for _ in range(total)]), cos=cos, sin=sin,
                interleaved=rng.random() < 0.5)
    return Case("append_kv", args)


def _compact_case(rng: random.Random) -> Case:
    import torch
    window = rng.choice([2, 4, 6, 8])
    stride = rng.choice([s for s in range(1, window + 1)])
    divisors = [r for r in range(1, stride + 1) if stride % r == 0]
    layers, batch, heads, d = rng.randint(1, 2), rng.randint(1, 3), rng.randint(1, 2), rng.choice([4, 8])
    mems, raws, beacons, ratios = [], [], [], []
    for _ in range(batch):
        ratio = rng.choice([0] + divisors)
        raw = window if rng.random() < 0.6 else rng.randint(0, window)
        mems.append(rng.randint(0, 5)), raws.append(raw), ratios.append(ratio)
        beacons.append(stride // ratio if raw == window and ratio > 0 else 0)
    cap = max(m + r + b for m, r, b in zip(mems, raws, beacons)) + rng.randint(0, 2)
    cos, sin = _tables(d, cap + window + 1)
    shape = (layers, batch, heads, cap, d)
    args = dict(k_cache=torch.randn(shape), v_cache=torch.randn(shape), mem_len=_i32(mems), raw_len=_i32(raws),
                beacon_len=_i32(beacons), ratio=_i32(ratios), cos=cos, sin=sin, window=window, stride=stride,
                beacon_mode=rng.choice(mask_kinds()), interleaved=rng.random() < 0.5)
    return Case("compact_", args)


def valid_case(op: str, rng: random.Random) -> Case:
    return {"attention": lambda: _attention_case(rng, False), "attention_backward": lambda: _attention_case(rng, True),
            "rope_": lambda: _rope_case(rng), "append_kv": lambda: _append_case(rng),
            "compact_": lambda: _compact_case(rng)}[op]()


# ------------------------------------------------------------------------------------------------
# Mutations: each changes one argument (invalid) or makes an edge case (valid).
def _tensor_names(c: Case) -> list[str]:
    import torch
    return [n for n, v in c.args.items() if isinstance(v, torch.Tensor)]


def _float_names(c: Case) -> list[str]:
    import torch
    return [n for n in _tensor_names(c) if c.args[n].is_floating_point()]


def _int_names(c: Case) -> list[str]:
    import torch
    return [n for n in _tensor_names(c) if c.args[n].dtype == torch.int32]


def _bad(c: Case, name: str, value, label: str, *extra: str) -> Case:
    c.args[name] = value
    c.bad, c.label, c.extra_names = name, label, extra
    return c


def m_dtype(c: Case, rng: random.Random) -> Case:
    import torch
    name = rng.choice(_tensor_names(c))
    t = c.args[name]
    if t.dtype == torch.int32:
        dt = rng.choice([torch.int64, torch.float32, torch.int16])
    elif c.op == "attention_backward" and name in ("q", "k_cache", "v_cache", "dout", "out"):
        dt = rng.choice([torch.int64, torch.float16, torch.float64])  # one tensor off q's dtype
    else:
        dt = rng.choice([torch.int64, torch.float64, torch.int32] +
                        ([torch.float16] if name in ("k_cache", "v_cache", "k_new", "v_new", "q", "lse") else []))
    if name in ("k_cache", "v_cache") and c.op in ("append_kv", "compact_") and dt == torch.float16:
        dt = torch.float64
    return _bad(c, name, t.to(dt), f"dtype {name} {dt}")


def m_rank(c: Case, rng: random.Random) -> Case:
    name = rng.choice(_tensor_names(c))
    t = c.args[name]
    drop = rng.random() >= 0.5 and t.dim() > 0
    if drop and t.shape[0] == 0:  # no first row to take: merge the first two dimensions
        drop = t.dim() >= 2
        value = t.flatten(0, 1) if drop else t.unsqueeze(0)
    else:
        value = t[0] if drop else t.unsqueeze(0)
    return _bad(c, name, value, f"rank {name}")


def m_size(c: Case, rng: random.Random) -> Case:
    import torch
    name = rng.choice(_tensor_names(c))
    t = c.args[name]
    if t.dim() == 0:
        return m_rank(c, rng)
    # Only dimensions tied to another argument (a free size such as the capacity may change).
    free = {("attention", "k_cache"): {2}, ("attention_backward", "k_cache"): {2}, ("rope_", "cos"): {0},
            ("rope_", "sin"): {0}, ("append_kv", "cos"): {0}, ("append_kv", "sin"): {0},
            ("append_kv", "k_cache"): {2}, ("compact_", "k_cache"): {0, 3}, ("compact_", "cos"): {0},
            ("compact_", "sin"): {0}, ("attention", "q"): set(), ("rope_", "x"): {1},
            ("compact_", "v_cache"): set()}.get((c.op, name), set())
    if c.op in ("rope_",) and name == "x":
        free = {1}
    dims = [i for i in range(t.dim()) if i not in free]
    if name in ("q",) and c.op.startswith("attention"):
        dims = [0, 2]  # heads may change within the group rule (checked separately)
    if not dims:
        return m_rank(c, rng)
    dim = rng.choice(dims)
    grow = rng.random() < 0.5 or t.shape[dim] == 0
    if grow:
        pad_shape = list(t.shape)
        pad_shape[dim] = 1
        value = torch.cat([t, torch.zeros(pad_shape, dtype=t.dtype)], dim=dim)
    else:
        value = t.narrow(dim, 0, t.shape[dim] - 1).contiguous()
    if c.op == "rope_" and name == "x" and dim == 2 and not grow and t.shape[2] % 2 == 1:
        pass
    return _bad(c, name, value, f"size {name} dim {dim} {'+1' if grow else '-1'}")


def m_meta(c: Case, rng: random.Random) -> Case:
    name = rng.choice(_tensor_names(c))
    # The error names the argument on the wrong device, or the reference it is compared with.
    ref = {"attention": "q", "attention_backward": "q", "rope_": "x"}.get(c.op, "k_cache")
    return _bad(c, name, c.args[name].to("meta"), f"meta {name}", ref)


def m_none(c: Case, rng: random.Random) -> Case:
    name = rng.choice(_tensor_names(c))
    return _bad(c, name, None, f"None {name}")


def m_strides(c: Case, rng: random.Random) -> Case:
    import torch
    name = rng.choice(_tensor_names(c))
    t = c.args[name]
    if t.dim() == 1:  # every other element of a twice as long vector
        value = torch.stack([t, t], dim=1).reshape(-1)[::2]
        if value.numel() <= 1:
            return m_meta(c, rng)
    elif t.dim() >= 2 and t.shape[-1] > 1:
        value = t.transpose(-1, -2).contiguous().transpose(-1, -2)  # head_dim not contiguous
        if value.is_contiguous():
            return m_rank(c, rng)
    else:
        return m_rank(c, rng)
    if c.op == "attention_backward" and name in ("dout", "out", "lse"):
        # Valid: the backward reads these through contiguous copies (autograd may pass an
        # expanded dout); the result is checked against the reference.
        c.args[name], c.label = value, f"edge strides {name}"
        return c
    return _bad(c, name, value, f"strides {name}")


def _alias_pairs(op: str) -> list[tuple[str, str]]:
    return {"rope_": [("x", "cos"), ("x", "sin"), ("x", "positions")],
            "append_kv": [("k_cache", "v_cache"), ("k_cache", "k_new"), ("v_cache", "v_new"), ("k_cache", "cos"),
                          ("v_cache", "sin"), ("k_cache", "mem_len")],
            "compact_": [("k_cache", "v_cache"), ("mem_len", "raw_len"), ("raw_len", "beacon_len"),
                         ("k_cache", "cos"), ("v_cache", "sin"), ("mem_len", "ratio"), ("beacon_len", "ratio")],
            }.get(op, [])


def m_alias(c: Case, rng: random.Random) -> Case:
    import torch
    pairs = _alias_pairs(c.op)
    if not pairs:
        return m_value(c, rng)
    written, other = rng.choice(pairs)
    w, o = c.args[written], c.args[other]
    # `written` becomes a view of `other`'s memory with its own shape and dtype.
    need = w.numel() * w.element_size()
    if need == 0 or o.numel() == 0:  # nothing to alias
        return m_value(c, rng)
    buf = o.view(-1).view(torch.uint8)
    if buf.numel() < need:
        big = torch.zeros(need, dtype=torch.uint8)
        if buf.numel():
            big[: buf.numel()] = buf
        # `other` too becomes a view of the bigger buffer, with its values.
        c.args[other] = big[: o.numel() * o.element_size()].view(o.dtype).view(o.shape)
        buf = big
    view = buf[:need].view(w.dtype).view(w.shape)
    view.copy_(w.clone())
    return _bad(c, written, view, f"alias {written}~{other}", other)


def m_scalar(c: Case, rng: random.Random) -> Case:
    a = c.args
    choices: list[tuple[str, Any]] = []
    if "mode" in a or "beacon_mode" in a:
        key = "mode" if "mode" in a else "beacon_mode"
        choices += [(key, "sliding"), (key, ""), (key, "Segmentation")]
    if "softmax_scale" in a:
        choices += [("softmax_scale", v) for v in (math.inf, -math.inf, math.nan, 1e39, -1e39, 3.5e38)]
    if "max_seqlen_q" in a:
        choices += [("max_seqlen_q", -1), ("max_seqlen_q", -(2 ** 40))]
    if "window" in a:
        choices += [("window", 0), ("window", -3), ("window", 2 ** 31), ("stride", 0), ("stride", -1),
                    ("stride", a["window"] + 1)]
    if not choices:
        return m_value(c, rng)
    name, value = rng.choice(choices)
    return _bad(c, name, value, f"scalar {name}={value}")


def _set(t, i, value):
    t = t.clone()
    t[i] = max(-2 ** 31, min(2 ** 31 - 1, int(value)))  # stays an int32
    return t


def m_value(c: Case, rng: random.Random) -> Case:
    """A bad length or position value (read by the CPU kernels)."""
    a = c.args
    B = len(a["mem_len"]) if "mem_len" in a else 0
    choices: list[tuple[str, Callable[[], Any], tuple[str, ...]]] = []
    big = rng.choice([2 ** 31 - 1, 2 ** 30, 10 ** 6])
    if c.op.startswith("attention"):
        cu = a["cu_seqlens_q"]
        b = rng.randrange(B)
        choices += [
            ("mem_len", lambda: _set(a["mem_len"], b, -1), ("k_cache",)),
            ("mem_len", lambda: _set(a["mem_len"], b, big), ("k_cache",)),
            ("raw_len", lambda: _set(a["raw_len"], b, -rng.randint(1, 5)), ("cu_seqlens_q",)),
            ("beacon_len", lambda: _set(a["beacon_len"], b, -1), ("ratio", "cu_seqlens_q")),
            ("beacon_len", lambda: _set(a["beacon_len"], b, a["beacon_len"][b].item() + big),
             ("ratio", "cu_seqlens_q", "k_cache")),
            ("ratio", lambda: _set(a["ratio"], b, -1), ()),
            ("cu_seqlens_q", lambda: _set(cu, 0, 1), ("q",)),
            ("cu_seqlens_q", lambda: _set(cu, B, cu[B].item() + 1), ("q",)),
            ("raw_len", lambda: _set(a["raw_len"], b, a["raw_len"][b].item() + big), ("k_cache", "cu_seqlens_q")),
        ]
        if B >= 2 and cu[B].item() > 0:
            i = rng.randint(1, B - 1)
            choices.append(("cu_seqlens_q", lambda i=i: _set(cu, i, cu[B].item() + 1 + rng.randint(0, 3)), ()))
        nqs = [cu[i + 1].item() - cu[i].item() for i in range(B)]
        if max(nqs, default=0) > 0:
            choices.append(("max_seqlen_q", lambda: max(nqs) - 1, ("cu_seqlens_q",)))
        if any(x > 0 for x in a["beacon_len"].tolist()):
            i = [j for j, x in enumerate(a["beacon_len"].tolist()) if x > 0][0]
            choices.append(("ratio", lambda i=i: _set(a["ratio"], i, 0), ("beacon_len",)))
        if any(n > 0 for n in nqs):
            i = [j for j, n in enumerate(nqs) if n > 0][0]
            choices.append(("raw_len", lambda i=i: _set(a["raw_len"], i, max(0, nqs[i] - a["beacon_len"][i].item()) - 1)
                            if nqs[i] - a["beacon_len"][i].item() > 0 else _set(a["raw_len"], i, -1),
                            ("cu_seqlens_q",)))
    elif c.op == "rope_":
        if a["positions"].numel():
            i = rng.randrange(a["positions"].numel())
            rows = a["cos"].shape[0]
            choices += [("positions", lambda i=i: _set(a["positions"], i, rng.choice([-1, rows, 2 ** 31 - 1])), ())]
        else:
            return m_scalar_or_size(c, rng)
    elif c.op == "append_kv":
        b = rng.randrange(B)
        cu = a["cu_seqlens"]
        choices += [
            ("mem_len", lambda: _set(a["mem_len"], b, -1), ()),
            ("mem_len", lambda: _set(a["mem_len"], b, big), ("k_cache",)),
            ("raw_len", lambda: _set(a["raw_len"], b, -1), ()),
            ("beacon_len", lambda: _set(a["beacon_len"], b, big), ("k_cache",)),
            ("cu_seqlens", lambda: _set(cu, 0, 1), ("k_new",)),
            ("cu_seqlens", lambda: _set(cu, B, cu[B].item() + 1), ("k_new",)),
        ]
        if a["positions"].numel():
            i = rng.randrange(a["positions"].numel())
            choices.append(("positions", lambda i=i: _set(a["positions"], i, rng.choice([-5, a["cos"].shape[0]])), ()))
        news = [cu[i + 1].item() - cu[i].item() for i in range(B)]
        i = rng.randrange(B)
        if news[i] > 0:  # raw_len + beacon_len one less than the sequence's new tokens
            short = "raw_len" if news[i] - a["beacon_len"][i].item() - 1 >= 0 else "beacon_len"
            keep = "beacon_len" if short == "raw_len" else "raw_len"
            choices.append((short, lambda i=i, short=short, keep=keep:
                            _set(a[short], i, news[i] - a[keep][i].item() - 1), ("cu_seqlens", keep)))
    elif c.op == "compact_":
        b = rng.randrange(B)
        W, S = a["window"], a["stride"]
        choices += [
            ("mem_len", lambda: _set(a["mem_len"], b, -1), ()),
            ("raw_len", lambda: _set(a["raw_len"], b, W + 1), ()),
            ("raw_len", lambda: _set(a["raw_len"], b, -1), ()),
            ("ratio", lambda: _set(a["ratio"], b, -2), ()),
            ("ratio", lambda: _set(a["ratio"], b, S + 1), ()),
            ("beacon_len", lambda: _set(a["beacon_len"], b, a["beacon_len"][b].item() + 1), ()),
            ("mem_len", lambda: _set(a["mem_len"], b, big), ("k_cache",)),
        ]
        # One table row is too few only where keys rotate: a full window with beacons (beacon 0
        # moves by at least its ratio); with ratio 0 nothing moves.
        if any(n == W and r > 0 for n, r in zip(a["raw_len"].tolist(), a["ratio"].tolist())):
            choices.append(("cos", lambda: a["cos"][:1].contiguous(), ("sin",)))
    name, make, extra = rng.choice(choices)
    value = make()
    if name in ("cos",):
        c.args["sin"] = c.args["sin"][: value.shape[0]].contiguous()
    return _bad(c, name, value, f"value {name}", *extra)


def m_scalar_or_size(c: Case, rng: random.Random) -> Case:
    return m_scalar(c, rng) if rng.random() < 0.5 else m_size(c, rng)


INVALID_MUTATIONS = (m_dtype, m_rank, m_size, m_meta, m_none, m_strides, m_alias, m_scalar, m_value)


def edge_case(c: Case, rng: random.Random) -> Case:
    """A valid call at the edges: empty tensors, huge ratios, strided views, loose bounds."""
    import torch
    a = c.args
    kinds = []
    if c.op.startswith("attention"):
        kinds += ["huge ratio", "loose max_seqlen_q", "cache view", "no heads", "no sequences", "negative scale"]
    elif c.op == "rope_":
        kinds += ["no tokens", "no heads"]
    elif c.op == "append_kv":
        kinds += ["no sequences", "cache view"]
    else:
        kinds += ["no sequences", "no layers", "huge memory"]
    kind = rng.choice(kinds)
    c.label = f"edge {kind}"
    if c.op.startswith("attention"):
        fwd = {k: a[k] for k in ("q", "k_cache", "v_cache", "cu_seqlens_q", "mem_len", "raw_len", "beacon_len",
                                 "ratio", "max_seqlen_q", "mode", "attend_previous", "softmax_scale")}
        if kind == "huge ratio":
            fwd["ratio"] = torch.tensor([rng.choice([2 ** 30, 2 ** 31 - 1, 2 ** 29 + 7]) if r > 0 else 0
                                         for r in fwd["ratio"].tolist()], dtype=torch.int32)
        elif kind == "loose max_seqlen_q":
            fwd["max_seqlen_q"] = fwd["max_seqlen_q"] + rng.choice([1, 100, 2 ** 40])
        elif kind == "cache view":  # a layer's view of a bigger cache: strided, head_dim contiguous
            for n in ("k_cache", "v_cache"):
                t = fwd[n]
                big = torch.randn(t.shape[0], t.shape[1], t.shape[2] + 3, t.shape[3])
                big[:, :, : t.shape[2]] = t
                fwd[n] = big[:, :, : t.shape[2]]
        elif kind == "no heads":
            fwd["q"] = fwd["q"][:, :0]
        elif kind == "no sequences":
            fwd.update(q=fwd["q"][:0], k_cache=fwd["k_cache"][:0], v_cache=fwd["v_cache"][:0],
                       cu_seqlens_q=_i32([0]), mem_len=_i32([]), raw_len=_i32([]), beacon_len=_i32([]),
                       ratio=_i32([]), max_seqlen_q=0)
        elif kind == "negative scale":
            fwd["softmax_scale"] = -rng.random()
        c.args = _with_forward(fwd) if c.op == "attention_backward" else fwd
    elif c.op == "rope_":
        if kind == "no tokens":
            a.update(x=a["x"][:0], positions=_i32([]))
        else:
            a["x"] = a["x"][:, :0]
    elif c.op == "append_kv":
        if kind == "no sequences":
            a.update(k_cache=a["k_cache"][:0], v_cache=a["v_cache"][:0], k_new=a["k_new"][:0],
                     v_new=a["v_new"][:0], cu_seqlens=_i32([0]), mem_len=_i32([]), raw_len=_i32([]),
                     beacon_len=_i32([]), positions=_i32([]))
        else:  # a layer's view of a whole cache
            k = torch.stack([a["k_cache"], torch.randn_like(a["k_cache"])])
            v = torch.stack([torch.randn_like(a["v_cache"]), a["v_cache"]])
            a.update(k_cache=k[0], v_cache=v[1])
    else:
        if kind == "no sequences":
            for n in ("k_cache", "v_cache"):
                a[n] = a[n][:, :0]
            for n in ("mem_len", "raw_len", "beacon_len", "ratio"):
                a[n] = _i32([])
        elif kind == "no layers":
            for n in ("k_cache", "v_cache"):
                a[n] = a[n][:0]
        else:  # memory near the capacity of a large cache (no data moved beyond it)
            a["mem_len"] = torch.zeros_like(a["mem_len"])
    return c


def make_case(op: str, seed: int) -> Case:
    import torch
    rng = random.Random(f"{op}:{seed}")
    torch.manual_seed(rng.randrange(2 ** 31))
    c = valid_case(op, rng)
    u = rng.random()
    if u < 0.2:
        return c
    if u < 0.4:
        return edge_case(c, rng)
    return rng.choice(INVALID_MUTATIONS)(c, rng)


# ------------------------------------------------------------------------------------------------
# References (independent of the kernels).
def _ref_attention(a: dict):
    from beacon_ops.reference import reference_attention
    return reference_attention(a["q"], a["k_cache"], a["v_cache"], a["cu_seqlens_q"], a["mem_len"], a["raw_len"],
                               a["beacon_len"], a["ratio"], mode=a["mode"], attend_previous=a["attend_previous"],
                               softmax_scale=a["softmax_scale"] if a["softmax_scale"] > 0 else None)


def _ref_backward(a: dict):
    import torch
    q, k, v = (a[n].double().requires_grad_() for n in ("q", "k_cache", "v_cache"))
    ref = _ref_attention({**a, "q": q, "k_cache": k, "v_cache": v})
    out = ref.out
    if out.numel():
        (out * a["dout"].double()).sum().backward()
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in (q, k, v)]
    return grads


def _rotate(x, positions, cos, sin, interleaved):
    """x [n, heads, D] rotated at positions [n] (fp64, from the tables' rows)."""
    pos = positions.long()
    return _rotate_tab(x.double(), cos[pos].double(), sin[pos].double(), interleaved)


def _ref_compact(a: dict):
    """Expected (k, v, mem, raw, beacon) after compaction, from the spec's moves (torch.cat)."""
    import torch
    from beacon_ops.positions import beacon_position
    k = a["k_cache"].double()
    mem, raw, bea, rat = (a[n].tolist() for n in ("mem_len", "raw_len", "beacon_len", "ratio"))
    W, S, mode = a["window"], a["stride"], a["beacon_mode"]
    k_out, v_out = a["k_cache"].double().clone(), a["v_cache"].clone()
    for b in range(len(mem)):
        if raw[b] != W:
            continue
        M, r = mem[b], rat[b]
        if r == 0:
            mem[b], raw[b] = M + S, W - S
            continue
        B = S // r
        src = list(range(M + W, M + W + B)) + list(range(M + S, M + W))
        old_pos = [beacon_position(M, j, r, W, mode) for j in range(B)] + list(range(M + S, M + W))
        new_pos = list(range(M, M + B + W - S))
        delta = torch.tensor([n - o for n, o in zip(new_pos, old_pos)])
        ks = k[:, b, :, src]                                       # [L, H, n, D]
        L, H, n, D = ks.shape
        x = ks.permute(2, 0, 1, 3).reshape(n, L * H, D)
        absd = delta.abs()
        cos, sin = a["cos"].double()[absd], a["sin"].double()[absd] * delta.sign().double()[:, None]
        rot = _rotate_tab(x, cos, sin, a["interleaved"])
        k_out[:, b, :, M:M + n] = rot.reshape(n, L, H, D).permute(1, 2, 0, 3)
        v_out[:, b, :, M:M + n] = a["v_cache"][:, b, :, src]
        mem[b], raw[b], bea[b] = M + B, W - S, 0
    for b in range(len(mem)):
        if a["raw_len"][b].item() == W:
            bea[b] = 0
    return k_out, v_out, mem, raw, bea


def _rotate_tab(x, c, s, interleaved):
    """x [n, heads, D] rotated row by row by the angles whose cos/sin are c, s [n, D/2]."""
    import torch
    if interleaved:
        x0, x1 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x0, x1 = x[..., :half], x[..., half:]
    c, s = c[:, None, :], s[:, None, :]
    y0, y1 = x0 * c - x1 * s, x1 * c + x0 * s
    return torch.stack([y0, y1], dim=-1).flatten(-2) if interleaved else torch.cat([y0, y1], dim=-1)


def _close(got, want, tol: float) -> bool:
    import torch
    got, want = got.double(), want.double()
    if got.shape != want.shape:
        return False
    return bool(torch.allclose(got, want, atol=tol, rtol=tol, equal_nan=False)) or (
        got.numel() == 0)


def check_result(c: Case, before: dict, result) -> str | None:
    """None if the valid call's result (and mutated arguments) match the reference, else why not."""
    import torch
    a = before
    if c.op == "attention":
        out, lse = result
        ref = _ref_attention(a)
        if not _close(out, ref.out, 1e-4):
            return "out differs"
        finite = torch.isfinite(ref.lse)
        if not torch.equal(torch.isfinite(lse), finite) or not _close(lse[finite], ref.lse[finite], 1e-4):
            return "lse differs"
        return None
    if c.op == "attention_backward":
        for name, g, w in zip(("dq", "dk_cache", "dv_cache"), result, _ref_backward(a)):
            if not _close(g, w, 2e-4):
                return f"{name} differs"
        return None
    if c.op == "rope_":
        want = _rotate(a["x"], a["positions"], a["cos"], a["sin"], a["interleaved"])
        return None if _close(c.args["x"], want, 1e-5) else "x differs"
    if c.op == "append_kv":
        k_want, v_want = a["k_cache"].double().clone(), a["v_cache"].clone()
        cu, mem, raw, bea = (a[n].tolist() for n in ("cu_seqlens", "mem_len", "raw_len", "beacon_len"))
        rot = _rotate(a["k_new"], a["positions"], a["cos"], a["sin"], a["interleaved"])
        for b in range(len(mem)):
            end = mem[b] + raw[b] + bea[b]
            n = cu[b + 1] - cu[b]
            k_want[b, :, end - n:end] = rot[cu[b]:cu[b + 1]].transpose(0, 1)
            v_want[b, :, end - n:end] = a["v_new"][cu[b]:cu[b + 1]].transpose(0, 1)
        if not torch.equal(c.args["v_cache"], v_want):
            return "v_cache differs"
        return None if _close(c.args["k_cache"], k_want, 1e-5) else "k_cache differs"
    if c.op == "compact_":
        k_want, v_want, mem, raw, bea = _ref_compact(a)
        got = [c.args[n].tolist() for n in ("mem_len", "raw_len", "beacon_len")]
        if got != [mem, raw, bea]:
            return f"lengths {got} != {[mem, raw, bea]}"
        if not torch.equal(c.args["v_cache"], v_want):
            return "v_cache differs"
        return None if _close(c.args["k_cache"], k_want, 1e-5) else "k_cache differs"
    raise ValueError(c.op)


# ------------------------------------------------------------------------------------------------
# Running one case (inside a worker).
def _call(c: Case, interface: str):
    import torch
    import beacon_ops
    a = c.args
    if interface == "raw":
        return getattr(torch.ops.beacon, c.op)(*a.values())
    if c.op == "attention":
        return beacon_ops.beacon_attention(*list(a.values())[:8], max_seqlen_q=a["max_seqlen_q"], mode=a["mode"],
                                           attend_previous=a["attend_previous"], softmax_scale=a["softmax_scale"])
    if c.op == "attention_backward":
        return beacon_ops.beacon_attention_backward(
            *list(a.values())[:11], max_seqlen_q=a["max_seqlen_q"], mode=a["mode"],
            attend_previous=a["attend_previous"], softmax_scale=a["softmax_scale"])
    if c.op == "rope_":
        return beacon_ops.rope_(*a.values())
    if c.op == "append_kv":
        return beacon_ops.append_kv(*a.values())
    return beacon_ops.compact_(*list(a.values())[:8], window=a["window"], stride=a["stride"],
                               mode=a["beacon_mode"], interleaved=a["interleaved"])


def _snapshot(args: dict) -> dict:
    import torch
    return {n: (v.clone() if isinstance(v, torch.Tensor) and not v.is_meta else v) for n, v in args.items()}


def _unchanged(args: dict, saved: dict) -> list[str]:
    import torch
    changed = []
    for n, v in args.items():
        if isinstance(v, torch.Tensor) and not v.is_meta:
            s = saved[n]
            if not torch.equal(v.view(-1).view(torch.uint8) if v.is_contiguous() else v.contiguous().view(-1)
                               .view(torch.uint8), s.contiguous().view(-1).view(torch.uint8)):
                changed.append(n)
    return changed


def names_argument(message: str, names) -> bool:
    for n in names:
        for spelling in {n, _WRAPPER_NAMES.get(n, n)}:
            if re.search(rf"(?<![\w]){re.escape(spelling)}(?![\w])", message):
                return True
    return False


def run_case(op: str, interface: str, seed: int) -> dict:
    c = make_case(op, seed)
    saved = _snapshot(c.args)
    try:
        result = _call(c, interface)
    except Exception as e:  # noqa: BLE001  (classified below)
        message = f"{type(e).__name__}: {e}".split("\n")[0][:300]
        changed = _unchanged(c.args, saved)
        if changed:
            return dict(outcome="state", label=c.label, message=f"{message} / changed {changed}")
        if c.bad is None:
            return dict(outcome="rejected", label=c.label, message=message)
        names = (c.bad,) + c.extra_names + PARTNERS[op].get(c.bad, ())
        return dict(outcome="named" if names_argument(message, names) else "unnamed", label=c.label,
                    message=message)
    if c.bad is not None:
        return dict(outcome="accepted", label=c.label, message="")
    if op in ("attention", "attention_backward"):
        changed = _unchanged(c.args, saved)
        if changed:
            return dict(outcome="wrong", label=c.label, message=f"inputs changed: {changed}")
    why = check_result(c, saved, result)
    return dict(outcome="wrong" if why else "correct", label=c.label, message=why or "")


# ------------------------------------------------------------------------------------------------
# Cache schedules.
def run_schedule(seed: int) -> dict:
    """One random schedule of CondensedKVCache calls. Returns counts per outcome and failures."""
    import torch
    from beacon_ops import CondensedKVCache
    from beacon_ops.reference import reference_attention
    rng = random.Random(f"schedule:{seed}")
    torch.manual_seed(rng.randrange(2 ** 31))
    window = rng.choice([2, 4, 6, 8])
    stride = rng.randint(1, window)
    divisors = [0] + [r for r in range(1, stride + 1) if stride % r == 0]
    batch, layers, kv, group, d = rng.randint(1, 3), rng.randint(1, 2), rng.randint(1, 2), rng.randint(1, 2), 8
    mode = rng.choice(mask_kinds())
    # Interleaved beacons (the causal mask kind only, stride == window): a window's beacons sit
    # among its raw tokens ("inner"), which the ops see as raw keys.
    interleave = mode == "causal" and rng.random() < 0.5
    attend_previous = rng.random() < 0.7
    # A sink of 0-2 entries where the newer variant allows one (stride == window; its mask kinds,
    # step-expansion only with the memory visible): the first compaction with beacons keeps it.
    sink = 0
    if (mode in ("causal", "step-causal") or (mode == "step-expansion" and attend_previous)) and rng.random() < 0.6:
        sink = rng.randint(0, min(2, window - 1))
    if interleave or sink:
        stride = window
        divisors = [0] + [r for r in range(1, stride + 1) if stride % r == 0]
    # A sink of 1 re-taken while the first window is read (sink_recapture): from the window's second
    # step on it has a slot of its own in front; it stays in the memory whatever the ratio.
    recapture = sink == 1 and rng.random() < 0.5
    length = rng.randint(0, 40)
    cap = CondensedKVCache.capacity_for(length, window, stride, ratio=max(divisors[1:], default=0) and 1,
                                        sink_size=sink, sink_recapture=recapture) + 2
    cache = CondensedKVCache(layers, batch, kv, d, cap, window=window, stride=stride, mode=mode,
                             attend_previous=attend_previous, sink_size=sink, sink_recapture=recapture,
                             placement="interleave" if interleave else "append")
    model = [dict(mem=0, raw=0, beacon=0, ratio=0, inner=0) for _ in range(batch)]
    sink_slot = [False] * batch  # the re-taken sink's slot is open (first window not condensed)
    counts = {"ok": 0, "raised": 0}
    failures: list[str] = []
    sink_kept = 0  # compactions that kept a sink

    def state():
        return ([t.clone() for t in (cache.k, cache.v, cache.mem_len, cache.raw_len, cache.beacon_len, cache.ratio)],
                (list(cache.host_mem_len), list(cache.host_raw_len), list(cache.host_beacon_len),
                 list(cache.host_ratio)))

    def same(s0, s1) -> bool:
        return all(torch.equal(x, y) for x, y in zip(s0[0], s1[0])) and s0[1] == s1[1]

    def attempt(what: str, fn, expect_error: bool | None) -> Any:
        before = state()
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001
            counts["raised"] += 1
            if not same(before, state()):
                failures.append(f"state changed by raised {what}: {e}")
            if expect_error is False:
                failures.append(f"valid {what} raised {type(e).__name__}: {e}")
            return e
        counts["ok"] += 1
        if expect_error:
            failures.append(f"invalid {what} accepted")
        return out

    def check_model():
        host = [dict(mem=cache.host_mem_len[b], raw=cache.host_raw_len[b], beacon=cache.host_beacon_len[b],
                     ratio=cache.host_ratio[b], inner=cache.host_inner_beacons[b]) for b in range(batch)]
        # the device's raw_len counts a window's entries: raw tokens and interleaved beacons
        dev = [dict(mem=cache.mem_len[b].item(), raw=cache.raw_len[b].item() - model[b]["inner"],
                    beacon=cache.beacon_len[b].item(), ratio=cache.ratio[b].item(), inner=model[b]["inner"])
               for b in range(batch)]
        if host != model or dev != model:
            failures.append(f"lengths host {host} device {dev} model {model}")

    # A ratio from the start: interleaved windows hold beacons from their first token (the ratio can
    # change only between windows); with a sink, most often, so that the first compaction keeps it.
    fill = bool(sink) and rng.random() < 0.5  # steps that often complete a window, so sinks are kept
    if interleave or (sink and rng.random() < 0.7):
        for b in range(batch):
            r = rng.choice(divisors[1:])
            attempt(f"set_ratio({b}, {r})", lambda: cache.set_ratio(b, r), False)
            model[b]["ratio"] = r
    for _ in range(rng.randint(3, 14) + 8 * fill):
        u = rng.random()
        b = rng.randrange(batch)
        if u < 0.15:
            r = rng.choice(divisors + [stride + 1, -1, 3 * stride + 1])
            valid = (r in divisors) and model[b]["raw"] < window and not (
                interleave and model[b]["raw"] > 0 and r != model[b]["ratio"])
            if attempt(f"set_ratio({b}, {r})", lambda: cache.set_ratio(b, r), not valid) is None:
                model[b]["ratio"] = r
        elif u < 0.3 + 0.15 * fill:
            full = any(m["raw"] == window for m in model)
            attempt("compact()", cache.compact, False)
            for bb, m in enumerate(model):
                if m["raw"] == window:
                    first = m["mem"] == 0 or sink_slot[bb]
                    kept = sink if first and (m["ratio"] or recapture) else 0  # the sink joins the first memory
                    sink_kept += kept > 0
                    m["mem"] = (0 if first else m["mem"]) + kept + (stride // m["ratio"] if m["ratio"] else stride)
                    sink_slot[bb] = False
                    m["raw"], m["beacon"], m["inner"] = window - stride, 0, 0
            del full
        elif u < 0.4 + 0.15 * fill:
            bad = rng.choice([[-1] * batch, [window + 1] * batch, [0] * (batch + 1), [1.5] * batch])
            attempt(f"begin_step({bad})", lambda: cache.begin_step(bad), True)
        else:
            num = [window - m["raw"] if fill and rng.random() < 0.5  # complete the window
                   else rng.randint(0, window - m["raw"]) if rng.random() < 0.9 else rng.randint(0, window)
                   for m in model]
            valid = all(n <= window - m["raw"] and m["beacon"] == 0 for n, m in zip(num, model))

            def new_beacons(n: int, m: dict) -> int:
                if interleave:  # one after every r-th raw token of the window
                    return (m["raw"] % m["ratio"] + n) // m["ratio"] if m["ratio"] else 0
                return stride // m["ratio"] if m["ratio"] and m["raw"] + n == window and n > 0 else 0

            def opens_sink_slot(n: int, m: dict) -> bool:
                return recapture and n > 0 and m["mem"] == 0 and m["raw"] + m["inner"] > 0

            capacity_ok = all(m["mem"] + m["raw"] + m["inner"] + n + m["beacon"] + new_beacons(n, m)
                              + opens_sink_slot(n, m) <= cap for n, m in zip(num, model))
            plan = attempt(f"begin_step({num})", lambda: cache.begin_step(num),
                           None if not capacity_ok else (not valid))
            if isinstance(plan, Exception) or plan is None:
                check_model()
                continue
            for bb, (n, m) in enumerate(zip(num, model)):
                if opens_sink_slot(n, m):
                    m["mem"], sink_slot[bb] = 1, True
                if interleave:
                    m["inner"] += new_beacons(n, m)
                elif n > 0 and m["raw"] + n == window and m["ratio"] > 0:
                    m["beacon"] = stride // m["ratio"]
                m["raw"] += n
            total = plan.positions.numel()
            for layer in range(layers):
                q = torch.randn(total, kv * group, d)
                k, v = torch.randn(total, kv, d), torch.randn(total, kv, d)
                attempt("rotate_queries", lambda: cache.rotate_queries(q, plan), False)
                attempt("append", lambda: cache.append(layer, k, v, plan), False)
                if rng.random() < 0.2:  # a wrong shape must change nothing
                    attempt("append(bad)", lambda: cache.append(layer, k[:, :, :-1], v, plan), True)
                res = attempt("attention", lambda: cache.attention(layer, q, plan), False)
                if isinstance(res, tuple):
                    ref = reference_attention(q, cache.k[layer], cache.v[layer], plan.cu_seqlens, cache.mem_len,
                                              cache.raw_len, cache.beacon_len, cache.ratio, mode=mode,
                                              attend_previous=cache.attend_previous)
                    if not torch.allclose(res[0].double(), ref.out, atol=1e-4, rtol=1e-4):
                        failures.append("attention output differs from the reference")
        check_model()
    return dict(counts=counts, failures=failures, sink=sink, sink_kept=sink_kept, recapture=recapture)


# ------------------------------------------------------------------------------------------------
# The driver (parent side): workers in subprocesses, restarted after a crash or hang.
class Worker:
    def __init__(self, stderr_path: str):
        self.stderr_path = stderr_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        err = open(self.stderr_path, "ab")
        env = os.environ.copy()  # the worker imports what this process imports (e.g. beacon_ops in place)
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) if p else os.getcwd() for p in sys.path)
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=err, env=env)
        err.close()
        # The worker says when its imports are done: the per-case timeout starts after that
        # (importing torch takes long on a loaded machine, and is no hang of an op).
        assert self.proc.stdout
        ready, _, _ = select.select([self.proc.stdout], [], [], 900)
        if not ready or self.proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("the fuzz worker did not start (see its stderr)")

    def ask(self, request: dict, timeout: float) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        assert self.proc and self.proc.stdin and self.proc.stdout
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            return self._died()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.proc.kill()
                self.proc.wait()
                return dict(outcome="hang", label="", message=f"no answer in {timeout:.0f} s")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    return self._died()
                return json.loads(line)

    def _died(self) -> dict:
        assert self.proc
        rc = self.proc.wait()
        return dict(outcome="crash", label="", message=f"worker exited with {rc}")

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.wait(timeout=60)


def fuzz(requests: list[dict], timeout: float = 120.0, stderr_path: str | None = None) -> list[dict]:
    """Run requests ({"op", "interface", "seed"} or {"schedule": seed}) in a worker; answers in order."""
    path = stderr_path or os.devnull
    worker = Worker(path)
    answers = []
    try:
        for r in requests:
            a = worker.ask(r, timeout)
            a.update(r)
            answers.append(a)
    finally:
        worker.close()
    return answers


def summarize(answers: list[dict]) -> dict[tuple[str, str], dict[str, int]]:
    table: dict[tuple[str, str], dict[str, int]] = {}
    for a in answers:
        if "schedule" in a:
            continue
        row = table.setdefault((a["op"], a["interface"]), {o: 0 for o in OUTCOMES})
        row[a["outcome"]] += 1
    return table


def format_table(table: dict[tuple[str, str], dict[str, int]], schedules: list[dict]) -> str:
    lines = ["| op | interface | calls | named errors | unnamed | correct | " + " | ".join(FAILURES) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(FAILURES)]
    for (op, iface), row in sorted(table.items()):
        calls = sum(row.values())
        lines.append(f"| {op} | {iface} | {calls} | {row['named']} | {row['unnamed']} | {row['correct']} | "
                     + " | ".join(str(row[f]) for f in FAILURES) + " |")
    if schedules:
        calls = sum(s["counts"]["ok"] + s["counts"]["raised"] for s in schedules if "counts" in s)
        bad = sum(len(s.get("failures", [])) + (s.get("outcome") in ("crash", "hang")) for s in schedules)
        sinks = sum(bool(s.get("sink")) for s in schedules)
        kept = sum(s.get("sink_kept", 0) for s in schedules)
        lines.append(f"\nCache schedules: {len(schedules)} ({calls} calls; {sinks} with a sink, "
                     f"{kept} compactions keeping one), failures: {bad}")
    return "\n".join(lines)


def _serve() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    # This directory first (the references), the repository last (beacon_ops in place, unless
    # PYTHONPATH names another build).
    sys.path.insert(0, here)
    sys.path.append(os.path.dirname(here))
    import torch
    import beacon_ops  # noqa: F401
    torch.set_num_threads(1)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("crash"):  # the driver's own test: die as a segfault would
            os.kill(os.getpid(), 11)
        try:
            if "schedule" in req:
                res = run_schedule(int(req["schedule"]))
                res["outcome"] = "failed" if res["failures"] else "ok"
            else:
                res = run_case(req["op"], req["interface"], int(req["seed"]))
        except Exception as e:  # noqa: BLE001  (a fault of the fuzzer itself: report it, go on)
            res = dict(outcome="crash", label="fuzzer", message=f"the fuzzer failed: {e!r}", failures=[repr(e)])
        sys.stdout.write(json.dumps(res) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        _serve()
    else:  # python fuzzing.py [calls_per_op_and_interface] [schedules]: print the table
        sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
        s = int(sys.argv[2]) if len(sys.argv) > 2 else 20
        reqs = [dict(op=op, interface=i, seed=k) for op in OPS for i in INTERFACES for k in range(n)]
        answers = fuzz(reqs + [dict(schedule=k) for k in range(s)], stderr_path="/dev/stderr")
        print(format_table(summarize(answers), [a for a in answers if "schedule" in a]))
        for a in answers:
            if a.get("outcome") in FAILURES + ("unnamed", "failed"):
                print(a)
