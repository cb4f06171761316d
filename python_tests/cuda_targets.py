"""Where test_cuda.py's cases run.

- ``cuda``: a CUDA GPU and a build with the CUDA kernels (skipped, visibly, without them);
- with ``BEACON_CUDA_EMU=1`` (``make test-cuda-emu``) instead: the host emulation of the same
  kernels (``beacon_ops.cuda_emu``, CPU tensors), once per schedule of
  ``BEACON_CUDA_EMU_SCHEDULES`` (default ``reverse,random``; the random order is seeded from
  the test's id, so a failure reproduces). The reverse schedule sizes grids for 16
  multiprocessors (several decode splits), the others for 1 (grid-stride loops, few blocks).
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import pytest
import torch

from conftest import requires_cuda

EMULATED = os.environ.get("BEACON_CUDA_EMU", "") == "1"


@dataclass(frozen=True)
class Target:
    name: str
    device: str             # where the op's tensors live
    schedule: str | None    # None: a real GPU
    sm_count: int = 16

    @property
    def emulated(self) -> bool:
        return self.schedule is not None

    def ops(self):
        """The op namespace to call: torch.ops.beacon, or its emulated twin."""
        if not self.emulated:
            return torch.ops.beacon
        from beacon_ops import cuda_emu

        return cuda_emu.ops()

    def activate(self, test_id: str) -> None:
        if self.emulated:
            from beacon_ops import cuda_emu

            cuda_emu.set_schedule(self.schedule, seed=zlib.crc32(test_id.encode()), sm_count=self.sm_count)


def cuda_targets() -> list:
    """pytest params for test_cuda.py's target fixture."""
    if not EMULATED:
        return [pytest.param(Target("cuda", "cuda", None), id="cuda", marks=requires_cuda)]
    names = os.environ.get("BEACON_CUDA_EMU_SCHEDULES", "reverse,random").split(",")
    return [pytest.param(Target(f"emu-{s}", "cpu", s, 16 if s == "reverse" else 1), id=f"emu-{s}")
            for s in names if s]
