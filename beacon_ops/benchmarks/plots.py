"""PNG plots of the benchmark results (matplotlib, headless): beacon vs full attention.

Each function takes the ``rows`` a benchmark module returned and writes one PNG per figure into
``out_dir``; it returns the paths written. Measured points are drawn solid, extrapolated ones
(``sdpa_extrapolated``) dashed with hollow markers, so a reader sees what was not run.
"""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Iterable


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ctx_axis(ax, contexts: Iterable[int]) -> None:
    ticks = sorted(set(contexts))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{c // 1024}K" for c in ticks])
    ax.set_xlabel("context (tokens)")
    ax.grid(True, which="both", alpha=0.3)


def attention_time_plot(rows: list[dict], out_dir: str) -> list[str]:
    """Summed attention time over a whole input vs context length, one panel per dtype/head dim."""
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    panels: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for r in rows:
        panels[(r["dtype"], r["head_dim"])].append(r)
    keys = sorted(panels)
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pr = panels[key]
        sdpa = sorted({(r["context"], r["sdpa_ms"], r["sdpa_extrapolated"]) for r in pr})
        meas = [(c, t) for c, t, e in sdpa if not e]
        extra = [(c, t) for c, t, e in sdpa if e]
        if meas:
            ax.plot(*zip(*meas), "k-o", label="SDPA full causal")
        if extra:
            ax.plot(*zip(*(meas[-1:] + extra)), "k--", label="SDPA (extrapolated by pairs)")
            ax.plot(*zip(*extra), "ko", mfc="none")
        for ratio in sorted({r["ratio"] for r in pr}):
            pts = sorted((r["context"], r["beacon_ms"]) for r in pr if r["ratio"] == ratio)
            ax.plot(*zip(*pts), "-s", label=f"beacon r={ratio} (sum of windows)")
        _ctx_axis(ax, (r["context"] for r in pr))
        ax.set_yscale("log")
        ax.set_ylabel("attention time (ms)")
        ax.set_title(f"{key[0]}, head_dim {key[1]}, {pr[0]['heads']} head(s)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, "long_context_attention_time.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path, _speedup_plot(plt, panels, keys, out_dir)]


def _speedup_plot(plt, panels: dict, keys: list, out_dir: str) -> str:
    """Speedup of the summed beacon windows over full causal SDPA vs context, against the ideal
    (the ratio of exact pair counts); hollow markers where SDPA was extrapolated."""
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pr = panels[key]
        for i, ratio in enumerate(sorted({r["ratio"] for r in pr})):
            rr = sorted((r for r in pr if r["ratio"] == ratio), key=lambda r: r["context"])
            color = f"C{i}"
            ax.plot([r["context"] for r in rr], [r["speedup"] for r in rr], "-", color=color,
                    label=f"r={ratio} measured")
            for r in rr:
                ax.plot(r["context"], r["speedup"], "o", color=color,
                        mfc="none" if r["sdpa_extrapolated"] else color)
            ax.plot([r["context"] for r in rr], [r["ideal_speedup"] for r in rr], ":", color=color,
                    label=f"r={ratio} ideal (pair ratio)")
        _ctx_axis(ax, (r["context"] for r in pr))
        ax.set_yscale("log")
        ax.set_ylabel("speedup over SDPA full causal")
        ax.set_title(f"{key[0]}, head_dim {key[1]} (hollow: SDPA extrapolated)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, "long_context_speedup.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def llama_plots(rows: list[dict], out_dir: str) -> list[str]:
    """Llama prefill: time and peak memory vs context, beacon vs full attention, per model."""
    plt = _pyplot()
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for model in sorted({r["model"] for r in rows}):
        mr = [r for r in rows if r["model"] == model]
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4.2))
        for attn, style in (("beacon", "-s"), ("full", "k-o")):
            ar = sorted((r for r in mr if r["attention"] == attn and r.get("prefill_s") is not None),
                        key=lambda r: r["context"])
            if not ar:
                continue
            label = attn if attn == "full" else f"beacon r={ar[0].get('ratio', '?')}"
            ax_t.plot([r["context"] for r in ar], [r["prefill_s"] for r in ar], style, label=label)
            mem = [r for r in ar if r.get("model_peak_mb") is not None]
            ax_m.plot([r["context"] for r in mem], [r["model_peak_mb"] for r in mem], style,
                      label=label)
        for ax in (ax_t, ax_m):
            _ctx_axis(ax, (r["context"] for r in mr))
            ax.legend(fontsize=8)
        ax_t.set_yscale("log")
        ax_t.set_ylabel("prefill time (s)")
        ax_m.set_ylabel("weights + peak memory of the prefill (MB)")
        ax_t.set_title(f"{model}: prefill time")
        ax_m.set_title(f"{model}: peak memory (see method)")
        fig.tight_layout()
        path = os.path.join(out_dir, f"llama_{model}_prefill.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
