"""``python -m beacon_ops plot-passkey JSON... --out PNG``: one table and heatmap from several
``eval-passkey --json`` runs.

Long grids are often run a length (or an adapter) at a time; this puts them side by side.
``--names`` renames the beacon results (one name for all files, or one a file), so that two
adapters become two panels of one picture."""
from __future__ import annotations

import argparse
import dataclasses

from ..evaluation import accuracy_table, plot_passkey_heatmap, read_passkey_results
from .common import Command, UsageError, check_png_output, existing_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", type=existing_path, nargs="+", metavar="JSON",
                   help="files written by eval-passkey --json")
    p.add_argument("--out", required=True, metavar="PNG", help="the heatmap to write")
    p.add_argument("--names", default=None, metavar="A,B,...",
                   help="a name for the beacon results, one for all files or one a file (default: keep 'beacon')")
    p.add_argument("--title", default="", help="a line above the plot")


def run(args: argparse.Namespace) -> int:
    check_png_output(args.out, "plot-passkey")
    names = args.names.split(",") if args.names is not None else [None]
    if len(names) == 1:
        names *= len(args.files)
    if len(names) != len(args.files) or not all(n is None or n.strip() for n in names):
        raise UsageError("--names", f"needs one non-empty name, or one for each of the {len(args.files)} "
                         f"files, got {args.names!r}")
    results, source = [], {}
    for i, (path, name) in enumerate(zip(args.files, names)):
        try:
            rows = read_passkey_results(path)
        except (ValueError, UnicodeDecodeError, IsADirectoryError) as e:
            raise UsageError("JSON", str(e)) from None
        for r in rows:
            if name is not None and r.method == "beacon":
                r = dataclasses.replace(r, method=name.strip())
            cell = (r.method, r.length, r.depth, r.key)
            if cell in source and source[cell][0] != i:
                raise UsageError("JSON", f"{path} and {source[cell][1]} both answer key {r.key} at length "
                                 f"{r.length}, depth {r.depth:g} for '{r.method}' (--names tells runs apart)")
            source[cell] = (i, path)
            results.append(r)
    if not results:
        raise UsageError("JSON", "the files hold no results")
    print(accuracy_table(results))
    print(f"heatmap: {plot_passkey_heatmap(results, args.out, args.title)}")
    return 0


COMMAND = Command("plot-passkey", "one accuracy table and heatmap from several eval-passkey --json runs",
                  add_arguments, run)
