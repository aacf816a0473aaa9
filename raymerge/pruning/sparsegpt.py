"""SparseGPT (Frantar & Alistarh, 2023): prune one linear layer and update its remaining weights
to compensate, from the Hessian proxy H = X^T X of the layer's calibration inputs.

Pure torch; runs on the weight's device, computes in float32 and returns the weights in the
input dtype. The algorithm follows the reference implementation (IST-DASLab/sparsegpt):
1. dead inputs (diag(H) == 0) get H_ii = 1 and their weight column is zeroed;
2. H += dampening * mean(diag(H)) * I;
3. U = upper Cholesky factor of H^-1 (Cholesky of H, `cholesky_inverse`, Cholesky again);
4. columns are processed in blocks of `blocksize` with lazy batched updates: inside a block,
   each column is pruned and its error err = (w - q) / U_ii is spread over the block's later
   columns through U[i, i:]; after the block, over all later columns at once.

Mask selection differs from the reference in one respect: counts are exact. Unstructured: at the
start of each block the saliency w^2 / U_cc^2 (current, already-updated weights) is ranked over
the whole block, and the block prunes exactly its allotted count (ties: lower row-major index
first). Block counts are floor or ceil of numel_block * sparsity, with the ceilings given to the
largest fractional remainders (ties: earlier block), so that the matrix prunes exactly
int(numel * sparsity). The reference prunes every saliency `<=` the value at rank
int(numel_block * s), i.e. at least one more per block. N:M: at every column i with i % M == 0,
each row prunes its N lowest saliencies among columns i..i+M-1 (current weights).

If the dampened H is not positive definite, the dampening is retried x10 (three times) before
PruningError; llm-compressor instead falls back to the identity silently.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Optional

import torch

from raymerge.methods.reductions import fixed_threads, mean
from raymerge.pruning.masks import (
    PruningError,
    _in,
    check_pattern,
    check_sparsity,
    is_finite_number,
    lowest_flat,
    nm_mask,
    not_multiple,
)

DAMPENING_RETRIES = 3


def block_counts(rows: int, widths: list[int], sparsity: float) -> list[int]:
    """Prune counts per column block: each floor or ceil of rows * width * sparsity (exact
    rational arithmetic), summing to int(rows * sum(widths) * sparsity); the ceilings go to the
    largest fractional parts, earlier blocks first among equal ones."""
    s = Fraction(sparsity)
    ideal = [rows * w * s for w in widths]
    counts = [int(c) for c in ideal]  # floor: all non-negative
    total = int(rows * sum(widths) * sparsity)
    extra = total - sum(counts)  # 0 <= extra <= len(widths) (float rounding of `total` can add 1)
    order = sorted(range(len(widths)), key=lambda k: (-(ideal[k] - counts[k]), k))
    for k in order[: max(0, extra)]:
        counts[k] = min(counts[k] + 1, rows * widths[k])
    return counts


def _upper_inverse_factor(hessian: torch.Tensor, dampening: float, name: Optional[str]) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, retrying with x10 dampening."""
    mean_diag = mean(hessian.diagonal())
    damp = dampening
    tried = []
    for _ in range(DAMPENING_RETRIES + 1):
        damped = hessian.clone()
        damped.diagonal().add_(damp * mean_diag)
        with fixed_threads():  # LAPACK blocks by thread count (methods.reductions)
            lower, info = torch.linalg.cholesky_ex(damped)
            if int(info) == 0:
                upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                return upper
        tried.append(damp)
        damp = damp * 10 if damp > 0 else 0.01
    raise PruningError(
        f"SparseGPT{_in(name)}: the Hessian is not positive definite even with dampening "
        f"{', '.join(f'{d:g}' for d in tried)} (x mean diagonal)"
    )


def _check_args(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: Optional[tuple[int, int]],
    blocksize: int,
    dampening: float,
    name: Optional[str],
) -> tuple[float, Optional[tuple[int, int]]]:
    where = _in(name)
    if weight.dim() != 2:
        raise PruningError(f"weight{where} must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    cols = weight.shape[1]
    if tuple(hessian.shape) != (cols, cols):
        raise PruningError(
            f"Hessian{where} must be [{cols}, {cols}] for in_features={cols}, got shape {tuple(hessian.shape)}"
        )
    if not bool(torch.isfinite(hessian).all()):
        raise PruningError(f"Hessian{where} has non-finite entries")
    s = check_sparsity(sparsity)
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise PruningError(f"blocksize must be a positive integer, got {blocksize!r}")
    if not is_finite_number(dampening) or dampening < 0:
        raise PruningError(f"dampening must be a finite number >= 0, got {dampening!r}")
    if pattern is not None:
        n, m = check_pattern(*pattern)
        if abs(s - n / m) > 1e-9:
            raise PruningError(f"sparsity {sparsity!r} does not match pattern {n}:{m} (which prunes {n / m:g})")
        if cols % m != 0:
            raise PruningError(not_multiple(cols, n, m, name))
        if blocksize % m != 0:
            raise PruningError(f"blocksize {blocksize} must be a multiple of M={m} for pattern {n}:{m}")
        pattern = (n, m)
    return s, pattern


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    *,
    pattern: Optional[tuple[int, int]] = None,
    blocksize: int = 128,
    dampening: float = 0.01,
    name: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune `weight` [out, in] to `sparsity` with SparseGPT; return (new weight, mask).

    `hessian` is [in, in] (e.g. `HessianStats.hessian()`, any scale, any device). With `pattern`
    (n, m) the mask is N:M and `sparsity` must equal n / m. The mask (True = pruned) holds exactly
    int(numel * sparsity) entries (N:M: exactly n per group); the new weight is exactly 0 there,
    and also in dead-input columns (the reference zeroes them; they cannot affect the calibration
    outputs), which the mask includes only where its selection picked them.
    """
    s, pattern = _check_args(weight, hessian, sparsity, pattern, blocksize, dampening, name)
    rows, cols = weight.shape
    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(device=W.device, dtype=torch.float32).clone()
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1
    W[:, dead] = 0
    U = _upper_inverse_factor(H, float(dampening), name)
    del H

    starts = list(range(0, cols, blocksize))
    counts = block_counts(rows, [min(blocksize, cols - i1) for i1 in starts], s) if pattern is None else []
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    for b, i1 in enumerate(starts):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        diag1 = U1.diagonal()
        Err1 = torch.zeros_like(W1)
        if pattern is None:
            mask1 = lowest_flat(W1.square() / diag1.square().unsqueeze(0), counts[b])
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if pattern is not None and i % pattern[1] == 0:  # blocks start at multiples of M
                j = i + pattern[1]
                saliency = W1[:, i:j].square() / diag1[i:j].square().unsqueeze(0)
                mask1[:, i:j] = nm_mask(saliency, pattern[0], pattern[1], name)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0)
            err = (w - q) / diag1[i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            W1[:, i] = q  # exact zeros (the update above leaves rounding residue)
            Err1[:, i] = err
        W[:, i1:i2] = W1
        mask[:, i1:i2] = mask1
        if i2 < cols:
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    W[:, dead] = 0
    W.masked_fill_(mask, 0)
    return W.to(weight.dtype), mask
