"""`make bench-peak`'s probe (bench/fma_peak.cpp): it compiles with the system C++ compiler and
prints one core's fp32 FMA rate, and the 512-bit FMA and bf16 dot-product rates where the CPU
has them, each as a positive GFLOP/s figure on a line of its own."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_peak_probe_prints_positive_rates(tmp_path):
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx})")
    exe = tmp_path / "fma_peak"
    subprocess.run([cxx, "-O2", "-std=c++17", str(ROOT / "bench" / "fma_peak.cpp"), "-o", str(exe)],
                   check=True, timeout=300)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300, check=True).stdout
    if "nothing to measure" in out:
        pytest.skip("this CPU has no AVX2 + FMA")
    rates = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(.*): (\d+(?:\.\d+)?) GFLOP/s$", out, re.M)}
    assert "fp32 FMA, 256-bit" in rates and all(v > 0 for v in rates.values()), out
    assert len(rates) == len(out.strip().splitlines()), out  # every line is a rate
