"""Differential tests: raymerge against mergekit 0.1.5 on the same configs and tiny models.

Every one of mergekit 0.1.5's 20 methods (linear, task_arithmetic, ties, breadcrumbs,
breadcrumbs_ties, slerp, nuslerp, model_stock, passthrough, sce, karcher, multislerp, nearswap,
arcee_fusion, ram, ramplus_tl, and the random dare_ties, dare_linear, della, della_linear at
densities that draw no mask, see below) is run through both tools on the session's tiny models
(llama float32 and bfloat16, qwen2 float32), with layer gradients, `filter:` conditionals,
`slices` (frankenmerges, offsets, repeated layers), and `dtype`/`out_dtype`. The outputs are
compared tensor by tensor: the same tensor names, shapes and dtypes, values within float
tolerance (float32 compute: atol 1e-5 + rtol 1e-5, in practice bit-identical; bfloat16 compute
or inputs: one bfloat16 ulp of the value), and the same layer count, architecture and dtype in
``config.json`` (for ``slices`` also the expected stacked layer count).

One documented exception: TIES on bfloat16 task vectors. Both tools keep exactly the top k
magnitudes, but bfloat16 deltas take few distinct values, so many elements tie at the k-th
magnitude, and which of those are kept differs (raymerge: lowest index; mergekit: whatever
torch's unstable argsort yields). Those cases skip exactly the tied elements (computed from the
inputs by `threshold_ties`) and check every other element.

mergekit runs from its own virtualenv (``tests/mergekit_oracle.py`` builds it on first use, about
40 s; later runs reuse it). When it cannot be built or used (no package index,
``RAYMERGE_NO_MERGEKIT=1``) every comparison here is skipped with the reason.

Speed: mergekit runs once per config, but all selected configs go through one mergekit process
(``run_mergekit_many``), so its ~5 s of imports are paid once; each raymerge merge runs in
process (``in_process=True``: the same worker code, no Ray; ``tests/test_in_process.py`` checks it
gives the bytes of a Ray merge). The file takes about 2 minutes on 2 cores once the venv exists.

The random methods (``dare_ties``, ``dare_linear``, ``della``, ``della_linear``) are compared only
where no mask is drawn: at density 1 (and, for ``filter: mlp``, density 0) both tools return the
task vectors unchanged (zeroed), so what is compared is everything around the mask: weights,
TIES sign consensus, ``lambda``, ``normalize``, DELLA's ``epsilon`` handling. With a density in
(0, 1) mergekit draws the masks from torch's global RNG stream in its execution order, raymerge
from a generator seeded per (seed, tensor name) so that results do not depend on placement; those
masks cannot match (``tests/test_methods*.py`` check raymerge's against the formulas). A fractional
density therefore never appears in these cases: not even through a per-layer gradient such as
``[1.0, 0.0]``, which interpolates to densities between the two. ``test_cases_cover_every_mergekit_method``
reads mergekit's own method registry and fails when one of its methods has no case here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch

import raymerge
from mergekit_oracle import (
    assert_tensors_close,
    load_tensors,
    mergekit_python,
    mergekit_unavailable_reason,
    run_mergekit_many,
)

pytestmark = pytest.mark.mergekit

Models = dict[str, Path]

FP32_ATOL = 1e-5
FP32_RTOL = 1e-5

# Random methods: compared only at densities 1 and 0, where no mask is drawn (module docstring).
RANDOM_METHODS = ("dare_ties", "dare_linear", "della", "della_linear")


@dataclass(frozen=True)
class Case:
    id: str
    family: str  # fixture name: llama_models, qwen2_models or llama_bf16_models
    build: Callable[[Models], dict[str, Any]]
    bf16: bool = False  # computed or stored in bfloat16: allow one bfloat16 ulp
    layers: Optional[int] = None  # expected num_hidden_layers of the output (slices)
    # magnitude trimming (ties) on bfloat16 task vectors: many elements share the threshold
    # magnitude, and which of them are kept is not determined by value (see threshold_ties)
    trim_ties: bool = False


def m(p: Models, name: str, **params: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"model": str(p[name])}
    if params:
        entry["parameters"] = params
    return entry


def src(p: Models, name: str, start: int, end: int, **params: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"model": str(p[name]), "layer_range": [start, end]}
    if params:
        entry["parameters"] = params
    return entry


def with_base(method: str, p: Models, models: list[dict[str, Any]], **top: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"merge_method": method, "base_model": str(p["base"]), "models": models}
    cfg.update(top)
    return cfg


SLERP_T = [0, 0.5, 0.3, 0.7, 1]
ATTN_MLP_T = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]


def ties_gradient(p: Models, **top: Any) -> dict[str, Any]:
    """TIES with a per-layer density gradient, a `filter: self_attn` density and a weight filter."""
    return with_base(
        "ties", p,
        [
            m(p, "ft1", weight=1.0, density=[0.9, 0.3]),
            m(p, "ft2", weight=0.6, density=[{"filter": "self_attn", "value": 0.3}, {"value": 0.7}]),
            m(p, "ft3", weight=[{"filter": "mlp", "value": 0.3}, {"value": 0.9}], density=0.5),
        ],
        parameters={"normalize": True},
        **top,
    )


CASES: list[Case] = [
    # -- linear --------------------------------------------------------------------------
    Case("linear-normalized-with-base", "llama_models", lambda p: {
        "merge_method": "linear",
        "models": [m(p, "base", weight=0.2), m(p, "ft1", weight=0.5), m(p, "ft2", weight=0.3)],
    }),
    Case("linear-unnormalized-gradient", "llama_models", lambda p: {
        "merge_method": "linear",
        "models": [m(p, "ft1", weight=[0.2, 0.8]), m(p, "ft2", weight=0.7), m(p, "ft3", weight=-0.2)],
        "parameters": {"normalize": False},
    }),
    Case("linear-base-model-listed", "llama_models", lambda p: with_base(
        "linear", p, [m(p, "base", weight=1.0), m(p, "ft3", weight=[{"filter": "mlp", "value": 2.0}, {"value": 0.5}])],
    )),
    # -- task arithmetic -----------------------------------------------------------------
    Case("task-arithmetic-lambda", "llama_models", lambda p: with_base(
        "task_arithmetic", p,
        [m(p, "ft1", weight=1.0), m(p, "ft2", weight=0.5), m(p, "ft3", weight=-0.3)],
        parameters={"lambda": 0.7},
    )),
    Case("task-arithmetic-normalized", "llama_models", lambda p: with_base(
        "task_arithmetic", p, [m(p, "ft1", weight=[0.3, 1.0]), m(p, "ft2", weight=0.6)],
        parameters={"normalize": True, "lambda": 1.3},
    )),
    # -- ties ----------------------------------------------------------------------------
    Case("ties-gradient-filter", "llama_models", ties_gradient),
    Case("ties-unnormalized-lambda-rescale", "llama_models", lambda p: with_base(
        "ties", p,
        [m(p, "ft1", weight=0.7, density=0.4), m(p, "ft2", weight=0.5, density=0.9), m(p, "ft3", weight=0.4, density=0.2)],
        parameters={"normalize": False, "lambda": 0.8, "rescale": True},
    )),
    Case("ties-slices-offsets-precedence", "llama_models", lambda p: {
        # layer offsets differ between sources; slice parameters beat top-level ones, and a
        # source's own parameters beat both
        "merge_method": "ties",
        "base_model": str(p["base"]),
        "slices": [
            {"sources": [src(p, "base", 0, 2), src(p, "ft1", 1, 3, weight=1.0, density=0.5),
                         src(p, "ft2", 2, 4, density=[0.2, 0.8])],
             "parameters": {"weight": 0.7}},
            {"sources": [src(p, "base", 1, 4), src(p, "ft1", 1, 4, weight=0.3), src(p, "ft3", 0, 3, density=0.5)]},
        ],
        "parameters": {"weight": 0.4, "density": 0.9, "normalize": False},
    }, layers=5),
    # -- breadcrumbs -----------------------------------------------------------------------
    Case("breadcrumbs", "llama_models", lambda p: with_base(
        "breadcrumbs", p,
        [m(p, "ft1", weight=1.0, density=0.8, gamma=0.05), m(p, "ft2", weight=0.5, density=0.6),
         m(p, "ft3", weight=0.3, density=[0.9, 0.5], gamma=0.1)],
    )),
    Case("breadcrumbs-ties-gamma", "llama_models", lambda p: with_base(
        "breadcrumbs_ties", p,
        [m(p, "ft1", weight=1.0, density=0.7, gamma=0.02), m(p, "ft2", weight=0.8, density=0.5, gamma=0.1),
         m(p, "ft3", weight=0.6, density=0.9, gamma=[{"filter": "self_attn", "value": 0.2}, {"value": 0.01}])],
        parameters={"normalize": True},
    )),
    # -- slerp ---------------------------------------------------------------------------
    Case("slerp-t-gradient", "llama_models", lambda p: with_base(
        "slerp", p, [m(p, "base"), m(p, "ft1")], parameters={"t": SLERP_T},
    )),
    Case("slerp-filter-attn-mlp-slices", "llama_models", lambda p: {
        "merge_method": "slerp",
        "base_model": str(p["base"]),
        "slices": [{"sources": [{"model": str(p["base"]), "layer_range": [0, 4]},
                                {"model": str(p["ft2"]), "layer_range": [0, 4]}]}],
        "parameters": {"t": ATTN_MLP_T},
    }),
    Case("slerp-two-slices-gradient", "llama_models", lambda p: {
        "merge_method": "slerp",
        "base_model": str(p["base"]),
        "slices": [{"sources": [src(p, "base", 0, 2), src(p, "ft1", 0, 2)]},
                   {"sources": [src(p, "base", 2, 4), src(p, "ft1", 2, 4)]}],
        "parameters": {"t": [0.1, 0.9, 0.4]},  # the gradient restarts in each slice
    }, layers=4),
    # -- nuslerp -------------------------------------------------------------------------
    Case("nuslerp-with-base", "llama_models", lambda p: with_base(
        "nuslerp", p, [m(p, "ft1", weight=0.7), m(p, "ft2", weight=0.3)],
    )),
    Case("nuslerp-no-base-row-wise", "llama_models", lambda p: {
        "merge_method": "nuslerp",
        "models": [m(p, "ft1", weight=1.0), m(p, "ft3", weight=[0.2, 0.8])],
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    }),
    Case("nuslerp-with-base-per-vector", "llama_models", lambda p: with_base(
        "nuslerp", p, [m(p, "ft2", weight=0.4), m(p, "ft3", weight=0.6)],
        parameters={"nuslerp_flatten": False},
    )),
    # -- model stock -----------------------------------------------------------------------
    Case("model-stock", "llama_models", lambda p: with_base(
        "model_stock", p, [m(p, "ft1"), m(p, "ft2"), m(p, "ft3")],
    )),
    Case("model-stock-filter-wise", "llama_models", lambda p: with_base(
        "model_stock", p, [m(p, "ft1"), m(p, "ft2"), m(p, "ft3")], parameters={"filter_wise": True},
    )),
    # -- passthrough / slices --------------------------------------------------------------
    Case("passthrough-frankenmerge", "llama_models", lambda p: {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(p["ft1"]), "layer_range": [0, 3]}]},
                   {"sources": [{"model": str(p["ft2"]), "layer_range": [1, 4]}]}],
    }, layers=6),
    Case("passthrough-repeated-layers", "llama_models", lambda p: {
        "merge_method": "passthrough",
        "slices": [{"sources": [src(p, "ft1", 0, 2)]}, {"sources": [src(p, "ft1", 0, 2)]},
                   {"sources": [src(p, "ft1", 3, 4)]}],
    }, layers=5),
    Case("passthrough-scale-filter", "llama_models", lambda p: {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(p["ft3"]), "layer_range": [2, 4]}]},
                   {"sources": [{"model": str(p["base"]), "layer_range": [0, 4],
                                 "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}}]}],
    }, layers=6),
    # -- sce -------------------------------------------------------------------------------
    Case("sce", "llama_models", lambda p: with_base("sce", p, [m(p, "ft1"), m(p, "ft2"), m(p, "ft3")])),
    Case("sce-select-topk-gradient", "llama_models", lambda p: with_base(
        "sce", p, [m(p, "ft1"), m(p, "ft2"), m(p, "ft3")],
        parameters={"select_topk": [0.2, 0.9], "int8_mask": True},
    )),
    # -- karcher -----------------------------------------------------------------------------
    Case("karcher", "llama_models", lambda p: {
        "merge_method": "karcher", "models": [m(p, "ft1"), m(p, "ft2"), m(p, "ft3")],
    }),
    Case("karcher-base-listed-iterations", "llama_models", lambda p: {
        # karcher has no base: a base_model is one more equally weighted input
        "merge_method": "karcher", "base_model": str(p["base"]), "models": [m(p, "ft1"), m(p, "ft2")],
        "parameters": {"max_iter": 25, "tol": 1e-7},
    }),
    # -- multislerp --------------------------------------------------------------------------
    Case("multislerp-no-base", "llama_models", lambda p: {
        "merge_method": "multislerp",
        "models": [m(p, "ft1", weight=0.5), m(p, "ft2", weight=[0.2, 0.6]), m(p, "ft3", weight=0.3)],
    }),
    Case("multislerp-with-base-unnormalized", "llama_models", lambda p: with_base(
        "multislerp", p, [m(p, "ft1", weight=0.4), m(p, "ft2", weight=0.3), m(p, "ft3", weight=0.2)],
        parameters={"normalize_weights": False},
    )),
    # -- nearswap ----------------------------------------------------------------------------
    Case("nearswap-t-gradient", "llama_models", lambda p: with_base(
        "nearswap", p, [m(p, "ft1")], parameters={"t": [0.0001, 0.0005, 0.002]},
    )),
    # -- arcee_fusion --------------------------------------------------------------------------
    Case("arcee-fusion", "llama_models", lambda p: with_base("arcee_fusion", p, [m(p, "ft2")])),
    # -- ram / ramplus_tl --------------------------------------------------------------------
    Case("ram", "llama_models", lambda p: with_base("ram", p, [m(p, "ft1"), m(p, "ft2"), m(p, "ft3")])),
    Case("ram-epsilon", "llama_models", lambda p: with_base(
        # an epsilon at the scale of the weight deltas: unique, shared and untouched elements
        "ram", p, [m(p, "ft1"), m(p, "ft2"), m(p, "ft3")], parameters={"epsilon": 0.0003},
    )),
    Case("ramplus-tl", "llama_models", lambda p: with_base("ramplus_tl", p, [m(p, "ft1"), m(p, "ft2"), m(p, "ft3")])),
    Case("ramplus-tl-r-alpha-epsilon", "llama_models", lambda p: with_base(
        "ramplus_tl", p, [m(p, "ft1"), m(p, "ft2"), m(p, "ft3")],
        parameters={"r": 0.5, "alpha": [0.1, 2.0], "epsilon": 0.0003},
    )),
    # -- random methods at densities that draw no mask (module docstring) ----------------
    Case("dare-ties-density-1-mlp-0", "llama_models", lambda p: with_base(
        "dare_ties", p,
        [m(p, "ft1", weight=0.7, density=1.0), m(p, "ft2", weight=[0.3, 0.9], density=1.0),
         m(p, "ft3", weight=0.5, density=[{"filter": "mlp", "value": 0.0}, {"value": 1.0}])],
        parameters={"normalize": True, "lambda": 0.9},
    )),
    Case("dare-linear-density-1", "llama_models", lambda p: with_base(
        "dare_linear", p, [m(p, "ft1", weight=0.6, density=1.0), m(p, "ft2", weight=-0.2, density=1.0),
                           m(p, "ft3", weight=[0.2, 0.8], density=1.0)],
        parameters={"normalize": False, "lambda": 1.1},
    )),
    Case("della-density-1", "llama_models", lambda p: with_base(
        "della", p, [m(p, "ft1", weight=1.0, density=1.0, epsilon=0.05), m(p, "ft2", weight=0.5, density=1.0, epsilon=0.1),
                     m(p, "ft3", weight=0.3, density=1.0, epsilon=0.05)],
        parameters={"lambda": 0.8, "normalize": True},
    )),
    Case("della-linear-density-1", "llama_models", lambda p: with_base(
        "della_linear", p, [m(p, "ft1", weight=0.4, density=1.0, epsilon=0.05),
                            m(p, "ft3", weight=[0.9, 0.1], density=1.0, epsilon=0.1)],
        parameters={"lambda": 1.2},
    )),
    # -- dtypes --------------------------------------------------------------------------
    Case("ties-bf16-compute-fp32-out", "llama_models", lambda p: ties_gradient(p, dtype="bfloat16", out_dtype="float32"),
         bf16=True, trim_ties=True),
    Case("bf16-ties", "llama_bf16_models", lambda p: ties_gradient(p), bf16=True, trim_ties=True),
    Case("task-arithmetic-bf16-compute-fp32-out", "llama_models", lambda p: with_base(
        "task_arithmetic", p, [m(p, "ft1", weight=0.8), m(p, "ft2", weight=0.4), m(p, "ft3", weight=0.2)],
        parameters={"lambda": 0.9}, dtype="bfloat16", out_dtype="float32",
    ), bf16=True),
    Case("bf16-linear", "llama_bf16_models", lambda p: {
        "merge_method": "linear",
        "models": [m(p, "ft1", weight=0.5), m(p, "ft2", weight=0.3), m(p, "ft3", weight=0.2)],
    }, bf16=True),
    Case("bf16-slerp-fp32-out", "llama_bf16_models", lambda p: with_base(
        "slerp", p, [m(p, "base"), m(p, "ft2")], parameters={"t": SLERP_T}, out_dtype="float32",
    ), bf16=True),
    Case("bf16-sce-topk", "llama_bf16_models", lambda p: with_base(
        "sce", p, [m(p, "ft1"), m(p, "ft2"), m(p, "ft3")], parameters={"select_topk": 0.5},
    ), bf16=True),
    Case("bf16-karcher", "llama_bf16_models", lambda p: {
        "merge_method": "karcher", "models": [m(p, "ft1"), m(p, "ft2"), m(p, "ft3")],
    }, bf16=True),
    Case("bf16-multislerp", "llama_bf16_models", lambda p: with_base(
        "multislerp", p, [m(p, "ft1", weight=0.5), m(p, "ft2", weight=0.5)],
    ), bf16=True),
    Case("bf16-nearswap", "llama_bf16_models", lambda p: with_base(
        "nearswap", p, [m(p, "ft3")], parameters={"t": 0.0005},
    ), bf16=True),
    Case("bf16-ram-epsilon", "llama_bf16_models", lambda p: with_base(
        "ram", p, [m(p, "ft1"), m(p, "ft2"), m(p, "ft3")], parameters={"epsilon": 0.0003},
    ), bf16=True),
    # arcee_fusion and ramplus_tl are not compared on 16-bit inputs: mergekit 0.1.5 returns their
    # results in float32 there (a float32 mask / float32 scale factors promote the arithmetic) and
    # writes them as float32 unless out_dtype is set; raymerge writes the working dtype. Their
    # values agree up to that final rounding (`test_methods_more.py` checks the formulas).
    # -- another architecture (attention biases) -----------------------------------------
    Case("qwen2-ties", "qwen2_models", ties_gradient),
    Case("qwen2-task-arithmetic", "qwen2_models", lambda p: with_base(
        "task_arithmetic", p, [m(p, "ft1", weight=0.6), m(p, "ft2", weight=0.4)], dtype="float32",
    )),
    Case("qwen2-multislerp", "qwen2_models", lambda p: with_base(
        "multislerp", p, [m(p, "ft1", weight=0.6), m(p, "ft2", weight=0.4), m(p, "ft3", weight=0.2)],
    )),
    Case("qwen2-arcee-fusion", "qwen2_models", lambda p: with_base("arcee_fusion", p, [m(p, "ft1")])),
    Case("qwen2-ramplus-tl", "qwen2_models", lambda p: with_base(
        "ramplus_tl", p, [m(p, "ft1"), m(p, "ft2")], parameters={"epsilon": 0.0002},
    )),
]

CASES_BY_ID = {c.id: c for c in CASES}
assert len(CASES_BY_ID) == len(CASES), "duplicate case ids"


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at |x| (the gap to the next larger bfloat16), as float64."""
    a = x.abs().to(torch.bfloat16)
    up = (a.view(torch.int16) + 1).view(torch.bfloat16)
    return (up.to(torch.float64) - a.to(torch.float64)).abs()


