"""The package imports, every op is registered, build_info() matches what was built."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import beacon_ops
from beacon_ops.commands.info import registered_ops

EXPECTED_OPS = {"attention", "rope_", "append_kv", "compact_"}


def test_all_ops_registered():
    assert EXPECTED_OPS <= set(registered_ops())
    for name in EXPECTED_OPS:
        assert isinstance(getattr(torch.ops.beacon, name), torch._ops.OpOverloadPacket)


def test_build_info_consistent():
    info = beacon_ops.build_info()
    assert info["version"] == beacon_ops.__version__
    assert info["torch"] == torch.__version__
    assert isinstance(info["cuda_compiled"], bool)
    if info["cuda_compiled"]:
        assert info["cuda_archs"] and all(a.startswith("sm_") for a in info["cuda_archs"])
        assert info["cutlass"].count(".") == 2
    else:
        assert info["cuda_archs"] == [] and info["cutlass"] == ""
    # The file read before loading the library says the same.
    with open(os.path.join(os.path.dirname(beacon_ops.__file__), "_build.json")) as f:
        built = json.load(f)
    for key in ("version", "torch", "cuda_compiled", "cuda_archs", "cutlass"):
        assert built[key] == info[key], key


@pytest.mark.skipif(os.environ.get("BEACON_OPS_EXPECT_CUDA") != "1",
                    reason="set BEACON_OPS_EXPECT_CUDA=1 where the CUDA kernels must be built (CI)")
def test_cuda_compiled_for_default_archs():
    info = beacon_ops.build_info()
    assert info["cuda_compiled"] is True
    assert {"sm_80", "sm_90a"} <= set(info["cuda_archs"])


def test_cli_info_json():
    out = subprocess.run([sys.executable, "-m", "beacon_ops", "info", "--json"],
                         capture_output=True, text=True, check=True).stdout
    info = json.loads(out)
    for key in ("version", "torch", "cuda_compiled", "cuda_archs", "cutlass"):
        assert key in info
    assert info["cuda_compiled"] == beacon_ops.build_info()["cuda_compiled"]
    assert EXPECTED_OPS <= set(info["ops"])


def test_cli_help_for_every_command():
    from beacon_ops.commands import COMMANDS

    for name in (c.name for c in COMMANDS):
        r = subprocess.run([sys.executable, "-m", "beacon_ops", name, "--help"],
                           capture_output=True, text=True)
        assert r.returncode == 0 and "usage" in r.stdout, name


def test_torch_mismatch_gives_rebuild_error(tmp_path):
    """A build for another torch is refused at import with a message that says to rebuild."""
    import shutil

    pkg = tmp_path / "beacon_ops"
    shutil.copytree(os.path.dirname(beacon_ops.__file__), pkg,
                    ignore=shutil.ignore_patterns("__pycache__"))
    built = json.loads((pkg / "_build.json").read_text())
    built["torch"] = "0.0.1"
    (pkg / "_build.json").write_text(json.dumps(built))
    r = subprocess.run([sys.executable, "-c", "import beacon_ops"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode != 0
    assert "rebuild" in r.stderr and "0.0.1" in r.stderr
