"""One process of the multi-process training tests (``torchrun ... distributed_worker.py``).

``make_trainer`` builds the same small run in every process and in the test itself, so that a
run over several processes can be compared with a single-process one.

Usage: ``distributed_worker.py OUT [--resume PATH] [--save-at STEP PATH]``: trains to
``STEPS`` (resuming from PATH), saving at STEP and at the end.
"""
from __future__ import annotations

import argparse

import torch

from beacon_ops.distributed import Distributed, init_from_env
from beacon_ops.trainer import TextSampler, TrainConfig, Trainer
from llama_helpers import tiny_model

STEPS, BATCH = 3, 3   # a batch of 3 over 2 processes: uneven shares (2 + 1)


def make_trainer(dist: Distributed | None = None) -> Trainer:
    g = torch.Generator().manual_seed(5)
    docs = [torch.randint(0, 101, (400,), generator=g).tolist() for _ in range(4)]
    cfg = TrainConfig(steps=STEPS, lr=1e-2, warmup=1, ratios=(2, 4, 8), checkpoint=None, batch_size=BATCH)
    return Trainer(tiny_model(seed=0, window=16), cfg, TextSampler(docs, 24, 70, seed=1), dist=dist)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--resume")
    p.add_argument("--save-at", nargs=2, default=None)
    args = p.parse_args()
    dist, _ = init_from_env("cpu")
    tr = make_trainer(dist)
    if args.resume:
        tr.resume(args.resume)
    while tr.step < STEPS:
        tr.train_step()
        if args.save_at and tr.step == int(args.save_at[0]):
            tr.save(args.save_at[1])
    tr.save(args.out)
    dist.close()


if __name__ == "__main__":
    main()
