"""Karcher mean (Riemannian centre of mass) of the models on the unit hypersphere (arXiv 2603.04972).

Each input tensor is one flat vector x_i. Its direction u_i = x_i / |x_i| is a point on the unit
sphere; the merged direction m minimises sum_i a_i d(m, u_i)^2 (d the great-circle distance). It
is found by Riemannian gradient steps: start from the normalised weighted average of the u_i,
then repeatedly map every u_i to the tangent space at m (log map: theta_i / sin(theta_i) *
(u_i - cos(theta_i) m), theta_i the angle between m and u_i), average those tangents with the
weights, and move m along the average (exp map) until the step is shorter than `tol` or after
`max_iter` steps. The result is m scaled by sum_i a_i |x_i|.

As in mergekit 0.1.5:
- every input has the same weight a_i = 1/N (there is no `weight` parameter) and there is no
  base model: a `base_model` is an ordinary input.
- inputs with a norm of at most `tol` do not take part in the mean (their weights are
  renormalised over the rest) but their norms still count in the final scale; when every input
  is that small the result is zero. A tangent is skipped when its angle is below `tol`, and the
  average direction falls back to the first input's when it is shorter than `tol`.
- norms are taken in float32 (float64 for float64 inputs); the iteration runs in the working
  dtype. One input is returned unchanged.

Determinism: the norms and dot products are whole-tensor reductions and go through
`raymerge.methods.reductions` (fixed-order float64 chunks above 32768 elements; 16-bit inputs
multiply in float32 as torch.dot does). mergekit takes the float32 dot products with
`torch.dot` (MKL's sdot), whose rounding changes with the thread count from ~10,000 elements,
so float32 results can differ from mergekit's in the last bits (the differential tests see at
most ~4e-7); 16-bit results and small tensors match exactly.
"""

from __future__ import annotations

import torch

from raymerge.methods import reductions


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) in a's dtype, thread-count independent. 16-bit inputs multiply and accumulate
    in float32 (as torch.dot does for them) rather than rounding every product to 16 bits."""
    a, b = a.reshape(-1), b.reshape(-1)
    if a.dtype in (torch.float16, torch.bfloat16):
        return reductions.dot(a.float(), b.float()).to(a.dtype)
    return reductions.dot(a, b)


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The weighted Karcher mean of `tensors`' directions, scaled by sum_i alphas[i] |tensors[i]|."""
    if len(tensors) == 1:
        return tensors[0]
    norm_dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [reductions.vector_norm(t.to(norm_dtype)) for t in tensors]
    directions = [torch.zeros_like(t) if float(n) == 0.0 else (t / n).to(t.dtype) for t, n in zip(tensors, norms)]

    live = [i for i, n in enumerate(norms) if float(n) > tol]
    if not live:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in live)
    weights = [alphas[i] / total for i in live]
    points = [directions[i] for i in live]

    mean = torch.zeros_like(points[0])
    for w, u in zip(weights, points):
        mean += w * u
    length = reductions.vector_norm(mean.to(norm_dtype))
    mean = points[0].clone() if float(length) < tol else (mean / length).to(mean.dtype)

    for _ in range(int(max_iter)):
        step = torch.zeros_like(mean)
        for w, u in zip(weights, points):
            cos = _dot(mean, u).clamp(-1.0, 1.0)
            theta = torch.arccos(cos)
            if float(theta) < tol:
                continue
            step += w * (theta / torch.sin(theta)) * (u - cos * mean)  # log map of u at mean
        length = reductions.vector_norm(step.to(norm_dtype))
        if float(length) < tol:
            break
        mean = (torch.cos(length) * mean + torch.sin(length) * (step / length)).to(mean.dtype)  # exp map
        length = reductions.vector_norm(mean.to(norm_dtype))
        if float(length) > tol:
            mean = (mean / length).to(mean.dtype)

    scale = sum(a * n for a, n in zip(alphas, norms))
    return scale * mean


def karcher(inputs, *, base_index, model_params, params, generator):
    n = len(inputs)
    return karcher_mean(list(inputs), [1.0 / n] * n, max_iter=int(params["max_iter"]), tol=float(params["tol"]))
