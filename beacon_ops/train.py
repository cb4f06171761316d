"""Old import path of the trainer, kept for one release: use :mod:`beacon_ops.trainer` (the
library) and ``python -m beacon_ops train`` (:mod:`beacon_ops.commands.train`)."""
from __future__ import annotations

from .adapter import load_beacon_adapter, save_beacon_adapter
from .trainer import StepLog, TextSampler, TrainConfig, Trainer, default_texts, lr_factor

__all__ = ["TrainConfig", "TextSampler", "Trainer", "StepLog", "default_texts", "load_beacon_adapter",
           "save_beacon_adapter", "lr_factor"]
