"""pytest-benchmark suite: in-place compaction vs a plain copy of the same rows vs the official
torch.cat rebuild (``python -m pytest bench/test_bench_compaction.py``; one group per case).

Sizes: the Llama-2 layout of ``beacon_ops.benchmarks.compaction`` (8 KV heads x head_dim 128,
memory 3072, window 1024, batch 1) with 4 layers, to stay quick on a 2-core machine. Runs on one
thread (``BEACON_BENCH_THREADS`` overrides), like the CLI benchmark: on a shared machine the
timings of parallel regions are dominated by other processes' scheduling.
"""
from __future__ import annotations

import os

import pytest
import torch

from beacon_ops.benchmarks.compaction import make_case

LAYERS = 4
CASES = {"bf16-r8": (torch.bfloat16, 8), "bf16-r32": (torch.bfloat16, 32), "fp32-r8": (torch.float32, 8)}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("BEACON_BENCH_THREADS", "1")))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, one_thread):
    dtype, ratio = CASES[request.param]
    c = make_case("cpu", dtype, LAYERS, ratio)
    c.restore()
    c.compact()
    c.check()
    return request.param, c


def test_compact_inplace(benchmark, case):
    name, c = case
    benchmark.group = f"compaction {name}"
    benchmark.extra_info["moved_bytes"] = c.moved_bytes
    benchmark.pedantic(c.compact, setup=c.restore, rounds=100, iterations=1)


def test_plain_copy_same_rows(benchmark, case):
    name, c = case
    benchmark.group = f"compaction {name}"
    benchmark.extra_info["moved_bytes"] = c.moved_bytes
    benchmark.pedantic(c.plain_copy, rounds=100, iterations=1)


def test_cat_rebuild(benchmark, case):
    name, c = case
    benchmark.group = f"compaction {name}"
    benchmark.pedantic(c.cat_rebuild, rounds=5, iterations=1)
