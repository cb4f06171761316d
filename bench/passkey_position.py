"""Where the pass key sits in its beacon window, and whether the answer finds it.

    python bench/passkey_position.py [demo options] --shifts 0,21,64,169

`make run`'s prompt (`python -m beacon_ops demo`'s, same options: --tokens, --key, --depth,
--adapter, --window, --mode, ...) with N newline tokens put after its first token for each N of
--shifts, which moves the key N tokens further into the input and so to another place in its
window. Prints, per shift, the key's first digit's token index, its place in the window (index mod
the window) and the greedy answer of beacon attention. The shipped adapter answers keys early
or midway in a window and loses the last digit of keys in the window's last ~30 tokens
(docs/training-log.md).
"""
from __future__ import annotations

import argparse

import torch

from beacon_ops.commands import demo
from beacon_ops.commands.common import beacon_config, load_model_for
from beacon_ops.evaluation import answer_contains, find_tokens, passkey_prompt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    demo.add_arguments(p)
    p.add_argument("--shifts", default="0,21,64,169", help="newline tokens to insert, comma-separated")
    args = p.parse_args()
    lm = load_model_for(args, beacon_config(args), getattr(torch, args.dtype))
    tok, window = lm.tokenizer, lm.model.beacon.window
    base = passkey_prompt(tok, args.tokens, args.key, args.depth)
    newline = tok.encode("\n")[-1]
    digits = tok.encode(str(args.key))
    with torch.no_grad():
        for shift in (int(s) for s in args.shifts.split(",")):
            ids = base[:1] + [newline] * shift + base[1:]
            at = find_tokens(ids, digits)
            r = demo.run_passkey(lm, ids, "beacon", args.max_new_tokens, args.device)
            print(f"key {args.key}, shift {shift}: first digit at token {at}, place {at % window} of the "
                  f"window's {window}; answer {r['answer']!r} ({'right' if answer_contains(str(args.key), r['answer']) else 'wrong'})",
                  flush=True)


if __name__ == "__main__":
    main()
