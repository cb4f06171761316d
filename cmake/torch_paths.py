"""Print what CMake needs to know about the torch (and pybind11, CUDA wheels) of this Python.

One KEY=VALUE per line; lists are joined with '|'. Run by CMakeLists.txt with the Python that
runs the build, so paths are never hard-coded.
"""
import os
import sys

import torch
import torch.utils.cpp_extension as ext

try:
    import pybind11

    pybind11_dir = pybind11.get_cmake_dir()
except ImportError:  # pragma: no cover - reported by find_package(pybind11)
    pybind11_dir = ""

torch_root = os.path.dirname(torch.__file__)
site = os.path.dirname(torch_root)
cuda_major = (torch.version.cuda or "").split(".")[0]
# CUDA that comes from pip wheels (nvidia-*-cu13 / nvidia/cu13): headers such as cublas_v2.h
# that ATen/cuda/CUDAContext.h includes live here, not in a minimal toolkit.
wheel_dirs = [os.path.join(site, "nvidia", f"cu{cuda_major}"), os.path.join(site, "nvidia")]
wheel_includes = []
for base in wheel_dirs:
    inc = os.path.join(base, "include")
    if cuda_major and os.path.isdir(inc):
        wheel_includes.append(inc)
    # per-library wheels of older releases: nvidia/cublas/include, ...
    if cuda_major and base.endswith("nvidia") and os.path.isdir(base):
        for name in sorted(os.listdir(base)):
            sub = os.path.join(base, name, "include")
            if name != f"cu{cuda_major}" and os.path.isdir(sub):
                wheel_includes.append(sub)

print(f"TORCH_VERSION={torch.__version__}")
print(f"TORCH_CUDA_VERSION={torch.version.cuda or ''}")
print(f"TORCH_ROOT={torch_root}")
print(f"TORCH_INCLUDE_DIRS={'|'.join(ext.include_paths())}")
print(f"TORCH_LIB_DIR={os.path.join(torch_root, 'lib')}")
print(f"TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
print(f"PYBIND11_CMAKE_DIR={pybind11_dir}")
print(f"CUDA_WHEEL_INCLUDES={'|'.join(wheel_includes)}")
print(f"PYTHON_SITE={site}")
print(f"PYTHON_VERSION={sys.version_info.major}.{sys.version_info.minor}")
