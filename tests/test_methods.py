"""Every merge method checked against a numeric reference written from its formula.

The references below (`ref_*`) are written from the published formulas and mergekit's documented
semantics, in float64, without calling any helper of `raymerge.methods`; only the method entry
points (`get_method(name).resolve` / `.fn`) and `raymerge.merge` are exercised. Covered:

- the registry: every built-in method and its parameter defaults (the seven methods added for
  mergekit parity have their references in `test_methods_more.py`);
- unit tests on random tensors (2-D and 1-D) for every method and its options, comparing the
  method's function with the reference (random methods: bit-for-bit the same Bernoulli stream
  from the same seeded generator, shared across the models of a tensor in input order);
- properties any correct DARE / DELLA implementation has (kept fraction, rescaled kept values,
  seed determinism), independent of the random stream;
- edge cases: density 0 (with every rescale mode) and 1, breadcrumbs' gamma cut, the magnitude
  tie rule (lower index first), TIES sign-election ties and zero divisors, `trim_scope: model`
  thresholds, DELLA's epsilon bounds, linear's zero weight sum, colinear / antipodal / zero-vector
  slerp, model_stock's singular case, bfloat16 in -> bfloat16 out;
- end to end through `raymerge.merge` on tiny llama and qwen2 (attention biases) checkpoints:
  every method x both architectures, every output tensor against the reference computed from
  the saved inputs; plus per-layer gradient parameters and `filter` lists.
"""

from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import raymerge
from raymerge.methods import MethodError, available_methods, get_method
from raymerge.methods.catalog import TRIM_THRESHOLD
from raymerge.runtime.operators import tensor_seed
from conftest import load_state

# name: (sparsification, TIES sign election, default normalize, default rescale)
FAMILY = {
    "task_arithmetic": (None, False, False, False),
    "ties": ("magnitude", True, True, False),
    "dare_ties": ("random", True, False, True),
    "dare_linear": ("random", False, False, True),
    "breadcrumbs": ("breadcrumbs", False, False, False),
    "breadcrumbs_ties": ("breadcrumbs", True, False, False),
    "della": ("della", True, True, True),
    "della_linear": ("della", False, False, True),
}
DEFAULT_DENSITY = 1.0
DEFAULT_GAMMA = 0.01
DEFAULT_EPSILON = 0.15
DEFAULT_LAMBDA = 1.0
ALL_METHODS = sorted([*FAMILY, "linear", "passthrough", "slerp", "nuslerp", "model_stock"])
# Methods whose references live in another test file.
TESTED_ELSEWHERE = {"tsv": "test_svd_methods.py", "lore": "test_svd_methods.py", "onebit": "test_svd_methods.py",
    "sce": "test_methods_more.py",
    "karcher": "test_methods_more.py",
    "multislerp": "test_methods_more.py",
    "nearswap": "test_methods_more.py",
    "arcee_fusion": "test_methods_more.py",
    "ram": "test_methods_more.py",
    "ramplus_tl": "test_methods_more.py",
}
RANDOM_METHODS = ("dare_ties", "dare_linear", "della", "della_linear")
SPARSIFYING = [m for m, (kind, *_rest) in FAMILY.items() if kind is not None]

