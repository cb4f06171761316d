"""Transparent huge pages for the large CPU buffers that a decode step streams (the KV caches).

A decode step reads its cache once, front to back, and on the CPU that read is bound by how many
cache lines one core keeps in flight. With 4 KB pages the hardware prefetchers stop at every page
boundary; with 2 MB pages they run on (one core of an AMD EPYC Zen 4, ``bench/huge_pages.py``: a
decode step over 3,584 fp32 keys 21.5 -> 27.5 GB/s, a copy 26.5 -> 33.4 GB/s). Linux with
transparent huge pages in its common ``madvise`` mode backs a mapping with huge pages only where
the program asks (``madvise(MADV_HUGEPAGE)``), and only for pages not yet touched: so a buffer is
allocated, advised, then filled. The first such buffer of a process may take longer to fill
(195 MB: 230-300 ms against 50, the kernel assembling 2 MB pages; later ones 14 ms). Elsewhere
(other systems, CUDA tensors, small buffers) these functions do what ``torch.zeros`` and
``Tensor.clone`` do.
"""
from __future__ import annotations

import ctypes
import sys
from typing import Sequence

import torch
from torch import Tensor

HUGE_PAGE = 2 << 20  # bytes (x86-64 and most aarch64 kernels)
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux
_libc: ctypes.CDLL | None = None


def advise_huge_pages(t: Tensor) -> int:
    """Ask the kernel to back ``t``'s memory with huge pages (``madvise(MADV_HUGEPAGE)`` over the
    whole 2 MB pages inside it). Takes effect for pages first touched after the call. Returns
    the bytes advised: 0 for a CUDA tensor, a tensor under 2 MB, or a system without it."""
    global _libc
    if t.device.type != "cpu" or not sys.platform.startswith("linux"):
        return 0
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()  # (a contiguous tensor's extent)
    first = -(-start // HUGE_PAGE) * HUGE_PAGE
    last = end // HUGE_PAGE * HUGE_PAGE
    if last <= first:
        return 0
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    rc = _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), ctypes.c_int(_MADV_HUGEPAGE))
    return last - first if rc == 0 else 0  # EINVAL: a kernel without transparent huge pages


def empty_huge(shape: Sequence[int], *, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``, advised onto huge pages where the CPU
    tensor is at least 4 MB (see :func:`advise_huge_pages`): fill it before reading it."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if t.numel() * t.element_size() >= 2 * HUGE_PAGE:
        advise_huge_pages(t)
    return t


def zeros_huge(shape: Sequence[int], *, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """``torch.zeros(shape, dtype=dtype, device=device)`` on huge pages (see :func:`empty_huge`)."""
    return empty_huge(shape, dtype=dtype, device=device).zero_()


def clone_huge(t: Tensor) -> Tensor:
    """A contiguous copy of ``t`` on huge pages (see :func:`empty_huge`)."""
    return empty_huge(t.shape, dtype=t.dtype, device=t.device).copy_(t)
