"""Sparsifying a task vector (delta): magnitude, magnitude with outliers, random (DARE), DELLA.

Pure torch. The selections reproduce mergekit 0.1.5's masks, with two deliberate differences:
- the k largest elements are found by an O(n) radix selection instead of a full sort, and
  among elements *exactly equal* to the threshold the ones with the lowest index are kept
  (mergekit's unstable argsort leaves that choice unspecified);
- random masks draw from the generator passed in (seeded per tensor), never the global one.

Rescaling after masking is either mergekit's norm matching (`"l1"`: scale so the L1 norm of the
kept delta equals the full delta's) or the papers' (`"inverse_density"`: DARE divides every kept
element by its keep probability, 1 / (1 - p); DELLA by its own per-element probability).
"""

from __future__ import annotations

from typing import Optional

import torch

from raymerge.methods import reductions
from raymerge.methods.catalog import RESCALE_MODES


_INT_VIEW = {
    torch.float16: (torch.int16, 0),
    torch.bfloat16: (torch.int16, 0),
    torch.float32: (torch.int32, 16),
    torch.float64: (torch.int64, 48),
}


def kth_smallest_magnitude(w: torch.Tensor, r: int) -> torch.Tensor:
    """The value at ascending rank r - 1 (1 <= r <= n) of flat, non-negative float `w`.

    Radix select: for non-negative floats the bit pattern orders like the value, so one
    `bincount` over the top 16 bits finds the bucket holding rank r - 1. For 16-bit floats the
    bucket *is* the value; for wider floats `kthvalue` runs only on that bucket. Exact, and
    several times faster than `kthvalue` (let alone a sort) on the whole tensor.
    """
    if w.dtype not in _INT_VIEW:
        return w.kthvalue(r).values
    int_dtype, shift = _INT_VIEW[w.dtype]
    bits = w.view(int_dtype)
    high = (bits >> shift) if shift else bits
    counts = torch.bincount(high.reshape(-1), minlength=1 << 15)
    cumulative = counts.cumsum(0)
    bucket = int(torch.searchsorted(cumulative, torch.tensor(r, dtype=cumulative.dtype, device=cumulative.device)))
    if shift == 0:
        return torch.tensor(bucket, dtype=int_dtype).view(w.dtype).to(w.device)
    before = int(cumulative[bucket - 1]) if bucket > 0 else 0
    candidates = w[high == bucket]
    return candidates.kthvalue(r - before).values


def stable_rank_below(w: torch.Tensor, r: int) -> torch.Tensor:
    """Mask of the elements of flat, non-negative `w` whose rank in a stable ascending sort is
    < r (equal values rank by index, so the result is deterministic)."""
    n = w.numel()
    if r <= 0:
        return torch.zeros_like(w, dtype=torch.bool)
    if r >= n:
        return torch.ones_like(w, dtype=torch.bool)
    pivot = kth_smallest_magnitude(w, r)
    upto = w <= pivot
    if int(torch.count_nonzero(upto)) == r:  # the pivot value occurs once (or its copies all fit)
        return upto
    return _with_ties(w < pivot, w == pivot, r)


def top_k_mask(w: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k largest elements of flat, non-negative `w`; among equal values, lower
    indices first."""
    n = w.numel()
    if k <= 0:
        return torch.zeros_like(w, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(w, dtype=torch.bool)
    pivot = kth_smallest_magnitude(w, n - k + 1)  # the k-th largest
    from_pivot = w >= pivot
    if int(torch.count_nonzero(from_pivot)) == k:  # the pivot value occurs once (or its copies all fit)
        return from_pivot
    return _with_ties(w > pivot, w == pivot, k)


def _with_ties(strict: torch.Tensor, equal: torch.Tensor, r: int) -> torch.Tensor:
    """`strict` plus the first (r - |strict|) elements of `equal`, by index.

    `nonzero` lists indices in ascending order; cheaper than a cumulative sum over the whole
    tensor, which matters for 16-bit weights, where the threshold value repeats almost always.
    """
    room = r - int(torch.count_nonzero(strict))
    first = equal.nonzero().reshape(-1)[:room]
    strict[first] = True
    return strict


def _magnitudes(tensor: torch.Tensor) -> torch.Tensor:
    """|tensor|, flat. 16-bit floats stay 16-bit: their order is exact and selection is faster."""
    return tensor.abs().reshape(-1)


def rescale_l1(tensor: torch.Tensor, masked: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale `masked` so its L1 norm equals `tensor`'s (unchanged when either norm is ~0)."""
    before = reductions.total(tensor.abs())
    after = reductions.total(masked.abs())
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def magnitude(tensor: torch.Tensor, density: float, rescale: Optional[str] = None) -> torch.Tensor:
    """Keep the `density` fraction of largest-magnitude elements (at least one when density > 0)."""
    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return torch.zeros_like(tensor)
    k = max(1, int(density * tensor.numel()))
    keep = top_k_mask(_magnitudes(tensor), k)
    return _apply(tensor, keep.reshape(tensor.shape).to(tensor.dtype), rescale, density)


def magnitude_outliers(
    tensor: torch.Tensor, density: float, gamma: float, rescale: Optional[str] = None, per_row: bool = False
) -> torch.Tensor:
    """Model Breadcrumbs: drop the `gamma` fraction of largest elements, then the smallest ones,
    keeping `density` of the elements (the outlier cut shrinks when needed to reach density).

    `per_row`: the selection is made in each row of a matrix (dim 0) separately, with the same
    fractions — the Breadcrumbs paper's per-row masks; otherwise over the whole tensor, as
    mergekit 0.1.5 does (a 1-D tensor is one row either way)."""
    if density >= 1:
        return tensor
    if per_row and tensor.dim() >= 2:
        return _apply(tensor, _row_band(tensor.reshape(tensor.shape[0], -1), density, gamma).reshape(tensor.shape)
                      .to(tensor.dtype), rescale, density)
    n = tensor.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - target - n_top)
    w = _magnitudes(tensor)
    keep = stable_rank_below(w, n_bottom + target) & ~stable_rank_below(w, n_bottom)
    return _apply(tensor, keep.reshape(tensor.shape).to(tensor.dtype), rescale, density)


