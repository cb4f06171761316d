"""Data-parallel helpers over ``torch.distributed`` for the trainer (one process per device).

Launch with ``torchrun``: :func:`init_from_env` reads its environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, the rendezvous) and joins the process group: gloo on the CPU, NCCL on the GPU.
Without ``torchrun`` (or with a world of one) nothing is initialised and every helper is the
identity, so a single process runs exactly the code it ran before.

The trainer does not wrap the model in ``DistributedDataParallel``: the model runs a sample
window by window through its own ``step`` (a training cache threaded between windows,
checkpointed per window), so one sample is many forwards of the same modules and a rank may hold
no sample of a step at all. Gradients are therefore accumulated locally over a rank's samples and
summed across ranks with one all-reduce of the flattened trainable gradients per optimizer step,
which is what DDP with ``no_sync`` on every micro-batch but the last computes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

__all__ = ["Distributed", "init_from_env", "launched_by_torchrun"]


def launched_by_torchrun() -> bool:
    """True when this process is one of several started by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass(frozen=True)
class Distributed:
    """This process's place in the process group (``rank`` 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> "Distributed":
        """The initialised default process group, or a single process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> list[int]:
        """This rank's offsets among ``n`` samples (round robin: rank, rank + world, ...)."""
        return list(range(self.rank, n, self.world_size))

    def all_gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (``[obj]`` for one process)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def sum_grads(self, params: Sequence[torch.Tensor]) -> None:
        """Sum the gradients of ``params`` over all ranks in place (a missing one counts as 0)."""
        if not self.active:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite ``tensors`` with rank 0's values."""
        if self.active:
            with torch.no_grad():
                for t in tensors:
                    dist.broadcast(t.data, 0)

    def any(self, flag: bool, device: torch.device | str = "cpu") -> bool:
        """True when ``flag`` is true on any rank (all ranks must call it)."""
        if not self.active:
            return flag
        t = torch.tensor([int(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group (after the last collective)."""
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def init_from_env(device: str) -> tuple[Distributed, str]:
    """Join the ``torchrun`` process group when launched by it; returns it and the device to use.

    ``device`` ``"cpu"`` uses gloo; ``"cuda"`` uses NCCL with this process on GPU ``LOCAL_RANK``
    (an explicit ``cuda:N`` is kept, for one process per node).
    """
    if not launched_by_torchrun():
        return Distributed(), device
    if not dist.is_available():
        raise RuntimeError("torchrun started several processes, but this PyTorch has no torch.distributed")
    cuda = device.startswith("cuda")
    if cuda and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if cuda:
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Distributed.current(), device
