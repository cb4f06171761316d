"""Differentiable training forward of Activation Beacon (spec sections 6-7).

:class:`~beacon_ops.llama.Llama` runs inference through the in-place condensed cache ops, which
carry no gradient from one window to the next. Training needs the opposite: the memory is *not*
detached, so the loss of window ``w`` sends gradients into the beacons of every earlier window
(spec section 7). :func:`beacon_loss` therefore processes one sequence window by window with an
out-of-place cache per layer (``torch.cat``), using the model's own modules and weights
(embeddings, norms, MLP, ``{q,k,v,o}_proj`` and ``beacon_{q,k,v,o}_proj``, LM head) and the
autograd-enabled :func:`beacon_ops.attention.beacon_attention` (beacon mask in the kernel).
Where the backward op has no kernel for the device (today: CUDA, whose build has the forward
only), gradients go through PyTorch's ``scaled_dot_product_attention`` with the explicit mask of
:func:`beacon_ops.reference.beacon_mask` instead (``attention="auto"``; a test checks that both
give the same loss and gradients).

Cache scheme (the choice the brief leaves open): keys are rotated once, at the positions of
:func:`beacon_ops.positions.step_positions` (raw token ``t`` at ``M + t``, beacon ``j`` at the
mode's beacon position). Memory slot ``i`` always has position ``i``, so when a window is
compacted its beacons' *pre-RoPE* keys are rotated at ``M .. M + B - 1`` and appended to the
memory (rotated keys); nothing in the memory is ever rotated again. This equals the inference
cache's "rotate by the position difference" up to fp32 rounding (rotations compose).

Semantics follow the inference path ``Llama.forward(ids, labels)`` (the reference; a test checks
equality for a fixed ratio): labels are shifted once over the whole sequence, then cut into
windows; beacon rows get no logits; the loss is the mean cross-entropy over raw tokens with a
target. Choices written down here:

* stride ``S = W`` only (the official training setting); ``S < W`` raises ``ValueError``.
* the ratio of a window is drawn only for *full* windows (the ones that get beacons), one draw
  per full window in order; a full last window draws too (keeps the draw sequence independent of
  where the text ends) but its beacons are skipped, since nothing after them reads them.
* ratio 0 keeps the window's raw keys as memory (the base model, spec section 5).
* :class:`StepRandomRatios` draws uniformly from the spec's list with one seeded generator
  (seed 42), restricted to ratios that divide the stride (so each beacon condenses exactly ``r``
  tokens; with ``W = 1024`` the whole list is usable).

Gradient checkpointing (``checkpoint="window"`` or ``"layer"``) uses
``torch.utils.checkpoint`` in the non-reentrant mode, as the official training does; the loss
of a window is computed inside its checkpoint so that no ``[tokens x vocab]`` logits are kept.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from .attention import beacon_attention
from .llama import Llama, _project, _Rows
from .positions import step_positions
from .reference import beacon_mask

__all__ = ["STEP_RANDOM_RATIOS", "StepRandomRatios", "BeaconLoss", "beacon_loss", "rope",
           "has_attention_backward"]

STEP_RANDOM_RATIOS: tuple[int, ...] = (2, 2, 2, 2, 2, 4, 4, 4, 4, 4, 8, 8, 16, 16, 32, 32, 64, 128)
"""Spec section 6's ``step-random`` list (duplicates act as weights)."""


