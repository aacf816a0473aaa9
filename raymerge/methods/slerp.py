"""Spherical interpolation: slerp (two models, base at t = 0) and nuslerp (two models with
weights, optionally around a base).

slerp treats each tensor as one flat vector: with the angle theta between the normalised
vectors, out = sin((1-t) theta)/sin(theta) * a + sin(t theta)/sin(theta) * b, falling back to
linear interpolation when |cos theta| > 0.9995. Computed in float32 (float64 inputs: float64)
and returned in the input dtype, like mergekit 0.1.5.

nuslerp interpolates at t = w_1 / (w_0 + w_1); by default over the flattened tensor, or per row
(`nuslerp_row_wise`) / per last-dimension vector (`nuslerp_flatten: false`). With a base model it
interpolates the two task vectors and adds the result to the base.
"""

from __future__ import annotations

import torch

from raymerge.methods import reductions

DOT_THRESHOLD = 0.9995


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    work = torch.float64 if v0.dtype == torch.float64 else torch.float32
    a = v0.reshape(-1).to(work)
    b = v1.reshape(-1).to(work)
    norm_a = reductions.vector_norm(a)
    norm_b = reductions.vector_norm(b)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = reductions.total((a / norm_a) * (b / norm_b)).clamp(-1, 1)
    if dot.abs() > DOT_THRESHOLD:
        coef_a, coef_b = 1 - t, t
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        coef_a = torch.sin((1 - t) * theta) / sin_theta
        coef_b = torch.sin(t * theta) / sin_theta
    return (coef_a * a + coef_b * b).to(v0.dtype).reshape(v0.shape)


def slerp(inputs, *, base_index, model_params, params, generator):
    other = 1 - base_index
    return slerp_tensors(float(params["t"]), inputs[base_index], inputs[other])


def nuslerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool, flatten: bool, eps: float = 1e-8) -> torch.Tensor:
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / reductions.norm_dim(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = reductions.sum_dim(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin_theta = torch.sin(theta)
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp(inputs, *, base_index, model_params, params, generator):
    others = [i for i in range(len(inputs)) if i != base_index]
    w0, w1 = (float(model_params[i]["weight"]) for i in others)
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    x0, x1 = (inputs[i] for i in others)
    opts = dict(row_wise=params["nuslerp_row_wise"], flatten=params["nuslerp_flatten"])
    if base_index is None:
        return nuslerp_tensors(t, x0, x1, **opts)
    base = inputs[base_index]
    return base + nuslerp_tensors(t, x0 - base, x1 - base, **opts)
