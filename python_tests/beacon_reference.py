"""From-scratch reference of Activation Beacon's windowed algorithm (test helper).

Written from ``docs/activation-beacon.md`` alone, the way the official code works: one
sequence at a time, window by window; per layer the memory's and the window's keys are cached
*before* RoPE and the whole cache is re-rotated at every step from positions computed here;
attention is a plain softmax over an explicit boolean mask. Shares no code with the package
(only the state dict and config values).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _inv_freq(cfg) -> Tensor:
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = cfg.rope_scaling
    if sc is not None:  # only the Llama-3 rule is exercised by the tests
        f, lo, hi, old = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"], sc["original_max_position_embeddings"]
        wave = 2 * math.pi / inv
        scaled = torch.where(wave > old / lo, inv / f, inv)
        sm = (old / wave - lo) / (hi - lo)
        mid = (wave >= old / hi) & (wave <= old / lo)
        inv = torch.where(mid, (1 - sm) * scaled / f + sm * scaled, scaled)
    return inv


def _rope(x: Tensor, pos: Tensor, inv: Tensor, interleaved: bool) -> Tensor:
    """x [n, heads, d] at integer positions pos [n]."""
    ang = pos.float()[:, None] * inv[None]
    c, s = ang.cos()[:, None], ang.sin()[:, None]
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * c - b * s, b * c + a * s), -1).flatten(-2)
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    return torch.cat((a * c - b * s, b * c + a * s), -1)


def _rms(x: Tensor, w: Tensor, eps: float) -> Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def reference_logits(sd: dict[str, Tensor], cfg, ids: list[int], *, window: int, stride: int,
                     ratio: int, mode: str, attend_previous: bool = True,
                     beacon_params=("q", "k", "v", "o")) -> Tensor:
    """Logits ``[len(ids), vocab]`` of every raw token of one sequence (fp32)."""
    W, S, r = window, stride, ratio
    L, H, KV, D = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    inv = _inv_freq(cfg)
    g = lambda name: sd[name].float()  # noqa: E731
    head = g("model.embed_tokens.weight") if cfg.tie_word_embeddings else g("lm_head.weight")

    def proj(i: int, p: str, x: Tensor, beacon_rows: Tensor) -> Tensor:
        base = f"model.layers.{i}.self_attn."
        out = x @ g(base + f"{p}_proj.weight").t()
        if p in beacon_params and beacon_rows.any():
            out[beacon_rows] = x[beacon_rows] @ g(base + f"beacon_{p}_proj.weight").t()
        return out

    mem_k = [torch.zeros(0, KV, D) for _ in range(L)]  # pre-RoPE
    mem_v = [torch.zeros(0, KV, D) for _ in range(L)]
    raw_k = [torch.zeros(0, KV, D) for _ in range(L)]
    raw_v = [torch.zeros(0, KV, D) for _ in range(L)]
    logits = []
    pos_in_ids = 0
    while pos_in_ids < len(ids):
        R0 = raw_k[0].shape[0]
        n = min(W - R0, len(ids) - pos_in_ids)
        new_ids = torch.tensor(ids[pos_in_ids:pos_in_ids + n])
        pos_in_ids += n
        R = R0 + n
        B = S // r if (R == W and r > 0) else 0
        M = mem_k[0].shape[0]
        # positions of the keys [memory | raw | beacons] and of this step's queries
        if mode == "step-expansion":
            bpos = [M + (j + 1) * r for j in range(B)]
        elif mode == "segmentation":
            bpos = [M + r] * B
        else:
            bpos = [M + W] * B
        kpos = torch.tensor(list(range(M + R)) + bpos)
        qpos = kpos[M + R0:]
        nk, nq = M + R + B, n + B
        mask = torch.zeros(nq, nk, dtype=torch.bool)
        for i in range(n):  # raw token t = R0 + i: memory + raw 0..t
            mask[i, :M + R0 + i + 1] = True
        for j in range(B):
            row = n + j
            mask[row, :M] = attend_previous
            lo, hi = {"segmentation": (j * r, (j + 1) * r), "step-expansion": (0, (j + 1) * r),
                      "full-coverage": (0, W)}[mode]
            mask[row, M + lo:M + hi] = True
            mask[row, M + R + j] = True
        beacon_rows = torch.arange(nq) >= n
        h = torch.cat([g("model.embed_tokens.weight")[new_ids],
                       g("model.beacon_embed_tokens.weight").expand(B, -1)])
        new_beacon_k, new_beacon_v = [], []
        for i in range(L):
            pre = f"model.layers.{i}."
            x = _rms(h, g(pre + "input_layernorm.weight"), cfg.rms_norm_eps)
            q = proj(i, "q", x, beacon_rows).view(nq, H, D)
            k = proj(i, "k", x, beacon_rows).view(nq, KV, D)
            v = proj(i, "v", x, beacon_rows).view(nq, KV, D)
            raw_k[i] = torch.cat([raw_k[i], k[:n]])
            raw_v[i] = torch.cat([raw_v[i], v[:n]])
            keys = torch.cat([mem_k[i], raw_k[i], k[n:]])
            vals = torch.cat([mem_v[i], raw_v[i], v[n:]])
            qr = _rope(q, qpos, inv, cfg.rope_interleaved)
            kr = _rope(keys, kpos, inv, cfg.rope_interleaved)
            rep = H // KV
            kr, vals = kr.repeat_interleave(rep, 1), vals.repeat_interleave(rep, 1)
            sc = torch.einsum("qhd,khd->hqk", qr, kr) / math.sqrt(D)
            sc = sc.masked_fill(~mask, float("-inf"))
            att = torch.einsum("hqk,khd->qhd", sc.softmax(-1), vals).reshape(nq, H * D)
            o = proj(i, "o", att, beacon_rows)
            h = h + o
            x = _rms(h, g(pre + "post_attention_layernorm.weight"), cfg.rms_norm_eps)
            h = h + (F.silu(x @ g(pre + "mlp.gate_proj.weight").t()) * (x @ g(pre + "mlp.up_proj.weight").t())) \
                @ g(pre + "mlp.down_proj.weight").t()
            new_beacon_k.append(k[n:])
            new_beacon_v.append(v[n:])
        hn = _rms(h[:n], g("model.norm.weight"), cfg.rms_norm_eps)
        logits.append(hn @ head.t())
        if R == W:  # compaction
            for i in range(L):
                if r > 0:
                    mem_k[i] = torch.cat([mem_k[i], new_beacon_k[i]])
                    mem_v[i] = torch.cat([mem_v[i], new_beacon_v[i]])
                else:
                    mem_k[i] = torch.cat([mem_k[i], raw_k[i][:S]])
                    mem_v[i] = torch.cat([mem_v[i], raw_v[i][:S]])
                raw_k[i], raw_v[i] = raw_k[i][S:], raw_v[i][S:]
    return torch.cat(logits)