class StepRandomRatios:
    """``step-random`` (spec section 6): a fresh ratio per window from one seeded generator.

    ``stride``: when given, ratios that do not divide it are left out of the list.
    The generator state is in :meth:`state_dict` so that a resumed run draws the same ratios.
    """

    def __init__(self, ratios: Sequence[int] = STEP_RANDOM_RATIOS, seed: int = 42,
                 stride: int | None = None) -> None:
        usable = [int(r) for r in ratios if stride is None or r == 0 or (r > 0 and stride % r == 0)]
        if not usable:
            raise ValueError(f"ratios: none of {list(ratios)} divides the stride {stride}")
        self.ratios = usable
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self) -> int:
        return self.ratios[int(torch.randint(len(self.ratios), (1,), generator=self.generator))]

    def state_dict(self) -> dict[str, Any]:
        return {"ratios": list(self.ratios), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ratios = list(state["ratios"])
        self.generator.set_state(state["generator"])


def rope(x: Tensor, positions: Tensor, inv_freq: Tensor, interleaved: bool = False) -> Tensor:
    """Out-of-place, differentiable RoPE of ``x`` ``[n, heads, head_dim]`` at ``positions`` ``[n]``.

    Same arithmetic as the ``rope_`` op (fp32 angles ``pos * inv_freq`` as in
    :func:`beacon_ops.positions.rope_tables`, rotation in fp32, result in ``x``'s dtype).
    ``interleaved``: pairs ``(2i, 2i+1)`` (GGUF layout) instead of ``(i, i + head_dim/2)``.
    """
    ang = positions.to(torch.float32)[:, None] * inv_freq.float()[None, :]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    xf = x.float()
    if interleaved:
        x0, x1 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)
    else:
        half = x.shape[-1] // 2
        x0, x1 = xf[..., :half], xf[..., half:]
        out = torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
    return out.to(x.dtype)


@dataclass
class BeaconLoss:
    """Result of :func:`beacon_loss`: ``loss`` (mean CE, differentiable) and per-window figures."""

    loss: Tensor
    window_loss_sums: list[float] = field(default_factory=list)  # detached CE sums
    window_counts: list[int] = field(default_factory=list)       # targets per window
    ratios: list[int] = field(default_factory=list)               # ratio of each full window

    def loss_after_first_window(self) -> float:
        """Mean CE over windows 2.. (where the memory matters); NaN when there are none."""
        n = sum(self.window_counts[1:])
        return sum(self.window_loss_sums[1:]) / n if n else float("nan")


@dataclass
class _Window:
    """Host-side description of one window."""

    mem: int      # M, memory length before the window
    raw: int      # R, raw tokens
    beacons: int  # B, beacons processed (0: none)
    ratio: int
    positions: Tensor      # int32 [R + B]: RoPE positions of the window's tokens
    mem_positions: Tensor  # int32 [B]: positions of its beacons once in memory
    keeps_raw: bool        # ratio 0 on a full window: raw keys join the memory
    mask: Tensor | None = None  # bool [R + B, M + R + B] for the "masked" attention backend


def _layer(model: Llama, i: int, w: _Window, rows: _Rows, h: Tensor, mem_k: Tensor,
           mem_v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Layer ``i`` on one window; returns the new hidden rows and the layer's next memory."""
    c, bc = model.config, model.beacon
    layer = model.model.layers[i]
    at = layer.self_attn
    n = h.shape[0]
    x = layer.input_layernorm(h)
    q = _project(x, rows, at.q_proj, at.beacon_q_proj).view(n, c.num_heads, c.head_dim)
    k = _project(x, rows, at.k_proj, at.beacon_k_proj).view(n, c.num_kv_heads, c.head_dim)
    v = _project(x, rows, at.v_proj, at.beacon_v_proj).view(n, c.num_kv_heads, c.head_dim)
    dt = v.dtype  # the attention op wants one dtype for q, k and v (autocast may differ)
    mem_k, mem_v = mem_k.to(dt), mem_v.to(dt)
    pos = w.positions.to(h.device)
    q = rope(q, pos, model.inv_freq, c.rope_interleaved).to(dt)
    k_rot = rope(k, pos, model.inv_freq, c.rope_interleaved).to(dt)
    # [kv_heads, M + R + B, head_dim]: memory | raw | beacons, contiguous for the kernel
    keys = torch.cat([mem_k, k_rot.transpose(0, 1)], dim=1)
    vals = torch.cat([mem_v, v.transpose(0, 1)], dim=1)
    dev = h.device

    def i32(x: int) -> Tensor:
        return torch.tensor([x], dtype=torch.int32, device=dev)

    if w.mask is None:
        out, _ = beacon_attention(
            q.contiguous(), keys.unsqueeze(0), vals.unsqueeze(0),
            torch.tensor([0, n], dtype=torch.int32, device=dev), i32(w.mem), i32(w.raw),
            i32(w.beacons), i32(w.ratio), max_seqlen_q=n, mode=bc.mode,
            attend_previous=bc.attend_previous)
    else:  # plain PyTorch attention with the spec's explicit mask (differentiable anywhere)
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], vals[None],
                                             attn_mask=w.mask, enable_gqa=True)[0].transpose(0, 1)
    h = h + _project(out.reshape(n, -1), rows, at.o_proj, at.beacon_o_proj)
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    # compaction (spec section 5): beacons (re-rotated at their memory slots) or ratio-0 raw keys
    if w.beacons:
        bk = rope(k[w.raw:], w.mem_positions.to(dev), model.inv_freq, c.rope_interleaved).to(dt)
        mem_k = torch.cat([mem_k, bk.transpose(0, 1)], dim=1)
        mem_v = torch.cat([mem_v, v[w.raw:].transpose(0, 1)], dim=1)
    elif w.keeps_raw:
        mem_k, mem_v = keys, vals
    return h, mem_k, mem_v


