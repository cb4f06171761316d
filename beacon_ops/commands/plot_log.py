"""``python -m beacon_ops plot-log LOG --out PNG``: the loss curve of a ``train --log-file`` log.

Works on a log that is still being written (a run in progress) and on the log of a run resumed
across sessions (a repeated step counts once, its last record)."""
from __future__ import annotations

import argparse

from ..training_plot import plot_training_log, read_training_log, summarize_training_log
from .common import Command, UsageError, check_png_output, existing_path, int_at_least, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("log", type=existing_path, metavar="LOG", help="the JSON lines of train --log-file")
    p.add_argument("--out", required=True, metavar="PNG", help="the picture to write")
    p.add_argument("--smooth", type=int_at_least(1), default=10, metavar="N",
                   help="the line is the mean loss of N steps (default %(default)s)")
    p.add_argument("--title", default="", help="a line above the plot")
    p.add_argument("--json", default=None, metavar="PATH", help="write the summary as JSON")


def run(args: argparse.Namespace) -> int:
    check_png_output(args.out, "plot-log")
    try:
        records = read_training_log(args.log)
    except (ValueError, UnicodeDecodeError, IsADirectoryError) as e:
        raise UsageError("LOG", str(e)) from None
    plot_training_log(records, args.out, smooth=args.smooth, title=args.title)
    s = summarize_training_log(records)
    print(f"{args.out}: steps {s['first_step']}-{s['last_step']} ({s['steps']} logged), {s['tokens']:,} tokens, "
          f"{s['hours']:.2f} h of step time; mean loss {s['loss_first']:.4f} over the first tenth, "
          f"{s['loss_last']:.4f} over the last")
    write_json(s, args.json)
    return 0


COMMAND = Command("plot-log", "draw the loss curve of a train --log-file log as a PNG", add_arguments, run)
