"""beacon_ops.huge_pages: the caches' buffers asked onto huge pages, with the same contents."""
import sys
from pathlib import Path

import pytest
import torch

from beacon_ops.condensed_cache import CondensedKVCache
from beacon_ops.full_cache import FullKVCache
from beacon_ops.huge_pages import HUGE_PAGE, advise_huge_pages, clone_huge, zeros_huge

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_available() -> bool:
    return sys.platform.startswith("linux") and THP.exists() and "[never]" not in THP.read_text()


@pytest.mark.parametrize("shape,dtype", [((3, 5), torch.float32), ((2, 3, 1000, 128), torch.bfloat16),
                                         ((4, 1 << 20), torch.float32)])
def test_zeros_huge_is_zeros(shape, dtype):
    t = zeros_huge(shape, dtype=dtype, device="cpu")
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
    assert torch.equal(t, torch.zeros(shape, dtype=dtype))


def test_clone_huge_copies_bit_for_bit():
    x = torch.randn(3, 700, 1024)  # 8.6 MB
    y = clone_huge(x)
    assert y.data_ptr() != x.data_ptr() and torch.equal(y, x)
    assert torch.equal(clone_huge(torch.empty(0, 4)), torch.empty(0, 4))


@pytest.mark.skipif(not _thp_available(), reason="no transparent huge pages on this system")
def test_advise_covers_the_whole_huge_pages_inside():
    t = torch.empty(5 * HUGE_PAGE // 4)  # 10 MB: at least four whole 2 MB pages inside
    n = advise_huge_pages(t)
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * 4
    expect = end // HUGE_PAGE * HUGE_PAGE - -(-start // HUGE_PAGE) * HUGE_PAGE
    assert n == expect and n >= 4 * HUGE_PAGE


def test_advise_skips_what_it_cannot_use():
    assert advise_huge_pages(torch.empty(1000)) == 0  # no whole 2 MB page inside
    assert advise_huge_pages(torch.empty(1 << 22, device="meta")) == 0


def test_caches_start_zeroed():
    c = CondensedKVCache(num_layers=2, batch_size=1, num_kv_heads=3, head_dim=64, capacity=8192, window=256,
                         dtype=torch.bfloat16)
    assert torch.count_nonzero(c.k) == 0 and torch.count_nonzero(c.v) == 0
    f = FullKVCache(2, 1, 3, 64, 8192)
    assert f.k.shape == (2, 1, 3, 8192, 64) and torch.count_nonzero(f.k) == 0 and torch.count_nonzero(f.v) == 0
