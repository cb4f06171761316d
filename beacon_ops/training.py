"""Beacon training: the differentiable loss of one sequence, read window by window.

:func:`beacon_loss` runs :meth:`beacon_ops.llama.Llama.step`, the model's one forward pass,
over a :class:`~beacon_ops.training_cache.TrainingKVCache`: the memory is *not* detached, so the
loss of window ``w`` sends gradients into the beacons of every earlier window
(``docs/activation-beacon.md``, section 7). Attention is the autograd-enabled
:func:`beacon_ops.attention.beacon_attention` (beacon mask in the kernel); where the backward op
has no kernel for the device (a build without the CUDA kernels, or another device type), PyTorch's
``scaled_dot_product_attention`` with the explicit mask of :func:`beacon_ops.masks.step_mask`
(``attention="auto"``; a test checks that both give the same loss and gradients). The CPU and
CUDA backward kernels cover every dtype and head dim their forward accepts.

Semantics follow the inference path :func:`beacon_ops.generation.sequence_loss` (a test checks
equality): labels are shifted once over the whole sequence, then cut into windows; beacon rows
get no logits; the loss is the mean cross-entropy over raw tokens with a target. Choices
written down here:

* stride ``S = W`` only (the official training setting); ``S < W`` raises ``ValueError``.
* the ratio of a window is drawn only for *full* windows (the ones that get beacons), one draw
  per full window in order; a full last window draws too (keeps the draw sequence independent of
  where the text ends) but its beacons are skipped, since nothing after them reads them. With
  interleaved beacons (``placement="interleave"``) every window draws, a partial last one too: its
  beacons sit among its raw tokens, which read them.
* the variants' sink tokens and ``sink_recapture`` are kept as the condensed cache keeps them
  (a window is one step, so the re-taken sink only matters for a first window with ratio 0).
* ratio 0 keeps the window's raw keys as memory (the base model).
* :class:`StepRandomRatios` draws uniformly from the ``step-random`` list with one seeded
  generator (seed 42), restricted to ratios that divide the stride (so each beacon condenses
  exactly ``r`` tokens; with ``W = 1024`` the whole list is usable).

Truncated backpropagation (``grad_windows``): a task's loss sits on a few answer tokens and what
it needs on a few fact tokens, while a long haystack's windows are most of the step's time.
Windows outside ``grad_windows`` are read without autograd (no recomputation, no backward, none
of their memory kept for the backward); the memory entries they add are constants, while the
memory they read keeps its gradient history (it is joined to their entries again with autograd
on), so the loss still reaches the beacons of every window in ``grad_windows``.
:func:`gradient_windows` picks them for a sample.

Distillation (``teacher``): full attention reads the same tokens first (:func:`teacher_states`,
every window at ratio 0, i.e. the base model), keeping every layer's output at the positions with
a target; the loss of each such position then adds ``distill`` times the mean squared distance of
the beaconed model's layer outputs from those, each vector scaled to unit RMS first
(:func:`distill_distance`). Cross-entropy on a passkey's answer says only whether the digits came
out; the teacher's layer outputs say, at every layer, what reading the raw tokens would have made
of them. ``distill_on="logits"`` compares only what comes out: the KL divergence of the beaconed
model's next-token distribution from the teacher's (:func:`logit_divergence`; the teacher's
logits are its last layer's output through the final norm and the LM head), which on text
carries the teacher's whole distribution where cross-entropy has one token.

Gradient checkpointing (``checkpoint="window"`` or ``"layer"``) uses
``torch.utils.checkpoint`` in the non-reentrant mode, as the official training does; the loss
of a window is computed inside its checkpoint so that no ``[tokens x vocab]`` logits are kept.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

from .llama import BeaconConfig, Llama, check_token_ids
from .positions import rotate as rope
from .training_cache import TrainingKVCache, has_attention_backward

__all__ = ["STEP_RANDOM_RATIOS", "StepRandomRatios", "BeaconLoss", "TeacherStates", "beacon_loss",
           "DISTILL_ON", "distill_distance", "gradient_windows", "layer_states", "logit_divergence",
           "ratio_draws", "rope", "has_attention_backward", "teacher_states"]

DISTILL_ON: tuple[str, ...] = ("layers", "logits")
"""What :func:`beacon_loss` compares with the teacher: every layer's output, or the next-token distribution."""

STEP_RANDOM_RATIOS: tuple[int, ...] = (2, 2, 2, 2, 2, 4, 4, 4, 4, 4, 8, 8, 16, 16, 32, 32, 64, 128)
"""Section 6's ``step-random`` list (duplicates act as weights)."""


