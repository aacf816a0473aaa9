"""RAM and RAM+ (Reinforced Agent Merging, arXiv 2601.13572), tensor-local, as in mergekit 0.1.5.

With task vectors tau_i = x_i - base, an element is *active* for model i when |tau_i| > epsilon
(an absolute threshold; inactive elements count as zero). Per element, c = the number of models
active there:

- ``ram``: elements only one model changed (c = 1) take that model's change as is; elements
  several models changed (c > 1) take the mean of their changes over those c models (not over
  all models, so a change is not diluted by models that left the element alone). The result is
  base + that.
- ``ramplus_tl``: as ``ram``, but each model's unique changes (c = 1) are scaled up by
  lambda_i = 1 + r * clip(rho_i, 0, alpha), where rho_i is the number of model i's active
  elements that are shared (c > 1) divided by the number that are unique to it (at least
  epsilon), counted over this tensor only (the "tensor-local" of the name, which suggests the
  paper's RAM+ counts over the whole model; not checked against the paper text).

Choices mergekit 0.1.5 makes that the paper does not spell out, kept here for equal numbers:
``epsilon`` (1e-5) is an absolute magnitude threshold on the task vectors, also used as the
floor of rho's denominator; rho, lambda are computed in the default float dtype (float32), so
with 16-bit inputs the unique part is computed in float32 before the final cast; shared
elements are averaged without weights; there is no ``weight`` parameter.

Determinism: the counts are integer sums; the merge itself is per element.
"""

from __future__ import annotations

import torch


def _active_task_vectors(inputs, base_index, epsilon):
    """(base, task vectors [n, numel] zeroed where inactive, active mask, per-element counts)."""
    base = inputs[base_index]
    others = [x for i, x in enumerate(inputs) if i != base_index]
    flat = torch.stack([x - base for x in others]).reshape(len(others), -1)
    active = flat.abs() > epsilon
    counts = active.sum(dim=0, keepdim=True)
    return base, flat * active, active, counts


def _merge(base, changes, counts, unique_scale=None):
    unique = counts == 1
    shared = counts > 1
    solo = changes * unique
    if unique_scale is not None:
        solo = solo * unique_scale.unsqueeze(-1)
    merged = (solo + changes * shared / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def ram(inputs, *, base_index, model_params, params, generator):
    if len(inputs) == 1:
        return inputs[base_index]
    base, changes, _, counts = _active_task_vectors(inputs, base_index, float(params["epsilon"]))
    return _merge(base, changes, counts)


def ramplus_tl(inputs, *, base_index, model_params, params, generator):
    if len(inputs) == 1:
        return inputs[base_index]
    epsilon = float(params["epsilon"])
    base, changes, active, counts = _active_task_vectors(inputs, base_index, epsilon)
    n_shared = (active & (counts > 1)).sum(dim=1)
    n_unique = (active & (counts == 1)).sum(dim=1)
    # an int64 count clamped by a float becomes the default float dtype (float32), as in mergekit
    rho = n_shared / n_unique.clamp(min=epsilon)
    scale = 1 + float(params["r"]) * rho.clamp(min=0, max=float(params["alpha"]))
    return _merge(base, changes, counts, unique_scale=scale)