def _window(model: Llama, w: _Window, ids: Tensor, targets: Tensor, layer_ckpt: bool,
            mems: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """One window through all layers; returns its CE sum (fp32) and the next memory."""
    emb = model.model.embed_tokens(ids)
    rows = _Rows([(0, w.raw, False)] + ([(w.raw, w.raw + w.beacons, True)] if w.beacons else []))
    h = emb if not w.beacons else torch.cat(
        [emb, model.model.beacon_embed_tokens.weight.expand(w.beacons, -1).to(emb.dtype)])
    new: list[Tensor] = []
    for i in range(model.config.num_layers):
        mk, mv = mems[2 * i], mems[2 * i + 1]
        if layer_ckpt:
            h, mk, mv = _checkpoint(_layer, model, i, w, rows, h, mk, mv, use_reentrant=False)
        else:
            h, mk, mv = _layer(model, i, w, rows, h, mk, mv)
        new += [mk, mv]
    hid = model.model.norm(h[:w.raw])
    keep = (targets != -100).nonzero()[:, 0]
    total = hid.new_zeros((), dtype=torch.float32)
    for s in range(0, len(keep), model.logits_chunk):
        sel = keep[s:s + model.logits_chunk]
        total = total + F.cross_entropy(model.logits(hid[sel]).float(), targets[sel], reduction="sum")
    return total, new


def _plan(n_tokens: int, window: int, mode: str, ratio: int | Callable[[], int]) -> list[_Window]:
    plans, mem, start = [], 0, 0
    while start < n_tokens:
        raw = min(window, n_tokens - start)
        full = raw == window
        r = (ratio() if callable(ratio) else int(ratio)) if full else 0
        if full and r and window % r:
            raise ValueError(f"ratio={r} does not divide the window {window}")
        last = start + raw >= n_tokens
        b = window // r if full and r and not last else 0  # last window's beacons: nothing reads them
        pos = step_positions([mem], [raw], [b], [r], [raw + b], window, mode)
        plans.append(_Window(mem, raw, b, r, pos,
                             torch.arange(mem, mem + b, dtype=torch.int32),
                             full and r == 0 and not last))
        mem += b if b else (raw if full and r == 0 else 0)
        start += raw
    return plans


def has_attention_backward(device: torch.device | str) -> bool:
    """Whether ``beacon::attention_backward`` has a kernel for ``device``'s type."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "beacon::attention_backward", key)


def beacon_loss(model: Llama, ids: Tensor | Sequence[int], labels: Tensor | Sequence[int] | None = None,
                *, ratio: int | Callable[[], int] | None = None, checkpoint: str | None = None,
                attention: str = "auto") -> BeaconLoss:
    """Mean next-token cross-entropy of one sequence, differentiable through all windows.

    Args:
        model: a :class:`~beacon_ops.llama.Llama` (its ``beacon`` config gives window, mode,
            ``attend_previous``; stride must equal the window).
        ids: ``[length]`` or ``[1, length]`` token ids (batch 1, as the official training).
        labels: aligned with ``ids`` (default ``ids``); shifted once over the whole sequence
            (position ``t`` predicts ``labels[t + 1]``), ``-100`` ignored.
        ratio: an int (fixed), a callable drawing one per full window (e.g.
            :class:`StepRandomRatios`), or None for the model's fixed ``beacon.ratio``.
        checkpoint: None, ``"window"`` or ``"layer"``: non-reentrant gradient checkpointing.
        attention: ``"op"`` (``beacon_attention``, mask in the kernel), ``"masked"`` (PyTorch
            ``scaled_dot_product_attention`` with the explicit mask of
            :func:`beacon_ops.reference.beacon_mask`) or ``"auto"``: the op, unless gradients
            are needed on a device without a ``beacon::attention_backward`` kernel (the GPU
            build has the forward only, so GPU training falls back to the masked path).

    Returns:
        :class:`BeaconLoss`; ``loss.backward()`` reaches the beacon parameters of every window.
    """
    bc = model.beacon
    if bc.stride != bc.window:
        raise ValueError(f"beacon_loss supports stride == window only, got stride {bc.stride} "
                         f"and window {bc.window}")
    if checkpoint not in (None, "window", "layer"):
        raise ValueError(f"checkpoint must be None, 'window' or 'layer', got {checkpoint!r}")
    ids = torch.as_tensor(ids, dtype=torch.long)
    ids = ids[0] if ids.dim() == 2 and ids.shape[0] == 1 else ids
    if ids.dim() != 1 or len(ids) == 0:
        raise ValueError(f"ids must be a non-empty [length] or [1, length] tensor, got shape {tuple(ids.shape)}")
    model._check_ids(ids, "ids")
    labels = ids if labels is None else torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.shape != ids.shape:
        raise ValueError(f"labels must have the shape of ids {tuple(ids.shape)}, got {tuple(labels.shape)}")
    if attention not in ("auto", "op", "masked"):
        raise ValueError(f"attention must be 'auto', 'op' or 'masked', got {attention!r}")
    if attention == "auto":
        need_grad = torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())
        attention = "masked" if need_grad and not has_attention_backward(model.device) else "op"
    if ratio is None:
        if bc.ratio is None:
            raise ValueError("ratio: the model uses adapt-N; pass a fixed ratio or a sampler")
        ratio = bc.ratio
    dev = model.device
    ids = ids.to(dev)
    targets = torch.cat([labels[1:], labels.new_full((1,), -100)]).to(dev)
    c = model.config
    mems = [torch.zeros(c.num_kv_heads, 0, c.head_dim, device=dev, dtype=model.dtype)
            for _ in range(2 * c.num_layers)]
    total = torch.zeros((), dtype=torch.float32, device=dev)
    out = BeaconLoss(total)
    start = 0
    for w in _plan(len(ids), bc.window, bc.mode, ratio):
        if attention == "masked":
            w.mask = beacon_mask(w.mem, w.raw, w.beacons, w.ratio, w.raw + w.beacons, bc.mode,
                                 bc.attend_previous).to(dev)
        if w.raw == bc.window:
            out.ratios.append(w.ratio)
        x, t = ids[start:start + w.raw], targets[start:start + w.raw]
        if checkpoint == "window":
            s, mems = _checkpoint(_window, model, w, x, t, False, mems, use_reentrant=False)
        else:
            s, mems = _window(model, w, x, t, checkpoint == "layer", mems)
        total = total + s
        out.window_loss_sums.append(float(s.detach()))
        out.window_counts.append(int((t != -100).sum()))
        start += w.raw
    count = sum(out.window_counts)
    if count == 0:
        raise ValueError("labels: no position has a target (all -100 or length 1)")
    out.loss = total / count
    return out