def assert_within_bf16_ulp(
    actual: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    ulps: int = 1,
    skip: Optional[dict[str, torch.Tensor]] = None,
) -> None:
    """Names, shapes and dtypes equal; every value within `ulps` bfloat16 ulps of mergekit's,
    except where `skip[name]` (a boolean mask) is set."""
    # names, shapes and dtypes first (with an infinite tolerance the values are not checked)
    assert_tensors_close(actual, expected, rtol=0.0, atol=float("inf"))
    failures = []
    for name in sorted(expected):
        if not actual[name].is_floating_point():
            assert torch.equal(actual[name], expected[name]), name
            continue
        a, e = actual[name].to(torch.float64), expected[name].to(torch.float64)
        allowed = ulps * torch.maximum(bf16_ulp(a), bf16_ulp(e))
        diff = (a - e).abs()
        bad = diff > allowed
        if skip is not None and name in skip:
            bad &= ~skip[name]
        if bool(bad.any()):
            failures.append(f"{name}: {int(bad.sum())} values off by more than {ulps} bf16 ulp, max abs diff {float(diff.max()):.3e}")
    assert not failures, f"{len(failures)}/{len(expected)} tensors differ from mergekit:\n  " + "\n  ".join(failures[:20])


def threshold_ties(config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Per output tensor of a TIES config, the elements whose trim decision is not determined
    by value: some model's task vector has several elements exactly at its k-th largest
    magnitude, more than fit in its top k, and the element is one of them.

    Both tools keep exactly k elements, but among those equal magnitudes raymerge keeps the
    lowest indices and mergekit whichever torch's unstable argsort puts first, so the outputs
    may legitimately differ there (TIES is elementwise after trimming, so only there). With
    bfloat16 task vectors such ties are common. The densities are resolved by raymerge's own
    planner; its resolution is checked exactly by the float32 cases.
    """
    from raymerge.config import load_config
    from raymerge.runtime.merge import open_sources
    from raymerge.checkpoints.safetensors_format import torch_dtype
    from raymerge.runtime.operators import build_program

    cfg, _ = load_config(config)
    opened = open_sources(cfg.referenced_models(), allow_pickle=False)
    try:
        sources = {ref: src for ref, (_, src) in opened.items()}
        program = build_program(cfg, sources)
        srcs = [sources[ref] for ref in program.models]
        masks: dict[str, torch.Tensor] = {}
        for op in program.operators:
            tensors = [srcs[i.model].read(i.name) for i in op.inputs]
            work = torch_dtype(op.work_dtype) if op.work_dtype else tensors[0].dtype
            base = tensors[op.base_index].to(work)
            tied = torch.zeros(base.shape, dtype=torch.bool)
            for j, t in enumerate(tensors):
                density = op.model_params[j].get("density", 1.0) if j != op.base_index else 1.0
                if density >= 1:
                    continue
                mag = (t.to(work) - base).abs().float().reshape(-1)
                k = max(1, int(density * mag.numel()))
                kth = mag.kthvalue(mag.numel() - k + 1).values  # the k-th largest magnitude
                if int((mag >= kth).sum()) > k:
                    tied |= (mag == kth).reshape(base.shape)
            masks[op.name] = tied
        return masks
    finally:
        for _, src in opened.values():
            src.close()


def max_abs_diff(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    return max(float((actual[k].double() - expected[k].double()).abs().max()) for k in expected)


def _selected_case_ids(session: pytest.Session) -> list[str]:
    """The cases of this module that this pytest run will actually execute (after -k etc.)."""
    ids = []
    for item in session.items:
        callspec = getattr(item, "callspec", None)
        module = getattr(item, "module", None)
        if module is not None and module.__name__ == __name__ and callspec is not None and "case" in callspec.params:
            ids.append(callspec.params["case"].id)
    return ids


@pytest.fixture(scope="module")
def mergekit_outputs(request, tmp_path_factory) -> dict[str, Any]:
    """mergekit's output folder (or its error text) for every selected case, run in one batch."""
    if mergekit_python() is None:
        pytest.skip(f"mergekit 0.1.5 unavailable: {mergekit_unavailable_reason()}")
    root = tmp_path_factory.mktemp("mergekit-out")
    ids = _selected_case_ids(request.session) or list(CASES_BY_ID)
    jobs = []
    for case_id in ids:
        case = CASES_BY_ID[case_id]
        jobs.append((case.build(request.getfixturevalue(case.family)), root / case_id))
    errors = run_mergekit_many(jobs)
    return {case_id: errors[root / case_id] or (root / case_id) for case_id in ids}


def _config(model_dir: Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "config.json").read_text())


