"""``python -m beacon_ops bench KIND``: the benchmarks of :mod:`beacon_ops.benchmarks`.

Each benchmark is a module with ``run(device: str, quick: bool, **options) -> dict``
(``threads``: the thread counts of ``--threads``, ``llama_context``: the length of ``bench
llama``'s fp32/bf16 rows, for the modules whose ``run`` takes them); the dict holds ``rows`` (a
list of flat dicts, printed as a table with the short headers of ``columns`` when given) plus any
summary figures. Everything is
measured side by side in one run, with the machine's ceilings (a matmul, a copy) measured in the
same run. ``all`` runs every kind the device supports (``cuda-attention`` only with
``--device cuda``).
"""
from __future__ import annotations

import argparse
import inspect
import os
import platform
import sys
from typing import Callable, NamedTuple

import torch

from ..benchmarks import attention, compaction, cuda_attention, decode, llama, long_context, training
from ..benchmarks.common import busy_machine_threads, print_table, print_value
from .common import Command, UsageError, device_name, int_at_least, write_json


class Benchmark(NamedTuple):
    """A benchmark kind: ``run(device, quick) -> dict`` and, when it draws any,
    ``plot(result, folder) -> list of PNG paths``."""

    run: Callable[[str, bool], dict]
    plot: Callable[[dict, str], list[str]] | None = None


KINDS: dict[str, Benchmark] = {
    "attention": Benchmark(attention.run),
    "long-context": Benchmark(long_context.run, long_context.plot),
    "decode": Benchmark(decode.run),
    "compaction": Benchmark(compaction.run),
    "llama": Benchmark(llama.run, llama.plot),
    "cuda-attention": Benchmark(cuda_attention.run),
    "train": Benchmark(training.run),
}
"""Every benchmark kind shipped, by name."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=list(KINDS) + ["all"], help="which benchmark to run")
    p.add_argument("--device", type=device_name, default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="small sizes (under 2 minutes on a 2-core CPU)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", default=None, metavar="DIR", help="write PNG plots (matplotlib) into DIR")
    p.add_argument("--threads", type=thread_counts, default=None, metavar="N[,M...]",
                   help="CPU threads (torch.set_num_threads, and OMP_NUM_THREADS for child "
                        "processes); default: 1 when the machine is already busy (1-minute load "
                        "average >= CPU count: parallel regions then wait for descheduled "
                        "threads, measured 2-25x slower here), else torch's default. "
                        "bench attention measures one row set per count given (default: "
                        "torch's count and 1); the others use the first")
    p.add_argument("--llama-context", type=int_at_least(1), default=None, metavar="TOKENS",
                   help="bench llama: also SmolLM2 with beacons in fp32 and bf16 at this many "
                        "tokens (prefill tokens/s side by side; default 16384, 4096 with --quick)")


def thread_counts(text: str) -> list[int]:
    """``N`` or ``N,M,...``: thread counts >= 1."""
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or N,M,..., got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"thread counts must be >= 1, got {text!r}")
    return counts


def run(args: argparse.Namespace) -> int:
    threads_note = "--threads" if args.threads is not None else "torch default"
    if args.threads is None and args.device == "cpu":
        args.threads, why = busy_machine_threads()
        if args.threads is not None:
            threads_note = f"1: {why}"
            print(f"bench: the machine is busy ({why}); using 1 thread (--threads N to override)")
    counts = [args.threads] if isinstance(args.threads, int) else args.threads
    if counts is not None:
        torch.set_num_threads(counts[0])
        os.environ["OMP_NUM_THREADS"] = str(counts[0])
    options = {"threads": counts, "llama_context": args.llama_context}
    kinds = [k for k in KINDS if k != "cuda-attention" or args.device == "cuda"] if args.kind == "all" else [args.kind]
    if "cuda-attention" in kinds and args.device != "cuda":
        raise UsageError("--device", "bench cuda-attention needs --device cuda")
    results = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
            "threads_choice": threads_note,
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "cpus": os.cpu_count(),
            "load_average_1_5_15min_at_start": os.getloadavg(),
        },
        "command": "python -m beacon_ops " + " ".join(sys.argv[1:]),
        "quick": args.quick,
    }
    for kind in kinds:
        bench = KINDS[kind]
        print(f"== {kind} ({args.device}{', quick' if args.quick else ''})")
        params = inspect.signature(bench.run).parameters
        res = bench.run(args.device, args.quick,
                        **{k: v for k, v in options.items() if k in params and v is not None})
        print_table(res.get("rows", []), res.get("columns"))
        for k, v in res.items():
            if k in ("rows", "plots", "columns"):
                continue
            print_value(k, v)
        results[kind] = res
        if args.plot and bench.plot is not None:
            res["plots"] = bench.plot(res, args.plot)
            print("plots: " + ", ".join(res["plots"] or []))
    results["machine"]["load_average_1_5_15min_at_end"] = os.getloadavg()
    print(f"load average (1, 5, 15 min): start {results['machine']['load_average_1_5_15min_at_start']}, "
          f"end {results['machine']['load_average_1_5_15min_at_end']} on {os.cpu_count()} CPUs")
    write_json(results, args.json)
    return 0


COMMAND = Command("bench", "microbenchmarks against full attention (side by side, one run)", add_arguments, run)
