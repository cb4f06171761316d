"""`make bench-amx`'s probe (bench/amx_tiles.cpp): it compiles against the kernel headers with the
system C++ compiler, runs, and prints every rate as a positive number; on a CPU without AMX (or
with BEACON_OPS_CPU_ISA capping it) it says so and exits 0."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Path:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler ({cxx})")
    exe = tmp_path_factory.mktemp("amx") / "amx_tiles"
    subprocess.run([cxx, "-O2", "-std=c++17", f"-I{ROOT / 'csrc'}", str(ROOT / "bench" / "amx_tiles.cpp"),
                    "-o", str(exe)], check=True, timeout=300)
    return exe


def run(exe: Path, isa: str | None) -> str:
    env = dict(os.environ)
    env.pop("BEACON_OPS_CPU_ISA", None)
    if isa:
        env["BEACON_OPS_CPU_ISA"] = isa
    res = subprocess.run([str(exe), "1"], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res
    return res.stdout


def test_probe_without_tiles_says_so(probe):
    assert "no AMX-BF16 tiles" in run(probe, "avx512")


def test_probe_prints_positive_rates(probe):
    out = run(probe, None)
    if "no AMX-BF16 tiles" in out:
        pytest.skip("this CPU has no AMX-BF16 tiles")
    names = ["tdpbf16ps alone", "tileloadd (1 KB", "16 B off lines", "2x2 block step", "gemm QK^T", "gemm P V"]
    for name in names:
        line = next(l for l in out.splitlines() if name in l)
        value = float(re.search(r"\s(\d+(?:\.\d+)?) (?:ns|GFLOP/s)", line).group(1))
        assert value > 0, line
