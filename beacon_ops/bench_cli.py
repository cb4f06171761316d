"""``python -m beacon_ops bench {attention,decode,compaction,llama,all}``.

Each benchmark is a module ``beacon_ops.benchmarks.<name>`` with
``run(device: str, quick: bool, **options) -> dict`` (``threads``: the thread counts of
``--threads``, ``llama_context``: the length of ``bench llama``'s fp32/bf16 rows, for the modules
whose ``run`` takes them); the dict holds ``rows`` (a list of flat dicts, printed as a table with
the short headers of ``columns`` when given) plus any summary figures. Everything is measured side by side in one run, with the
machine's ceilings (a matmul, a copy) measured in the same run.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import platform
import sys

from .cli import command, write_json

KINDS = ("attention", "long-context", "decode", "compaction", "llama")


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=KINDS + ("all",), help="which benchmark to run")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="small sizes (under 2 minutes on a 2-core CPU)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", default=None, metavar="DIR", help="write PNG plots (matplotlib) into DIR")
    p.add_argument("--threads", type=_thread_counts, default=None, metavar="N[,M...]",
                   help="CPU threads (torch.set_num_threads, and OMP_NUM_THREADS for child "
                        "processes); default: 1 when the machine is already busy (1-minute load "
                        "average >= CPU count: parallel regions then wait for descheduled "
                        "threads, measured 2-25x slower here), else torch's default. "
                        "bench attention measures one row set per count given (default: "
                        "torch's count and 1); the others use the first")
    p.add_argument("--llama-context", type=int, default=None, metavar="TOKENS",
                   help="bench llama: also SmolLM2 with beacons in fp32 and bf16 at this many "
                        "tokens (prefill tokens/s side by side; default 16384, 4096 with --quick)")


def _thread_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or N,M,..., got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"thread counts must be >= 1, got {text!r}")
    return counts


def busy_machine_threads() -> tuple[int | None, str]:
    """``(1, reason)`` when the 1-minute load average is at least the CPU count, else
    ``(None, "")``: on a busy machine parallel regions wait for descheduled threads (profiled
    here: 2-25x slower with 2 threads on 2 shared cores), so benchmarks run single-threaded."""
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load >= cpus:
        return 1, f"load average {load:.1f} >= {cpus} CPUs"
    return None, ""


def print_table(rows: list[dict], columns: dict[str, str] | None = None) -> None:
    """Print a list of flat dicts as an aligned text table; with ``columns`` (key -> header),
    only those keys, in that order, under those headers."""
    if not rows:
        return
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    if columns:
        cols = [k for k in columns if k in cols]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    heads = [columns.get(c, c) if columns else c for c in cols]
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(heads)]
    print("  ".join(h.rjust(w) for h, w in zip(heads, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def print_value(name: str, value) -> None:
    """Print a summary figure: a list of dicts as a table, a dict of dicts (metric -> {case:
    value}) as a table with one row per metric, anything else on one line."""
    if isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
        print(f"{name}:")
        print_table(value)
    elif (isinstance(value, dict) and value
          and all(isinstance(x, dict) and x for x in value.values())):
        print(f"{name}:")
        print_table([{"": metric, **cases} for metric, cases in value.items()])
    elif isinstance(value, dict):
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in value.items()))
    else:
        print(f"{name}: {value}")


@command("bench", "microbenchmarks against full attention (side by side, one run)")(_args)
def _bench(args: argparse.Namespace) -> int:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but no CUDA device is available")
    threads_note = "--threads" if args.threads is not None else "torch default"
    if args.threads is None and args.device == "cpu":
        args.threads, why = busy_machine_threads()
        if args.threads is not None:
            threads_note = f"1: {why}"
            print(f"bench: the machine is busy ({why}); using 1 thread (--threads N to override)")
    thread_counts = args.threads
    if isinstance(thread_counts, int):  # the busy-machine default
        thread_counts = [thread_counts]
    if thread_counts is not None:
        torch.set_num_threads(thread_counts[0])
        os.environ["OMP_NUM_THREADS"] = str(thread_counts[0])
    options = {"threads": thread_counts, "llama_context": args.llama_context}
    kinds = KINDS if args.kind == "all" else (args.kind,)
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
        mod_name = f"beacon_ops.benchmarks.{kind.replace('-', '_')}"
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name != mod_name:
                raise
            print(f"== {kind}: not implemented yet")
            continue
        print(f"== {kind} ({args.device}{', quick' if args.quick else ''})")
        params = inspect.signature(mod.run).parameters
        res = mod.run(args.device, args.quick,
                      **{k: v for k, v in options.items() if k in params and v is not None})
        print_table(res.get("rows", []), res.get("columns"))
        for k, v in res.items():
            if k in ("rows", "plots", "columns"):
                continue
            print_value(k, v)
        results[kind] = res
        if args.plot and hasattr(mod, "plot"):
            res["plots"] = mod.plot(res, args.plot)
            print("plots: " + ", ".join(res["plots"] or []))
    results["machine"]["load_average_1_5_15min_at_end"] = os.getloadavg()
    print(f"load average (1, 5, 15 min): start {results['machine']['load_average_1_5_15min_at_start']}, "
          f"end {results['machine']['load_average_1_5_15min_at_end']} on {os.cpu_count()} CPUs")
    write_json(results, args.json)
    return 0
