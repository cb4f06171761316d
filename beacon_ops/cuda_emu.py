"""The CUDA ops on the host emulation of the CUDA kernels (csrc/cuda/emu).

A build with ``BEACON_OPS_CUDA_EMU=ON`` (``make test-cuda-emu``) adds the extension module
``beacon_ops._cuda_emu``: the CUDA ops' host code and kernels compiled by the host C++
compiler, each CUDA thread a fiber, with checks for barrier divergence, deadlocks and
shared-/global-memory races. Its ops take CPU tensors and are registered as
``torch.ops.beacon_cuda_emu.<op>`` with the schemas of ``torch.ops.beacon.<op>``, so they never
replace the CPU kernels. For tests of the CUDA kernels on machines without a GPU; it is slow.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch

import beacon_ops  # noqa: F401  (registers torch.ops.beacon, whose schemas are copied)

NAMESPACE = "beacon_cuda_emu"
OPS = ("attention", "attention_backward", "rope_", "append_kv", "compact_")
SCHEDULES = ("forward", "reverse", "random")

_module: ModuleType | None = None
_library: torch.library.Library | None = None


def available() -> bool:
    """Whether this build contains the emulation module."""
    try:
        load()
    except ImportError:
        return False
    return True


def load() -> ModuleType:
    """Loads ``beacon_ops._cuda_emu`` once and defines ``torch.ops.beacon_cuda_emu``.

    Raises ImportError when the package was built without ``BEACON_OPS_CUDA_EMU=ON``. The
    environment variable ``BEACON_CUDA_EMU_LIB`` names another build of the module to load
    instead (e.g. the ASan + UBSan one, CMake option ``BEACON_OPS_CUDA_EMU_SANITIZE``).
    """
    global _module, _library
    if _module is None:
        if _library is None:
            lib = torch.library.Library(NAMESPACE, "DEF")
            for name in OPS:
                schema = str(getattr(torch.ops.beacon, name).default._schema)
                lib.define(schema.split("::", 1)[1])
            _library = lib
        try:
            path = os.environ.get("BEACON_CUDA_EMU_LIB")  # another build, e.g. the sanitizer one
            if path:
                spec = importlib.util.spec_from_file_location("_cuda_emu", path)
                if spec is None or spec.loader is None:
                    raise ImportError(f"cannot load {path}")
                _module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(_module)
            else:
                _module = importlib.import_module("beacon_ops._cuda_emu")
        except ImportError as e:
            raise ImportError(
                "beacon_ops: the CUDA host emulation is not built; run `make test-cuda-emu` "
                "(or build with CMAKE_ARGS=-DBEACON_OPS_CUDA_EMU=ON)"
            ) from e
    return _module


def ops() -> torch._ops._OpNamespace:
    """``torch.ops.beacon_cuda_emu``: the CUDA ops on CPU tensors, through the emulation."""
    load()
    return getattr(torch.ops, NAMESPACE)


def set_schedule(name: str, seed: int = 0, sm_count: int = 16) -> None:
    """Order of the emulated threads and blocks for the following launches.

    ``name``: ``forward``, ``reverse`` or ``random`` (reproducible from ``seed``);
    ``sm_count``: the multiprocessor count the ops' host code sizes grids and splits by.
    """
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
    m = load()
    m.set_schedule(name, seed)
    m.set_sm_count(sm_count)


def launch_count() -> int:
    """Emulated kernel launches so far (in this process)."""
    return int(load().launch_count())
