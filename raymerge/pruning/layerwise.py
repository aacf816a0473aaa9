"""Per-layer (decoder block) sparsity targets: uniform, explicit lists, and OWL.

OWL (Outlier Weighed Layerwise sparsity, Yin et al. 2024): a block's outlier ratio D_l is the
percentage of its Wanda scores (all linears of the block together) above M times their mean.
The ratios are scaled to [0, 2*lam], D' = (D - min D) / (max D - min D) * 2*lam, centred, and
subtracted from the target: sparsity_l = 1 - (D'_l - mean(D') + (1 - target)) = target - D'_l
+ mean(D'). Blocks with more outliers get lower sparsity; max - min of the sparsities is
exactly 2*lam and their mean is the target (before clipping). Note that a single layer may
deviate from the target by up to 2*lam*(L-1)/L (e.g. one outlier-heavy layer among many equal
ones), not only lam.

Pure torch and Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from raymerge.methods import reductions
from raymerge.pruning.masks import PruningError, check_sparsity, is_finite_number

OWL_LOW_CLIP = 0.01
OWL_HIGH_CLIP = 0.99


def _check_layers(n_layers: object) -> int:
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise PruningError(f"n_layers must be a positive integer, got {n_layers!r}")
    return n_layers


def uniform_sparsities(n_layers: int, target: float) -> list[float]:
    """[target] * n_layers."""
    return [check_sparsity(target, "target sparsity")] * _check_layers(n_layers)


def explicit_sparsities(values: Sequence[float], n_layers: int) -> list[float]:
    """`values` as floats, checked: exactly n_layers of them, each in [0, 1)."""
    n_layers = _check_layers(n_layers)
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise PruningError(f"layer sparsities must be a list of {n_layers} numbers, got {values!r}")
    if len(values) != n_layers:
        raise PruningError(f"layer sparsities: got {len(values)} values for {n_layers} layers")
    return [check_sparsity(v, f"layer sparsity [{i}]") for i, v in enumerate(values)]


def outlier_ratio(scores_of_a_block: Sequence[torch.Tensor], m: float) -> float:
    """OWL's D_l: 100 * the fraction of all entries of the block's score tensors (taken together)
    that are > m * their mean. Nothing is concatenated: a float64 sum gives the mean, then each
    tensor is counted against the threshold on its own device."""
    if not is_finite_number(m) or m <= 0:
        raise PruningError(f"outlier multiplier m must be a finite number > 0, got {m!r}")
    tensors = list(scores_of_a_block)
    count = sum(t.numel() for t in tensors)
    if count == 0:
        raise PruningError("outlier_ratio: the block has no scores")
    mean = sum(float(reductions.total(t.detach(), dtype=torch.float64)) for t in tensors) / count
    if math.isnan(mean):
        raise PruningError("outlier_ratio: the block's scores contain NaN")
    threshold = float(m) * mean
    above = sum(int((_wide(t) > threshold).sum()) for t in tensors)
    return 100.0 * above / count


def _wide(t: torch.Tensor) -> torch.Tensor:
    """`t` in float32 at least (16-bit scores would round the threshold to 16 bits)."""
    t = t.detach()
    return t if t.dtype in (torch.float32, torch.float64) else t.to(torch.float32)


def owl_sparsities(outlier_ratios: Sequence[float], target: float, lam: float) -> list[float]:
    """OWL layer sparsities (see the module docstring) from the blocks' outlier ratios.

    All-equal ratios (or lam 0) give the uniform target. Clipping, as OWL does for sparsity:
    a value <= 0 becomes 0.01 (OWL's rule); a value >= 1 (OWL has no rule; it happens when
    target + lam approaches 1) becomes 0.99. Clipped values no longer average to the target.
    """
    target = check_sparsity(target, "target sparsity")
    if not is_finite_number(lam) or lam < 0:
        raise PruningError(f"OWL lambda must be a finite number >= 0, got {lam!r}")
    d = [float(v) for v in outlier_ratios]
    if not d:
        raise PruningError("owl_sparsities: no outlier ratios")
    if not all(math.isfinite(v) for v in d):
        raise PruningError(f"owl_sparsities: outlier ratios must be finite, got {list(outlier_ratios)!r}")
    lo, hi = min(d), max(d)
    if hi == lo or lam == 0:
        return [target] * len(d)
    scaled = [(v - lo) / (hi - lo) * 2 * float(lam) for v in d]
    mean = sum(scaled) / len(scaled)
    sparsities = [1 - (v - mean + (1 - target)) for v in scaled]
    return [_owl_clip(s) for s in sparsities]


def _owl_clip(s: float) -> float:
    if s <= 0:
        return OWL_LOW_CLIP
    if s >= 1:
        return OWL_HIGH_CLIP
    return s


def mean_weighted_sparsity(sparsities: Sequence[float], sizes: Sequence[int]) -> float:
    """sum(s_i * n_i) / sum(n_i): the overall sparsity of layers with n_i weights each."""
    if len(sparsities) != len(sizes):
        raise PruningError(f"got {len(sparsities)} sparsities for {len(sizes)} sizes")
    for i, n in enumerate(sizes):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise PruningError(f"size [{i}] must be a non-negative integer, got {n!r}")
    total = sum(sizes)
    if total == 0:
        raise PruningError("mean_weighted_sparsity: the sizes sum to 0")
    return sum(check_sparsity(s, f"sparsity [{i}]") * n for i, (s, n) in enumerate(zip(sparsities, sizes))) / total