def _config_facts(cfg: dict[str, Any]) -> dict[str, Any]:
    """What a loader relies on: layer count, architecture, dtype (either spelling)."""
    return {
        "num_hidden_layers": cfg.get("num_hidden_layers"),
        "architectures": cfg.get("architectures"),
        "dtype": cfg.get("dtype", cfg.get("torch_dtype")),
    }


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_mergekit(case: Case, request, mergekit_outputs, tmp_path):
    models = request.getfixturevalue(case.family)
    expected_dir = mergekit_outputs[case.id]
    if not isinstance(expected_dir, Path):
        pytest.fail(f"mergekit failed on {case.id}:\n{expected_dir}")
    result = raymerge.merge(case.build(models), tmp_path / "out", quiet=True, in_process=True)

    actual, expected = load_tensors(result.output), load_tensors(expected_dir)
    diff = max_abs_diff(actual, expected) if set(actual) == set(expected) else float("nan")
    print(f"{case.id}: {len(expected)} tensors, max abs diff vs mergekit {diff:.3e}")
    if case.bf16:
        skip = threshold_ties(case.build(models)) if case.trim_ties else None
        if skip is not None:
            n_tied = sum(int(t.sum()) for t in skip.values())
            n_all = sum(t.numel() for t in skip.values())
            differ = sum(
                int(((actual[k].double() - expected[k].double()).abs() > bf16_ulp(expected[k].double()))[skip[k]].sum())
                for k in skip
            )
            print(f"{case.id}: {n_tied}/{n_all} elements tied at a trim threshold, {differ} of them differ from mergekit")
            # bf16 task vectors of these models take few distinct values (a fine-tune's delta is a
            # few ulps of the base weight), so ~30% of the elements sit at some model's threshold
            assert n_tied < 0.5 * n_all, "too many tied elements for the comparison to mean much"
        assert_within_bf16_ulp(actual, expected, skip=skip)
    else:
        assert_tensors_close(actual, expected, rtol=FP32_RTOL, atol=FP32_ATOL)

    ours, theirs = _config_facts(_config(result.output)), _config_facts(_config(expected_dir))
    assert ours == theirs, "config.json differs from mergekit's"
    if case.layers is not None:
        assert ours["num_hidden_layers"] == case.layers
        layer_ids = {int(n.split(".")[2]) for n in actual if n.startswith("model.layers.")}
        assert layer_ids == set(range(case.layers))


