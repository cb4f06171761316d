"""Append + attention + compaction over several windows equal the official scheme from scratch.

The reference here follows the official code: keys are kept *before* RoPE and the whole cache
is re-rotated at every step (memory slot i at position i, raw token t at M + t, beacon j at the
mode's position), and the mask is built explicitly from the table of docs/activation-beacon.md. beacon_ops instead
caches rotated keys and re-rotates only what compaction moves; both must give the same outputs.
"""
from __future__ import annotations

import math

import pytest
import torch

from beacon_ops import CondensedKVCache
from beacon_ops.positions import rope_tables

from conftest import DEVICES


def _rotate_half(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """HF-style rotate-half RoPE of x [n, h, d] at integer positions [n], in fp64."""
    ang = pos.double()[:, None] * inv_freq.double()[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None, :]
    x1, x2 = x.double().chunk(2, -1)
    return x.double() * cos + torch.cat([-x2, x1], -1) * sin


def _beacon_pos(mem: int, j: int, r: int, window: int, mode: str) -> int:
    return {"segmentation": mem + r, "step-expansion": mem + (j + 1) * r,
            "full-coverage": mem + window}[mode]


def _visible(row_kind: str, idx: int, mem: int, raw: int, nb: int, r: int, mode: str,
             attend_previous: bool) -> torch.Tensor:
    """Boolean row of the documented mask over keys [memory | raw | beacons] (section 3 table)."""
    row = torch.zeros(mem + raw + nb, dtype=torch.bool)
    if row_kind == "raw":
        row[: mem + idx + 1] = True
        return row
    j = idx
    if attend_previous:
        row[:mem] = True
    lo, hi = {"segmentation": (j * r, (j + 1) * r), "step-expansion": (0, (j + 1) * r),
              "full-coverage": (0, raw)}[mode]
    row[mem + lo: mem + min(hi, raw)] = True
    row[mem + raw + j] = True
    return row


class OfficialStream:
    """One sequence processed the official way (pre-RoPE cache, re-rotated every step)."""

    def __init__(self, window, stride, ratio, mode, attend_previous, inv_freq, group):
        self.W, self.S, self.r, self.mode, self.ap = window, stride, ratio, mode, attend_previous
        self.inv_freq, self.group = inv_freq, group
        self.mem_k, self.mem_v, self.raw_k, self.raw_v = [], [], [], []

    def step(self, q_raw, k_raw, v_raw, q_b, k_b, v_b):
        """Attention outputs (fp64) for the step's raw queries then beacon queries."""
        M, R0 = len(self.mem_k), len(self.raw_k)
        self.raw_k += list(k_raw)
        self.raw_v += list(v_raw)
        R, nb = len(self.raw_k), len(k_b)
        keys = torch.stack(self.mem_k + self.raw_k + list(k_b))
        vals = torch.stack(self.mem_v + self.raw_v + list(v_b))
        kpos = list(range(M + R)) + [_beacon_pos(M, j, self.r, self.W, self.mode) for j in range(nb)]
        keys = _rotate_half(keys, torch.tensor(kpos), self.inv_freq)
        qpos = list(range(M + R0, M + R)) + kpos[M + R:]
        q = _rotate_half(torch.cat([q_raw, q_b]), torch.tensor(qpos), self.inv_freq)
        rows = [_visible("raw", R0 + i, M, R, nb, self.r, self.mode, self.ap) for i in range(len(q_raw))]
        rows += [_visible("beacon", j, M, R, nb, self.r, self.mode, self.ap) for j in range(nb)]
        mask = torch.stack(rows)  # [nq, keys]
        kk = keys.repeat_interleave(self.group, dim=1)  # GQA
        vv = vals.double().repeat_interleave(self.group, dim=1)
        s = torch.einsum("qhd,khd->hqk", q, kk) / math.sqrt(q.shape[-1])
        s = s.masked_fill(~mask[None], float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)
        out = torch.einsum("hqk,khd->qhd", p, vv)
        # Compaction, the official way: memory takes the beacons (or the first S raw tokens).
        if R == self.W:
            if self.r > 0:
                self.mem_k += list(k_b)
                self.mem_v += list(v_b)
            else:
                self.mem_k += self.raw_k[: self.S]
                self.mem_v += self.raw_v[: self.S]
            self.raw_k, self.raw_v = self.raw_k[self.S:], self.raw_v[self.S:]
        return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["segmentation", "step-expansion", "full-coverage"])
@pytest.mark.parametrize("attend_previous", [True, False])
@pytest.mark.parametrize("window,stride,ratios,chunks", [
    (8, 8, (4, 2), (8, 5, 3, 8, 2, 1, 1, 4)),      # S = W, whole and split windows, decode steps
    (8, 4, (2, 4), (8, 4, 3, 1, 4, 2)),            # S < W: carried raw tokens move every window
    (8, 8, (0, 4), (8, 8, 6, 2)),                  # r = 0 windows then beacons
])
def test_windows_match_official_scheme(device, mode, attend_previous, window, stride, ratios, chunks):
    torch.manual_seed(0)
    hq, hkv, d = 4, 2, 16
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    batch = len(ratios)
    # Per sequence its own chunk schedule (a rotation of the same list) and ratio.
    schedules = [list(chunks[b:] + chunks[:b]) for b in range(batch)]
    cap = CondensedKVCache.capacity_for(sum(chunks), window, stride, ratio=min(r for r in ratios if r) )
    cap = max(cap, sum(chunks) + window)  # r = 0 keeps every token
    cache = CondensedKVCache(1, batch, hkv, d, cap, window=window, stride=stride, mode=mode,
                             attend_previous=attend_previous, dtype=torch.float32, device=device,
                             inv_freq=inv_freq)
    refs = [OfficialStream(window, stride, r, mode, attend_previous, inv_freq, hq // hkv) for r in ratios]
    for b, r in enumerate(ratios):
        cache.set_ratio(b, r)
    for step in range(len(chunks)):
        num_raw = [min(schedules[b][step], cache.room(b)) for b in range(batch)]
        plan = cache.begin_step(num_raw)
        qs, ks, vs, expected = [], [], [], []
        for b in range(batch):
            n, nb = plan.num_raw[b], plan.num_beacons[b]
            q, k, v = (torch.randn(n + nb, h, d) for h in (hq, hkv, hkv))
            expected.append(refs[b].step(q[:n], k[:n], v[:n], q[n:], k[n:], v[n:]))
            qs.append(q), ks.append(k), vs.append(v)
        q = torch.cat(qs).to(device)
        cache.rotate_queries(q, plan)
        cache.append(0, torch.cat(ks).to(device), torch.cat(vs).to(device), plan)
        out, lse = cache.attention(0, q, plan)
        torch.testing.assert_close(out.cpu().double(), torch.cat(expected), atol=2e-5, rtol=2e-5)
        cache.compact()
        for b in range(batch):
            assert cache.host_mem_len[b] == len(refs[b].mem_k)
            assert cache.host_raw_len[b] == len(refs[b].raw_k)
        assert cache.mem_len.tolist() == cache.host_mem_len
        assert cache.raw_len.tolist() == cache.host_raw_len
