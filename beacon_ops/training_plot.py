"""The loss curve of a training run: read the JSON lines of ``train --log-file`` and draw a PNG.

A run resumed after an interruption appends the steps after its last save a second time (the
steps it had logged but not saved are trained again, identically); :func:`read_training_log`
keeps the last record of each step, so a log of several sessions reads as one run.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

__all__ = ["read_training_log", "plot_training_log", "summarize_training_log"]


def read_training_log(path: str) -> list[dict[str, Any]]:
    """The step records of a ``train --log-file`` file, one per step in step order.

    Raises ``ValueError`` naming the file and line for a line that is not a JSON object with a
    numeric ``step`` and ``loss``, and for a log with no records."""
    by_step: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e.msg})") from None
            if not (isinstance(rec, dict) and isinstance(rec.get("step"), int)
                    and isinstance(rec.get("loss"), (int, float))):
                raise ValueError(f"{path}:{n}: a training log line has an integer 'step' and a numeric "
                                 f"'loss' (train --log-file writes them)")
            by_step[rec["step"]] = rec  # a resumed run's repeat of a step replaces the first
    if not by_step:
        raise ValueError(f"{path}: no training steps in it")
    return [by_step[s] for s in sorted(by_step)]


def _rolling_mean(values: Sequence[float], n: int) -> list[float]:
    """Mean of each value and the ``n - 1`` before it (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= n:
            total -= values[i - n]
        out.append(total / min(i + 1, n))
    return out


def summarize_training_log(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Steps, tokens, hours of step time and the mean loss of the first and last ``tenth`` steps
    (a tenth of them, at least one)."""
    k = max(1, len(records) // 10)
    losses = [float(r["loss"]) for r in records]
    return {"steps": len(records), "first_step": records[0]["step"], "last_step": records[-1]["step"],
            "tokens": sum(int(r.get("tokens", 0)) for r in records),
            "hours": sum(float(r.get("seconds", 0.0)) for r in records) / 3600,
            "tenth": k, "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k}


def plot_training_log(records: Sequence[dict[str, Any]], path: str, *, smooth: int = 10,
                      title: str = "") -> str:
    """Draw the loss of every step (dots), its mean over ``smooth`` steps (line) and, below, the
    learning rate, to the PNG ``path``; returns ``path``."""
    if smooth < 1:
        raise ValueError(f"smooth must be >= 1, got {smooth}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    loss = [float(r["loss"]) for r in records]
    has_lr = all(isinstance(r.get("lr"), (int, float)) for r in records)
    fig, axes = plt.subplots(2 if has_lr else 1, 1, figsize=(7, 4.6 if has_lr else 3.4), sharex=True,
                             squeeze=False, gridspec_kw={"height_ratios": [3, 1]} if has_lr else None)
    ax = axes[0][0]
    ax.plot(steps, loss, ".", color="tab:blue", alpha=0.35, markersize=4, label="step")
    ax.plot(steps, _rolling_mean(loss, smooth), "-", color="tab:blue", linewidth=2,
            label=f"mean of {smooth} steps")
    ax.set_ylabel("loss")
    if min(loss) > 0 and max(loss) / min(loss) > 30:
        ax.set_yscale("log")  # a long run's early losses would flatten the rest
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    s = summarize_training_log(records)
    tokens = s["tokens"]
    tok = f"{tokens / 1e6:.2f}M" if tokens >= 1e5 else f"{tokens:,}"
    ax.set_title((title + "\n" if title else "")
                 + f"steps {s['first_step']}-{s['last_step']}, {tok} tokens, {s['hours']:.1f} h of step time",
                 fontsize=9)
    if has_lr:
        lx = axes[1][0]
        lx.plot(steps, [float(r["lr"]) for r in records], "-", color="tab:gray")
        lx.set_ylabel("lr")
        lx.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        lx.grid(alpha=0.3)
    axes[-1][0].set_xlabel("step")
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