class StepRandomRatios:
    """``step-random`` (``docs/activation-beacon.md``, section 6): a fresh ratio per window from one seeded generator.

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


def ratio_draws(length: int, beacon: BeaconConfig) -> int:
    """How many ratios :func:`beacon_loss` draws for ``length`` tokens: one per full window, or
    per window, a partial last one too, with interleaved beacons."""
    if beacon.placement == "interleave":
        return -(-length // beacon.window)
    return length // beacon.window


def gradient_windows(length: int, window: int, labels: Sequence[int] | Tensor, fact_positions: Sequence[int] = (),
                     *, others: int = 0, generator: torch.Generator | None = None) -> set[int]:
    """The windows :func:`beacon_loss` should backpropagate through for one sample.

    Those holding a target (position ``t`` predicts ``labels[t + 1]``), those where a fact starts
    and the window after each (a fact may run over the boundary), and ``others`` more drawn at
    random from the rest (with ``generator``), so that the beacons of plain text are trained too.
    Window ``i`` covers tokens ``i * window .. (i + 1) * window - 1``.
    """
    if window < 1 or length < 1:
        raise ValueError(f"window and length must be >= 1, got {window} and {length}")
    if others < 0:
        raise ValueError(f"others must be >= 0, got {others}")
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if len(labels) != length:
        raise ValueError(f"labels must have {length} entries, got {len(labels)}")
    count = -(-length // window)
    chosen = {int(t) // window for t in (labels[1:] != -100).nonzero()[:, 0]}
    for p in fact_positions:
        if not 0 <= p < length:
            raise ValueError(f"fact_positions: {p} is outside the sample's {length} tokens")
        chosen |= {p // window, min(p // window + 1, count - 1)}
    rest = [i for i in range(count) if i not in chosen]
    if others and rest:
        pick = torch.randperm(len(rest), generator=generator)[:others]
        chosen |= {rest[int(i)] for i in pick}
    return chosen


@dataclass
class BeaconLoss:
    """Result of :func:`beacon_loss`: ``loss`` (mean CE, plus the distillation term with a
    teacher; differentiable) and per-window figures."""

    loss: Tensor
    window_loss_sums: list[float] = field(default_factory=list)  # detached CE sums
    window_counts: list[int] = field(default_factory=list)       # targets per window
    ratios: list[int] = field(default_factory=list)               # ratio of each window that drew one
    window_distill_sums: list[float] = field(default_factory=list)  # detached distill_distance sums

    def loss_after_first_window(self) -> float:
        """Mean CE over windows 2.. (where the memory matters); NaN when there are none."""
        n = sum(self.window_counts[1:])
        return sum(self.window_loss_sums[1:]) / n if n else float("nan")

    def cross_entropy(self) -> float:
        """Mean CE over every target (``loss`` without the distillation term)."""
        return sum(self.window_loss_sums) / sum(self.window_counts)

    def distill(self) -> float:
        """Mean distillation term (:func:`distill_distance` or :func:`logit_divergence`) over
        every target (0 without a teacher)."""
        return sum(self.window_distill_sums) / sum(self.window_counts)


@dataclass
class TeacherStates:
    """Layer outputs at a sample's target positions (:func:`layer_states`; full attention's:
    :func:`teacher_states`)."""

    states: Tensor  # [targets, layers, hidden]: targets in position order
    row: Tensor     # [length] long: the row of ``states`` for each position, -1 where it has no target


def _training_cache(model: Llama, length: int, attention: str) -> TrainingKVCache:
    """An empty cache for ``length`` tokens of one sequence, laid out as ``model.beacon`` says."""
    bc, c = model.beacon, model.config
    mode, attend_previous = bc.attention_mask_kind
    return TrainingKVCache(c.num_layers, c.num_kv_heads, c.head_dim, length, window=bc.window,
                           mode=mode, attend_previous=attend_previous, inv_freq=model.inv_freq,
                           rope_interleaved=c.rope_interleaved, attention=attention,
                           dtype=model.dtype, device=model.device, placement=bc.placement,
                           sink_size=bc.sink_size, sink_recapture=bc.sink_recapture)


def _sequence(model: Llama, ids: Tensor | Sequence[int], labels: Tensor | Sequence[int] | None) -> tuple[Tensor, Tensor]:
    """``ids`` as a checked ``[length]`` tensor (``[1, length]`` taken too) and ``labels`` (default
    ``ids``) of the same shape."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    ids = ids[0] if ids.dim() == 2 and ids.shape[0] == 1 else ids
    if ids.dim() != 1 or len(ids) == 0:
        raise ValueError(f"ids must be a non-empty [length] or [1, length] tensor, got shape {tuple(ids.shape)}")
    check_token_ids(ids, model.config.vocab_size, "ids")
    labels = ids if labels is None else torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if labels.shape != ids.shape:
        raise ValueError(f"labels must have the shape of ids {tuple(ids.shape)}, got {tuple(labels.shape)}")
    return ids, labels


