"""Arcee Fusion (https://arcee.ai, mergekit 0.1.5): take the other model's value only where it
changed the base in a way that matters, and keep the base elsewhere.

With b the base and x the other model (exactly two models, one of them the base):

- importance per element: |x - b| times the KL divergence KL(p || q) of the row it is in, where
  p = softmax(x) + 1e-8 and q = softmax(b) + 1e-8 along the last dimension;
- threshold: median + 1.5 (Q3 - Q1) of the importances (the upper Tukey fence), each quantile
  being the element at index floor(q (n - 1)) of the sorted importances (no interpolation);
- result: x where the importance is at least the threshold, b elsewhere.

One documented difference from mergekit 0.1.5: mergekit takes the quantiles of a random sample
(with replacement, from torch's global generator) of 1,000,000 importances when a tensor has
more elements, so its output for such tensors changes from run to run. raymerge always takes
the exact quantiles of all the importances (`torch.kthvalue`, which selects without sorting), so
the method is deterministic; on tensors of up to 1,000,000 elements the two agree exactly.

Determinism: the row sums of the KL go through `reductions.sum_dim` (a 1-D tensor is one row);
`kthvalue` on a flat tensor is a single selection, not split across threads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raymerge.methods import reductions

KL_EPS = 1e-8
QUANTILES = (1, 2, 3)  # quarters: Q1, median, Q3


def importance(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|x - base| times the row-wise KL(softmax(x) || softmax(base)) (each + 1e-8)."""
    p = F.softmax(x, dim=-1) + KL_EPS
    q = F.softmax(base, dim=-1) + KL_EPS
    kl = reductions.sum_dim(p * torch.log(p / q), dim=-1, keepdim=True)
    return (x - base).abs() * kl


def sorted_at(flat: torch.Tensor, index: int) -> torch.Tensor:
    """The element at `index` of `flat` sorted ascending."""
    return torch.kthvalue(flat, index + 1).values


def fence(scores: torch.Tensor) -> torch.Tensor:
    """median + 1.5 * (Q3 - Q1) of all the scores."""
    flat = scores.reshape(-1)
    last = flat.numel() - 1
    # floor(q * last) for q = 1/4, 1/2, 3/4: mergekit computes it in float32, which is exact for
    # every size it applies it to (at most 1,000,000 elements); integer arithmetic is exact for all
    q1, median, q3 = (sorted_at(flat, k * last // 4) for k in QUANTILES)
    return median + 1.5 * (q3 - q1)


def arcee_fusion(inputs, *, base_index, model_params, params, generator):
    base = inputs[base_index]
    other = inputs[1 - base_index]
    scores = importance(other, base)
    keep = (scores >= fence(scores)).to(base.dtype)
    return base + (other - base) * keep
