"""Multi-SLERP: barycentric interpolation of any number of models on a hypersphere
(https://goddard.blog/posts/multislerp-wow-what-a-cool-idea), as in mergekit 0.1.5.

Each model's tensor (its task vector x_i - base when there is a base model) is one flat vector
v_i with weight w_i (divided by sum_i w_i when `normalize_weights`). The directions
u_i = v_i / (|v_i| + eps) are averaged with the weights; the average, normalised, is the centre c.
Each u_i is projected onto the tangent space at c (u_i - (u_i . c) c), the projections are
summed with the weights into t, and t is mapped back to the sphere by the exponential map:
c cos|t| + t sin|t| / |t| (eps added to |t|). The result is scaled by sum_i w_i |v_i| (and the
base added back).

Edge cases, as in mergekit: one model (besides the base) is returned unchanged (the model, not
base + its task vector); when the weighted average of the directions is shorter than `eps`,
two models are interpolated linearly (w_0 v_0 + w_1 v_1, plus the base) and more models are an
error (antipodal inputs whose weights cancel).

Determinism: the per-model norms (one output per model) and the whole-tensor norms go through
`raymerge.methods.reductions`.
"""

from __future__ import annotations

import torch

from raymerge.methods import reductions
from raymerge.methods.registry import MethodError


def multislerp(inputs, *, base_index, model_params, params, generator):
    chosen = [i for i in range(len(inputs)) if i != base_index]
    if len(chosen) == 1:
        return inputs[chosen[0]]
    base = None if base_index is None else inputs[base_index]
    shape = inputs[chosen[0]].shape
    eps = float(params["eps"])

    points = torch.stack([inputs[i] for i in chosen])
    if base is not None:
        points -= base
    flat = points.reshape(len(chosen), -1)
    weights = torch.tensor([float(model_params[i]["weight"]) for i in chosen], dtype=flat.dtype, device=flat.device)
    if params["normalize_weights"]:
        weights = weights / weights.sum()
    column = weights.view(-1, 1)

    norms = reductions.norm_dim(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    centre = (units * column).sum(0)
    centre_norm = reductions.vector_norm(centre)
    if centre_norm < eps:
        if len(chosen) != 2:
            raise MethodError(
                "multislerp: the weighted sum of the models' directions is zero (antipodal models whose "
                "weights cancel); change a weight"
            )
        result = (points[0] * weights[0] + points[1] * weights[1]).view(shape)
        return result if base is None else result + base
    centre = centre / centre_norm

    cosines = reductions.sum_dim(units * centre, dim=-1, keepdim=True)
    tangent = ((units - cosines * centre) * column).sum(0)
    length = reductions.vector_norm(tangent) + eps
    result = centre * torch.cos(length) + tangent * (torch.sin(length) / length)
    result = (result * (norms.squeeze(-1) * weights).sum()).view(shape)
    return result if base is None else result + base
