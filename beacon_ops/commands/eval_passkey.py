"""``python -m beacon_ops eval-passkey``: the paper's passkey test over lengths x depths.

For every ``--lengths`` x ``--depths`` cell ``--keys`` passkey prompts
(:func:`beacon_ops.evaluation.passkey_prompt`, each its own random 5-digit key) are answered greedily by
each method: ``beacon`` (the model with its adapter: by default the shipped one for SmolLM2),
``untrained`` (beacon parameters copied from the base projections), ``full`` attention (up to
``--full-max``, by default the model's context) and ``sliding`` (a window of ``W`` raw tokens, no
memory). Prints the accuracy table, writes a length x depth heatmap (``--plot DIR``) and every
answer as JSON (``--json``). Model options as for ``demo``.
"""
from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from ..evaluation import (accuracy_table, passkey_grid, passkey_min_tokens, plot_passkey_heatmap,
                          digits_by_position, window_place_split)
from ..generation import ratio_for_length
from .common import (Command, UsageError, add_model_args, full_attention_limit, int_at_least,
                     load_evaluated_model, load_model_for, write_json,
                     one_thread_when_busy)
from .eval_ppl import parse_lengths

METHODS = ("beacon", "untrained", "full", "sliding")


def parse_depths(s: str) -> list[float]:
    """``"0,0.5,1"`` -> ``[0.0, 0.5, 1.0]`` (an argparse type: each depth in [0, 1])."""
    try:
        out = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers in [0, 1], got {s!r}") from None
    if not out or any(not 0.0 <= d <= 1.0 for d in out):
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers in [0, 1], got {s!r}")
    return out


def parse_methods(s: str) -> list[str]:
    """``"beacon,full"`` -> ``["beacon", "full"]`` (an argparse type)."""
    out = [m.strip() for m in s.split(",") if m.strip()]
    if not out or set(out) - set(METHODS):
        raise argparse.ArgumentTypeError(f"must be a comma-separated list of {','.join(METHODS)}, got {s!r}")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, window=1024)
    p.add_argument("--lengths", type=parse_lengths, default=parse_lengths("4k,8k,16k,32k"),
                   help="prompt lengths (default 4k,8k,16k,32k)")
    p.add_argument("--depths", type=parse_depths, default=parse_depths("0,0.25,0.5,0.75,1"),
                   help="depths of the key, 0 (start) .. 1 (end) (default 0,0.25,0.5,0.75,1)")
    p.add_argument("--methods", type=parse_methods, default=list(METHODS),
                   help="beacon, untrained, full, sliding (default: all)")
    p.add_argument("--keys", type=int_at_least(1), default=1,
                   help="prompts (keys) per length x depth cell (default 1; more for tighter figures)")
    p.add_argument("--seed", type=int, default=0, help="seed of the keys")
    p.add_argument("--plot", default=None, metavar="DIR", help="write passkey_heatmap.png into DIR")
    p.add_argument("--no-share-prefix", dest="share_prefix", action="store_false",
                   help="read every prompt from its start (default: the filler a length's prompts share "
                        "is read once and the session copied; the same answers from about half the tokens)")


@one_thread_when_busy
@torch.no_grad()  # scoped, not global: the commands also run in-process (tests)
def run(args: argparse.Namespace) -> int:
    dtype = getattr(torch, args.dtype)
    lm = load_evaluated_model(args)
    shortest = passkey_min_tokens(lm.tokenizer, 99999)
    if min(args.lengths) < shortest:
        raise UsageError("--lengths", f"each length must be >= {shortest} (the prompt's fixed text), "
                         f"got {min(args.lengths)}")
    models: dict[str, tuple[Any, str]] = {}
    for m in args.methods:
        if m == "untrained":
            plain = lm.model if not lm.adapter else load_model_for(
                argparse.Namespace(**{**vars(args), "adapter": None}), lm.model.beacon, dtype).model
            models[m] = (plain, "beacon")
        else:
            models[m] = (lm.model, m if m in ("full", "sliding") else "beacon")
    full_max, why = full_attention_limit(args, lm.model.config.max_position_embeddings)
    b = lm.model.beacon
    ratios = ", ".join(f"{n} -> r = {ratio_for_length(lm.model, n)}" for n in args.lengths)
    print(f"model: {lm.name}; adapter: {lm.adapter or 'none (untrained beacons)'}; window {b.window}, "
          f"{b.layout_text()}; ratio {'adapt-N: ' + ratios if b.ratio is None else b.ratio}", flush=True)
    results = passkey_grid(models, lm.tokenizer, args.lengths, args.depths, seed=args.seed,
                           keys=args.keys, max_tokens={"full": full_max}, share_prefix=args.share_prefix)
    print()
    print(accuracy_table(results))
    for line in digits_by_position(results) + window_place_split(results, b.window):
        print(line)
    if args.share_prefix and results:
        print(f"read {sum(r.read for r in results):,} of the prompts' {sum(r.tokens for r in results):,} tokens "
              "(the filler they share read once; --no-share-prefix reads it all)")
    if "full" in args.methods and any(n > full_max for n in args.lengths):
        print(f"(full attention skipped past {full_max} tokens, {why}; --full-max N sets the limit)")
    if args.plot:
        os.makedirs(args.plot, exist_ok=True)
        path = plot_passkey_heatmap(results, os.path.join(args.plot, "passkey_heatmap.png"),
                                    f"passkey retrieval, {lm.name}, window {b.window}")
        print(f"heatmap: {path}")
    write_json({"model": lm.name, "adapter": lm.adapter, "window": b.window, "mode": b.mode,
                "fixed_ratio": b.ratio, "full_max": full_max, "results": [vars(r) for r in results]},
               args.json)
    return 0


COMMAND = Command("eval-passkey", "passkey retrieval over lengths x depths: beacon vs untrained vs full "
                  "vs sliding window", add_arguments, run)
