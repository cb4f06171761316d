"""Shared test helpers: device parametrisation (CUDA cases are skipped, visibly, without a GPU)."""
from __future__ import annotations

import os

import pytest
import torch

import beacon_ops  # noqa: F401  (registers torch.ops.beacon)

# The directory holding this copy of beacon_ops, built in place or installed: PYTHONPATH for
# subprocesses that must import the same copy.
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(beacon_ops.__file__)))

HAS_CUDA = torch.cuda.is_available()
CUDA_BUILT = beacon_ops.build_info()["cuda_compiled"]

requires_cuda = pytest.mark.skipif(
    not (HAS_CUDA and CUDA_BUILT),
    reason="needs a CUDA GPU and a build with CUDA kernels (run bench/gpu_check.sh on a GPU machine)",
)

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=requires_cuda)]


def pytest_addoption(parser):
    parser.addoption("--fuzz-long", action="store_true", default=False,
                     help="test_fuzz.py: 1000 calls per op and interface, 200 cache schedules")
