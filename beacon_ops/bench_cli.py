"""``python -m beacon_ops bench {attention,decode,compaction,llama,all}``.

Each benchmark is a module ``beacon_ops.benchmarks.<name>`` with
``run(device: str, quick: bool) -> dict``; the dict holds ``rows`` (a list of flat dicts, printed
as a table) plus any summary figures. Everything is measured side by side in one run, with the
machine's ceilings (a matmul, a copy) measured in the same run.
"""
from __future__ import annotations

import argparse
import importlib
import platform

from .cli import command, write_json

KINDS = ("attention", "decode", "compaction", "llama")


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=KINDS + ("all",), help="which benchmark to run")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="small sizes (under 2 minutes on a 2-core CPU)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", default=None, metavar="DIR", help="write PNG plots (matplotlib) into DIR")


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
    kinds = KINDS if args.kind == "all" else (args.kind,)
    results = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        },
        "quick": args.quick,
    }
    for kind in kinds:
        try:
            mod = importlib.import_module(f"beacon_ops.benchmarks.{kind}")
        except ModuleNotFoundError as e:
            if e.name != f"beacon_ops.benchmarks.{kind}":
                raise
            print(f"== {kind}: not implemented yet")
            continue
        print(f"== {kind} ({args.device}{', quick' if args.quick else ''})")
        res = mod.run(args.device, args.quick)
        print_table(res.get("rows", []))
        for k, v in res.items():
            if k not in ("rows", "plots"):
                print(f"{k}: {v}")
        results[kind] = res
        if args.plot and hasattr(mod, "plot"):
            mod.plot(res, args.plot)
    write_json(results, args.json)
    return 0
