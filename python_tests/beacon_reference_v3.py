"""From-scratch reference of the newer Activation Beacon variant (test helper).

Written from ``docs/activation-beacon.md`` section 9 alone, the way the newer official code
works: every call of the model appends its input to the sequence read so far and runs one
decoder pass per window step; per layer it keeps pre-RoPE keys and values in three stores,
``[sink | beacon memory | raw memory]``, rotates past and new keys at every pass from positions
computed here (a plain ``arange``, overridden for appended step-expansion beacons) and attends
with an explicit boolean mask. Beacons are interleaved (one after every ``r`` raw tokens, also in
windows that are not full) or appended to a full window. The sink is taken once, from the first
``sink`` entries of the first window (the intended behaviour), or, with ``recapture``, as the
official code takes it: after every call while the beacon memory is empty, the first ``sink``
entries of that call. Shares no code with the package (only the state dict and config values).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from beacon_reference import _inv_freq, _rms, _rope


class ReferenceV3:
    """One sequence read call by call; :meth:`__call__` returns the logits of a call's raw tokens."""

    def __init__(self, sd: dict[str, Tensor], cfg, *, window: int, ratio: int, placement: str,
                 mode: str = "full-coverage", attend_previous: bool = True, sink: int = 0,
                 beacon_params=("q", "k", "v"), recapture: bool = False) -> None:
        self.sd, self.cfg = sd, cfg
        self.W, self.r, self.placement, self.mode = window, ratio, placement, mode
        self.attend_previous, self.sink_size, self.params = attend_previous, sink, beacon_params
        self.recapture = recapture
        L, KV, D = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        empty = lambda: [torch.zeros(0, KV, D) for _ in range(L)]  # noqa: E731
        self.sink_k, self.sink_v = empty(), empty()
        self.mem_k, self.mem_v = empty(), empty()
        self.raw_k, self.raw_v = empty(), empty()
        self.raw_is_beacon: list[bool] = []  # per raw-memory entry (interleaved beacons)
        self.window_raw = 0                  # raw tokens of the current window fed so far
        self.inv = _inv_freq(cfg)

    def _g(self, name: str) -> Tensor:
        return self.sd[name].float()

    def _proj(self, i: int, p: str, x: Tensor, beacon_rows: Tensor) -> Tensor:
        base = f"model.layers.{i}.self_attn."
        bias = self.sd.get(base + f"{p}_proj.bias")
        out = x @ self._g(base + f"{p}_proj.weight").t() + (0 if bias is None else bias.float())
        if p in self.params and beacon_rows.any():
            bb = self.sd.get(base + f"beacon_{p}_proj.bias")
            out[beacon_rows] = (x[beacon_rows] @ self._g(base + f"beacon_{p}_proj.weight").t()
                                + (0 if bb is None else bb.float()))
        return out

    def __call__(self, ids: list[int]) -> Tensor:
        out = []
        while ids:
            n = min(self.W - self.window_raw, len(ids))
            out.append(self._pass(ids[:n]))
            ids = ids[n:]
        return torch.cat(out)

    def _pass(self, new_ids: list[int]) -> Tensor:
        W, r, cfg = self.W, self.r, self.cfg
        n = len(new_ids)
        full = self.window_raw + n == W
        # the call's entries: raw tokens, with interleaved or appended beacons
        is_beacon: list[bool] = []
        if self.placement == "interleave" and r > 0:
            for t in range(self.window_raw, self.window_raw + n):
                is_beacon.append(False)
                if (t + 1) % r == 0:
                    is_beacon.append(True)
        else:
            is_beacon = [False] * n + ([True] * (W // r) if full and r > 0 else [])
        nq = len(is_beacon)
        S = self.sink_k[0].shape[0]
        M = S + self.mem_k[0].shape[0]
        P = self.raw_k[0].shape[0]
        window_beacon = self.raw_is_beacon + is_beacon  # over the window entries (raw memory + call)
        nk = M + P + nq
        # positions: arange over [sink | beacon memory | raw memory | call], then the overrides
        pos = list(range(nk))
        mask = torch.ones(nq, nk).tril(nk - nq).bool()  # causal, aligned bottom-right
        if self.placement == "append" and self.mode == "step-expansion" and any(is_beacon):
            B = W // r
            for j in range(B):
                row, key = n + j, M + P + n + j
                raw_end = M + (j + 1) * r  # window raw [0, (j+1) r): raw memory then the call's
                pos[key] = (raw_end - 1) + 1 + (j if self.attend_previous else 0)
                mask[row] = False
                mask[row, :raw_end] = True                                 # memory, raw range
                mask[row, M + W:key + 1] = self.attend_previous            # beacons 0..j
                mask[row, key] = True
        pos_t = torch.tensor(pos)
        rows_b = torch.tensor(is_beacon)
        g = self._g
        emb = g("model.embed_tokens.weight")
        h = torch.empty(nq, cfg.hidden_size)
        h[~rows_b] = emb[torch.tensor(new_ids, dtype=torch.long)]
        h[rows_b] = g("model.beacon_embed_tokens.weight")[0]
        H, KV, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        new_k, new_v = [], []
        for i in range(cfg.num_layers):
            pre = f"model.layers.{i}."
            x = _rms(h, g(pre + "input_layernorm.weight"), cfg.rms_norm_eps)
            q = self._proj(i, "q", x, rows_b).view(nq, H, D)
            k = self._proj(i, "k", x, rows_b).view(nq, KV, D)
            v = self._proj(i, "v", x, rows_b).view(nq, KV, D)
            new_k.append(k)
            new_v.append(v)
            keys = torch.cat([self.sink_k[i], self.mem_k[i], self.raw_k[i], k])
            vals = torch.cat([self.sink_v[i], self.mem_v[i], self.raw_v[i], v])
            qr = _rope(q, pos_t[-nq:], self.inv, cfg.rope_interleaved)
            kr = _rope(keys, pos_t, self.inv, cfg.rope_interleaved)
            rep = H // KV
            kr, vals = kr.repeat_interleave(rep, 1), vals.repeat_interleave(rep, 1)
            sc = torch.einsum("qhd,khd->hqk", qr, kr) / math.sqrt(D)
            sc = sc.masked_fill(~mask, float("-inf"))
            att = torch.einsum("hqk,khd->qhd", sc.softmax(-1), vals).reshape(nq, H * D)
            h = h + self._proj(i, "o", att, rows_b)
            x = _rms(h, g(pre + "post_attention_layernorm.weight"), cfg.rms_norm_eps)
            h = h + (F.silu(x @ g(pre + "mlp.gate_proj.weight").t()) * (x @ g(pre + "mlp.up_proj.weight").t())) \
                @ g(pre + "mlp.down_proj.weight").t()
        hn = _rms(h[~rows_b], g("model.norm.weight"), cfg.rms_norm_eps)
        head = g("model.embed_tokens.weight") if cfg.tie_word_embeddings else g("lm_head.weight")
        # update the memory
        first_window = self.mem_k[0].shape[0] == 0 and S == 0
        capture = self.recapture and self.sink_size and self.mem_k[0].shape[0] == 0
        for i in range(cfg.num_layers):
            if capture:  # the call's first entries replace the sink, before the window is condensed
                self.sink_k[i], self.sink_v[i] = new_k[i][:self.sink_size], new_v[i][:self.sink_size]
            wk = torch.cat([self.raw_k[i], new_k[i]])
            wv = torch.cat([self.raw_v[i], new_v[i]])
            if not full:
                self.raw_k[i], self.raw_v[i] = wk, wv
                continue
            if first_window and self.sink_size and r > 0 and not capture:  # r = 0: the window, sink included, is memory
                self.sink_k[i], self.sink_v[i] = wk[:self.sink_size], wv[:self.sink_size]
            keep = torch.tensor(window_beacon) if r > 0 else torch.ones(len(window_beacon), dtype=torch.bool)
            self.mem_k[i] = torch.cat([self.mem_k[i], wk[keep]])
            self.mem_v[i] = torch.cat([self.mem_v[i], wv[keep]])
            self.raw_k[i], self.raw_v[i] = wk[:0], wv[:0]
        if full:
            self.raw_is_beacon, self.window_raw = [], 0
        else:
            self.raw_is_beacon, self.window_raw = window_beacon, self.window_raw + n
        return hn @ head.t()
