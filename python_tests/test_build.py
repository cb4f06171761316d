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


# Kernels that prefetch by software (template instances, by name). Each compiled instance
# must hold a prefetch instruction: GCC 12 once deleted every call of an out-of-line prefetch
# helper (it found the helper free of side effects), silently, and decode_linear's kernels ran
# without their prefetches for many commits.
PREFETCHING_KERNELS = (
    "(anonymous namespace)::rows_bf16<",  # decode_linear.cpp
    *(f"beacon::cpu::attn::{k}<" for k in (
        "small_qk_rows_avx2", "small_pv_rows_avx2", "decode_qk_f32_rows", "decode_qk_bf16_rows",
        "decode_pv_rows", "decode_pv_pairs_rows", "decode_qk_amx_tiles", "decode_pv_qk_amx_tiles")),
    "beacon::rows::rotate_rows_avx2<", "beacon::rows::avx512::rotate_rows_avx512<")


def function_prefetches(library: str) -> dict[str, int]:
    """Prefetch instructions in each function of ``library``'s disassembly (objdump -d -C)."""
    dis = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", library], capture_output=True,
                         text=True, check=True).stdout
    counts: dict[str, int] = {}
    name = None
    for line in dis.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            name = head.group(1)
            counts.setdefault(name, 0)
        elif name is not None and re.search(r"\sprefetch", line):
            counts[name] += 1
    return counts


@pytest.mark.skipif(shutil.which("objdump") is None or os.uname().machine != "x86_64",
                    reason="needs objdump and an x86-64 build")
def test_prefetching_kernels_keep_their_prefetches():
    counts = function_prefetches(beacon_ops._C.__file__)
    if not any("beacon::" in name for name in counts):
        pytest.skip("the library's symbols are stripped")
    for prefix in PREFETCHING_KERNELS:
        found = {name: n for name, n in counts.items() if prefix in name}
        assert found, f"no function {prefix}...> in the library"
        assert all(found.values()), f"instances without a prefetch: {[k for k, v in found.items() if not v]}"


SOURCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
CMAKE_DIR = os.path.join(SOURCE_DIR, "cmake")
INST_DIR = os.path.join(SOURCE_DIR, "csrc", "cuda", "instantiations")
HAVE_SOURCES = pytest.mark.skipif(not os.path.isdir(INST_DIR), reason="no source tree next to the tests")
HAVE_CMAKE = pytest.mark.skipif(shutil.which("cmake") is None and importlib.util.find_spec("cmake") is None,
                                reason="no cmake to run the build script with")


def instantiation_kinds() -> set[str]:
    """The tensor-core kernel kinds of the source tree (instantiations/<kind>_hdim<d>_<dtype>.cu)."""
    return {m.group(1) for f in os.listdir(INST_DIR) if (m := re.fullmatch(r"(.+)_hdim\d+_\w+\.cu", f))}


@pytest.mark.skipif(not beacon_ops.build_info()["cuda_compiled"], reason="a CPU-only build")
@HAVE_SOURCES
def test_build_info_lists_cuda_kernel_kinds():
    """Every CUDA kernel kind is reported: the generic path and the cache kernels for any head
    dim / dtype, and each tensor-core kind built (BEACON_OPS_KERNELS) with one instance per
    selected (head dim x dtype)."""
    info = beacon_ops.build_info()
    kernels = info["cuda_kernels"]
    assert {"attention_generic", "cache"} <= set(kernels)
    assert kernels["attention_generic"] == [] and kernels["cache"] == []
    instantiated = {kind for kind, insts in kernels.items() if insts}
    assert instantiated <= instantiation_kinds()
    selected = {f"hdim{d}_{t}" for d in info["cuda_head_dims"] for t in info["cuda_dtypes"]}
    for kind in instantiated:
        assert set(kernels[kind]) == selected, kind