def _ratio_draw(model: Llama, ratio: int | Callable[[], int] | None) -> Callable[[], int]:
    """The ratio of each window that draws one: ``ratio`` (fixed or a sampler), else the model's."""
    if ratio is None:
        if model.beacon.ratio is None:
            raise ValueError("ratio: the model uses adapt-N; pass a fixed ratio or a sampler")
        ratio = model.beacon.ratio
    return ratio if callable(ratio) else (lambda: int(ratio))


def _targets(ids: Tensor, labels: Tensor) -> Tensor:
    """Position ``t``'s target is ``labels[t + 1]`` (-100 for the last position)."""
    return torch.cat([labels[1:], labels.new_full((1,), -100)]).to(ids.device)


@torch.no_grad()
def teacher_states(model: Llama, ids: Tensor | Sequence[int], labels: Tensor | Sequence[int] | None = None,
                   *, attention: str = "op", last_layer_only: bool = False) -> TeacherStates:
    """Every layer's output at the positions of ``ids`` that have a target, read with full
    attention (each window at ratio 0: its raw keys stay, the base model), window by window as
    :func:`beacon_loss` reads it. ``labels`` as in :func:`beacon_loss` (default ``ids``).
    ``last_layer_only``: keep the last layer's alone (all that ``distill_on="logits"`` reads)."""
    ids, labels = _sequence(model, ids, labels)
    if len(ids) > model.trained_context:
        raise ValueError(f"ids: {len(ids)} tokens exceed the {model.trained_context} positions full attention "
                         "was trained for (the teacher would read them no better than the student)")
    return layer_states(model, ids, labels, ratio=0, attention=attention, last_layer_only=last_layer_only)


@torch.no_grad()
def layer_states(model: Llama, ids: Tensor | Sequence[int], labels: Tensor | Sequence[int] | None = None,
                 *, ratio: int | Callable[[], int] | None = None, attention: str = "op",
                 last_layer_only: bool = False) -> TeacherStates:
    """Every layer's output at the positions of ``ids`` that have a target, read window by window
    as :func:`beacon_loss` reads it (``ratio`` as there; 0: full attention, :func:`teacher_states`).
    ``labels`` as in :func:`beacon_loss` (default ``ids``). ``last_layer_only``: states
    ``[targets, 1, hidden]``, the last layer's output alone."""
    ids, labels = _sequence(model, ids, labels)
    draw = _ratio_draw(model, ratio)
    c, dev = model.config, model.device
    ids = ids.to(dev)
    targets = _targets(ids, labels)
    cache = _training_cache(model, len(ids), attention)
    parts, start = [], 0
    while start < len(ids):
        n = cache.room(0)
        if n == model.beacon.window or model.beacon.placement == "interleave":
            cache.set_ratio(0, draw())
        outs: list[Tensor] = []
        model.step(cache, [ids[start:start + n]], layer_outputs=outs)
        keep = (targets[start:start + n] != -100).nonzero()[:, 0]
        if len(keep):
            parts.append(torch.stack([o[keep] for o in (outs[-1:] if last_layer_only else outs)], dim=1))
        start += n
    keep = targets != -100
    row = torch.full((len(ids),), -1, dtype=torch.long, device=dev)
    row[keep] = torch.arange(int(keep.sum()), device=dev)
    layers = 1 if last_layer_only else c.num_layers
    states = torch.cat(parts) if parts else ids.new_zeros((0, layers, c.hidden_size), dtype=model.dtype)
    return TeacherStates(states, row)


def distill_distance(student: Tensor, teacher: Tensor, eps: float = 1e-6, *, per_layer: bool = False) -> Tensor:
    """Per row (dim 0), the mean over layers and features of the squared difference of
    ``student`` and ``teacher`` (``[rows, layers, hidden]``), each vector scaled to unit RMS
    first (in fp32): a layer's scale (and the residual stream's growth with depth) does not
    weigh in, only the direction and relative sizes of its features. ``per_layer``: ``[rows,
    layers]``, the mean over features only."""
    def unit(x: Tensor) -> Tensor:
        x = x.float()
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    d = (unit(student) - unit(teacher)).square().mean(dim=-1)
    return d if per_layer else d.mean(dim=1)


