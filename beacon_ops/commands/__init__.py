"""The subcommands of ``python -m beacon_ops``, one thin module each, registered in :data:`COMMANDS`.

A command module parses its options and calls the library; what it needs beyond argument
handling lives in the library (``beacon_ops.generation``, ``trainer``, ``evaluation``, ...).
To add a command: write ``commands/<name>.py`` with a ``COMMAND`` and list it here.
"""
from __future__ import annotations

from . import bench, demo, eval_passkey, eval_ppl, eval_tasks, info, plot_log, plot_passkey, train
from .common import Command, UsageError

__all__ = ["COMMANDS", "Command", "UsageError"]

COMMANDS: tuple[Command, ...] = (info.COMMAND, demo.COMMAND, eval_ppl.COMMAND, eval_passkey.COMMAND,
                                 eval_tasks.COMMAND, train.COMMAND, plot_log.COMMAND, plot_passkey.COMMAND,
                                 bench.COMMAND)
