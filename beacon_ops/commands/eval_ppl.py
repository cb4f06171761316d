"""``python -m beacon_ops eval-ppl``: perplexity of a fixed target block at growing context lengths.

Perplexity of one fixed block of target tokens (the last ``--targets`` tokens of the longest
prefix) read with ``L`` tokens of context for each ``L`` of ``--lengths``, with beacon
attention, full attention (skipped past ``--full-max``, said so) and a plain sliding window of
``W`` raw tokens (no memory). ``--text`` defaults to CPython's ``_pydecimal.py``
(:func:`beacon_ops.evaluation.default_text`). Model options as for ``demo``.
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch

from ..evaluation import default_text
from ..generation import ATTENTION_KINDS, ratio_for_length, sequence_loss
from .common import (Command, UsageError, add_model_args, existing_path, full_attention_limit,
                     int_at_least, load_evaluated_model, write_json,
                     one_thread_when_busy)


def parse_lengths(s: str) -> list[int]:
    """``"2k,8k,1500"`` -> ``[2048, 8192, 1500]`` (an argparse type: every length >= 2)."""
    out = []
    for part in s.split(","):
        part = part.strip().lower()
        mult = 1024 if part.endswith("k") else 1
        try:
            n = int(float(part.rstrip("k")) * mult)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--lengths: cannot read {part!r} (use e.g. 2k,8k,16k)") from None
        if n < 2:
            raise argparse.ArgumentTypeError(f"--lengths: every length must be >= 2, got {part!r}")
        out.append(n)
    return out


def parse_kinds(s: str) -> list[str]:
    """``"beacon,full"`` -> ``["beacon", "full"]`` (an argparse type)."""
    kinds = [k.strip() for k in s.split(",") if k.strip()]
    bad = sorted(set(kinds) - set(ATTENTION_KINDS))
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"must be a comma-separated list of {','.join(ATTENTION_KINDS)}, "
                                         f"got {s!r}")
    return kinds


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, window=1024)
    p.add_argument("--text", type=existing_path, default=None, help="text file (default: CPython's _pydecimal.py)")
    p.add_argument("--lengths", type=parse_lengths, default=parse_lengths("2k,8k,16k,32k"),
                   help="context lengths, e.g. 2k,8k,16k,32k")
    p.add_argument("--targets", type=int_at_least(1), default=1024, help="target tokens scored at every length")
    p.add_argument("--kinds", type=parse_kinds, default=list(ATTENTION_KINDS),
                   help="attention kinds to evaluate (default beacon,full,sliding)")


@one_thread_when_busy
@torch.no_grad()  # scoped, not global: the commands also run in-process (tests)
def run(args: argparse.Namespace) -> int:
    lm = load_evaluated_model(args)
    path = args.text or default_text()
    with open(path, encoding="utf-8", errors="replace") as f:
        ids = lm.tokenizer.encode(f.read())
    lengths, kinds = sorted(args.lengths), args.kinds
    if lengths[-1] > len(ids):
        raise UsageError("--lengths", f"{lengths[-1]} tokens asked but {path} has only {len(ids)}")
    if args.targets >= lengths[0]:
        raise UsageError("--targets", f"must be smaller than the shortest length ({lengths[0]}), got {args.targets}")
    full_max, why = full_attention_limit(args, lm.model.config.max_position_embeddings)
    end = lengths[-1]
    print(f"model: {lm.name}; text: {path} ({len(ids)} tokens); scoring tokens "
          f"[{end - args.targets}, {end}) at every length; window {args.window}, "
          f"{lm.model.beacon.layout_text()}")
    rows = []
    for L in lengths:
        x = torch.tensor(ids[end - L:end])
        labels = x.clone()
        labels[:L - args.targets] = -100  # target of position t is labels[t + 1]
        row: dict[str, Any] = {"length": L}
        for kind in kinds:
            if kind == "full" and L > full_max:
                row[kind] = None
                continue
            t0 = time.perf_counter()
            loss = sequence_loss(lm.model, [x], [labels], attention=kind, progress=True)
            lm.model.reset()
            row[kind] = math.exp(loss.item())
            row[f"{kind}_s"] = time.perf_counter() - t0
        if "beacon" in kinds:
            row["ratio"] = ratio_for_length(lm.model, L)
        rows.append(row)
        print("  " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) and not k.endswith("_s") else
                               f"{k} {v}" for k, v in row.items() if not k.endswith("_s")), flush=True)
    print(f"\nperplexity of the last {args.targets} tokens ({lm.name}, window {args.window}):")
    print(f"{'length':>8} " + " ".join(f"{k:>10}" for k in kinds) + ("   ratio" if "beacon" in kinds else ""))
    for row in rows:
        cells = ["   skipped" if row[k] is None else f"{row[k]:>10.2f}" for k in kinds]
        print(f"{row['length']:>8} " + " ".join(cells) + (f" {row['ratio']:>7}" if "beacon" in kinds else ""))
    if "full" in kinds and any(r.get("full") is None for r in rows):
        print(f"(full attention skipped past {full_max} tokens, {why}; --full-max N sets the limit)")
    b = lm.model.beacon
    write_json({"model": lm.name, "text": path, "targets": args.targets, "window": b.window,
                "stride": b.stride, "mode": b.mode, "fixed_ratio": args.ratio,
                "full_max": args.full_max, "rows": rows}, args.json)
    return 0


COMMAND = Command("eval-ppl", "perplexity of a fixed target block at growing context lengths", add_arguments, run)
