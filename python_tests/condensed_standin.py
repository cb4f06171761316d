"""A pure-PyTorch stand-in for ``beacon_ops.CondensedKVCache`` (test helper, not the package).

Same API and layout (README's condensed-cache contract): keys stored rotated in
``[layers, batch, kv_heads, capacity, head_dim]``, per sequence ``[memory | raw | beacons]``,
compaction rotates moved keys by their position difference. Attention uses an explicit boolean
mask built from the spec's table. Lets the model be tested before (and independently of) the
native ops.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from beacon_ops.positions import beacon_position, rope_tables, step_positions


def rotate(x: Tensor, positions: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    """RoPE of ``x [n, heads, head_dim]`` at ``positions [n]`` (rotate-half or interleaved pairs)."""
    c = cos[positions.long()][:, None, :]
    s = sin[positions.long()][:, None, :]
    xf = x.float()
    if interleaved:
        x0, x1 = xf[..., 0::2], xf[..., 1::2]
        return torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), -1).flatten(-2).to(x.dtype)
    half = x.shape[-1] // 2
    x0, x1 = xf[..., :half], xf[..., half:]
    return torch.cat((x0 * c - x1 * s, x1 * c + x0 * s), -1).to(x.dtype)


@dataclass
class StepPlan:
    cu_seqlens: Tensor
    num_raw: list[int]
    num_beacons: list[int]
    num_new: list[int]
    completes_window: list[bool]
    max_seqlen_q: int
    positions: Tensor


class StandInCondensedKVCache:
    def __init__(self, num_layers, batch_size, num_kv_heads, head_dim, capacity, *, window,
                 stride=None, mode="step-expansion", attend_previous=True, dtype=torch.float32,
                 device="cpu", inv_freq=None, rope_interleaved=False):
        self.window, self.stride = window, stride or window
        self.mode, self.attend_previous = mode, attend_previous
        self.capacity = capacity
        self.k = torch.zeros(num_layers, batch_size, num_kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        z = [0] * batch_size
        self.host_mem_len, self.host_raw_len, self.host_beacon_len, self.host_ratio = list(z), list(z), list(z), list(z)
        if inv_freq is None:
            inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.cos, self.sin = rope_tables(inv_freq, capacity + window + 1)
        self.interleaved = rope_interleaved

    @staticmethod
    def capacity_for(length, window, stride=None, ratio=0, extra_tokens=0):
        stride = stride or window
        n = length + extra_tokens
        if ratio == 0:
            return n + 1
        full = max(0, (n - window) // stride + 1)
        return full * (stride // ratio) + window + stride // ratio

    def room(self, b):
        return self.window - self.host_raw_len[b]

    def set_ratio(self, b, r):
        self.host_ratio[b] = r

    def begin_step(self, num_raw: Sequence[int]) -> StepPlan:
        for b, n in enumerate(num_raw):
            assert 0 <= n <= self.room(b), (b, n, self.room(b))
        nb = []
        for b, n in enumerate(num_raw):
            self.host_raw_len[b] += n
            r = self.host_ratio[b]
            full = n > 0 and self.host_raw_len[b] == self.window
            self.host_beacon_len[b] = self.stride // r if full and r > 0 else 0
            nb.append(self.host_beacon_len[b])
            assert self.host_mem_len[b] + self.host_raw_len[b] + nb[-1] <= self.capacity, "capacity"
        num_new = [n + b for n, b in zip(num_raw, nb)]
        cu = [0]
        for n in num_new:
            cu.append(cu[-1] + n)
        pos = step_positions(self.host_mem_len, self.host_raw_len, self.host_beacon_len,
                             self.host_ratio, num_new, self.window, self.mode)
        return StepPlan(torch.tensor(cu, dtype=torch.int32), list(num_raw), nb, num_new,
                        [n > 0 and self.host_raw_len[b] == self.window for b, n in enumerate(num_raw)],
                        max(num_new), pos)

    def rotate_queries(self, q, plan):
        q.copy_(rotate(q, plan.positions, self.cos, self.sin, self.interleaved))

    def append(self, layer, k_new, v_new, plan):
        k_rot = rotate(k_new, plan.positions, self.cos, self.sin, self.interleaved)
        cu = plan.cu_seqlens.tolist()
        for b, n in enumerate(plan.num_new):
            end = self.host_mem_len[b] + self.host_raw_len[b] + self.host_beacon_len[b]
            self.k[layer, b, :, end - n:end] = k_rot[cu[b]:cu[b + 1]].transpose(0, 1)
            self.v[layer, b, :, end - n:end] = v_new[cu[b]:cu[b + 1]].transpose(0, 1)

    def _mask(self, b, n):
        M, R, B, r = self.host_mem_len[b], self.host_raw_len[b], self.host_beacon_len[b], self.host_ratio[b]
        L = M + R + B
        mask = torch.zeros(n, L, dtype=torch.bool)
        for i, slot in enumerate(range(L - n, L)):
            if slot < M + R:  # raw token t = slot - M
                mask[i, :slot + 1] = True
                continue
            j = slot - M - R
            mask[i, :M] = self.attend_previous
            lo, hi = {"segmentation": (j * r, (j + 1) * r), "step-expansion": (0, (j + 1) * r),
                      "full-coverage": (0, R)}[self.mode]
            mask[i, M + lo:M + hi] = True
            mask[i, slot] = True
        return mask

    def attention(self, layer, q, plan, softmax_scale=None):
        out = torch.zeros_like(q)
        cu = plan.cu_seqlens.tolist()
        H, D = q.shape[1], q.shape[2]
        scale = softmax_scale or D ** -0.5
        for b, n in enumerate(plan.num_new):
            if not n:
                continue
            L = self.host_mem_len[b] + self.host_raw_len[b] + self.host_beacon_len[b]
            rep = H // self.k.shape[2]
            k = self.k[layer, b, :, :L].repeat_interleave(rep, 0).float()
            v = self.v[layer, b, :, :L].repeat_interleave(rep, 0).float()
            qb = q[cu[b]:cu[b + 1]].transpose(0, 1).float()
            s = (qb @ k.transpose(1, 2)) * scale
            s = s.masked_fill(~self._mask(b, n), float("-inf"))
            out[cu[b]:cu[b + 1]] = (s.softmax(-1) @ v).transpose(0, 1).to(q.dtype)
        return out, None

    def compact(self):
        W, S = self.window, self.stride
        for b in range(len(self.host_mem_len)):
            M, R, B, r = self.host_mem_len[b], self.host_raw_len[b], self.host_beacon_len[b], self.host_ratio[b]
            if R != W:
                continue
            if r == 0:
                self.host_mem_len[b] = M + S
                self.host_raw_len[b] = W - S
                continue
            # beacons -> M + j, rotated by new - old position
            src = torch.arange(M + W, M + W + B)
            old = torch.tensor([beacon_position(M, j, r, W, self.mode) for j in range(B)])
            new = torch.arange(M, M + B)
            kb = self.k[:, b, :, src]  # [layers, kv, B, D]
            carried_k = self.k[:, b, :, M + S:M + W].clone()
            carried_v = self.v[:, b, :, M + S:M + W].clone()
            vb = self.v[:, b, :, src].clone()
            kb = self._rotate_by(kb, new - old)
            self.k[:, b, :, M:M + B] = kb
            self.v[:, b, :, M:M + B] = vb
            # carried raw tokens t in [S, W): slot M + t -> M + B + t - S, delta B - S
            delta = torch.full((W - S,), B - S)
            self.k[:, b, :, M + B:M + B + W - S] = self._rotate_by(carried_k, delta)
            self.v[:, b, :, M + B:M + B + W - S] = carried_v
            self.host_mem_len[b] = M + B
            self.host_raw_len[b] = W - S
            self.host_beacon_len[b] = 0

    def _rotate_by(self, x, delta):
        # x [layers, kv, n, D]; signed deltas -> cos(|d|), sign(d) * sin(|d|)
        L, H, n, D = x.shape
        a = delta.abs()
        c, s = self.cos[a], self.sin[a] * delta.sign()[:, None].float()
        flat = x.permute(2, 0, 1, 3).reshape(n, L * H, D)
        xf = flat.float()
        if self.interleaved:
            x0, x1 = xf[..., 0::2], xf[..., 1::2]
            y = torch.stack((x0 * c[:, None] - x1 * s[:, None], x1 * c[:, None] + x0 * s[:, None]), -1).flatten(-2)
        else:
            h = D // 2
            x0, x1 = xf[..., :h], xf[..., h:]
            y = torch.cat((x0 * c[:, None] - x1 * s[:, None], x1 * c[:, None] + x0 * s[:, None]), -1)
        return y.to(x.dtype).reshape(n, L, H, D).permute(1, 2, 0, 3)

    def reset(self, b=None):
        for i in range(len(self.host_mem_len)) if b is None else [b]:
            self.host_mem_len[i] = self.host_raw_len[i] = self.host_beacon_len[i] = self.host_ratio[i] = 0

    def bytes_in_use(self):
        return self.k.numel() * self.k.element_size() * 2