def logit_divergence(student: Tensor, teacher: Tensor) -> Tensor:
    """Per row, KL(teacher || student) of the next-token distributions given by the logits
    ``student`` and ``teacher`` (``[rows, vocab]``), in fp32: 0 where they agree, and its gradient
    pulls the student's whole distribution towards the teacher's."""
    t = F.log_softmax(teacher.float(), dim=-1)
    return (t.exp() * (t - F.log_softmax(student.float(), dim=-1))).sum(-1)


def beacon_loss(model: Llama, ids: Tensor | Sequence[int], labels: Tensor | Sequence[int] | None = None,
                *, ratio: int | Callable[[], int] | None = None, checkpoint: str | None = None,
                attention: str = "auto", split_constant_windows: bool = True,
                grad_windows: Collection[int] | None = None, teacher: TeacherStates | None = None,
                distill: float = 1.0, distill_on: str = "layers") -> BeaconLoss:
    """Mean next-token cross-entropy of one sequence, differentiable through all windows (or ``grad_windows``).

    Args:
        model: a :class:`~beacon_ops.llama.Llama` (its ``beacon`` config gives window, mode,
            ``attend_previous``, placement and sink, either variant; stride must equal the window).
        ids: ``[length]`` or ``[1, length]`` token ids (batch 1, as the official training).
        labels: aligned with ``ids`` (default ``ids``); shifted once over the whole sequence
            (position ``t`` predicts ``labels[t + 1]``), ``-100`` ignored.
        ratio: an int (fixed), a callable drawing one per full window (per window, interleaved; e.g.
            :class:`StepRandomRatios`), or None for the model's fixed ``beacon.ratio``.
        checkpoint: None, ``"window"`` or ``"layer"``: non-reentrant gradient checkpointing.
        attention: ``"op"`` (``beacon_attention``, mask in the kernel), ``"masked"`` (PyTorch
            ``scaled_dot_product_attention`` with the explicit mask of
            :func:`beacon_ops.masks.step_mask`) or ``"auto"``: the op, unless gradients
            are needed on a device without a ``beacon::attention_backward`` kernel (CPU and
            CUDA have one; ``"op"`` never falls back: it raises where the op cannot run).
        split_constant_windows: when gradients are on and nothing a full window's raw tokens
            read carries them (the first window; after it, windows read with ratio 0; appended
            beacons), read all its raw tokens but the last without autograd, then the last with
            the beacons: the same loss and gradients without backpropagating through rows that
            depend on no trainable parameter (``bench train``: 13% less time for a two-window
            step). False: every window in one step, as the inference caches read it.
        grad_windows: indices of the windows to backpropagate through (window ``i`` starts at
            token ``i * window``; e.g. :func:`gradient_windows`); the others are read without
            autograd and the memory entries they add are constants (the module docstring).
            None: every window. The loss is the same either way (up to rounding with low-rank
            deltas outside autocast, which read a window without autograd through their merged
            matrix).
        teacher: full attention's layer outputs (:func:`teacher_states` of the same ids and
            labels): each target's loss adds ``distill`` times its :func:`distill_distance`
            (``distill_on="layers"``) or its :func:`logit_divergence` (``"logits"``).
        distill: the distillation term's weight (with ``teacher``).
        distill_on: ``"layers"`` (every layer's output) or ``"logits"`` (the next-token
            distribution), what the teacher is compared with.

    Returns:
        :class:`BeaconLoss`; ``loss.backward()`` reaches the beacon parameters of every window.
    """
    bc = model.beacon
    if bc.stride != bc.window:
        raise ValueError(f"beacon_loss supports stride == window only, got stride {bc.stride} "
                         f"and window {bc.window}")
    if checkpoint not in (None, "window", "layer"):
        raise ValueError(f"checkpoint must be None, 'window' or 'layer', got {checkpoint!r}")
    ids, labels = _sequence(model, ids, labels)
    if attention not in ("auto", "op", "masked"):
        raise ValueError(f"attention must be 'auto', 'op' or 'masked', got {attention!r}")
    if attention == "auto":
        need_grad = torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())
        attention = "masked" if need_grad and not has_attention_backward(model.device) else "op"
    draw = _ratio_draw(model, ratio)
    if grad_windows is not None:
        count = -(-len(ids) // bc.window)
        bad = [i for i in grad_windows if not (isinstance(i, int) and 0 <= i < count)]
        if bad:
            raise ValueError(f"grad_windows: {bad[:3]} are not window indices of a {len(ids)}-token sequence "
                             f"(0..{count - 1})")
    if distill_on not in DISTILL_ON:
        raise ValueError(f"distill_on must be one of {DISTILL_ON}, got {distill_on!r}")
    if teacher is not None and teacher.row.shape != ids.shape:
        raise ValueError(f"teacher: states of a {len(teacher.row)}-token sequence, ids has {len(ids)}")
    if teacher is not None and distill_on == "layers" and teacher.states.shape[1] != model.config.num_layers:
        raise ValueError(f"teacher: {teacher.states.shape[1]} layer(s) of states; distill_on='layers' compares all "
                         f"{model.config.num_layers} (teacher_states without last_layer_only)")
    dev = model.device
    ids = ids.to(dev)
    targets = _targets(ids, labels)
    cache = _training_cache(model, len(ids), attention)

    def window_loss(x: Tensor, t: Tensor, at: int) -> tuple[Tensor, Tensor]:
        """CE sum (fp32) of tokens ``at ..`` (``x``): the model's step, then the LM head where
        targets exist; and the sum of their distill_distance (or logit_divergence) to the teacher
        (0 without one)."""
        outs = [] if teacher is not None and distill_on == "layers" else None
        hid = model.step(cache, [x], checkpoint_layers=checkpoint == "layer", layer_outputs=outs)[0]
        keep = (t != -100).nonzero()[:, 0]
        total = hid.new_zeros((), dtype=torch.float32)
        dist = hid.new_zeros((), dtype=torch.float32)
        for s in range(0, len(keep), model.logits_chunk):
            sel = keep[s:s + model.logits_chunk]
            logits = model.logits(hid[sel])
            total = total + F.cross_entropy(logits.float(), t[sel], reduction="sum")
            if teacher is not None and distill_on == "logits":
                with torch.no_grad():
                    taught = model.logits(model.model.norm(teacher.states[teacher.row[at + sel], -1]))
                dist = dist + logit_divergence(logits, taught).sum()
        if outs is not None and len(keep):
            mine = torch.stack([o[keep] for o in outs], dim=1)
            dist = distill_distance(mine, teacher.states[teacher.row[at + keep]]).sum()
        return total, dist

    def recomputable_window(host: dict[str, Any], x: Tensor, t: Tensor, at: int,
                            *memory: Tensor) -> tuple[Tensor, ...]:
        cache.load_state(host, memory)  # a recomputation starts from the window's own state
        s, dist = window_loss(x, t, at)
        return (s, dist, *cache.state()[1])

    total = torch.zeros((), dtype=torch.float32, device=dev)
    out = BeaconLoss(total)
    start = 0
    while start < len(ids):
        n = cache.room(0)
        if n == bc.window or bc.placement == "interleave":
            r = draw()
            cache.set_ratio(0, r)
            out.ratios.append(r)
        x, t = ids[start:start + n], targets[start:start + n]
        if grad_windows is not None and start // bc.window not in grad_windows and torch.is_grad_enabled():
            before = cache.state()[1]
            with torch.no_grad():
                s, dist = window_loss(x, t, start)
            host, after = cache.state()
            # the entries this window added are constants; the memory before them keeps its history
            cache.load_state(host, [torch.cat([b, a[:, b.shape[1]:]], dim=1) if b.requires_grad else a
                                    for b, a in zip(before, after)])
        else:
            constant, at = None, start
            if (split_constant_windows and n == bc.window > 1 and start + n < len(ids) and torch.is_grad_enabled()
                    and cache.can_split_window() and not cache.memory_requires_grad()):
                with torch.no_grad():  # these raw tokens depend on no trainable parameter
                    constant = window_loss(x[:-1], t[:-1], at)
                x, t, at = x[-1:], t[-1:], start + n - 1
            if checkpoint == "window":
                host, memory = cache.state()
                s, dist, *memory = _checkpoint(recomputable_window, host, x, t, at, *memory, use_reentrant=False)
                cache.load_state(cache.state()[0], memory)  # the checkpoint's outputs
            else:
                s, dist = window_loss(x, t, at)
            if constant is not None:
                s, dist = s + constant[0], dist + constant[1]
        total = total + s + distill * dist if teacher is not None else total + s
        out.window_loss_sums.append(float(s.detach()))
        out.window_distill_sums.append(float(dist.detach()))
        out.window_counts.append(int((targets[start:start + n] != -100).sum()))
        start += n
    count = sum(out.window_counts)
    if count == 0:
        raise ValueError("labels: no position has a target (all -100 or length 1)")
    out.loss = total / count
    return out