F32_TOL = dict(atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# References (float64, written from the formulas)
# ---------------------------------------------------------------------------------------------


def ref_top_k_mask(delta, density):
    """1 for the k = max(1, int(density * n)) largest |delta| (equal magnitudes: lower index
    first); all ones for density >= 1, all zeros for density <= 0."""
    mags = delta.reshape(-1).double().abs()
    n = mags.numel()
    mask = torch.zeros(n, dtype=torch.float64)
    if density >= 1:
        mask[:] = 1
    elif density > 0 and n:
        k = max(1, int(density * n))
        order = torch.sort(-mags, stable=True).indices  # descending |delta|, ties by index
        mask[order[:k]] = 1
    return mask.reshape(delta.shape)


def ref_breadcrumbs_mask(delta, density, gamma):
    """Model Breadcrumbs: keep the elements whose ascending-|delta| rank lies in
    [n_bot, n_bot + target), target = int(density n), n_bot = max(0, n - target - int(gamma n))."""
    mags = delta.reshape(-1).double().abs()
    n = mags.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = torch.sort(mags, stable=True).indices  # ascending |delta|, ties by index
    mask = torch.zeros(n, dtype=torch.float64)
    mask[order[n_bot : n_bot + target]] = 1
    return mask.reshape(delta.shape)


def ref_della_probs(delta, density, epsilon):
    """DELLA MagPrune keep probabilities (float32, the shape of the row view): per row, the
    element of ascending |delta| rank r (0..m-1) is kept with p = density - eps + 2 eps r/(m-1)."""
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    n_rows, m = rows.shape
    order = torch.sort(rows.double().abs(), dim=1, stable=True).indices
    ranks = torch.empty((n_rows, m), dtype=torch.float32)
    ranks.scatter_(1, order, torch.arange(m, dtype=torch.float32).expand(n_rows, m).contiguous())
    norm_rank = ranks / (m - 1) if m > 1 else torch.full_like(ranks, 0.5)
    return (density - epsilon) + norm_rank * (2 * epsilon)


def ref_rescale(delta64, mask, mode, keep_prob):
    kept = delta64 * mask
    if mode is None:
        return kept
    if mode == "l1":  # match the L1 norm of the full delta
        before, after = delta64.abs().sum(), kept.abs().sum()
        if before < 1e-7 or after < 1e-7:
            return kept
        return kept * (before / after)
    assert mode == "inverse_density"  # divide each kept value by its keep probability
    return torch.where(mask > 0, delta64 / keep_prob, torch.zeros_like(delta64))


def ref_sparsify(kind, delta, mp, rescale_mode, generator):
    """One model's sparsified delta (float64). `delta` is x - base in the working dtype."""
    d = delta.double()
    density = mp.get("density", DEFAULT_DENSITY)
    if kind is None:
        return d
    if kind == "magnitude":
        if TRIM_THRESHOLD in mp:  # trim_scope: model: the runtime's per-model magnitude threshold
            mask = (delta.double().abs() >= mp[TRIM_THRESHOLD]).double()
            return ref_rescale(d, mask, rescale_mode, density)
        return ref_rescale(d, ref_top_k_mask(delta, density), rescale_mode, density)
    if kind == "breadcrumbs":
        if density >= 1:
            return d
        return ref_rescale(d, ref_breadcrumbs_mask(delta, density, mp.get("gamma", DEFAULT_GAMMA)), rescale_mode, density)
    if kind == "random":  # DARE: keep each element with probability `density`
        if density >= 1:  # everything kept, nothing drawn
            return d
        probs = torch.full(delta.shape, density, dtype=torch.float32)
        mask = torch.bernoulli(probs, generator=generator).double()
        return ref_rescale(d, mask, rescale_mode, density)
    if kind == "della":
        if density >= 1:
            return d
        if density <= 0:
            return torch.zeros_like(d)
        epsilon = mp.get("epsilon", DEFAULT_EPSILON)
        if not (density - epsilon > 0 and density + epsilon < 1):
            raise ValueError("density +/- epsilon outside (0, 1)")
        probs = ref_della_probs(delta, density, epsilon)
        mask = torch.bernoulli(probs, generator=generator).double().reshape(delta.shape)
        return ref_rescale(d, mask, rescale_mode, probs.double().reshape(delta.shape))
    raise AssertionError(kind)


def ref_task_family(method, inputs, base_index, model_params, params, generator):
    """base + lambda * [sum_i w_i delta_i (TIES: only deltas agreeing with the elected sign)],
    divided by the (surviving) weights when normalising."""
    kind, consensus, default_normalize, default_rescale = FAMILY[method]
    normalize = params.get("normalize", default_normalize)
    rescale = params.get("rescale", default_rescale)
    mode = params.get("rescale_mode", "l1") if rescale else None
    lam = params.get("lambda", DEFAULT_LAMBDA)
    base = inputs[base_index]
    weighted, weights = [], []
    for i, x in enumerate(inputs):
        if i == base_index:
            continue
        w = float(model_params[i]["weight"])
        weighted.append(w * ref_sparsify(kind, x - base, model_params[i], mode, generator))
        weights.append(w)
    if not weighted:
        return base.double()
    if consensus:
        total = sum(weighted)
        elected = torch.where(total >= 0, 1.0, -1.0).double()
        masks = [(torch.sign(d) == elected).double() for d in weighted]
        mixed = sum(d * m for d, m in zip(weighted, masks))
        divisor = sum(w * m for w, m in zip(weights, masks))
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = sum(weighted)
        divisor = sum(weights)
        if abs(divisor) < 1e-8:
            divisor = 1.0
    if normalize:
        mixed = mixed / divisor
    return base.double() + lam * mixed


def ref_linear(inputs, model_params, params):
    weights = [float(mp["weight"]) for mp in model_params]
    out = sum(w * x.double() for w, x in zip(weights, inputs))
    if params.get("normalize", True):
        out = out / sum(weights)
    return out


def ref_slerp_flat(t, v0, v1):
    """Slerp of two whole tensors seen as flat vectors (lerp when |cos| > 0.9995)."""
    a, b = v0.double().reshape(-1), v1.double().reshape(-1)
    na, nb = float(a.norm()), float(b.norm())
    na = na if na > 1e-8 else 1.0
    nb = nb if nb > 1e-8 else 1.0
    dot = min(1.0, max(-1.0, float((a / na) @ (b / nb))))
    if abs(dot) > 0.9995:
        out = (1 - t) * a + t * b
    else:
        theta = math.acos(dot)
        out = math.sin((1 - t) * theta) / math.sin(theta) * a + math.sin(t * theta) / math.sin(theta) * b
    return out.reshape(v0.shape)


def ref_nuslerp_vector(t, a, b):
    ua = a / max(float(a.norm()), 1e-7)
    ub = b / max(float(b.norm()), 1e-7)
    cos = min(1.0, max(-1.0, float(ua @ ub)))
    if 1 - cos * cos <= 1e-16:  # sin(theta) <= 1e-8: colinear
        return (1 - t) * a + t * b
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def ref_nuslerp_tensors(t, v0, v1, *, flatten, row_wise):
    a, b = v0.double(), v1.double()
    if flatten:
        return ref_nuslerp_vector(t, a.reshape(-1), b.reshape(-1)).reshape(v0.shape)
    if row_wise:  # vectors along dim 0
        a, b = a.movedim(0, -1), b.movedim(0, -1)
    shape = a.shape
    rows_a, rows_b = a.reshape(-1, shape[-1]), b.reshape(-1, shape[-1])
    out = torch.stack([ref_nuslerp_vector(t, rows_a[i], rows_b[i]) for i in range(rows_a.shape[0])]).reshape(shape)
    return out.movedim(-1, 0) if row_wise else out


def ref_nuslerp(inputs, base_index, model_params, params):
    others = [i for i in range(len(inputs)) if i != base_index]
    assert len(others) == 2
    w0, w1 = (float(model_params[i]["weight"]) for i in others)
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    opts = dict(flatten=params.get("nuslerp_flatten", True), row_wise=params.get("nuslerp_row_wise", False))
    x0, x1 = (inputs[i] for i in others)
    if base_index is None:
        return ref_nuslerp_tensors(t, x0, x1, **opts)
    base = inputs[base_index]
    return base.double() + ref_nuslerp_tensors(t, x0 - base, x1 - base, **opts)


def ref_model_stock(inputs, base_index, params):
    """t = N cos / (1 + (N-1) cos) from the mean pairwise cosine of the task vectors (whole
    tensor, or per row with filter_wise); out = t * mean(fine-tunes) + (1 - t) * base."""
    w0 = inputs[base_index].double()
    ws = [x.double() for i, x in enumerate(inputs) if i != base_index]
    shape = w0.shape
    n_rows = shape[0] if params.get("filter_wise", False) and w0.dim() >= 2 else 1
    base_rows = w0.reshape(n_rows, -1)
    ft_rows = [w.reshape(n_rows, -1) for w in ws]
    n = len(ws)
    ts = []
    for r in range(n_rows):
        vectors = [f[r] - base_rows[r] for f in ft_rows]
        cosines = []
        for i in range(n):
            for j in range(i + 1, n):
                norms = max(float(vectors[i].norm() * vectors[j].norm()), 1e-6)
                cosines.append(min(1.0, max(-1.0, float(vectors[i] @ vectors[j]) / norms)))
        cos = sum(cosines) / len(cosines)
        denominator = 1 + (n - 1) * cos
        ts.append(0.0 if abs(denominator) < 1e-6 else n * cos / denominator)
    t = torch.tensor(ts, dtype=torch.float64).unsqueeze(1)
    average = sum(ft_rows) / n
    return (t * average + (1 - t) * base_rows).reshape(shape)


def reference(method, inputs, base_index, model_params, params, generator=None):
    if method in FAMILY:
        return ref_task_family(method, inputs, base_index, model_params, params, generator)
    if method == "linear":
        return ref_linear(inputs, model_params, params)
    if method == "passthrough":
        scale = model_params[0].get("scale")
        return inputs[0].double() * (1.0 if scale is None else scale)
    if method == "slerp":
        return ref_slerp_flat(params["t"], inputs[base_index], inputs[1 - base_index])
    if method == "nuslerp":
        return ref_nuslerp(inputs, base_index, model_params, params)
    if method == "model_stock":
        return ref_model_stock(inputs, base_index, params)
    raise AssertionError(f"no reference for {method}")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def run_impl(method, inputs, base_index, model_params, params, seed=0):
    """The registered method, with defaults applied by its spec, on copies of the inputs."""
    spec = get_method(method)
    mps, ps = spec.resolve([dict(m) for m in model_params], dict(params), base_index)
    generator = torch.Generator().manual_seed(seed) if spec.random else None
    return spec.fn([x.clone() for x in inputs], base_index=base_index, model_params=mps, params=ps, generator=generator)


def run_ref(method, inputs, base_index, model_params, params, seed=0):
    generator = torch.Generator().manual_seed(seed) if method in RANDOM_METHODS else None
    return reference(method, inputs, base_index, model_params, params, generator)


def make_inputs(n_ft, shape, *, seed=0, spread=0.5, dtype=torch.float32):
    """A base and `n_ft` fine-tunes whose task vectors share a common component."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    common = torch.randn(shape, generator=g, dtype=torch.float64)
    fts = [base + spread * (0.5 * common + torch.randn(shape, generator=g, dtype=torch.float64)) for _ in range(n_ft)]
    return base.to(dtype), [f.to(dtype) for f in fts]


def build_case(n_ft, model_params, *, has_base=True, base_at=0, shape=(24, 40), seed=0, dtype=torch.float32):
    base, fts = make_inputs(n_ft, shape, seed=seed, dtype=dtype)
    inputs, mps = list(fts), [dict(m) for m in model_params]
    base_index = None
    if has_base:
        inputs.insert(base_at, base)
        mps.insert(base_at, {})
        base_index = base_at
    return inputs, base_index, mps


def one_model(delta, base=None, **mp):
    """Inputs for one fine-tune (base + delta, weight 1): (base, inputs, base_index, model_params)."""
    base = torch.zeros_like(delta) if base is None else base
    params = {"weight": 1.0, **mp}
    return base, [base, base + delta], 0, [{}, params]


# ---------------------------------------------------------------------------------------------
# Registry and defaults
# ---------------------------------------------------------------------------------------------


def test_every_registered_method_has_a_reference():
    assert sorted(set(available_methods()) - set(TESTED_ELSEWHERE)) == ALL_METHODS
    assert set(TESTED_ELSEWHERE) <= set(available_methods())


@pytest.mark.parametrize("method", sorted(FAMILY))
def test_task_family_defaults(method):
    _, _, normalize, rescale = FAMILY[method]
    spec = get_method(method)
    mps, params = spec.resolve([{}, {"weight": 0.5}], {}, 0)
    assert mps[0] == {}, "the base model gets no per-model parameters"
    assert params["normalize"] is normalize and params["rescale"] is rescale
    assert params["lambda"] == DEFAULT_LAMBDA and params["rescale_mode"] == "l1"
    expected = {"weight": 0.5, "density": DEFAULT_DENSITY}
    if FAMILY[method][0] == "breadcrumbs":
        expected["gamma"] = DEFAULT_GAMMA
    if FAMILY[method][0] == "della":
        expected["epsilon"] = DEFAULT_EPSILON
    assert mps[1] == expected
    assert spec.random == (method in RANDOM_METHODS)


def test_other_defaults():
    assert get_method("linear").resolve([{"weight": 1}], {}, None)[1] == {"normalize": True}
    assert get_method("nuslerp").resolve([{"weight": 1}, {"weight": 1}], {}, None)[1] == {
        "nuslerp_row_wise": False,
        "nuslerp_flatten": True,
    }
    assert get_method("model_stock").resolve([{}, {}, {}], {}, 0)[1] == {"filter_wise": False}


@pytest.mark.parametrize(
    "method, model_params, params",
    [
        ("ties", [{}, {"density": 0.5}], {}),  # weight is required
        ("ties", [{}, {"weight": 1, "density": 1.5}], {}),
        ("breadcrumbs", [{}, {"weight": 1, "gamma": -0.1}], {}),
        ("della", [{}, {"weight": 1, "epsilon": 2}], {}),
        ("slerp", [{}, {}], {}),  # t is required
        ("slerp", [{}, {}], {"t": 1.5}),
        ("linear", [{"weight": 1}, {}], {}),
        ("dare_linear", [{}, {"weight": 1}], {"rescale_mode": "l2"}),
    ],
)
def test_bad_parameters_are_refused(method, model_params, params):
    base_index = None if method == "linear" else 0
    with pytest.raises(MethodError):
        get_method(method).resolve(model_params, params, base_index)


# ---------------------------------------------------------------------------------------------
# Every method against its reference on random tensors
# ---------------------------------------------------------------------------------------------

W3 = [0.7, 0.4, 0.6]


def weights(*ws, **per_model):
    """Per-model parameter dicts: weights plus lists of other per-model values."""
    out = [{"weight": w} for w in ws]
    for name, values in per_model.items():
        for mp, v in zip(out, values):
            if v is not None:
                mp[name] = v
    return out


# (id, method, n fine-tunes, per-model params of the fine-tunes, global params, build options)
UNIT_CASES = [
    ("linear", "linear", 3, weights(0.2, 0.5, 0.6), {}, {"has_base": False}),
    ("linear-raw", "linear", 3, weights(1.0, -0.5, 0.25), {"normalize": False}, {"has_base": False}),
    ("passthrough", "passthrough", 1, [{}], {}, {"has_base": False}),
    ("passthrough-scale", "passthrough", 1, [{"scale": -0.5}], {}, {"has_base": False}),
    ("task_arithmetic", "task_arithmetic", 3, weights(0.7, 0.4, -0.3), {"lambda": 0.8}, {"base_at": 1}),
    ("task_arithmetic-normalize", "task_arithmetic", 3, weights(0.7, 0.4, 0.3), {"normalize": True}, {}),
    ("ties", "ties", 3, weights(*W3, density=[0.5, 0.3, 0.7]), {}, {}),
    ("ties-base-last", "ties", 3, weights(*W3, density=[0.5, 0.3, 0.7]), {"lambda": 1.2}, {"base_at": 3}),
    ("ties-l1", "ties", 3, weights(*W3, density=[0.5, 0.3, 0.7]), {"normalize": False, "rescale": True}, {}),
    ("ties-inverse-density", "ties", 3, weights(*W3, density=[0.5, 0.3, 0.7]), {"rescale": True, "rescale_mode": "inverse_density"}, {}),
    ("ties-negative-weight", "ties", 3, weights(0.7, -0.4, 0.6, density=[0.5, 0.6, 0.7]), {}, {}),
    ("dare_ties", "dare_ties", 3, weights(0.5, 0.5, 0.5, density=[0.6, 0.4, 0.8]), {}, {}),
    ("dare_ties-normalize-inverse", "dare_ties", 3, weights(*W3, density=[0.6, 0.4, 0.8]), {"normalize": True, "rescale_mode": "inverse_density"}, {"base_at": 2}),
    ("dare_ties-dense-model", "dare_ties", 3, weights(*W3, density=[0.6, 1.0, 0.8]), {}, {}),
    ("dare_linear", "dare_linear", 3, weights(*W3, density=[0.6, 0.4, 0.8]), {}, {}),
    ("dare_linear-plain", "dare_linear", 3, weights(*W3, density=[0.6, 0.4, 0.8]), {"rescale": False, "normalize": True, "lambda": 1.3}, {}),
    ("dare_linear-inverse", "dare_linear", 2, weights(0.7, 0.4, density=[0.3, 0.9]), {"rescale_mode": "inverse_density"}, {}),
    ("breadcrumbs", "breadcrumbs", 3, weights(*W3, density=[0.8, 0.6, 0.9], gamma=[0.05, None, 0.1]), {}, {}),
    ("breadcrumbs-l1", "breadcrumbs", 3, weights(*W3, density=[0.8, 0.6, 0.9], gamma=[0.05, 0.2, 0.1]), {"rescale": True}, {}),
    ("breadcrumbs_ties", "breadcrumbs_ties", 3, weights(*W3, density=[0.7, 0.5, 0.9], gamma=[0.02, 0.1, None]), {"normalize": True}, {}),
    ("breadcrumbs_ties-raw", "breadcrumbs_ties", 2, weights(0.9, 0.3, density=[0.7, 0.5]), {}, {"base_at": 1}),
    ("della", "della", 3, weights(*W3, density=[0.5, 0.4, 0.6], epsilon=[0.1, None, 0.2]), {}, {}),
    ("della-inverse", "della", 3, weights(*W3, density=[0.5, 0.4, 0.6], epsilon=[0.1, 0.3, 0.2]), {"rescale_mode": "inverse_density"}, {}),
    ("della-plain", "della", 3, weights(*W3, density=[0.5, 0.4, 0.6]), {"rescale": False, "normalize": False}, {"base_at": 3}),
    ("della_linear", "della_linear", 3, weights(*W3, density=[0.6, 0.5, 0.7], epsilon=[0.2, None, 0.1]), {}, {}),
    ("della_linear-normalize", "della_linear", 2, weights(0.8, 0.4, density=[0.6, 0.5]), {"normalize": True, "lambda": 0.9}, {}),
    ("slerp", "slerp", 1, [{}], {"t": 0.3}, {}),
    ("slerp-base-second", "slerp", 1, [{}], {"t": 0.8}, {"base_at": 1}),
    ("nuslerp-base", "nuslerp", 2, weights(0.3, 0.7), {}, {}),
    ("nuslerp-no-base", "nuslerp", 2, weights(2.0, 1.0), {}, {"has_base": False}),
    ("nuslerp-vectors", "nuslerp", 2, weights(0.3, 0.7), {"nuslerp_flatten": False}, {"has_base": False}),
    ("nuslerp-columns", "nuslerp", 2, weights(0.3, 0.7), {"nuslerp_flatten": False, "nuslerp_row_wise": True}, {"base_at": 1}),
    ("nuslerp-row-wise-flat", "nuslerp", 2, weights(0.6, 0.2), {"nuslerp_row_wise": True}, {}),
    ("model_stock-3", "model_stock", 3, [{}, {}, {}], {}, {}),
    ("model_stock-2", "model_stock", 2, [{}, {}], {}, {"base_at": 2}),
    ("model_stock-filter-wise", "model_stock", 3, [{}, {}, {}], {"filter_wise": True}, {}),
]


def test_unit_cases_cover_every_method():
    assert sorted({c[1] for c in UNIT_CASES}) == ALL_METHODS


@pytest.mark.parametrize("shape", [(24, 40), (97,)], ids=["2d", "1d"])
@pytest.mark.parametrize("case", UNIT_CASES, ids=[c[0] for c in UNIT_CASES])
def test_method_matches_reference(case, shape):
    _, method, n_ft, mps, params, opts = case
    inputs, base_index, model_params = build_case(n_ft, mps, shape=shape, seed=len(case[0]), **opts)
    out = run_impl(method, inputs, base_index, model_params, params, seed=1234)
    ref = run_ref(method, inputs, base_index, model_params, params, seed=1234)
    assert out.dtype == torch.float32 and out.shape == inputs[0].shape
    torch.testing.assert_close(out, ref.float(), **F32_TOL)


def test_slerp_uses_the_spherical_branch_in_unit_cases():
    """Guard for the slerp cases above: their inputs are far enough apart that lerp would differ."""
    inputs, base_index, mps = build_case(1, [{}])
    lerp = 0.7 * inputs[0].double() + 0.3 * inputs[1].double()
    out = run_impl("slerp", inputs, base_index, mps, {"t": 0.3})
    assert (out.double() - lerp).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Random methods: properties that hold for any correct implementation
# ---------------------------------------------------------------------------------------------

BIG = (400, 500)


def big_single(method, seed=0, **mp):
    base, fts = make_inputs(1, BIG, seed=seed)
    return base, fts[0] - base, [base, fts[0]], [{}, {"weight": 1.0, **mp}]


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_random_kept_fraction_and_l1_rescale(method):
    density = 0.3
    mp = {"density": density, "epsilon": 0.1} if "della" in method else {"density": density}
    base, delta, inputs, mps = big_single(method, **mp)
    out = run_impl(method, inputs, 0, mps, {}, seed=7).double()
    moved = out - base.double()
    kept = moved != 0
    assert abs(kept.double().mean().item() - density) < 0.01  # sigma ~ 0.001
    # kept values are delta * s with s the L1 ratio of the full delta to its kept part
    d = delta.double()
    scale = d.abs().sum() / d[kept].abs().sum()
    torch.testing.assert_close(moved[kept], d[kept] * scale, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_random_inverse_density_rescale(method):
    """Each kept value is delta / p, p its keep probability (DARE: density; DELLA: from its
    magnitude rank), so the rescaled delta is unbiased."""
    density, eps = 0.4, 0.2
    mp = {"density": density, "epsilon": eps} if "della" in method else {"density": density}
    base, delta, inputs, mps = big_single(method, seed=1, **mp)
    out = run_impl(method, inputs, 0, mps, {"rescale_mode": "inverse_density"}, seed=3).double()
    moved = out - base.double()
    kept = moved != 0
    d = delta.double()
    if "della" in method:
        ranks = delta.abs().argsort(dim=1).argsort(dim=1).double()
        p = density - eps + 2 * eps * ranks / (delta.shape[1] - 1)
    else:
        p = torch.full_like(d, density)
    torch.testing.assert_close(moved[kept], d[kept] / p[kept], atol=1e-6, rtol=1e-5)
    std = (d.square() * (1 - p) / p).sum().sqrt()
    assert abs(moved.sum() - d.sum()) < 5 * std


def test_della_keeps_large_magnitudes_more_often():
    density, eps = 0.5, 0.2
    base, delta, inputs, mps = big_single("della_linear", seed=2, density=density, epsilon=eps)
    out = run_impl("della_linear", inputs, 0, mps, {"rescale": False}, seed=5)
    kept = (out != base).double()
    # per row, rank deciles: top decile kept with mean probability density + 0.9 eps, bottom with density - 0.9 eps
    ranks = delta.abs().argsort(dim=1).argsort(dim=1).double() / (delta.shape[1] - 1)
    top = kept[ranks >= 0.9].mean().item()
    bottom = kept[ranks <= 0.1].mean().item()
    assert abs(top - (density + 0.9 * eps)) < 0.02
    assert abs(bottom - (density - 0.9 * eps)) < 0.02


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_random_seed_determinism(method):
    mp = {"density": 0.5, "epsilon": 0.1} if "della" in method else {"density": 0.5}
    inputs, base_index, mps = build_case(2, [{"weight": 0.6, **mp}, {"weight": 0.5, **mp}])
    a = run_impl(method, inputs, base_index, mps, {}, seed=11)
    b = run_impl(method, inputs, base_index, mps, {}, seed=11)
    c = run_impl(method, inputs, base_index, mps, {}, seed=12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_random_mask_is_the_generator_stream(method):
    """The kept elements are exactly torch.bernoulli's draws from the seeded generator."""
    mp = {"density": 0.45, "epsilon": 0.15} if "della" in method else {"density": 0.45}
    base, fts = make_inputs(1, (30, 50), seed=9)
    out = run_impl(method, [base, fts[0]], 0, [{}, {"weight": 1.0, **mp}], {"rescale": False}, seed=99)
    g = torch.Generator().manual_seed(99)
    delta = fts[0] - base
    probs = ref_della_probs(delta, 0.45, 0.15) if "della" in method else torch.full(delta.shape, 0.45)
    expected = torch.bernoulli(probs, generator=g).bool()
    assert torch.equal(out != base, expected)


def test_della_without_spread_is_dare():
    """epsilon = 0 makes every keep probability equal to density: DELLA's draws are DARE's."""
    inputs, base_index, mps = build_case(3, weights(*W3, density=[0.5, 0.3, 0.7], epsilon=[0.0, 0.0, 0.0]))
    dare_mps = [{k: v for k, v in mp.items() if k != "epsilon"} for mp in mps]
    della = run_impl("della_linear", inputs, base_index, mps, {}, seed=21)
    dare = run_impl("dare_linear", inputs, base_index, dare_mps, {}, seed=21)
    torch.testing.assert_close(della, dare, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rescale", [{}, {"rescale": True}, {"rescale": True, "rescale_mode": "inverse_density"}], ids=["default", "l1", "inverse"])
@pytest.mark.parametrize("method", SPARSIFYING)
def test_density_zero_returns_base(method, rescale):
    inputs, base_index, mps = build_case(2, weights(0.6, 0.8, density=[0.0, 0.0]))
    out = run_impl(method, inputs, base_index, mps, rescale, seed=3)
    assert torch.equal(out, inputs[0])


@pytest.mark.parametrize("method", SPARSIFYING)
def test_density_one_is_plain_task_arithmetic(method):
    """With density 1 nothing is dropped: the method is task arithmetic (with sign election for
    the TIES variants), for any seed."""
    _, consensus, _, _ = FAMILY[method]
    inputs, base_index, mps = build_case(3, weights(0.7, -0.4, 0.6, density=[1.0, 1.0, 1.0], epsilon=[0.5, 0.5, 0.5]))
    params = {"normalize": True, "lambda": 0.9}
    out = run_impl(method, inputs, base_index, mps, params, seed=1)
    again = run_impl(method, inputs, base_index, mps, params, seed=2)
    assert torch.equal(out, again)
    dense_mps = [{k: v for k, v in mp.items() if k == "weight"} for mp in mps]
    ref = ref_task_family("ties" if consensus else "task_arithmetic", inputs, base_index, dense_mps, params, None)
    torch.testing.assert_close(out, ref.float(), **F32_TOL)


TIES_LIKE = [m for m, (_, consensus, *_rest) in FAMILY.items() if consensus]


@pytest.mark.parametrize("method", TIES_LIKE)
def test_sign_election_tie_counts_as_positive(method):
    """Weighted deltas +1 and -1 sum to 0: the elected sign is +, so only the +1 survives."""
    base = torch.zeros(3)
    inputs = [base, torch.tensor([1.0, 2.0, -1.0]), torch.tensor([-1.0, 1.0, -3.0])]
    out = run_impl(method, inputs, 0, [{}, {"weight": 1.0}, {"weight": 1.0}], {"normalize": False})
    assert torch.equal(out, torch.tensor([1.0, 3.0, -4.0]))


@pytest.mark.parametrize("method", TIES_LIKE)
def test_sign_election_zero_divisor_counts_as_one(method):
    """Weights 0.5 and -0.5 whose weighted deltas agree: the surviving weights sum to 0, and the
    divisor 0 is replaced by 1 (the merged delta is not divided)."""
    base = torch.zeros(2)
    inputs = [base, torch.tensor([1.0, 2.0]), torch.tensor([-1.0, -2.0])]
    out = run_impl(method, inputs, 0, [{}, {"weight": 0.5}, {"weight": -0.5}], {"normalize": True})
    assert torch.equal(out, torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("rescale", [{}, {"rescale": True}, {"rescale": True, "rescale_mode": "inverse_density"}], ids=["plain", "l1", "inverse"])
@pytest.mark.parametrize("thresholds, densities", [((0.3, 0.6), (0.5, 0.3)), ((math.inf, 0.5), (0.0, 0.4))], ids=["kept", "density-0"])
def test_ties_model_scope_threshold(thresholds, densities, rescale):
    """trim_scope: model: the runtime passes each model's magnitude threshold over its whole task
    vector; elements with |delta| >= threshold are kept, then rescaled as configured."""
    inputs, base_index, mps = build_case(2, weights(0.7, 0.4, density=list(densities)))
    spec = get_method("ties")
    params = {"trim_scope": "model", **rescale}
    resolved, ps = spec.resolve(mps, params, base_index)
    for i, thr in zip((1, 2), thresholds):
        resolved[i][TRIM_THRESHOLD] = thr
        mps[i][TRIM_THRESHOLD] = thr
    out = spec.fn([x.clone() for x in inputs], base_index=base_index, model_params=resolved, params=ps, generator=None)
    ref = reference("ties", inputs, base_index, mps, params)
    torch.testing.assert_close(out, ref.float(), **F32_TOL)


def test_magnitude_keeps_at_least_one_element():
    delta = torch.tensor([0.3, -2.0, 0.1, 1.5, -0.7])
    base, inputs, bi, mps = one_model(delta, density=1e-6)
    out = run_impl("ties", inputs, bi, mps, {})
    assert torch.equal(out - base, torch.tensor([0.0, -2.0, 0.0, 0.0, 0.0]))


def test_breadcrumbs_tiny_density_keeps_nothing():
    """Breadcrumbs keeps int(density * n) elements, which may be none (unlike magnitude trim)."""
    delta = torch.tensor([0.3, -2.0, 0.1, 1.5, -0.7])
    base, inputs, bi, mps = one_model(delta, density=0.1, gamma=0.0)
    assert torch.equal(run_impl("breadcrumbs", inputs, bi, mps, {}), base)


# |delta| = 1..10 scattered over positions with mixed signs
CRUMBS = torch.tensor([-7.0, 2.0, 10.0, -1.0, 5.0, -9.0, 3.0, 8.0, -4.0, 6.0])


@pytest.mark.parametrize(
    "density, gamma, kept_magnitudes",
    [
        (0.5, 0.2, {4, 5, 6, 7, 8}),  # target 5, top 2 dropped, bottom 3 dropped
        (0.5, 0.0, {6, 7, 8, 9, 10}),  # no outlier cut: plain magnitude trim
        (0.9, 0.2, {1, 2, 3, 4, 5, 6, 7, 8, 9}),  # outlier cut shrinks to 1 to keep 9
        (0.3, 0.3, {5, 6, 7}),
        (0.4, 0.6, {1, 2, 3, 4}),  # n_bot clamps at 0
    ],
)
def test_breadcrumbs_gamma(density, gamma, kept_magnitudes):
    base, inputs, bi, mps = one_model(CRUMBS, density=density, gamma=gamma)
    out = run_impl("breadcrumbs", inputs, bi, mps, {})
    expected = torch.where(torch.isin(CRUMBS.abs(), torch.tensor(sorted(kept_magnitudes), dtype=torch.float32)), CRUMBS, 0.0)
    assert torch.equal(out, expected)


def test_ties_tie_rule_keeps_lower_indices():
    delta = torch.tensor([0.5, 1.0, -1.0, 1.0, -1.0, 0.25])
    base, inputs, bi, mps = one_model(delta, density=0.4)  # k = 2 of four equal magnitudes
    out = run_impl("ties", inputs, bi, mps, {})
    assert torch.equal(out, torch.tensor([0.0, 1.0, -1.0, 0.0, 0.0, 0.0]))


def test_breadcrumbs_tie_rule_ranks_equal_magnitudes_by_index():
    delta = torch.tensor([2.0, 1.0, -1.0, 1.0, -1.0, 3.0])
    # ascending ranks: idx1, idx2, idx3, idx4 (|1|), idx0 (2), idx5 (3); keep ranks 3..5
    base, inputs, bi, mps = one_model(delta, density=0.5, gamma=0.0)
    out = run_impl("breadcrumbs", inputs, bi, mps, {})
    assert torch.equal(out, torch.tensor([2.0, 0.0, 0.0, 0.0, -1.0, 3.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("method, mp", [("ties", {"density": 0.37}), ("breadcrumbs", {"density": 0.45, "gamma": 0.1})])
def test_trim_with_many_ties(method, mp, dtype):
    """Quantised deltas (many equal magnitudes, including at the cut) in several dtypes."""
    g = torch.Generator().manual_seed(4)
    delta = (torch.randint(-20, 21, (70, 73), generator=g).double() / 8).to(dtype)
    base, inputs, bi, mps = one_model(delta, **mp)
    out = run_impl(method, inputs, bi, mps, {})
    if method == "ties":
        mask = ref_top_k_mask(delta, mp["density"])
    else:
        mask = ref_breadcrumbs_mask(delta, mp["density"], mp["gamma"])
    assert out.dtype == dtype
    assert torch.equal(out, (delta.double() * mask).to(dtype))


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("density, epsilon", [(0.1, 0.15), (0.9, 0.15), (0.5, 0.5), (0.3, 0.3)])
def test_della_epsilon_bounds(method, density, epsilon):
    inputs, base_index, mps = build_case(1, [{"weight": 1.0, "density": density, "epsilon": epsilon}])
    with pytest.raises(ValueError, match="epsilon"):
        run_impl(method, inputs, base_index, mps, {})


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_bounds_not_checked_when_nothing_is_dropped(method):
    inputs, base_index, mps = build_case(1, [{"weight": 1.0, "density": 1.0, "epsilon": 0.5}])
    out = run_impl(method, inputs, base_index, mps, {"normalize": False})
    torch.testing.assert_close(out, inputs[1], **F32_TOL)


def test_linear_zero_weight_sum():
    inputs, _, mps = build_case(2, weights(0.5, -0.5), has_base=False)
    with pytest.raises(ValueError, match="zero"):
        run_impl("linear", inputs, None, mps, {})
    out = run_impl("linear", inputs, None, mps, {"normalize": False})
    torch.testing.assert_close(out, (0.5 * inputs[0].double() - 0.5 * inputs[1].double()).float(), **F32_TOL)


def test_task_arithmetic_zero_weight_sum_normalize_divides_by_one():
    inputs, base_index, mps = build_case(2, weights(0.5, -0.5))
    out = run_impl("task_arithmetic", inputs, base_index, mps, {"normalize": True})
    expected = inputs[0].double() + 0.5 * (inputs[1].double() - inputs[0].double()) - 0.5 * (inputs[2].double() - inputs[0].double())
    torch.testing.assert_close(out, expected.float(), **F32_TOL)


def test_linear_accumulates_bf16_in_float32():
    """256 + 1 + 1: in bfloat16 each partial sum rounds back to 256; in float32 it is 258."""
    inputs = [torch.full((4,), v, dtype=torch.bfloat16) for v in (256.0, 1.0, 1.0)]
    out = run_impl("linear", inputs, None, weights(1, 1, 1), {"normalize": False})
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.full((4,), 258.0, dtype=torch.bfloat16))


def test_linear_float64_stays_float64():
    a = torch.full((3,), 1.0, dtype=torch.float64)
    b = torch.full((3,), 1e-12, dtype=torch.float64)
    out = run_impl("linear", [a, b], None, weights(1, 1), {"normalize": False})
    assert out.dtype == torch.float64 and torch.equal(out, a + b)


@pytest.mark.parametrize("t", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("factor", [2.5, -1.0, -3.0], ids=["colinear", "antipodal", "antipodal-scaled"])
def test_slerp_colinear_and_antipodal_fall_back_to_lerp(factor, t):
    a = torch.randn(7, 9, generator=torch.Generator().manual_seed(0))
    b = a * factor
    out = run_impl("slerp", [a, b], 0, [{}, {}], {"t": t})
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ((1 - t) * a.double() + t * b.double()).float(), **F32_TOL)


@pytest.mark.parametrize("cos, spherical", [(0.9994, True), (0.9996, False), (-0.9996, False), (0.0, True), (-0.5, True)])
def test_slerp_threshold(cos, spherical):
    """Unit vectors at a known angle: the closed form on either side of |cos| = 0.9995."""
    t = 0.3
    a = torch.zeros(16, dtype=torch.float64)
    b = torch.zeros(16, dtype=torch.float64)
    a[0] = 1.0
    b[0], b[1] = cos, math.sqrt(1 - cos * cos)
    if spherical:
        theta = math.acos(cos)
        expected = math.sin((1 - t) * theta) / math.sin(theta) * a + math.sin(t * theta) / math.sin(theta) * b
    else:
        expected = (1 - t) * a + t * b
    out = run_impl("slerp", [a.float(), b.float()], 0, [{}, {}], {"t": t})
    torch.testing.assert_close(out, expected.float(), atol=1e-6, rtol=1e-5)


def test_slerp_zero_vector_uses_unit_norm():
    b = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    out = run_impl("slerp", [torch.zeros_like(b), b], 0, [{}, {}], {"t": 0.4})
    torch.testing.assert_close(out, (math.sin(0.4 * math.pi / 2) * b.double()).float(), **F32_TOL)


@pytest.mark.parametrize("t, pick", [(0.0, 0), (1.0, 1)])
def test_slerp_endpoints(t, pick):
    inputs, _, _ = build_case(1, [{}])
    base, other = inputs
    for base_index, order in ((0, [base, other]), (1, [other, base])):
        out = run_impl("slerp", order, base_index, [{}, {}], {"t": t})
        torch.testing.assert_close(out, [base, other][pick], **F32_TOL)


def test_nuslerp_colinear_and_zero_weights():
    a = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    out = run_impl("nuslerp", [a, 2 * a], None, weights(1.0, 3.0), {"nuslerp_flatten": False})
    torch.testing.assert_close(out, (0.25 * a.double() + 0.75 * 2 * a.double()).float(), **F32_TOL)
    inputs, _, _ = build_case(2, [{}, {}], has_base=False)
    zero = run_impl("nuslerp", inputs, None, weights(1.0, -1.0), {})  # weights sum to 0: t = 0.5
    torch.testing.assert_close(zero, ref_nuslerp_tensors(0.5, *inputs, flatten=True, row_wise=False).float(), **F32_TOL)


def test_model_stock_singular_and_identical():
    base, fts = make_inputs(1, (8, 10))
    d = fts[0] - base
    opposite = run_impl("model_stock", [base, base + d, base - d], 0, [{}, {}, {}], {})
    assert torch.equal(opposite, base), "1 + (N-1) cos = 0: keep the base"
    same = run_impl("model_stock", [base, base + d, base + d, base + d], 0, [{}] * 4, {})
    torch.testing.assert_close(same, (base + d), **F32_TOL)  # cos = 1: t = 1, the average


def bf16_case(method):
    """Per method, a bfloat16 case without sign-election ambiguity (one fine-tune for the
    task-vector family)."""
    if method in FAMILY:
        mp = {"weight": 0.75}
        if method != "task_arithmetic":
            mp["density"] = 0.5
        return 1, [mp], {}, {}
    return {
        "linear": (3, weights(0.25, 0.5, 0.75), {}, {"has_base": False}),
        "passthrough": (1, [{"scale": 0.5}], {}, {"has_base": False}),
        "slerp": (1, [{}], {"t": 0.3}, {}),
        "nuslerp": (2, weights(0.25, 0.75), {}, {}),
        "model_stock": (3, [{}, {}, {}], {}, {}),
    }[method]


@pytest.mark.parametrize("method", ALL_METHODS)
def test_bfloat16_in_bfloat16_out(method):
    n_ft, mps, params, opts = bf16_case(method)
    inputs, base_index, model_params = build_case(n_ft, mps, dtype=torch.bfloat16, **opts)
    out = run_impl(method, inputs, base_index, model_params, params, seed=5)
    assert out.dtype == torch.bfloat16 and out.shape == inputs[0].shape
    assert torch.isfinite(out.float()).all()
    if method in RANDOM_METHODS:
        # whatever the draws, each element is the base or the base moved by delta * s
        base, x = inputs[base_index].double(), inputs[1 - base_index].double()
        moved = out.double() - base
        kept = moved.abs() > 0.02 * (x - base).abs()
        assert 0.2 < kept.double().mean() < 0.8
        ratio = moved[kept] / (x - base)[kept]
        assert ((ratio - ratio.median()).abs() < 0.05 * ratio.median()).double().mean() > 0.9
        return
    ref = reference(method, inputs, base_index, model_params, params)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------------------------------------
# End to end: raymerge.merge on tiny llama and qwen2 checkpoints
# ---------------------------------------------------------------------------------------------

E2E_SEED = 1234
E2E_LAYERS = 4

# Per method: base model key (None: no base), listed models with their parameters, globals.
E2E_SPECS = {
    "linear": (None, [("base", {"weight": 0.2}), ("ft1", {"weight": 0.5}), ("ft2", {"weight": 0.6})], {}),
    "passthrough": (None, [("ft2", {"scale": 0.5})], {}),
    "task_arithmetic": ("base", [("ft1", {"weight": 0.7}), ("ft2", {"weight": 0.4}), ("ft3", {"weight": -0.3})], {"lambda": 0.8}),
    "ties": ("base", [("ft1", {"weight": 0.7, "density": 0.5}), ("ft2", {"weight": 0.4, "density": 0.3}), ("ft3", {"weight": 0.6, "density": 0.7})], {}),
    "dare_ties": ("base", [("ft1", {"weight": 0.5, "density": 0.6}), ("ft2", {"weight": 0.5, "density": 0.4}), ("ft3", {"weight": 0.5, "density": 0.8})], {}),
    "dare_linear": (
        "base",
        [("ft1", {"weight": 0.7, "density": 0.6}), ("ft2", {"weight": 0.4, "density": 0.5}), ("ft3", {"weight": 0.6, "density": 0.8})],
        {"rescale_mode": "inverse_density"},
    ),
    "breadcrumbs": (
        "base",
        [("ft1", {"weight": 0.7, "density": 0.8, "gamma": 0.05}), ("ft2", {"weight": 0.4, "density": 0.6}), ("ft3", {"weight": 0.6, "density": 0.9, "gamma": 0.1})],
        {},
    ),
    "breadcrumbs_ties": (
        "base",
        [("ft1", {"weight": 0.7, "density": 0.7, "gamma": 0.02}), ("ft2", {"weight": 0.4, "density": 0.5, "gamma": 0.1}), ("ft3", {"weight": 0.6, "density": 0.9})],
        {"normalize": True},
    ),
    "della": (
        "base",
        [("ft1", {"weight": 0.7, "density": 0.5, "epsilon": 0.1}), ("ft2", {"weight": 0.4, "density": 0.4}), ("ft3", {"weight": 0.6, "density": 0.6, "epsilon": 0.2})],
        {"lambda": 1.1},
    ),
    "della_linear": (
        "base",
        [("ft1", {"weight": 0.7, "density": 0.6, "epsilon": 0.2}), ("ft2", {"weight": 0.4, "density": 0.5, "epsilon": 0.1}), ("ft3", {"weight": 0.6, "density": 0.7})],
        {"rescale_mode": "inverse_density"},
    ),
    "slerp": ("base", [("base", {}), ("far", {})], {"t": 0.3}),
    "nuslerp": ("base", [("ft1", {"weight": 0.3}), ("ft2", {"weight": 0.7})], {}),
    "model_stock": ("base", [("ft1", {}), ("ft2", {}), ("ft3", {})], {}),
}

ARCHS = ("llama", "qwen2")


def test_e2e_specs_cover_every_method():
    assert sorted(E2E_SPECS) == ALL_METHODS


def e2e_config(method, spec, paths):
    base, models, params = spec
    cfg = {
        "merge_method": method,
        "models": [{"model": str(paths[k]), **({"parameters": dict(mp)} if mp else {})} for k, mp in models],
        "dtype": "float32",
    }
    if base is not None:
        cfg["base_model"] = str(paths[base])
    if params:
        cfg["parameters"] = dict(params)
    return cfg


def layer_t(name):
    """Gradient position of a tensor: i / (n - 1) in layer i; 0 outside the layers (embeddings,
    final norm, lm_head), as mergekit 0.1.5 plans them."""
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) / (E2E_LAYERS - 1) if m else 0.0


def setting_value(setting, name):
    """A parameter setting for one tensor: a filter list (first entry whose filter is a
    substring of the name; no filter matches all), a gradient (piecewise linear in layer_t), or
    a plain value."""
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        for entry in setting:
            if entry.get("filter") is None or entry["filter"] in name:
                return setting_value(entry["value"], name)
        raise AssertionError(f"no filter matches {name}")
    if isinstance(setting, list):
        pos = layer_t(name) * (len(setting) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(setting) - 1)
        frac = pos - lo
        return setting[lo] * (1 - frac) + setting[hi] * frac
    return setting


def e2e_reference(method, spec, states, name):
    base, models, params = spec
    keys = [k for k, _ in models]
    mps = [{p: setting_value(v, name) for p, v in mp.items()} for _, mp in models]
    if base is not None and base not in keys:  # an unlisted base model is the last input
        keys.append(base)
        mps.append({})
    base_index = None if method in ("linear", "passthrough") else keys.index(base)
    if base_index is not None and method in FAMILY:
        mps[base_index] = {}
    gparams = {p: setting_value(v, name) for p, v in params.items()}
    generator = torch.Generator().manual_seed(tensor_seed(E2E_SEED, name)) if method in RANDOM_METHODS else None
    return reference(method, [states[k][name] for k in keys], base_index, mps, gparams, generator)


def compare_merged(output, method, spec, states):
    merged = load_state(output)
    assert sorted(merged) == sorted(states["base"]), "output tensors differ from the model's"
    failures = []
    for name in sorted(merged):
        out = merged[name]
        ref = e2e_reference(method, spec, states, name)
        if out.dtype != torch.float32 or out.shape != ref.shape:
            failures.append(f"{name}: {out.dtype} {tuple(out.shape)}")
            continue
        try:
            torch.testing.assert_close(out, ref.float(), **F32_TOL)
        except AssertionError as err:
            failures.append(f"{name}: {str(err).splitlines()[2:4]}")
    assert not failures, f"{method}: {len(failures)} tensors differ from the reference:\n" + "\n".join(failures)


def add_far_model(paths, arch, folder):
    """A fine-tune far from the base (slerp's angle is then well above its lerp threshold)."""
    from raymerge.demo import build_tiny_model

    out = dict(paths)
    out["far"] = build_tiny_model(folder / f"{arch}-far", arch=arch, seed=7, base=paths["base"], delta_scale=1.0)
    return out


@pytest.fixture(scope="module")
def e2e_families(llama_models, qwen2_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("far-models")
    return {"llama": add_far_model(llama_models, "llama", folder), "qwen2": add_far_model(qwen2_models, "qwen2", folder)}


@pytest.fixture(scope="module")
def e2e_states(e2e_families):
    return {arch: {k: load_state(p) for k, p in paths.items()} for arch, paths in e2e_families.items()}


@pytest.fixture(scope="module")
def e2e_merges(e2e_families, tmp_path_factory):
    """The method x architecture merges, in process (no Ray: starting actors would dominate these
    tiny merges; `tests/test_in_process.py` checks in-process bytes equal a Ray merge's, and
    `tests/test_determinism.py` that the worker count changes nothing), submitted at once and run
    one after another in a background thread while the tests compare the finished ones. Maps
    (method, arch) to a future of the output folder."""
    root = tmp_path_factory.mktemp("e2e-merges")

    def one(method, arch):
        cfg = e2e_config(method, E2E_SPECS[method], e2e_families[arch])
        return raymerge.merge(cfg, root / f"{method}-{arch}", in_process=True, random_seed=E2E_SEED, quiet=True).output

    pool = ThreadPoolExecutor(max_workers=1)
    try:
        yield {(m, a): pool.submit(one, m, a) for m in ALL_METHODS for a in ARCHS}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_end_to_end_matches_reference(method, arch, e2e_merges, e2e_states):
    output = e2e_merges[(method, arch)].result()
    compare_merged(output, method, E2E_SPECS[method], e2e_states[arch])
    if method == "slerp":  # guard: the far model puts slerp on its spherical branch, not lerp
        name = "model.layers.1.mlp.up_proj.weight"
        base, far = e2e_states[arch]["base"][name], e2e_states[arch]["far"][name]
        assert (load_state(output)[name] - (0.7 * base + 0.3 * far)).abs().max() > 1e-4


def test_end_to_end_gradient_parameters(e2e_families, e2e_states, tmp_path):
    """Per-layer gradients (two- and three-point lists) on per-model and global parameters and a
    per-model filter list, with a random method (per-tensor seeds), in process."""
    spec = (
        "base",
        [
            ("ft1", {"weight": 0.7, "density": [0.8, 0.3], "epsilon": 0.1}),
            ("ft2", {"weight": [0.2, 1.0, 0.5], "density": 0.5}),
            ("ft3", {"weight": [{"filter": "self_attn", "value": 0.2}, {"value": 0.8}], "density": [0.4, 0.8]}),
        ],
        {"lambda": [1.0, 0.5]},
    )
    cfg = e2e_config("della", spec, e2e_families["llama"])
    out = raymerge.merge(cfg, tmp_path / "out", in_process=True, random_seed=E2E_SEED, quiet=True).output
    compare_merged(out, "della", spec, e2e_states["llama"])
    # guards for the reference's own resolution: the values really vary over the layers
    name = "model.layers.2.self_attn.q_proj.weight"
    assert setting_value([0.8, 0.3], name) == pytest.approx(0.8 - 0.5 * 2 / 3)
    assert setting_value([0.2, 1.0, 0.5], name) == pytest.approx(1.0 * 2 / 3 + 0.5 / 3)
    assert setting_value([0.8, 0.3], "lm_head.weight") == 0.8
    assert setting_value(spec[1][2][1]["weight"], name) == 0.2
    assert setting_value(spec[1][2][1]["weight"], "model.layers.2.mlp.up_proj.weight") == 0.8


def test_end_to_end_filter_parameters(e2e_families, e2e_states, tmp_path):
    """mergekit's classic slerp config: filters on the tensor name, each with its own gradient,
    and a catch-all default; in process."""
    t = [
        {"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
        {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
        {"value": 0.5},
    ]
    spec = ("base", [("base", {}), ("far", {})], {"t": t})
    cfg = e2e_config("slerp", spec, e2e_families["qwen2"])
    out = raymerge.merge(cfg, tmp_path / "slerp", in_process=True, quiet=True).output
    compare_merged(out, "slerp", spec, e2e_states["qwen2"])
    merged, base, far = load_state(out), e2e_states["qwen2"]["base"], e2e_states["qwen2"]["far"]
    for name in ("model.layers.0.self_attn.q_proj.bias", "model.layers.3.mlp.up_proj.weight"):  # t = 0
        assert torch.equal(merged[name], base[name])
    for name in ("model.layers.3.self_attn.k_proj.weight", "model.layers.0.mlp.down_proj.weight"):  # t = 1
        torch.testing.assert_close(merged[name], far[name], **F32_TOL)
