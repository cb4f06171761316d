"""beacon_ops: fused Activation Beacon attention and condensed KV cache ops for PyTorch.

Importing this package loads the native library and registers every op under
``torch.ops.beacon``. See README.md for how to use each op from model code.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

__version__ = "0.1.0"

_HERE = os.path.dirname(os.path.abspath(__file__))


def _read_build_json() -> dict[str, Any] | None:
    path = os.path.join(_HERE, "_build.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _load_native() -> Any:
    built = _read_build_json()
    if built is None:
        raise ImportError(
            "beacon_ops: the native library is not built in "
            f"{_HERE}. Install with `pip install --no-build-isolation .` or run `make build` "
            "in the source tree."
        )
    if built.get("torch") != torch.__version__:
        raise ImportError(
            f"beacon_ops was built against torch {built.get('torch')} but torch "
            f"{torch.__version__} is installed: rebuild beacon_ops "
            "(`pip install --no-build-isolation --force-reinstall --no-deps .` or `make build`)."
        )
    try:
        from . import _C  # noqa: F401  (registers torch.ops.beacon.*)
    except (ImportError, OSError) as e:  # undefined symbols etc.
        raise ImportError(
            f"beacon_ops: loading the native library failed ({e}). It was probably built "
            "against a different torch or CUDA: rebuild beacon_ops against the installed torch."
        ) from e
    return _C


_C = _load_native()


def build_info() -> dict[str, Any]:
    """What this build contains.

    Returns a dict with keys ``version`` (package version), ``torch`` (the torch version it was
    built against), ``cuda_compiled`` (bool), ``cuda_archs`` (the GPU code compiled in, e.g.
    ``['sm_80', 'sm_90', 'compute_90']``; ``compute_*`` is PTX), ``cutlass`` (version of the
    optional CUTLASS headers on the CUDA include path, '' when absent or without CUDA),
    ``cuda_head_dims`` and ``cuda_dtypes`` (the tensor-core instantiations selected, [] without
    CUDA), ``cuda_kernels`` (the CUDA kernel kinds compiled in, each with its instantiations, e.g.
    ``{'prefill': ['hdim64_bf16', ...], 'decode': [...], 'attention_generic': [], 'cache': []}``;
    an empty list: one kernel for every head dim and dtype it accepts; ``{}`` without CUDA),
    ``cpu_isa_detected`` and ``cpu_isa`` (the CPU kernels' instruction set: detected, used),
    ``cpu_fp32_gemm`` (how the CPU kernels multiply fp32 tiles: ``blas``, torch's own BLAS;
    ``kernel``, the project's AVX-512 micro-kernel; ``aten``; ``BEACON_OPS_FP32_GEMM`` overrides),
    ``cpu_decode`` (the few-row decode kernels: ``avx512`` on Intel CPUs, ``avx2`` on others,
    where they read the cache faster on AMD Zen 4; ``portable``; ``BEACON_OPS_CPU_DECODE`` overrides),
    ``cpu_decode_linear_fp32`` (``decode_linear`` in fp32: ``kernel``, or ``blas``, torch's own, on
    Intel CPUs and without AVX2; ``BEACON_OPS_FP32_GEMM`` overrides).
    """
    return dict(_C.build_info())


from . import ops  # noqa: E402,F401  (fake kernels, typed wrappers)
from .ops import *  # noqa: E402,F401,F403
from . import attention_autograd  # noqa: E402  (registers autograd for beacon::attention)
from .attention_autograd import beacon_attention_backward  # noqa: E402,F401
from .condensed_cache import CondensedKVCache, StepPlan, adapt_ratio  # noqa: E402

__all__ = (["build_info", "__version__", "CondensedKVCache", "StepPlan", "adapt_ratio"]
           + list(ops.__all__) + list(attention_autograd.__all__))
