"""``python -m beacon_ops``: the command line.

Subcommands register themselves in ``COMMANDS`` (name -> (help, add_arguments, run)); each has
``--help``; machine-readable output goes to ``--json PATH``.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {}


def command(name: str, help: str):
    """Register ``run(args) -> int`` as subcommand ``name``; ``add_arguments`` via ``.args``."""

    def wrap(add_arguments: Callable[[argparse.ArgumentParser], None]):
        def register(run: Callable[[argparse.Namespace], int]):
            COMMANDS[name] = (help, add_arguments, run)
            return run

        return register

    return wrap


def write_json(obj: Any, dest: str | None) -> None:
    """Write ``obj`` as JSON to ``dest`` ('-' = stdout); nothing when ``dest`` is None."""
    if dest is None:
        return
    text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    if dest == "-":
        print(text)
    else:
        with open(dest, "w") as f:
            f.write(text + "\n")


def registered_ops() -> list[str]:
    """Names of the ops registered under ``torch.ops.beacon`` (e.g. ``'attention'``)."""
    import torch

    names = torch._C._dispatch_get_all_op_names()
    return sorted(n.split("::", 1)[1].split(".")[0] for n in names if n.startswith("beacon::"))


# --- info ------------------------------------------------------------------------------------
def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write the build info as JSON to PATH (stdout when PATH is omitted)")


@command("info", "show what this build of beacon_ops contains")(_info_args)
def _info(args: argparse.Namespace) -> int:
    import torch

    import beacon_ops

    info = beacon_ops.build_info()
    info["torch_runtime"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    info["ops"] = registered_ops()
    if args.json == "-":
        write_json(info, "-")
        return 0
    for k in ("version", "torch", "torch_runtime", "cuda_compiled", "cuda_archs", "cutlass",
              "cuda_head_dims", "cuda_dtypes", "cuda_available", "cpu_isa_detected", "cpu_isa",
              "ops"):
        v = info.get(k)
        print(f"{k:>16}: {', '.join(map(str, v)) if isinstance(v, list) else v}")
    write_json(info, args.json)
    return 0


def _load_optional_commands() -> None:
    # Later subcommands (bench, demo, eval-ppl, train) live in their own modules.
    import importlib

    for mod in ("beacon_ops.bench_cli", "beacon_ops.demo", "beacon_ops.train"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def main(argv: list[str] | None = None) -> int:
    _load_optional_commands()
    parser = argparse.ArgumentParser(prog="python -m beacon_ops", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, add_arguments, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        add_arguments(p)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return COMMANDS[args.command][2](args)


if __name__ == "__main__":
    sys.exit(main())
