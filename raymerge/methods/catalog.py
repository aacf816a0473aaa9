"""The built-in merge methods as the registry sees them: one `MethodSpec` each, torch-free.

A spec says what a method accepts and costs: its parameters (defaults, checks, docs), its base
and model-count rules, whether it is random or elementwise, its planner figures (`cost_ns`,
`extra_copies`, `extra`) and its trim key. Its `fn` is a `LazyFunction` naming the pure torch
function in the method's own module (`raymerge.methods.linear.linear`, ...), imported on the first
call. So everything that only reads specs (config checks, `raymerge methods`, planning from
headers) runs without importing torch, and a typo in `merge_method` or a parameter is reported
at once. Adding a method is its function in a module of `raymerge.methods` plus its entry here
(a plugin may instead `register` a spec whose `fn` is any callable).

Names and constants the method modules share with their specs (the trim key, the rescale and
LoRE merge modes, the task-vector methods' working copies) live here, so the modules import
them from the catalog rather than the other way round.
"""

from __future__ import annotations

from typing import Optional

from raymerge.methods import checks
from raymerge.methods.registry import LazyFunction, MethodSpec, ParamSpec, register

# The per-model value through which ties receives a whole-model magnitude threshold
# (`trim_scope: model`, `raymerge.runtime.global_trim`).
TRIM_THRESHOLD = "_trim_threshold"
RESCALE_MODES = ("l1", "inverse_density")  # `rescale_mode` of the task-arithmetic family
LORE_MERGE_MODES = ("ties", "task_arithmetic", "average")  # LoRE's `merge`

# Full-size working copies a task-vector method holds besides its inputs and output (peak memory,
# `runtime.costs`): one delta per model plus the sparsified deltas, |delta| and a mask; DELLA's
# argsort ranks are int64.
TASK_VECTOR_EXTRA = 2.0
DELLA_EXTRA = 6.0


def _function(module: str, name: str) -> LazyFunction:
    return LazyFunction(f"raymerge.methods.{module}", name)


# -- value checks of single methods ------------------------------------------------------------
def _whole_number(value) -> Optional[str]:
    if not checks.is_finite_number(value) or value != int(value) or value < 0:
        return f"expected a whole number >= 0, got {value!r}"
    return None


def _finite_nonnegative(value) -> Optional[str]:
    if not checks.is_finite_number(value) or value < 0:
        return f"expected a finite number >= 0, got {value!r}"
    return None


def _positive_int(value) -> Optional[str]:
    if not checks.is_finite_number(value) or not isinstance(value, int) or value < 1:
        return f"expected a whole number >= 1, got {value!r}"
    return None


def _non_negative(value) -> Optional[str]:
    msg = checks.number(value)
    return msg or (None if value >= 0 else f"must be >= 0, got {value!r}")


def _fraction(value) -> Optional[str]:
    msg = checks.in_range(0, 1)(value)
    return msg or (None if value > 0 else f"must be in (0, 1], got {value!r}")


# -- linear, passthrough -----------------------------------------------------------------------
register(
    MethodSpec(
        name="linear",
        fn=_function("linear", "linear"),
        params=(
            ParamSpec("weight", per_model=True, required=True, input_scope=True, check=checks.number, doc="weight of this model"),
            ParamSpec("normalize", True, check=checks.boolean, doc="divide by the sum of weights"),
        ),
        base="none",
        elementwise=True,
        doc="weighted average of the models (model soups, arXiv 2203.05482)",
        cost_ns=0.8,
        extra_copies=lambda n: 0.0,
    )
)

register(
    MethodSpec(
        name="passthrough",
        fn=_function("linear", "passthrough"),
        params=(ParamSpec("scale", per_model=True, input_scope=True, check=checks.number, doc="multiply the tensor by this"),),
        base="none",
        max_models=1,
        elementwise=True,
        doc="copy tensors from one model; with slices, stacks layers (frankenmerges)",
        cost_ns=0.3,  # returns its input: the cost is the dtype cast and the write
        extra_copies=lambda n: 0.0,
    )
)

# -- model stock -------------------------------------------------------------------------------
register(
    MethodSpec(
        name="model_stock",
        fn=_function("model_stock", "model_stock"),
        params=(ParamSpec("filter_wise", False, check=checks.boolean, doc="one interpolation factor per row"),),
        base="required",
        min_models=3,
        doc="Model Stock: move from the base towards the fine-tunes' average by their geometry",
        cost_ns=3.6,
        extra_copies=lambda n: 4.0,
    )
)

