"""What the pytest-benchmark suites share (``pytest bench/ --benchmark-only``): the device
parameter, the busy-machine thread rule of ``python -m beacon_ops bench``, and a GPU
synchronisation inside each timed call."""
from __future__ import annotations

from typing import Callable

import pytest
import torch

from beacon_ops.benchmarks.common import busy_machine_threads


@pytest.fixture(scope="module", params=[
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="CUDA device not available")),
])
def device(request) -> str:
    """Every suite runs on the CPU and, where there is one, the GPU."""
    return request.param


@pytest.fixture(scope="module")
def busy_machine_thread_count():
    """One thread on a busy machine, as ``python -m beacon_ops bench`` does (a suite opts in
    with ``pytestmark = pytest.mark.usefixtures("busy_machine_thread_count")``)."""
    threads, _ = busy_machine_threads()
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    yield threads
    torch.set_num_threads(before)


@pytest.fixture
def synced(device: str) -> Callable[[Callable], Callable]:
    """``synced(fn)``: ``fn`` followed by a CUDA synchronisation, so a timed call includes its
    kernels rather than only their launch."""
    def wrap(fn: Callable) -> Callable:
        def run(*args):
            out = fn(*args)
            if device == "cuda":
                torch.cuda.synchronize()
            return out
        return run
    return wrap
