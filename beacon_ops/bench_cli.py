"""``python -m beacon_ops bench {attention,decode,compaction,llama,all}``.

Each benchmark is a module ``beacon_ops.benchmarks.<name>`` with
``run(device: str, quick: bool) -> dict``; the dict holds ``rows`` (a list of flat dicts, printed
as a table) plus any summary figures. Everything is measured side by side in one run, with the
machine's ceilings (a matmul, a copy) measured in the same run.
"""
from __future__ import annotations

import argparse
import importlib
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
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads (torch.set_num_threads, and OMP_NUM_THREADS for child "
                        "processes); default: 1 when the machine is already busy (1-minute load "
                        "average >= CPU count: parallel regions then wait for descheduled "
                        "threads, measured 2-25x slower here), else torch's default")


def busy_machine_threads() -> tuple[int | None, str]:
    """``(1, reason)`` when the 1-minute load average is at least the CPU count, else
    ``(None, "")``: on a busy machine parallel regions wait for descheduled threads (profiled
    here: 2-25x slower with 2 threads on 2 shared cores), so benchmarks run single-threaded."""
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load >= cpus:
        return 1, f"load average {load:.1f} >= {cpus} CPUs"
    return None, ""


def print_table(rows: list[dict]) -> None:
    """Print a list of flat dicts as an aligned text table."""
    if not rows:
        return
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


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
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"bench: --threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
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
        res = mod.run(args.device, args.quick)
        print_table(res.get("rows", []))
        for k, v in res.items():
            if k in ("rows", "plots"):
                continue
            if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                print(f"{k}:")
                print_table(v)
            else:
                print(f"{k}: {v}")
        results[kind] = res
        if args.plot and hasattr(mod, "plot"):
            res["plots"] = mod.plot(res, args.plot)
            print("plots: " + ", ".join(res["plots"] or []))
    results["machine"]["load_average_1_5_15min_at_end"] = os.getloadavg()
    print(f"load average (1, 5, 15 min): start {results['machine']['load_average_1_5_15min_at_start']}, "
          f"end {results['machine']['load_average_1_5_15min_at_end']} on {os.cpu_count()} CPUs")
    write_json(results, args.json)
    return 0