def run_cmake_script(tmp_path, body: str, check: bool = True) -> subprocess.CompletedProcess:
    """Runs `body` with cmake -P after including cmake/kernel_list.cmake."""
    script = tmp_path / "script.cmake"
    script.write_text(f'include("{os.path.abspath(CMAKE_DIR)}/kernel_list.cmake")\n{body}')
    cmake = ([sys.executable, "-m", "cmake"] if importlib.util.find_spec("cmake")
             else [shutil.which("cmake")])
    return subprocess.run(cmake + ["-P", str(script)], capture_output=True, text=True, check=check)


@HAVE_CMAKE
@HAVE_SOURCES
def test_kernel_list_reads_kinds_from_source_names(tmp_path):
    """cmake/kernel_list.cmake: kinds from the CUDA source names (a new kind needs no edit)."""
    r = run_cmake_script(
        tmp_path,
        "beacon_kernel_list(K a/cuda/attention_api.cu a/cuda/cache.cu a/cuda/attention_generic.cu "
        "a/cuda/instantiations/prefill_hdim128_fp16.cu a/cuda/instantiations/prefill_hdim64_bf16.cu "
        "a/cuda/instantiations/bwd_hdim64_bf16.cu)\n"
        'message("${K_JSON}")\nmessage("${K_CXX}")\n')
    as_json, as_cxx = r.stderr.strip().splitlines()
    assert json.loads("{" + as_json + "}") == {
        "attention_generic": [], "bwd": ["hdim64_bf16"], "cache": [],
        "prefill": ["hdim64_bf16", "hdim128_fp16"]}
    assert as_cxx == "attention_generic=,bwd=hdim64_bf16,cache=,prefill=hdim64_bf16 hdim128_fp16"


@HAVE_CMAKE
@HAVE_SOURCES
def test_built_flags_follow_selected_kinds(tmp_path):
    """beacon_instantiations: the sources and BEACON_BUILT_<KIND>_HDIM<d>_<dtype> flags of the
    selected kinds x head dims x dtypes (those with a source file), nothing else; a kind that
    has no instantiation is refused, naming BEACON_OPS_KERNELS."""
    inst = tmp_path / "inst"
    inst.mkdir()
    for name in ("prefill_hdim64_bf16", "prefill_hdim128_bf16", "decode_hdim64_bf16", "bwd_hdim64_bf16",
                 "bwd_hdim64_fp16", "bwd_hdim128_fp16"):
        (inst / f"{name}.cu").write_text("")
    show = 'message("|${I_DEFS}|${I_SOURCES}|${I_ALL_KINDS}|")\n'

    def select(kinds, head_dims="64", dtypes="bf16 fp16"):
        r = run_cmake_script(
            tmp_path, f'beacon_instantiations(I "{inst}" KINDS {kinds} HEADDIMS {head_dims} DTYPES {dtypes})\n{show}')
        _, defs, sources, all_kinds, _ = r.stderr.strip().split("|")
        assert all_kinds == "bwd;decode;prefill"
        names = [os.path.basename(s)[:-3] for s in sources.split(";") if s]
        return [d for d in defs.split(";") if d], names

    defs, names = select("bwd decode")
    assert defs == ["BEACON_BUILT_BWD_HDIM64_bf16=1", "BEACON_BUILT_BWD_HDIM64_fp16=1",
                    "BEACON_BUILT_DECODE_HDIM64_bf16=1"]
    assert names == ["bwd_hdim64_bf16", "bwd_hdim64_fp16", "decode_hdim64_bf16"]
    defs, names = select("prefill", head_dims="64 128", dtypes="bf16")
    assert defs == ["BEACON_BUILT_PREFILL_HDIM64_bf16=1", "BEACON_BUILT_PREFILL_HDIM128_bf16=1"]
    assert names == ["prefill_hdim64_bf16", "prefill_hdim128_bf16"]
    assert select("") == ([], [])

    r = run_cmake_script(tmp_path, f'beacon_instantiations(I "{inst}" KINDS prefill fwd HEADDIMS 64 DTYPES bf16)\n',
                         check=False)
    assert r.returncode != 0
    assert "BEACON_OPS_KERNELS" in r.stderr and "'fwd'" in r.stderr and "bwd, decode, prefill" in r.stderr


