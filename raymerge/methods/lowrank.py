"""Linear-algebra helpers shared by the SVD-based merge methods (`tsv`, `lore`): pure torch.

Weights arrive in the merge's working dtype (often bfloat16), which `torch.linalg.svd` does not
take; these helpers compute in float32 (float64 for float64 inputs) and the methods cast their
result back. Tensors with more than two dimensions are treated as matrices of shape
(shape[0], prod(shape[1:])), as a conv kernel's [out, in, kh, kw] would be.
"""

from __future__ import annotations

import torch

from raymerge.methods.reductions import fixed_threads


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, else float32 (SVD has no 16-bit kernels)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def is_matrix(t: torch.Tensor) -> bool:
    """True for tensors the SVD methods decompose (2 or more dimensions, none of size 0)."""
    return t.dim() >= 2 and t.numel() > 0


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """`t` as a 2-D matrix (rows = first dimension)."""
    return t.reshape(t.shape[0], -1)


def svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD m = U diag(S) Vh, singular values descending (on a fixed thread count: LAPACK's
    blocking follows it, see `methods.reductions`)."""
    with fixed_threads():
        return torch.linalg.svd(m, full_matrices=False)


def numerical_rank_mask(s: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Which singular values are above the numerical-rank tolerance S_max * max(m, n) * eps
    (numpy's / torch's `matrix_rank` default); the directions of the others are arbitrary."""
    if s.numel() == 0:
        return torch.zeros_like(s, dtype=torch.bool)
    tol = s.max() * max(shape) * torch.finfo(s.dtype).eps
    return s > tol


def polar_factor(m: torch.Tensor) -> torch.Tensor:
    """The orthogonal (polar) factor P Q^T of m = P S Q^T: the matrix with orthonormal columns
    (rows when m is wide) nearest to m in Frobenius norm."""
    p, _, qh = svd(m)
    return p @ qh


def svt(m: torch.Tensor, mu: float) -> torch.Tensor:
    """Singular-value soft-thresholding: U diag(max(S - mu, 0)) V^T."""
    u, s, vh = svd(m)
    s = (s - mu).clamp_min(0)
    keep = int(torch.count_nonzero(s))  # s is descending: the kept ones come first
    if keep == 0:
        return torch.zeros_like(m)
    return (u[:, :keep] * s[:keep]) @ vh[:keep]