def _row_band(rows: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Per row of a matrix: the mask of the elements whose stable ascending |x| rank lies in
    [n_bottom, n_bottom + target) (as `magnitude_outliers`, row by row; equal values rank by
    index). Each row is sorted on its own, so the result does not depend on thread counts."""
    n = rows.shape[1]
    target = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - target - n_top)
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=rows.device).expand_as(order))
    return (ranks >= n_bottom) & (ranks < n_bottom + target)


def _random_dtype(tensor: torch.Tensor) -> torch.dtype:
    # torch.bernoulli has no float16 kernel on CPU; mergekit upcasts to float32 there too.
    if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16:
        return tensor.dtype
    return torch.float32


def draw_bernoulli(probs: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """`torch.bernoulli(probs)` drawn on the generator's device and returned on `probs`'s. The
    runtime passes a CPU generator whatever the device, so the mask a GPU worker draws is the one
    a CPU worker draws for the same tensor (a CUDA generator's stream differs from the CPU's)."""
    if generator is None or generator.device == probs.device:
        return torch.bernoulli(probs, generator=generator)
    return torch.bernoulli(probs.to(generator.device), generator=generator).to(probs.device)


def bernoulli(
    tensor: torch.Tensor, density: float, generator: Optional[torch.Generator], rescale: Optional[str] = None
) -> torch.Tensor:
    """DARE: keep each element independently with probability `density` (= 1 - p)."""
    if density >= 1:
        return tensor
    work = _random_dtype(tensor)
    probs = torch.full_like(tensor, density, dtype=work)
    mask = draw_bernoulli(probs, generator)
    return _apply(tensor.to(work), mask, rescale, density).to(tensor.dtype)


def della_magprune(
    tensor: torch.Tensor,
    density: float,
    epsilon: float,
    generator: Optional[torch.Generator],
    rescale: Optional[str] = None,
) -> torch.Tensor:
    """DELLA MagPrune: per row, keep probabilities rise linearly with magnitude rank from
    density - epsilon (smallest) to density + epsilon (largest)."""
    if density >= 1:
        return tensor
    if density <= 0:
        return torch.zeros_like(tensor)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"epsilon ({epsilon}) must keep density +/- epsilon inside (0, 1) (density {density})")
    shape = tensor.shape
    work = _random_dtype(tensor)
    rows = tensor.unsqueeze(0) if tensor.dim() < 2 else tensor
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    # 0-based ranks (rank + 1 in the paper, the same after normalising): the inverse permutation
    # of `order`, scattered in one pass rather than found by a second sort.
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions).to(work)
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    rank_norm = torch.nan_to_num((ranks - lo) / (hi - lo), nan=0.5).clamp(0, 1)  # nan: one-element rows
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    mask = draw_bernoulli(probs, generator).to(work)
    rows = rows.to(work)
    if rescale == "inverse_density":
        result = rows * mask / probs
    else:
        result = _apply(rows, mask, rescale, density)
    return result.to(tensor.dtype).reshape(shape)


def _apply(tensor: torch.Tensor, mask: torch.Tensor, rescale: Optional[str], density: float) -> torch.Tensor:
    masked = tensor * mask
    if rescale is None:
        return masked
    if rescale == "l1":
        return rescale_l1(tensor, masked)
    if rescale == "inverse_density":
        return masked / density if density > 0 else masked  # density 0: nothing kept, no 0/0
    raise ValueError(f"unknown rescale mode {rescale!r} (expected one of {', '.join(RESCALE_MODES)})")
