"""The task-arithmetic family: task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs,
breadcrumbs_ties, della, della_linear.

All are one formula with two switches (as in mergekit): each fine-tune's delta from the base is
optionally sparsified (magnitude / random / magnitude with outliers / DELLA), weighted, optionally
filtered by TIES sign election, summed, optionally normalised by the weights that survived, scaled
by `lambda` and added to the base.

Options beyond mergekit (defaults keep mergekit 0.1.5's behaviour):
- `rescale_mode: inverse_density` rescales kept elements as the DARE paper does, by 1 / (1 - p)
  (DELLA: by each element's own keep probability) instead of mergekit's L1 norm matching.
- `trim_scope: model` (ties) picks the kept elements over each model's whole task
  vector, as the TIES paper does, instead of per tensor. The runtime then finds one magnitude
  threshold per model before merging and passes it in as the `_trim_threshold` per-model value.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from raymerge.methods.catalog import TRIM_THRESHOLD
from raymerge.methods.sparsify import (
    bernoulli,
    della_magprune,
    magnitude,
    magnitude_outliers,
    rescale_l1,
)


def sparsify_delta(delta: torch.Tensor, kind: Optional[str], mp: dict[str, Any], params: dict[str, Any], generator) -> torch.Tensor:
    """Apply the method's sparsification to one delta with that model's parameters."""
    if kind is None:
        return delta
    rescale = params.get("rescale_mode", "l1") if params["rescale"] else None
    density = mp["density"]
    if kind == "magnitude":
        threshold = mp.get(TRIM_THRESHOLD)
        if threshold is not None:  # trim_scope: model
            masked = delta * (delta.abs() >= threshold).to(delta.dtype)
            return masked if rescale is None else _rescale_model_scope(delta, masked, rescale, density)
        return magnitude(delta, density, rescale)
    if kind == "random":
        return bernoulli(delta, density, generator, rescale)
    if kind == "magnitude_outliers":
        return magnitude_outliers(delta, density, mp["gamma"], rescale, per_row=params.get("breadcrumbs_scope") == "row")
    if kind == "della":
        return della_magprune(delta, density, mp["epsilon"], generator, rescale)
    raise ValueError(f"unknown sparsification {kind!r}")


def _rescale_model_scope(delta: torch.Tensor, masked: torch.Tensor, rescale: str, density: float) -> torch.Tensor:
    return rescale_l1(delta, masked) if rescale == "l1" else (masked / density if density > 0 else masked)


def sign_consensus(deltas: torch.Tensor) -> torch.Tensor:
    """TIES sign election: per element, the sign of the summed (weighted) deltas wins (ties: +);
    returns the mask of deltas that agree with it (zeros never agree), in the deltas' dtype."""
    majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    return ((deltas * majority) > 0).to(deltas.dtype)  # same as sign(d) == majority, cheaper


# Elements per model processed at once after sparsifying: the [models, CHUNK] working set and
# its temporaries stay in cache, which makes these memory-bound passes about twice as fast and
# bounds the extra memory. Results do not depend on it (every step is per element).
CHUNK = 1 << 16


def merge_task_vectors(
    inputs: list[torch.Tensor],
    *,
    base_index: Optional[int],
    model_params: list[dict[str, Any]],
    params: dict[str, Any],
    generator: Optional[torch.Generator],
    sparsification: Optional[str],
    consensus: bool,
) -> torch.Tensor:
    assert base_index is not None
    base = inputs[base_index]
    others = [i for i in range(len(inputs)) if i != base_index]
    if not others:
        return base
    deltas = [
        sparsify_delta(inputs[i] - base, sparsification, model_params[i], params, generator).reshape(-1)
        for i in others
    ]
    weights = torch.tensor([model_params[i]["weight"] for i in others], dtype=base.dtype, device=base.device)
    weights = weights.reshape(len(others), 1)
    flat_base = base.reshape(-1)
    out = torch.empty_like(flat_base)
    for a in range(0, flat_base.numel(), CHUNK):
        b = min(a + CHUNK, flat_base.numel())
        chunk = torch.stack([d[a:b] for d in deltas]).mul_(weights)
        if consensus:
            mask = sign_consensus(chunk)
            mixed = chunk.mul_(mask).sum(dim=0)
            divisor = (weights * mask).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = chunk.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if params["normalize"]:
            mixed /= divisor
        if params["lambda"] != 1:
            mixed *= params["lambda"]
        torch.add(flat_base[a:b], mixed, out=out[a:b])
    return out.reshape(base.shape)


def _variant(sparsification: Optional[str], consensus: bool):
    """The merge function of one method of the family (its spec: `raymerge.methods.catalog`)."""

    def fn(inputs, *, base_index, model_params, params, generator):
        return merge_task_vectors(
            inputs, base_index=base_index, model_params=model_params, params=params,
            generator=generator, sparsification=sparsification, consensus=consensus,
        )

    return fn


task_arithmetic = _variant(None, consensus=False)
ties = _variant("magnitude", consensus=True)
dare_ties = _variant("random", consensus=True)
dare_linear = _variant("random", consensus=False)
breadcrumbs = _variant("magnitude_outliers", consensus=False)
breadcrumbs_ties = _variant("magnitude_outliers", consensus=True)
della = _variant("della", consensus=True)
della_linear = _variant("della", consensus=False)
