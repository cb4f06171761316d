"""``python -m beacon_ops``: Activation Beacon from the command line.

Subcommands are listed in :data:`beacon_ops.commands.COMMANDS`; each has ``--help``;
machine-readable output goes to ``--json PATH``. A command-line mistake prints one line on
stderr naming the flag and what it accepts, and exits with status 2; any other failure prints
one line and exits with status 1. ``--debug`` (or ``BEACON_OPS_DEBUG=1``) shows the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from .commands import COMMANDS, UsageError

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``PROG: error: MESSAGE`` on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand."""
    parser = _Parser(prog="python -m beacon_ops", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks of errors")
        cmd.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("BEACON_OPS_DEBUG", "") not in ("", "0")
    prog = f"{parser.prog} {args.command}"
    run = {c.name: c.run for c in COMMANDS}[args.command]
    try:
        return run(args)
    except UsageError as e:
        if debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001  (one line instead of a traceback; --debug shows it)
        if debug:
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"{prog}: error: {msg} ({type(e).__name__}; --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
