"""``python -m beacon_ops info``: what this build of beacon_ops contains."""
from __future__ import annotations

import argparse

import torch

from .. import build_info
from ..positions import MASK_KINDS
from ..variants import supported_variants
from .common import Command, write_json


def registered_ops() -> list[str]:
    """Names of the ops registered under ``torch.ops.beacon`` (e.g. ``'attention'``)."""
    names = torch._C._dispatch_get_all_op_names()
    return sorted(n.split("::", 1)[1].split(".")[0] for n in names if n.startswith("beacon::"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write the build info as JSON to PATH (stdout when PATH is omitted)")


def run(args: argparse.Namespace) -> int:
    info = build_info()
    info["torch_runtime"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    info["ops"] = registered_ops()
    info["variants"] = supported_variants()
    info["mask_kinds"] = list(MASK_KINDS)
    if args.json == "-":
        write_json(info, "-")
        return 0
    for k in ("version", "torch", "torch_runtime", "cuda_compiled", "cuda_archs", "cutlass",
              "cuda_head_dims", "cuda_dtypes", "cuda_kernels", "cuda_available", "cpu_isa_detected",
              "cpu_isa", "cpu_fp32_gemm", "cpu_decode", "cpu_decode_linear_fp32", "ops", "mask_kinds"):
        v = info.get(k)
        if isinstance(v, dict):  # cuda_kernels: kind (instances)
            v = ", ".join(f"{kind} ({' '.join(insts)})" if insts else kind for kind, insts in v.items())
        print(f"{k:>22}: {', '.join(map(str, v)) if isinstance(v, list) else v}")
    for i, line in enumerate(info["variants"]):
        print(f"{'variants' if i == 0 else '':>22}{':' if i == 0 else ' '} {line}")
    write_json(info, args.json)
    return 0


COMMAND = Command("info", "show what this build of beacon_ops contains", add_arguments, run)
