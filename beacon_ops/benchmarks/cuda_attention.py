"""CUDA-specific attention benchmarks: the prefill kernel against SDPA (flash backend) and the
split-KV decode kernel against a device-to-device copy, measured side by side in one run.

Setting (the paper's inference default): bf16, head_dim 128, 32 query heads over 8 KV heads,
window W = 1024 (stride = W), batch 8, ratio r in {8, 32}, memory M from 0 up to the adapt-N
maximum ``max_pos - W`` (Llama-2: 3072 beacons; the memory never exceeds it when the ratio is
chosen by adapt-N).

- prefill: the step that completes a window: W raw queries + W / r beacons over
  ``M + W + W / r`` keys. Useful FLOPs = ``4 * d * (allowed (query, key) pairs)`` per head,
  counted exactly from the mask. Baseline: SDPA flash, dense causal attention over a sequence
  as long as the keys (its own exact FLOPs ``4 d N (N + 1) / 2``); both reported in TFLOP/s.
- decode: one query per sequence over ``M + W / 2`` keys; bytes = K and V read once (plus q and
  out), reported against a plain device-to-device copy (read + write counted).

Run: ``python -m beacon_ops.benchmarks.cuda_attention [--quick] [--json PATH]`` or
``run("cuda", quick)``.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from .common import copy_gbps, time_fn

HEAD_DIM = 128
HEADS = 32
KV_HEADS = 8
WINDOW = 1024
BATCH = 8
MAX_POS = 4096  # Llama-2: the adapt-N maximum memory is MAX_POS - WINDOW beacons
RATIOS = (8, 32)


def allowed_pairs(mem: int, raw: int, beacons: int, ratio: int, n_raw_q: int) -> int:
    """Exact number of (query, key) pairs one head of one sequence attends to (step-expansion,
    attend_previous): raw token t sees M + t + 1 keys, beacon j sees M + (j + 1) r + 1."""
    raw_pairs = sum(mem + t + 1 for t in range(raw - n_raw_q, raw))
    beacon_pairs = sum(mem + min((j + 1) * ratio, raw) + 1 for j in range(beacons))
    return raw_pairs + beacon_pairs


def _lens(batch: int, value: int, device: str) -> torch.Tensor:
    return torch.full((batch,), value, dtype=torch.int32, device=device)


def bench_prefill(device: str, mem: int, ratio: int, batch: int) -> dict:
    dt = torch.bfloat16
    beacons = WINDOW // ratio
    nq = WINDOW + beacons
    keys = mem + WINDOW + beacons
    q = torch.randn(batch * nq, HEADS, HEAD_DIM, device=device, dtype=dt)
    k = torch.randn(batch, KV_HEADS, keys, HEAD_DIM, device=device, dtype=dt)
    v = torch.randn_like(k)
    cu = torch.arange(0, batch + 1, device=device, dtype=torch.int32) * nq
    args = (q, k, v, cu, _lens(batch, mem, device), _lens(batch, WINDOW, device), _lens(batch, beacons, device),
            _lens(batch, ratio, device), nq, "step-expansion", True, 0.0)
    t = time_fn(lambda: torch.ops.beacon.attention(*args), device)
    flops = 4 * HEAD_DIM * HEADS * batch * allowed_pairs(mem, WINDOW, beacons, ratio, WINDOW)

    # SDPA flash: dense causal over a sequence of `keys` tokens (GQA expanded to full heads).
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qs = torch.randn(batch, HEADS, keys, HEAD_DIM, device=device, dtype=dt)
    ks = torch.randn_like(qs)
    vs = torch.randn_like(qs)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ts = time_fn(lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True), device)
    sdpa_flops = 4 * HEAD_DIM * HEADS * batch * keys * (keys + 1) // 2
    return {
        "kind": "prefill", "ratio": ratio, "mem": mem, "queries": nq, "keys": keys, "batch": batch,
        "beacon_ms": t * 1e3, "beacon_tflops": flops / t / 1e12,
        "sdpa_causal_ms": ts * 1e3, "sdpa_tflops": sdpa_flops / ts / 1e12,
        "tflops_ratio": (flops / t) / (sdpa_flops / ts),
    }


def bench_decode(device: str, mem: int, ratio: int, batch: int, copy_bw: float) -> dict:
    dt = torch.bfloat16
    raw = WINDOW // 2
    keys = mem + raw
    q = torch.randn(batch, HEADS, HEAD_DIM, device=device, dtype=dt)
    k = torch.randn(batch, KV_HEADS, keys, HEAD_DIM, device=device, dtype=dt)
    v = torch.randn_like(k)
    cu = torch.arange(0, batch + 1, device=device, dtype=torch.int32)
    args = (q, k, v, cu, _lens(batch, mem, device), _lens(batch, raw, device), _lens(batch, 0, device),
            _lens(batch, ratio, device), 1, "step-expansion", True, 0.0)
    t = time_fn(lambda: torch.ops.beacon.attention(*args), device)
    nbytes = (k.numel() + v.numel() + 2 * q.numel()) * q.element_size()
    gbps = nbytes / t / 1e9
    return {
        "kind": "decode", "ratio": ratio, "mem": mem, "keys": keys, "batch": batch,
        "beacon_us": t * 1e6, "beacon_gbps": gbps, "copy_gbps": copy_bw, "fraction_of_copy": gbps / copy_bw,
    }


def run(device: str = "cuda", quick: bool = False) -> dict:
    """Prefill and decode rows (see the module docstring); needs a CUDA device."""
    if device != "cuda" or not torch.cuda.is_available():
        raise SystemExit("cuda_attention: needs --device cuda and a CUDA GPU")
    batch = 2 if quick else BATCH
    mems = (0, MAX_POS - WINDOW) if quick else (0, 1024, 2048, MAX_POS - WINDOW)
    copy_bw = copy_gbps(device)
    rows = []
    for ratio in RATIOS:
        for mem in mems:
            rows.append(bench_prefill(device, mem, ratio, batch))
            rows.append(bench_decode(device, mem, ratio, batch, copy_bw))
    return {
        "rows": rows,
        "device": torch.cuda.get_device_name(),
        "copy_gbps": copy_bw,
        "setting": {"head_dim": HEAD_DIM, "heads": HEADS, "kv_heads": KV_HEADS, "window": WINDOW,
                    "batch": batch, "dtype": "bfloat16", "mode": "step-expansion"},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    import beacon_ops  # noqa: F401  (registers the ops)
    from .common import print_table

    res = run("cuda", args.quick)
    print_table(res["rows"])
    print(f"copy_gbps: {res['copy_gbps']:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