def _case_methods() -> set[str]:
    """The merge methods CASES use (the builders are cheap pure functions of the model paths)."""
    fake = {k: Path(f"/models/{k}") for k in ("base", "ft1", "ft2", "ft3")}
    return {case.build(fake)["merge_method"] for case in CASES}


def _densities(config: dict[str, Any]) -> list[Any]:
    """Every `density` value of a config: top-level, per model, per slice source."""
    entries = [config, *config.get("models", [])]
    for sl in config.get("slices", []):
        entries += [sl, *sl.get("sources", [])]
    found = [e.get("parameters", {}).get("density") for e in entries]
    return [d for d in found if d is not None]


def _scalars(value: Any) -> list[Any]:
    """The numbers of a parameter value: a number, a gradient list, or a list of filter entries."""
    if isinstance(value, dict):
        return _scalars(value["value"])
    if isinstance(value, list):
        if all(isinstance(v, (int, float)) for v in value) and len(set(value)) > 1:
            return [None]  # a per-layer gradient interpolates to densities between its points
        return [s for v in value for s in _scalars(v)]
    return [value]


def test_random_methods_draw_no_mask():
    """The random methods are compared only at densities where neither tool draws a mask: 1 or
    0, never a gradient between them (module docstring)."""
    fake = {k: Path(f"/models/{k}") for k in ("base", "ft1", "ft2", "ft3")}
    assert set(RANDOM_METHODS) <= set(raymerge.available_methods())
    for case in CASES:
        config = case.build(fake)
        if config["merge_method"] in RANDOM_METHODS:
            densities = [s for d in _densities(config) for s in _scalars(d)]
            assert densities and all(d in (0.0, 1.0) for d in densities), (case.id, densities)


def test_cases_cover_every_mergekit_method():
    """Every method in mergekit 0.1.5's registry has a case here (read from the installed
    mergekit, so a method it gains is a failure until a case is added)."""
    import subprocess

    from mergekit_oracle import mergekit_env

    python = mergekit_python()
    if python is None:
        pytest.skip(f"mergekit 0.1.5 unavailable: {mergekit_unavailable_reason()}")
    listing = ("import json; from mergekit.merge_methods.registry import registered_methods as r; "
               "print(json.dumps(sorted(m.spec.name for m in r())))")
    proc = subprocess.run([str(python), "-c", listing], capture_output=True, text=True, env=mergekit_env(),
                          timeout=300, check=True)
    theirs = set(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert len(theirs) == 20, sorted(theirs)
    missing = theirs - _case_methods()
    assert not missing, f"mergekit methods without a differential case: {sorted(missing)}"
