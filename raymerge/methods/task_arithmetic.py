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

from raymerge.methods import checks
from raymerge.methods.registry import MethodSpec, ParamSpec, register
from raymerge.methods.sparsify import (
    RESCALE_MODES,
    bernoulli,
    della_magprune,
    magnitude,
    magnitude_outliers,
    rescale_l1,
)

TRIM_THRESHOLD = "_trim_threshold"


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


# Full-size working copies a task-vector method holds besides its inputs and output (peak memory,
# `runtime.costs`): one delta per model plus the sparsified deltas, |delta| and a mask; DELLA's
# argsort ranks are int64.
TASK_VECTOR_EXTRA = 2.0
DELLA_EXTRA = 6.0


def _register(
    name: str, sparsification: Optional[str], consensus: bool, normalize: bool, rescale: bool, doc: str, cost_ns: float
) -> None:
    params = [
        ParamSpec("weight", per_model=True, required=True, check=checks.number, doc="scale of this model's task vector"),
        ParamSpec("density", 1.0, per_model=True, check=checks.in_range(0, 1), doc="fraction of delta elements kept"),
        ParamSpec("normalize", normalize, check=checks.boolean, doc="divide by the sum of (surviving) weights"),
        ParamSpec("rescale", rescale, check=checks.boolean, doc="rescale kept elements after sparsifying"),
        ParamSpec("lambda", 1.0, check=checks.number, doc="scale of the merged task vector"),
        ParamSpec("int8_mask", False, check=checks.boolean, doc="accepted for mergekit compatibility (memory only)"),
        ParamSpec(
            "rescale_mode", "l1", check=checks.choice(*RESCALE_MODES),
            doc="l1: match the delta's L1 norm (mergekit); inverse_density: divide by keep probability (DARE/DELLA papers)",
        ),
    ]
    if sparsification == "magnitude_outliers":
        params.append(ParamSpec("gamma", 0.01, per_model=True, check=checks.in_range(0, 1), doc="fraction of largest elements removed"))
        params.append(ParamSpec(
            "breadcrumbs_scope", "tensor", check=checks.choice("tensor", "row"),
            doc="tensor: rank over the whole tensor (mergekit); row: in each row of a matrix (the Breadcrumbs paper)",
        ))
    if sparsification == "della":
        params.append(ParamSpec("epsilon", 0.15, per_model=True, check=checks.in_range(0, 1), doc="spread of keep probabilities around density"))
    if sparsification == "magnitude":
        params.append(
            ParamSpec(
                "trim_scope", "tensor", check=checks.choice("tensor", "model"),
                doc="tensor: keep the top density per tensor (mergekit); model: over the whole task vector (TIES paper)",
            )
        )

    def fn(inputs, *, base_index, model_params, params, generator):
        return merge_task_vectors(
            inputs, base_index=base_index, model_params=model_params, params=params,
            generator=generator, sparsification=sparsification, consensus=consensus,
        )

    register(
        MethodSpec(
            name=name,
            fn=fn,
            params=tuple(params),
            base="required",
            random=sparsification in ("random", "della"),
            elementwise=sparsification is None,
            doc=doc,
            extra={"sparsification": sparsification, "consensus": consensus},
            cost_ns=cost_ns,
            extra_copies=(lambda n: DELLA_EXTRA + n) if sparsification == "della" else (lambda n: TASK_VECTOR_EXTRA + n),
            model_trim_key=TRIM_THRESHOLD if sparsification == "magnitude" else None,
        )
    )


_register("task_arithmetic", None, False, False, False, "base + sum of weighted task vectors (arXiv 2212.04089)", cost_ns=3.4)
_register("ties", "magnitude", True, True, False, "TIES: trim by magnitude, elect signs, disjoint mean (arXiv 2306.01708)", cost_ns=15.0)
_register("dare_ties", "random", True, False, True, "DARE drop-and-rescale with TIES sign election (arXiv 2311.03099)", cost_ns=20.0)
_register("dare_linear", "random", False, False, True, "DARE drop-and-rescale, summed linearly (arXiv 2311.03099)", cost_ns=14.0)
_register("breadcrumbs", "magnitude_outliers", False, False, False, "Model Breadcrumbs: drop smallest and outliers (arXiv 2312.06795)", cost_ns=16.0)
_register("breadcrumbs_ties", "magnitude_outliers", True, False, False, "Model Breadcrumbs with TIES sign election (arXiv 2312.06795)", cost_ns=22.0)
_register("della", "della", True, True, True, "DELLA: magnitude-ranked random drop with TIES sign election (arXiv 2406.11617)", cost_ns=95.0)
_register("della_linear", "della", False, False, True, "DELLA: magnitude-ranked random drop, summed linearly (arXiv 2406.11617)", cost_ns=85.0)
