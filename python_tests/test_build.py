"""The package imports, every op is registered, build_info() matches what was built."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
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


@pytest.mark.parametrize("op", sorted(EXPECTED_OPS | {"attention_backward"}))
def test_every_op_has_a_kernel_per_compiled_backend(op):
    """CPU kernels always; CUDA kernels (the backward too) in a CUDA build, GPU or not."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has(f"beacon::{op}", "CPU")
    assert has(f"beacon::{op}", "CUDA") == beacon_ops.build_info()["cuda_compiled"]


def test_build_info_consistent():
    info = beacon_ops.build_info()
    assert info["version"] == beacon_ops.__version__
    assert info["torch"] == torch.__version__
    assert isinstance(info["cuda_compiled"], bool)
    if info["cuda_compiled"]:
        assert any(a.startswith("sm_") for a in info["cuda_archs"])
        assert all(re.fullmatch(r"(sm|compute)_[0-9]+[af]?", a) for a in info["cuda_archs"])
        assert info["cutlass"] == "" or info["cutlass"].count(".") == 2  # optional headers
    else:
        assert info["cuda_archs"] == [] and info["cutlass"] == "" and info["cuda_kernels"] == {}
        assert info["cuda_head_dims"] == [] and info["cuda_dtypes"] == []
    # The file read before loading the library says the same.
    with open(os.path.join(os.path.dirname(beacon_ops.__file__), "_build.json")) as f:
        built = json.load(f)
    for key in ("version", "torch", "cuda_compiled", "cuda_archs", "cutlass", "cuda_kernels"):
        assert built[key] == info[key], key


@pytest.mark.skipif(not beacon_ops.build_info()["cuda_compiled"], reason="a CPU-only build")
def test_build_info_lists_cuda_kernel_kinds():
    """Every CUDA kernel kind is reported; the tensor-core ones with one instance per selected
    (head dim x dtype), the generic path and the cache kernels for any head dim / dtype."""
    info = beacon_ops.build_info()
    kernels = info["cuda_kernels"]
    assert {"prefill", "decode", "attention_generic", "cache"} <= set(kernels)
    selected = {f"hdim{d}_{t}" for d in info["cuda_head_dims"] for t in info["cuda_dtypes"]}
    for kind in ("prefill", "decode"):
        assert set(kernels[kind]) == selected, kind
    assert kernels["attention_generic"] == [] and kernels["cache"] == []


CMAKE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "cmake")


@pytest.mark.skipif(shutil.which("cmake") is None and importlib.util.find_spec("cmake") is None,
                    reason="no cmake to run the build script with")
@pytest.mark.skipif(not os.path.isdir(CMAKE_DIR), reason="no source tree (cmake/) next to the tests")
def test_kernel_list_reads_kinds_from_source_names(tmp_path):
    """cmake/kernel_list.cmake: kinds from the CUDA source names (a new kind needs no edit)."""
    script = tmp_path / "list.cmake"
    script.write_text(
        f'include("{os.path.abspath(CMAKE_DIR)}/kernel_list.cmake")\n'
        "beacon_kernel_list(K a/cuda/attention_api.cu a/cuda/cache.cu a/cuda/attention_generic.cu "
        "a/cuda/instantiations/prefill_hdim128_fp16.cu a/cuda/instantiations/prefill_hdim64_bf16.cu "
        "a/cuda/instantiations/bwd_hdim64_bf16.cu)\n"
        'message("${K_JSON}")\nmessage("${K_CXX}")\n')
    cmake = ([sys.executable, "-m", "cmake"] if importlib.util.find_spec("cmake")
             else [shutil.which("cmake")])
    r = subprocess.run(cmake + ["-P", str(script)], capture_output=True, text=True, check=True)
    as_json, as_cxx = r.stderr.strip().splitlines()
    assert json.loads("{" + as_json + "}") == {
        "attention_generic": [], "bwd": ["hdim64_bf16"], "cache": [],
        "prefill": ["hdim64_bf16", "hdim128_fp16"]}
    assert as_cxx == "attention_generic=,bwd=hdim64_bf16,cache=,prefill=hdim64_bf16 hdim128_fp16"


@pytest.mark.skipif(os.environ.get("BEACON_OPS_EXPECT_CUDA") != "1",
                    reason="set BEACON_OPS_EXPECT_CUDA=1 where the CUDA kernels must be built (CI)")
def test_cuda_compiled_for_default_archs():
    info = beacon_ops.build_info()
    assert info["cuda_compiled"] is True
    # sm_80 code (A100, also runs on sm_86 / sm_89), sm_90 code (H100 / H200), PTX for newer GPUs
    assert info["cuda_archs"] == ["sm_80", "sm_90", "compute_90"]


def test_cli_info_json():
    out = subprocess.run([sys.executable, "-m", "beacon_ops", "info", "--json"],
                         capture_output=True, text=True, check=True).stdout
    info = json.loads(out)
    for key in ("version", "torch", "cuda_compiled", "cuda_archs", "cutlass", "cuda_kernels"):
        assert key in info
    assert info["cuda_compiled"] == beacon_ops.build_info()["cuda_compiled"]
    assert info["cuda_kernels"] == beacon_ops.build_info()["cuda_kernels"]
    assert EXPECTED_OPS <= set(info["ops"])


def test_cli_info_text_names_kernel_kinds():
    out = subprocess.run([sys.executable, "-m", "beacon_ops", "info"],
                         capture_output=True, text=True, check=True).stdout
    lines = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in out.splitlines())}
    kernels = beacon_ops.build_info()["cuda_kernels"]
    for kind, insts in kernels.items():
        assert (f"{kind} ({' '.join(insts)})" if insts else kind) in lines["cuda_kernels"], kind
    if not kernels:
        assert lines["cuda_kernels"] == ""


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
