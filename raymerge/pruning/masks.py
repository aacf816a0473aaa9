"""Pruning masks: argument checks, N:M patterns, and exact lowest-score selections.

Pure torch; every function works on the device its tensors are on. Conventions:
- weights and scores are 2-D `[out_features, in_features]`, like `nn.Linear.weight`;
- a mask is a bool tensor of the same shape, True where the weight is *pruned* (set to zero);
- counts are exact: a selection of k elements prunes exactly k, and among equal scores the
  element with the lower index (column, or row-major flat index) is pruned first, so every mask
  is deterministic. Weights that are already zero get score 0 and are usually pruned first; the
  achieved sparsity of the weights can still exceed the mask's when zeros lie outside it.

Owns `PruningError`, the `ValueError` every function of `raymerge.pruning` raises on bad input.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Optional

import torch

from raymerge.errors import RaymergeError

PATTERN_SPELLINGS = "'unstructured' or 'N:M' with integers 0 < N < M (e.g. '2:4', '4:8')"

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


class PruningError(RaymergeError, ValueError):
    """A bad pruning argument: the message names the offending value (and tensor, if given)."""


def _in(name: Optional[str]) -> str:
    return f" in {name}" if name else ""


def check_sparsity(s: object, what: str = "sparsity") -> float:
    """`s` as a float in [0, 1); anything else (1.0, -0.1, "abc", nan, True) raises PruningError."""
    if isinstance(s, bool) or not isinstance(s, numbers.Real):
        raise PruningError(f"{what} must be a number in [0, 1), got {s!r}")
    value = float(s)
    if not (0.0 <= value < 1.0):  # also rejects nan
        raise PruningError(f"{what} must be in [0, 1), got {s!r}")
    return value


def parse_pattern(text: object) -> Optional[tuple[int, int]]:
    """"unstructured" -> None; "N:M" with 0 < N < M -> (N, M) (N pruned in every M weights)."""
    if isinstance(text, str):
        if text.strip().lower() == "unstructured":
            return None
        match = _PATTERN.match(text)
        if match:
            n, m = int(match.group(1)), int(match.group(2))
            if 0 < n < m:
                return n, m
    raise PruningError(f"unknown sparsity pattern {text!r}: expected {PATTERN_SPELLINGS}")


def check_pattern(n: int, m: int) -> tuple[int, int]:
    """(n, m) if they are integers with 0 < n < m, else PruningError."""
    ok = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in (n, m))
    if not ok or not 0 < n < m:
        raise PruningError(f"bad N:M pattern {n!r}:{m!r}: expected {PATTERN_SPELLINGS}")
    return int(n), int(m)


def _check_scores(scores: torch.Tensor, name: Optional[str]) -> torch.Tensor:
    if scores.dim() != 2:
        raise PruningError(
            f"scores{_in(name)} must be 2-D [out_features, in_features], got shape {tuple(scores.shape)}"
        )
    if not scores.is_floating_point():
        scores = scores.float()
    if bool(torch.isnan(scores).any()):
        raise PruningError(f"scores{_in(name)} contain NaN")
    return scores


def not_multiple(cols: int, n: int, m: int, name: Optional[str]) -> str:
    """The message for an input width that N:M cannot split into groups."""
    return (
        f"in_features {cols}{_in(name)} is not a multiple of M={m}: "
        f"pattern {n}:{m} needs whole groups of {m} columns"
    )


def lowest_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k lowest entries of every row of 2-D `scores` (lower column first among ties).

    O(numel): `kthvalue` finds each row's pivot; only rows where the pivot value repeats past
    the k-th place need the tie rule (a cumulative count over that row's copies of the pivot).
    """
    rows, cols = scores.shape
    if k <= 0 or rows == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= cols:
        return torch.ones_like(scores, dtype=torch.bool)
    pivot = scores.kthvalue(k, dim=1, keepdim=True).values
    below = scores < pivot
    tied = scores == pivot
    n_below = below.sum(dim=1)
    over = (n_below + tied.sum(dim=1)) > k
    if bool(over.any()):
        idx = over.nonzero().reshape(-1)
        room = (k - n_below[idx]).unsqueeze(1)
        sub = tied[idx]
        tied[idx] = sub & (sub.cumsum(dim=1) <= room)
    return below | tied


def lowest_flat(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask (same shape) of the k lowest entries of `scores` in row-major flat order (lower flat
    index first among ties)."""
    flat = scores.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    pivot = flat.kthvalue(k).values
    below = flat < pivot
    room = k - int(below.sum())
    tied = (flat == pivot).nonzero().reshape(-1)[:room]  # nonzero lists indices in ascending order
    below[tied] = True
    return below.reshape(scores.shape)


def row_mask(scores: torch.Tensor, sparsity: float, *, name: Optional[str] = None) -> torch.Tensor:
    """Per output row, prune exactly int(in_features * sparsity) lowest scores (Wanda's
    comparison group; ties: lower column first, like Wanda's stable sort)."""
    s = check_sparsity(sparsity)
    scores = _check_scores(scores, name)
    return lowest_per_row(scores, int(scores.shape[1] * s))


def matrix_mask(scores: torch.Tensor, sparsity: float, *, name: Optional[str] = None) -> torch.Tensor:
    """Whole-matrix comparison group: prune exactly int(numel * sparsity) lowest scores (ties:
    lower row-major flat index first).

    The Wanda repo's magnitude baseline instead prunes everything `<=` the value at that rank,
    which over-prunes when the threshold value repeats (common with 16-bit weights); here the
    count is always exact.
    """
    s = check_sparsity(sparsity)
    scores = _check_scores(scores, name)
    return lowest_flat(scores, int(scores.numel() * s))


def nm_mask(scores: torch.Tensor, n: int, m: int, name: Optional[str] = None) -> torch.Tensor:
    """N:M along the input dimension: in every group of m consecutive columns of each row,
    prune exactly the n lowest scores (ties: lower column first)."""
    n, m = check_pattern(n, m)
    scores = _check_scores(scores, name)
    rows, cols = scores.shape
    if cols % m != 0:
        raise PruningError(not_multiple(cols, n, m, name))
    groups = scores.reshape(rows, cols // m, m)
    order = torch.sort(groups, dim=2, stable=True).indices[:, :, :n]
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, order, True)
    return mask.reshape(rows, cols)


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A copy of `weight` with the pruned entries (mask True) set to exactly zero."""
    if mask.shape != weight.shape:
        raise PruningError(f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}")
    return weight.masked_fill(mask.to(weight.device), 0)


def achieved_sparsity(weight_or_mask: torch.Tensor) -> float:
    """Fraction pruned: of True entries for a bool mask, of exact zeros for weights (0.0 if empty)."""
    n = weight_or_mask.numel()
    if n == 0:
        return 0.0
    if weight_or_mask.dtype == torch.bool:
        pruned = int(weight_or_mask.sum())
    else:
        pruned = n - int(torch.count_nonzero(weight_or_mask))
    return pruned / n


def follows_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of m consecutive input weights of every row holds >= n zeros
    (">=": weights can be zero by accident). False if in_features is not a multiple of m."""
    n, m = check_pattern(n, m)
    if weight.dim() != 2 or weight.shape[1] % m != 0:
        return False
    zeros = (weight == 0).reshape(weight.shape[0], -1, m).sum(dim=2)
    return bool((zeros >= n).all())


def is_finite_number(x: object) -> bool:
    """A real number (not bool) that is finite."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))
