"""The explicit-mask reference (beacon_ops.reference) against the worked example of the mask
(``docs/activation-beacon.md``, section 3) and against independent computations (causal SDPA,
hand-built masks)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from beacon_ops.positions import MASK_KINDS
from beacon_ops.reference import allowed_pairs, beacon_mask, reference_attention, worked_example

# docs/activation-beacon.md, section 3, step-expansion, W = S = 8, r = 4: rows t.., b0, b1.
WINDOW1 = [
    [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    [1, 1, 1, 1, 1, 1, 1, 1, 0, 0],
    [1, 1, 1, 1, 0, 0, 0, 0, 1, 0],
    [1, 1, 1, 1, 1, 1, 1, 1, 0, 1],
]
WINDOW1_POS = [0, 1, 2, 3, 4, 5, 6, 7, 4, 8]
WINDOW2 = [
    [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0],
    [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 0],
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1],
]
WINDOW2_POS = [2, 3, 4, 5, 6, 7, 8, 9, 6, 10]


def test_worked_example_masks_and_positions():
    w1, w2 = worked_example()
    assert w1["mask"].int().tolist() == WINDOW1
    assert w2["mask"].int().tolist() == WINDOW2
    assert w1["positions"] == WINDOW1_POS
    assert w2["positions"] == WINDOW2_POS


def test_worked_example_other_modes():
    # Spec: segmentation b0 sees raw 0..3 and b1 raw 4..7; full-coverage both see all 8 raw.
    seg = beacon_mask(0, 8, 2, 4, 10, "segmentation")
    assert seg[8].int().tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 1, 0]
    assert seg[9].int().tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 0, 1]
    full = beacon_mask(2, 8, 2, 4, 10, "full-coverage")
    assert full[8].int().tolist() == [1, 1] + [1] * 8 + [1, 0]
    assert full[9].int().tolist() == [1, 1] + [1] * 8 + [0, 1]
    # Raw rows are the same in every mode.
    for mode in ("segmentation", "full-coverage"):
        assert torch.equal(beacon_mask(2, 8, 2, 4, 10, mode)[:8], torch.tensor(WINDOW2)[:8].bool())


def test_attend_previous_off_hides_memory_from_beacons_only():
    m = beacon_mask(2, 8, 2, 4, 10, "step-expansion", attend_previous=False)
    expected = torch.tensor(WINDOW2).bool()
    expected[8:, :2] = False
    assert torch.equal(m, expected)


def test_partial_step_rows_are_the_last_raw_tokens():
    # A chunk of 3 new raw tokens in a window that holds 5: rows are raw 2, 3, 4.
    m = beacon_mask(4, 5, 0, 0, 3)
    assert m.int().tolist() == [[1] * 4 + [1, 1, 1, 0, 0], [1] * 4 + [1, 1, 1, 1, 0], [1] * 9]


def test_allowed_pairs_counts_the_worked_example():
    assert allowed_pairs([0, 10], [0], [8], [2], [4]) == sum(map(sum, WINDOW1))
    assert allowed_pairs([0, 10, 20], [0, 2], [8, 8], [2, 2], [4, 4]) == (
        sum(map(sum, WINDOW1)) + sum(map(sum, WINDOW2)))


def test_invalid_query_count_rejected():
    with pytest.raises(ValueError, match="num_queries"):
        beacon_mask(0, 4, 2, 2, 1)
    with pytest.raises(ValueError, match="mode"):
        beacon_mask(0, 4, 0, 0, 4, "nope")


@pytest.mark.parametrize("nq", [16, 5])
def test_reference_equals_causal_sdpa_without_memory_and_beacons(nq):
    torch.manual_seed(0)
    R, H, d = 16, 4, 32
    q = torch.randn(nq, H, d, dtype=torch.float64)
    k = torch.randn(1, H, R + 3, d, dtype=torch.float64)
    v = torch.randn(1, H, R + 3, d, dtype=torch.float64)
    res = reference_attention(q, k, v, [0, nq], [0], [R], [0], [0])
    bias = causal_lower_right(nq, R)
    expected = F.scaled_dot_product_attention(q.transpose(0, 1), k[0, :, :R], v[0, :, :R],
                                              attn_mask=bias)
    torch.testing.assert_close(res.out, expected.transpose(0, 1), atol=1e-12, rtol=1e-12)
    assert res.pairs == sum(R - nq + i + 1 for i in range(nq))


def test_reference_lse_and_gqa_match_a_hand_computation():
    torch.manual_seed(1)
    M, R, B, r, H, Hkv, d = 3, 8, 2, 4, 6, 2, 16
    nq = 4 + B
    q = torch.randn(nq, H, d, dtype=torch.float64)
    k = torch.randn(1, Hkv, M + R + B, d, dtype=torch.float64)
    v = torch.randn(1, Hkv, M + R + B, d, dtype=torch.float64)
    res = reference_attention(q, k, v, [0, nq], [M], [R], [B], [r], mode="segmentation",
                              softmax_scale=0.3)
    mask = beacon_mask(M, R, B, r, nq, "segmentation")
    for h in range(H):
        kh, vh = k[0, h // 3], v[0, h // 3]
        for i in range(nq):
            s = (q[i, h] @ kh.T * 0.3)[mask[i]]
            p = torch.softmax(s, 0)
            assert torch.allclose(res.out[i, h], p @ vh[mask[i]], atol=1e-12)
            assert abs(res.lse[i, h].item() - torch.logsumexp(s, 0).item()) < 1e-5


@pytest.mark.parametrize("mode", MASK_KINDS)
@pytest.mark.parametrize("attend_previous", [True, False])
def test_production_mask_equals_reference(mode, attend_previous):
    """beacon_ops.masks.step_mask (index comparisons, used by the masked training backend)
    against the reference's row-by-row mask, over every shape a step can have."""
    from beacon_ops.masks import step_mask

    for M, R, B, r in [(0, 8, 2, 4), (3, 8, 4, 2), (5, 6, 0, 0), (2, 16, 2, 8), (0, 5, 3, 4), (7, 12, 3, 4)]:
        for n_raw in range(0, R + 1, 3):
            want = beacon_mask(M, R, B, r, n_raw + B, mode, attend_previous)
            got = step_mask(M, R, B, r, n_raw + B, mode, attend_previous)
            assert torch.equal(got, want), (M, R, B, r, n_raw, mode)