@HAVE_CMAKE
@HAVE_SOURCES
def test_every_instantiation_has_a_dispatch_flag(tmp_path):
    """Each flag CMake can define for the source tree is one csrc/cuda/static_switch.h reads, and
    it reads no other: a kind or instance added on one side only would never be called."""
    kinds = " ".join(sorted(instantiation_kinds()))
    r = run_cmake_script(tmp_path, f'beacon_instantiations(I "{os.path.abspath(INST_DIR)}" KINDS {kinds} '
                                   'HEADDIMS 64 128 256 DTYPES bf16 fp16 fp32)\nmessage("${I_DEFS}")\n')
    flags = {d.removesuffix("=1") for d in r.stderr.strip().split(";")}
    assert len(flags) == len(os.listdir(INST_DIR))
    with open(os.path.join(SOURCE_DIR, "csrc", "cuda", "static_switch.h")) as f:
        read = set(re.findall(r"^#if (BEACON_BUILT_\w+)$", f.read(), re.M))
    assert flags == read


def _emulation():
    from beacon_ops import cuda_emu

    return cuda_emu if cuda_emu.available() else None


@pytest.mark.skipif(_emulation() is None, reason="the CUDA host emulation is not built")
@HAVE_SOURCES
def test_kernel_kinds_not_built_raise_a_clear_error():
    """The emulation module (the CUDA ops built from the same sources and BEACON_BUILT_* flags)
    reports every kind of the sources; it runs each (kind, head dim, dtype) it reports built and
    refuses every other with a ValueError naming the kind, head dim, dtype and the setting."""
    from test_attention_backward import Case, Seq, make_inputs, op_kwargs

    emu = _emulation()
    built = emu.load().built_kernels()
    assert set(built) == instantiation_kinds()
    ops = emu.ops()
    emu.set_schedule("forward")
    for dim in (64, 128):
        for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
            for kind, n_q in (("prefill", 3), ("decode", 1), ("bwd", 3)):
                case = Case([Seq(mem=2, raw=5, beacon=0, ratio=2, n_q=n_q)], dim=dim)
                inputs, lengths = make_inputs(case, dtype)
                kw = op_kwargs(case)
                args = (kw["max_seqlen_q"], kw["mode"], kw["attend_previous"], kw["softmax_scale"])

                def call():
                    if kind != "bwd":
                        return ops.attention(*inputs, *lengths, *args)
                    out = torch.zeros_like(inputs[0])
                    lse = torch.zeros(out.shape[:2])
                    return ops.attention_backward(torch.ones_like(out), *inputs, out, lse, *lengths, *args)

                if f"hdim{dim}_{name}" in built[kind]:
                    assert all(torch.isfinite(t).all() for t in call()), (kind, dim, name)
                else:
                    with pytest.raises(ValueError, match=f"no CUDA {kind} kernel for head_dim {dim} and dtype "
                                                         f"{name} .*BEACON_OPS_KERNELS"):
                        call()


@pytest.mark.skipif(os.environ.get("BEACON_OPS_EXPECT_CUDA") != "1",
                    reason="set BEACON_OPS_EXPECT_CUDA=1 where the CUDA kernels must be built (CI)")
def test_cuda_compiled_for_default_archs():
    info = beacon_ops.build_info()
    assert info["cuda_compiled"] is True
    # sm_80 code (A100, also runs on sm_86 / sm_89), sm_90 code (H100 / H200), PTX for newer GPUs
    assert info["cuda_archs"] == ["sm_80", "sm_90", "compute_90"]
    if os.path.isdir(INST_DIR):  # and every tensor-core kernel kind (BEACON_OPS_KERNELS' default)
        assert {kind for kind, insts in info["cuda_kernels"].items() if insts} == instantiation_kinds()


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