# -- slerp, nuslerp ----------------------------------------------------------------------------
register(
    MethodSpec(
        name="slerp",
        fn=_function("slerp", "slerp"),
        params=(ParamSpec("t", required=True, check=checks.in_range(0, 1), doc="0 gives the base model, 1 the other"),),
        base="required",
        min_models=2,
        max_models=2,
        doc="spherical interpolation between the base and one other model",
        cost_ns=3.2,
        extra_copies=lambda n: 4.0,
    )
)
register(
    MethodSpec(
        name="nuslerp",
        fn=_function("slerp", "nuslerp"),
        params=(
            ParamSpec("weight", per_model=True, required=True, check=checks.number, doc="relative weight of this model"),
            ParamSpec("nuslerp_row_wise", False, check=checks.boolean, doc="interpolate each row (dim 0) separately"),
            ParamSpec("nuslerp_flatten", True, check=checks.boolean, doc="interpolate the flattened tensor"),
        ),
        base="optional",
        non_base_models=(2, 2),
        doc="spherical interpolation of two models (or their task vectors from a base) by weight",
        cost_ns=2.2,
        extra_copies=lambda n: 4.0,
    )
)


# -- the task-arithmetic family (`raymerge.methods.task_arithmetic`) ---------------------------
def _task_vector_method(
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
    register(
        MethodSpec(
            name=name,
            fn=_function("task_arithmetic", name),
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


_task_vector_method("task_arithmetic", None, False, False, False, "base + sum of weighted task vectors (arXiv 2212.04089)", cost_ns=3.4)
_task_vector_method("ties", "magnitude", True, True, False, "TIES: trim by magnitude, elect signs, disjoint mean (arXiv 2306.01708)", cost_ns=15.0)
_task_vector_method("dare_ties", "random", True, False, True, "DARE drop-and-rescale with TIES sign election (arXiv 2311.03099)", cost_ns=20.0)
_task_vector_method("dare_linear", "random", False, False, True, "DARE drop-and-rescale, summed linearly (arXiv 2311.03099)", cost_ns=14.0)
_task_vector_method("breadcrumbs", "magnitude_outliers", False, False, False, "Model Breadcrumbs: drop smallest and outliers (arXiv 2312.06795)", cost_ns=16.0)
_task_vector_method("breadcrumbs_ties", "magnitude_outliers", True, False, False, "Model Breadcrumbs with TIES sign election (arXiv 2312.06795)", cost_ns=22.0)
_task_vector_method("della", "della", True, True, True, "DELLA: magnitude-ranked random drop with TIES sign election (arXiv 2406.11617)", cost_ns=95.0)
_task_vector_method("della_linear", "della", False, False, True, "DELLA: magnitude-ranked random drop, summed linearly (arXiv 2406.11617)", cost_ns=85.0)

# -- LoRE --------------------------------------------------------------------------------------
register(
    MethodSpec(
        name="lore",
        fn=_function("lore", "lore"),
        params=(
            ParamSpec("weight", 1.0, per_model=True, check=checks.number, doc="weight of this model's estimated task vector"),
            ParamSpec("density", 1.0, per_model=True, check=checks.in_range(0, 1), doc="fraction of the estimated task vector kept (merge: ties)"),
            ParamSpec("mu", 0.01, check=_non_negative, doc="singular-value soft threshold of the task vectors (weight units)"),
            ParamSpec("iterations", 20, check=_positive_int, doc="coordinate-descent rounds estimating base and task vectors"),
            ParamSpec("merge", "ties", check=checks.choice(*LORE_MERGE_MODES), doc="ties, task_arithmetic or average of the estimated task vectors"),
            ParamSpec("lambda", 1.0, check=checks.number, doc="scale of the merged task vector"),
        ),
        base="optional",
        doc="LoRE-Merging: estimate a shared base and low-rank task vectors without the base model (arXiv 2502.10749)",
        cost_ns=1000.0,  # 20 iterations x n thin SVDs, at the SVD calibration shape (runtime.costs)
        extra={"svd": True},
    )
)

# -- 1bit --------------------------------------------------------------------------------------
register(
    MethodSpec(
        name="onebit",
        fn=_function("onebit", "onebit"),
        params=(
            ParamSpec("weight", per_model=True, required=True, check=checks.number, doc="scale of this model's (compressed) task vector"),
            ParamSpec("keep_full", False, per_model=True, check=checks.boolean, doc="keep this model's full task vector for this tensor (use filters to pick modules)"),
            ParamSpec("lambda", 1.0, check=checks.number, doc="scale of the merged task vector"),
            ParamSpec("normalize", False, check=checks.boolean, doc="divide by the sum of weights"),
        ),
        base="required",
        doc="1bit-Merging: task vectors as sign x per-tensor scale, merged by task arithmetic (arXiv 2502.10743)",
        cost_ns=5.0,  # task arithmetic plus |delta| mean and sign per model
    )
)

# -- TSV ---------------------------------------------------------------------------------------
register(
    MethodSpec(
        name="tsv",
        fn=_function("tsv", "tsv"),
        params=(
            ParamSpec("alpha", 1.0, check=checks.number, doc="scale of the merged task vector"),
            ParamSpec(
                "rank_fraction", 1.0, check=_fraction,
                doc="rank budget as a fraction of min(rows, cols), split evenly over the tasks (paper: 1.0)",
            ),
        ),
        base="required",
        doc="TSV-Merge: task singular vectors, orthogonalised across tasks (arXiv 2412.00081)",
        cost_ns=45.0,  # T + 2 thin SVDs, at the SVD calibration shape (runtime.costs)
        extra={"svd": True},
    )
)

# -- SCE ---------------------------------------------------------------------------------------
register(
    MethodSpec(
        name="sce",
        fn=_function("sce", "sce"),
        params=(
            ParamSpec("select_topk", 1.0, check=checks.number,
                      doc="share of the nonzero-variance positions kept by variance across models (1: all)"),
            ParamSpec("int8_mask", False, check=checks.boolean, doc="accepted for mergekit compatibility (memory only)"),
        ),
        base="required",
        doc="SCE: select by variance, weight by task-vector energy, erase minority signs (arXiv 2408.07990)",
        cost_ns=8.0,
        # the stacked task vectors, their masked and weighted copies, plus masks and the variance
        extra_copies=lambda n: 2.0 * n + 3.0,
    )
)

# -- Karcher mean ------------------------------------------------------------------------------
register(
    MethodSpec(
        name="karcher",
        fn=_function("karcher", "karcher"),
        params=(
            ParamSpec("max_iter", 10, check=_whole_number, doc="most Riemannian gradient steps"),
            ParamSpec("tol", 1e-5, check=_finite_nonnegative, doc="stop when a step is shorter than this"),
        ),
        base="none",
        doc="Karcher mean: equal-weight Riemannian centre of the models' directions, scaled by their mean norm",
        cost_ns=13.0,
        # the unit directions, the mean, the tangent step and one temporary
        extra_copies=lambda n: n + 3.0,
    )
)

# -- multislerp --------------------------------------------------------------------------------
register(
    MethodSpec(
        name="multislerp",
        fn=_function("multislerp", "multislerp"),
        params=(
            ParamSpec("weight", per_model=True, required=True, check=checks.number, doc="weight of this model"),
            ParamSpec("normalize_weights", True, check=checks.boolean, doc="divide the weights by their sum"),
            ParamSpec("eps", 1e-8, check=checks.number, doc="added to norms for numerical stability"),
        ),
        base="optional",
        non_base_models=(1, None),
        doc="Multi-SLERP: weighted spherical interpolation of any number of models (or task vectors)",
        cost_ns=14.0,
        # the stacked points, their unit directions, the tangents and the weighted products
        extra_copies=lambda n: 3.0 * n + 2.0,
    )
)

# -- NearSwap ----------------------------------------------------------------------------------
register(
    MethodSpec(
        name="nearswap",
        fn=_function("nearswap", "nearswap"),
        params=(ParamSpec("t", required=True, check=checks.number, doc="distance below which the other model's value is taken"),),
        base="required",
        min_models=2,
        max_models=2,
        elementwise=True,
        doc="NearSwap: swap in the other model's values where they are within t of the base's",
        cost_ns=1.0,
        extra_copies=lambda n: 3.0,
    )
)

# -- Arcee Fusion ------------------------------------------------------------------------------
register(
    MethodSpec(
        name="arcee_fusion",
        fn=_function("arcee_fusion", "arcee_fusion"),
        base="required",
        min_models=2,
        max_models=2,
        doc="Arcee Fusion: take the other model's values whose change is an importance outlier",
        cost_ns=22.0,
        # |x - b|, the two softmaxes, their log ratio, the scores, kthvalue's copy and the mask
        extra_copies=lambda n: 6.0,
    )
)

# -- RAM, RAM+ ---------------------------------------------------------------------------------
_EPSILON = ParamSpec("epsilon", 1e-5, check=checks.number, doc="a task-vector element counts as changed when |delta| > epsilon")
register(
    MethodSpec(
        name="ram",
        fn=_function("ram", "ram"),
        params=(_EPSILON,),
        base="required",
        doc="RAM: keep changes unique to one model, average shared ones over the models that made them",
        elementwise=True,  # every step is per element (no tensor-wide statistic)
        cost_ns=16.0,
        # the stacked task vectors, the zeroed copy, the masked products and the boolean masks
        extra_copies=lambda n: 3.0 * n + 2.0,
    )
)
register(
    MethodSpec(
        name="ramplus_tl",
        fn=_function("ram", "ramplus_tl"),
        params=(
            ParamSpec("r", 0.1, check=checks.number, doc="how much a model's unique changes are scaled up by its overlap ratio"),
            ParamSpec("alpha", 0.2, check=checks.number, doc="the overlap ratio rho is clipped to [0, alpha]"),
            _EPSILON,
        ),
        base="required",
        doc="RAM+ (tensor-local): RAM with unique changes scaled by 1 + r clip(shared/unique, 0, alpha)",
        cost_ns=20.0,
        extra_copies=lambda n: 3.0 * n + 3.0,
    )
)
