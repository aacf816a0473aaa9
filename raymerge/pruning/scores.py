"""Importance scores for mask selection (higher = more important = kept): magnitude and Wanda.

Pure torch; scores are float32 on the weight's device, shaped like the weight
`[out_features, in_features]`. Only the ranking matters, so any constant factor in the input
statistic (a sum of squares instead of Wanda's running mean over sequences) changes nothing.
"""

from __future__ import annotations

from typing import Optional

import torch

from raymerge.pruning.masks import PruningError, _in, is_finite_number


def _check_weight(weight: torch.Tensor, name: Optional[str]) -> None:
    if weight.dim() != 2:
        raise PruningError(
            f"weight{_in(name)} must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}"
        )


def magnitude_scores(weight: torch.Tensor, *, name: Optional[str] = None) -> torch.Tensor:
    """|W| in float32."""
    _check_weight(weight, name)
    return weight.detach().abs().to(torch.float32)


def feature_norms(feature_sq_sum: torch.Tensor) -> torch.Tensor:
    """||X_j||_2 from the per-feature sum of squares, in float32 (the square root is taken in the
    statistic's own precision, usually float64)."""
    return feature_sq_sum.detach().sqrt().to(torch.float32)


def wanda_scores(
    weight: torch.Tensor,
    feature_sq_sum: torch.Tensor,
    *,
    weight_exponent: float = 1.0,
    norm_exponent: float = 1.0,
    name: Optional[str] = None,
) -> torch.Tensor:
    """|W_ij|^a * ||X_j||_2^b, broadcast over rows; a = b = 1 is Wanda's |W_ij| * ||X_j||_2.

    `feature_sq_sum[j]` is the sum over calibration tokens of x_j^2 (`FeatureNormStats.sq_sum`),
    any device: it is moved to the weight's. The exponents are for a metric search (OptiShear
    style); exponent 1 skips the power, so the default is exactly Wanda's product. 0^0 is 1.
    """
    _check_weight(weight, name)
    if feature_sq_sum.dim() != 1 or feature_sq_sum.shape[0] != weight.shape[1]:
        raise PruningError(
            f"feature statistic{_in(name)} must be a vector of length in_features={weight.shape[1]}, "
            f"got shape {tuple(feature_sq_sum.shape)}"
        )
    for what, value in (("weight_exponent", weight_exponent), ("norm_exponent", norm_exponent)):
        if not is_finite_number(value):
            raise PruningError(f"{what} must be a finite number, got {value!r}")
    if bool((feature_sq_sum < 0).any()) or bool(torch.isnan(feature_sq_sum).any()):
        raise PruningError(f"feature statistic{_in(name)} must be a non-negative sum of squares")
    w = weight.detach().abs().to(torch.float32)
    if weight_exponent != 1:
        w = w.pow(float(weight_exponent))
    norms = feature_norms(feature_sq_sum).to(weight.device)
    if norm_exponent != 1:
        norms = norms.pow(float(norm_exponent))
    return w * norms.unsqueeze(0)
