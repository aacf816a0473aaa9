"""TSV-Merge (Task Singular Vectors, Gargiulo et al., CVPR 2025, arXiv 2412.00081).

Per weight matrix: truncate every task vector's SVD, stack the singular vectors of all tasks,
decorrelate the stacks by replacing each with its nearest orthogonal matrix, and rebuild one
merged task vector from them and the stacked singular values.
"""

from __future__ import annotations

import math

import torch

from raymerge.methods.lowrank import as_matrix, compute_dtype, is_matrix, numerical_rank_mask, polar_factor, svd


def tsv_rank(shape: tuple[int, ...], tasks: int, rank_fraction: float) -> int:
    """Singular triplets kept per task: floor(rank_fraction * min(m, n) / tasks), at least 1."""
    rows = shape[0]
    cols = math.prod(shape[1:])
    return max(1, int(rank_fraction * min(rows, cols) / tasks))


def tsv_merge_delta(deltas: list[torch.Tensor], rank_fraction: float) -> torch.Tensor:
    """The TSV-merged task vector of the 2-D `deltas` (same shape, compute dtype)."""
    m, n = deltas[0].shape
    k = tsv_rank((m, n), len(deltas), rank_fraction)
    us, ss, vhs = [], [], []
    for d in deltas:
        u, s, vh = svd(d)
        # Drop numerically-zero singular values: their vectors are arbitrary (e.g. a model equal
        # to the base) and would only rotate the other tasks' vectors in the orthogonalisation.
        keep = numerical_rank_mask(s, (m, n))[:k]
        us.append(u[:, :k][:, keep])
        ss.append(s[:k][keep])
        vhs.append(vh[:k][keep])
    s_all = torch.cat(ss)
    if s_all.numel() == 0:
        return torch.zeros_like(deltas[0])
    u_perp = polar_factor(torch.cat(us, dim=1))  # m x (T k)
    v_perp = polar_factor(torch.cat(vhs, dim=0).T)  # n x (T k)
    return (u_perp * s_all) @ v_perp.T


def tsv(inputs, *, base_index, model_params, params, generator):
    """TSV-Merge: theta = base + alpha * TSV(delta_1, ..., delta_T), per tensor.

    Parameters (global):
    - `alpha` (default 1.0): scale of the merged task vector. The paper picks it on validation
      data (sweeping 0.1..3.0); 1.0 adds the merged task vector as is.
    - `rank_fraction` (default 1.0, in (0, 1]): the rank budget as a fraction of min(m, n),
      split evenly over the T tasks: each keeps k = floor(rank_fraction * min(m, n) / T)
      (at least 1) leading singular triplets. 1.0 is the paper's k = rank / T.

    For a 2-D weight (tensors with more dimensions are reshaped to (shape[0], -1)) and each task
    vector delta_t = U_t S_t V_t^T: keep its k leading triplets; stack U = [U_1k | ... | U_Tk],
    S = [S_1k; ...; S_Tk], V = [V_1k | ... | V_Tk]; orthogonalise each stack by its polar factor
    (SVD U = P Sigma Q^T, U_perp = P Q^T; the same for V); the merged task vector is
    U_perp diag(S) V_perp^T.

    Choices where the paper leaves room (or we deviate):
    - non-matrix tensors (norms, biases, 1-D) get the mean task vector (task arithmetic with
      weight 1/T), scaled by `alpha` like the matrices, as the official code does;
    - embeddings and lm_head are 2-D and decomposed like any other matrix (the official code
      only excludes CLIP's text_projection); a filter on `rank_fraction` can change their budget;
    - singular triplets below the numerical-rank tolerance (S_max * max(m, n) * eps) are
      dropped before stacking: a task vector that is zero or rank-deficient would otherwise add
      arbitrary directions that rotate the other tasks' vectors;
    - per-model `weight`s are not part of the method and not accepted.

    SVDs run in float32 (float64 for float64 inputs); the result is cast to the input dtype.
    Deterministic. Cost: T + 2 thin SVDs per matrix, O(T m n min(m, n)).
    """
    base = inputs[base_index]
    others = [x for i, x in enumerate(inputs) if i != base_index]
    if not others:
        return base
    work = compute_dtype(base)
    base_w = base.to(work)
    deltas = [x.to(work) - base_w for x in others]
    if is_matrix(base):
        merged = tsv_merge_delta([as_matrix(d) for d in deltas], float(params["rank_fraction"])).reshape(base.shape)
    else:
        merged = torch.stack(deltas).mean(dim=0)
    return (base_w + params["alpha"] * merged).to(base.dtype)
