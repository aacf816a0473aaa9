"""The O(n) radix selection behind magnitude trimming: same masks as a stable full sort,
including ties, zeros and every float dtype it sees."""

from __future__ import annotations

import pytest
import torch

from raymerge.methods.sparsify import kth_smallest_magnitude, stable_rank_below, top_k_mask


def sorted_mask(w: torch.Tensor, k: int, descending: bool) -> torch.Tensor:
    order = torch.sort(-w if descending else w, stable=True).indices[:k]
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    mask[order] = True
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 7, 2500, 4999, 5000])
def test_masks_equal_stable_sort(dtype, k):
    g = torch.Generator().manual_seed(k)
    w = torch.randn(5000, generator=g).to(dtype).abs().float() if dtype == torch.bfloat16 else torch.randn(5000, generator=g, dtype=dtype).abs()
    w[::97] = 0.0  # many exact ties at zero
    w[5:40] = w[3]  # and ties in the middle of the range
    assert torch.equal(top_k_mask(w, k), sorted_mask(w, k, descending=True))
    assert torch.equal(stable_rank_below(w, k), sorted_mask(w, k, descending=False))


def test_kth_smallest_is_exact():
    g = torch.Generator().manual_seed(0)
    w = torch.rand(100_000, generator=g) * 1e-3
    for r in (1, 2, 50_000, 99_999, 100_000):
        assert kth_smallest_magnitude(w, r) == torch.sort(w).values[r - 1]
