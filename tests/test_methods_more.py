"""The methods added for mergekit 0.1.5 parity (sce, karcher, multislerp, nearswap,
arcee_fusion, ram, ramplus_tl) against float64 references written here from their formulas.

As in `test_methods.py`, the references (`ref_*`) use no helper of `raymerge.methods`: they are
written from the papers' formulas and mergekit's documented semantics, element by element or
with plain float64 tensor arithmetic, on small tensors. Only `get_method(name).resolve` / `.fn`
are exercised. The methods run on float64 inputs (they compute in the input dtype), so the
comparison tolerance is float64 rounding; a float32 run is checked against the same reference
with float32 tolerances. The numbers against mergekit itself are in
`test_mergekit_differential.py`.
"""

from __future__ import annotations

import math

import pytest
import torch

from raymerge.methods import MethodError, get_method

NEW_METHODS = ("sce", "karcher", "multislerp", "nearswap", "arcee_fusion", "ram", "ramplus_tl")
F64 = dict(atol=1e-10, rtol=1e-10)
F32 = dict(atol=2e-5, rtol=2e-5)


def family(n: int, shape=(12, 20), dtype=torch.float64, seed=0, scale=0.05, sparse: float = 0.0) -> list[torch.Tensor]:
    """A base and n - 1 fine-tunes near it; with `sparse`, each fine-tune leaves that share of
    the elements (its own random choice) exactly at the base."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    out = [base]
    for _ in range(n - 1):
        delta = scale * torch.randn(shape, generator=g, dtype=torch.float64)
        if sparse:
            delta = delta * (torch.rand(shape, generator=g, dtype=torch.float64) >= sparse)
        out.append(base + delta)
    return [t.to(dtype) for t in out]


def run(method: str, inputs, base_index, model_params=None, **params):
    spec = get_method(method)
    mps = [dict(m) for m in (model_params or [{} for _ in inputs])]
    mps, ps = spec.resolve(mps, params, base_index)
    return spec.fn([t.clone() for t in inputs], base_index=base_index, model_params=mps, params=ps, generator=None)


def flat64(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.reshape(-1).tolist()]


# -- references ------------------------------------------------------------------------------------
def ref_sce(inputs, base_index, select_topk=1.0):
    base = inputs[base_index].double()
    taus = [x.double() - base for i, x in enumerate(inputs) if i != base_index]
    if not taus:
        return base
    n, size = len(taus), base.numel()
    cols = [flat64(t) for t in taus]
    if select_topk < 1:
        variances = []
        for j in range(size):
            vals = [c[j] for c in cols]
            mu = sum(vals) / n
            variances.append(sum((v - mu) ** 2 for v in vals) / n)  # population variance
        nonzero = sum(1 for v in variances if v != 0)
        k = int(nonzero * select_topk) if select_topk > 0 else 0
        chosen = set(sorted(range(size), key=lambda j: -variances[j])[:k])
        cols = [[v if j in chosen else 0.0 for j, v in enumerate(c)] for c in cols]
    energy = [sum(v * v for v in c) / size for c in cols]
    total = sum(energy)
    weights = [1.0 / n] * n if abs(total) < 1e-6 else [e / total for e in energy]
    out = []
    for j in range(size):
        vals = [c[j] for c in cols]
        elected = 1.0 if sum(vals) >= 0 else -1.0
        agree = [1.0 if (v > 0 and elected > 0) or (v < 0 and elected < 0) else 0.0 for v in vals]
        num = sum(w * a * v for w, a, v in zip(weights, agree, vals))
        den = max(sum(w * a for w, a in zip(weights, agree)), 1e-6)
        out.append(num / den)
    return base + torch.tensor(out, dtype=torch.float64).reshape(base.shape)


def _log_map(m: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The tangent vector at unit m pointing to unit u, of length the angle between them."""
    c = float(torch.dot(m, u).clamp(-1, 1))
    theta = math.acos(c)
    if theta < 1e-15:
        return torch.zeros_like(m)
    return theta / math.sin(theta) * (u - c * m)


def ref_karcher_direction(inputs) -> torch.Tensor:
    """argmin over unit m of sum_i d(m, u_i)^2 with equal weights, by fixed-point iteration
    m <- exp_m(mean_i log_m(u_i)) to convergence, in float64."""
    units = [x.double().reshape(-1) / x.double().norm() for x in inputs]
    m = sum(units)
    m = m / m.norm()
    for _ in range(1000):
        step = sum(_log_map(m, u) for u in units) / len(units)
        length = float(step.norm())
        if length < 1e-15:
            break
        m = math.cos(length) * m + math.sin(length) * step / length
        m = m / m.norm()
    return m


def ref_karcher(inputs):
    scale = sum(float(x.double().norm()) for x in inputs) / len(inputs)
    return (scale * ref_karcher_direction(inputs)).reshape(inputs[0].shape)


def ref_multislerp(inputs, base_index, weights, normalize_weights=True, eps=1e-8):
    chosen = [i for i in range(len(inputs)) if i != base_index]
    if len(chosen) == 1:
        return inputs[chosen[0]].double()
    base = None if base_index is None else inputs[base_index].double()
    vs = [inputs[i].double().reshape(-1) - (0 if base is None else base.reshape(-1)) for i in chosen]
    w = list(weights)
    if normalize_weights:
        w = [x / sum(weights) for x in weights]
    norms = [float(v.norm()) for v in vs]
    units = [v / (nv + eps) for v, nv in zip(vs, norms)]
    centre = sum(wi * u for wi, u in zip(w, units))
    centre = centre / centre.norm()
    tangent = sum(wi * (u - float(torch.dot(u, centre)) * centre) for wi, u in zip(w, units))
    length = float(tangent.norm()) + eps
    point = math.cos(length) * centre + math.sin(length) / length * tangent
    out = (sum(wi * nv for wi, nv in zip(w, norms)) * point).reshape(inputs[chosen[0]].shape)
    return out if base is None else out + base


def ref_nearswap(base, other, t):
    out = []
    for a, b in zip(flat64(base), flat64(other)):
        w = min(max(t / max(abs(a - b), 1e-6), 0.0), 1.0)
        out.append(w * b + (1 - w) * a)
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


def ref_arcee_fusion(base, other):
    b, x = base.double(), other.double()
    rows_b = b.reshape(-1, b.shape[-1])
    rows_x = x.reshape(-1, x.shape[-1])
    scores = []
    for rb, rx in zip(rows_b.tolist(), rows_x.tolist()):
        zb, zx = sum(math.exp(v) for v in rb), sum(math.exp(v) for v in rx)
        p = [math.exp(v) / zx + 1e-8 for v in rx]
        q = [math.exp(v) / zb + 1e-8 for v in rb]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        scores += [abs(vx - vb) * kl for vx, vb in zip(rx, rb)]
    ordered = sorted(scores)
    last = len(ordered) - 1
    q1, med, q3 = (ordered[math.floor(f * last)] for f in (0.25, 0.5, 0.75))
    fence = med + 1.5 * (q3 - q1)
    out = [vx if s >= fence else vb for s, vx, vb in zip(scores, flat64(x), flat64(b))]
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


def ref_ram(inputs, base_index, epsilon=1e-5, plus=False, r=0.1, alpha=0.2):
    base = inputs[base_index].double()
    cols = [[v for v in flat64(x.double() - base)] for i, x in enumerate(inputs) if i != base_index]
    size = base.numel()
    active = [[abs(v) > epsilon for v in c] for c in cols]
    counts = [sum(a[j] for a in active) for j in range(size)]
    lam = [1.0] * len(cols)
    if plus:
        for i, a in enumerate(active):
            shared = sum(1 for j in range(size) if a[j] and counts[j] > 1)
            unique = sum(1 for j in range(size) if a[j] and counts[j] == 1)
            # as in mergekit, rho and lambda are float32 (torch's default dtype) whatever the inputs'
            rho32 = float(torch.tensor(shared, dtype=torch.float32) / torch.tensor(max(unique, epsilon), dtype=torch.float32))
            lam[i] = float(torch.tensor(1 + r * min(max(rho32, 0.0), alpha), dtype=torch.float32))
    out = []
    for j in range(size):
        acc = 0.0
        for i, c in enumerate(cols):
            if not active[i][j]:
                continue
            acc += c[j] * lam[i] if counts[j] == 1 else c[j] / counts[j]
        out.append(acc)
    return base + torch.tensor(out, dtype=torch.float64).reshape(base.shape)


# -- registry and parameters -----------------------------------------------------------------------
def test_defaults_are_mergekits():
    assert get_method("sce").resolve([{}, {}, {}], {}, 0)[1] == {"select_topk": 1.0, "int8_mask": False}
    assert get_method("karcher").resolve([{}, {}], {}, None)[1] == {"max_iter": 10, "tol": 1e-5}
    mps, ps = get_method("multislerp").resolve([{}, {"weight": 1}, {"weight": 2}], {}, 0)
    assert ps == {"normalize_weights": True, "eps": 1e-8} and mps[0] == {}
    assert get_method("ram").resolve([{}, {}], {}, 0)[1] == {"epsilon": 1e-5}
    assert get_method("ramplus_tl").resolve([{}, {}], {}, 0)[1] == {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}
    assert get_method("arcee_fusion").resolve([{}, {}], {}, 0)[1] == {}
    assert get_method("nearswap").param("t").required
    shapes = {m: (get_method(m).base, get_method(m).min_models, get_method(m).max_models) for m in NEW_METHODS}
    assert shapes == {
        "sce": ("required", 1, None), "karcher": ("none", 1, None), "multislerp": ("optional", 1, None),
        "nearswap": ("required", 2, 2), "arcee_fusion": ("required", 2, 2),
        "ram": ("required", 1, None), "ramplus_tl": ("required", 1, None),
    }
    assert get_method("multislerp").non_base_models == (1, None)
    for m in NEW_METHODS:
        spec = get_method(m)
        assert spec.cost_ns is not None and spec.extra_copies is not None and not spec.random, m


@pytest.mark.parametrize(
    "method, model_params, params",
    [
        ("nearswap", [{}, {}], {}),  # t has no default
        ("nearswap", [{}, {}], {"t": "near"}),
        ("multislerp", [{"weight": 1}, {}], {}),  # weight required for every model
        ("karcher", [{}, {}], {"max_iter": 2.5}),
        ("karcher", [{}, {}], {"max_iter": -1}),
        ("karcher", [{}, {}], {"max_iter": float("inf")}),  # YAML .inf: was an OverflowError traceback
        ("karcher", [{}, {}], {"max_iter": float("nan")}),
        ("karcher", [{}, {}], {"tol": -1e-3}),
        ("sce", [{}, {}], {"select_topk": "all"}),
        ("ramplus_tl", [{}, {}], {"alpha": None, "r": True}),
    ],
)
def test_bad_parameters_are_refused(method, model_params, params):
    base_index = None if method in ("karcher", "multislerp") else 0
    with pytest.raises(MethodError):
        get_method(method).resolve(model_params, params, base_index)


def test_every_parameter_check_answers_odd_values_with_a_message():
    """A value YAML can produce (.inf, .nan, a 400-digit integer, a list, a mapping, a string) is
    accepted or refused with a message by every parameter's check, never an exception: the CLI
    prints the message as one line, an exception would be a traceback."""
    from raymerge.methods import available_methods

    odd = [float("inf"), float("-inf"), float("nan"), 10**400, -(10**400), [], {}, [1], {"a": 1}, "", "x", None, True]
    for name in available_methods():
        for p in get_method(name).params:
            for value in odd if p.check is not None else ():
                answer = p.check(value)
                assert answer is None or isinstance(answer, str), (name, p.name, value)
            if p.check is not None:
                assert p.check(10**400) is not None, (name, p.name)  # too large for a float: refused


# -- against the references ------------------------------------------------------------------------
@pytest.mark.parametrize("select_topk", [1.0, 0.25, 0.5, 0.0])
@pytest.mark.parametrize("shape", [(12, 20), (30,)])
def test_sce(select_topk, shape):
    inputs = family(4, shape)
    out = run("sce", inputs, 0, select_topk=select_topk)
    torch.testing.assert_close(out, ref_sce(inputs, 0, select_topk), **F64)
    if select_topk == 0.0:
        torch.testing.assert_close(out, inputs[0], atol=0, rtol=0)


def test_sce_sign_erasure_and_float32():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(8, 8, generator=g, dtype=torch.float64)
    # one model pushes against the other two everywhere: it is erased where it loses the vote
    inputs = [base, base + 0.1, base + 0.05, base - 0.12]
    torch.testing.assert_close(run("sce", inputs, 0), ref_sce(inputs, 0), **F64)
    f32 = [t.float() for t in family(3, (16, 24))]
    torch.testing.assert_close(run("sce", f32, 0, select_topk=0.3).double(), ref_sce(f32, 0, 0.3), **F32)


def test_sce_without_fine_tunes_and_with_one():
    base, ft = family(2)
    torch.testing.assert_close(run("sce", [base], 0), base)
    # one model: its coefficient is 1 and nothing is erased, so the result is the model itself
    torch.testing.assert_close(run("sce", [base, ft], 0), ft, **F64)


@pytest.mark.parametrize("n, shape", [(2, (12, 20)), (3, (12, 20)), (4, (40,))])
def test_karcher_converges_to_the_karcher_mean(n, shape):
    inputs = family(n, shape, scale=0.5)[1:] if n > 2 else family(n, shape, scale=0.5)
    out = run("karcher", inputs, None, max_iter=200, tol=1e-13)
    torch.testing.assert_close(out, ref_karcher(inputs), atol=1e-9, rtol=1e-9)
    # first-order condition: the mean log map at the result's direction vanishes
    m = out.reshape(-1) / out.norm()
    units = [x.reshape(-1) / x.norm() for x in inputs]
    assert float(sum(_log_map(m, u) for u in units).norm()) < 1e-9


def test_karcher_defaults_close_and_float32():
    inputs = family(4, scale=0.3)
    # the default stop (a step shorter than tol = 1e-5 rad) leaves the direction ~1e-5 away
    torch.testing.assert_close(run("karcher", inputs, None), ref_karcher(inputs), atol=5e-5, rtol=5e-5)
    f32 = [t.float() for t in inputs]
    torch.testing.assert_close(run("karcher", f32, None).double(), ref_karcher(inputs), atol=5e-5, rtol=5e-5)


def test_karcher_of_two_is_the_slerp_midpoint_and_edge_cases():
    a, b = family(2, (50,), scale=1.0)
    cos = float(torch.dot(a, b) / (a.norm() * b.norm()))
    theta = math.acos(cos)
    mid = (a / a.norm() + b / b.norm()) / (2 * math.cos(theta / 2))  # slerp at t = 1/2 of the units
    expected = (a.norm() + b.norm()) / 2 * mid
    torch.testing.assert_close(run("karcher", [a, b], None, max_iter=100, tol=1e-14), expected, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(run("karcher", [a], None), a)
    zeros = [torch.zeros(6, dtype=torch.float64), torch.full((6,), 1e-7, dtype=torch.float64)]
    assert torch.equal(run("karcher", zeros, None), torch.zeros(6, dtype=torch.float64))
    # an input of norm <= tol is left out of the mean but its norm still counts in the scale
    small = torch.full((50,), 1e-8, dtype=torch.float64)
    out = run("karcher", [a, b, small], None, max_iter=100, tol=1e-5)
    torch.testing.assert_close(out.norm(), (a.norm() + b.norm() + small.norm()) / 3, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp(normalize, with_base):
    inputs = family(4, scale=0.3)
    weights = [0.5, 0.3, 0.4]
    base_index = 0 if with_base else None
    if with_base:
        mps, models = [{}] + [{"weight": w} for w in weights], inputs
    else:
        mps, models = [{"weight": w} for w in weights], inputs[1:]
    out = run("multislerp", models, base_index, mps, normalize_weights=normalize)
    torch.testing.assert_close(out, ref_multislerp(models, base_index, weights, normalize), **F64)
    f32 = [t.float() for t in models]
    torch.testing.assert_close(run("multislerp", f32, base_index, mps, normalize_weights=normalize).double(),
                               ref_multislerp(models, base_index, weights, normalize), **F32)


def test_multislerp_of_two_is_slerp_and_edge_cases():
    a, b = family(2, (40,), scale=1.0)
    a, b = a / a.norm(), b / b.norm()  # unit vectors: no norm scaling
    t = 0.3
    theta = math.acos(float(torch.dot(a, b)))
    slerp = (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)
    out = run("multislerp", [a, b], None, [{"weight": 1 - t}, {"weight": t}], eps=0.0)
    # the tangent-space construction is barycentric on the sphere, not the geodesic at t:
    # close to slerp for nearby points, exact at t = 1/2
    torch.testing.assert_close(out, slerp, atol=5e-2, rtol=0)
    half = run("multislerp", [a, b], None, [{"weight": 1}, {"weight": 1}], eps=0.0)
    torch.testing.assert_close(half, (a + b) / (a + b).norm(), **F64)
    # one model besides the base: returned as it is (not base + task vector)
    base, ft = family(2)
    torch.testing.assert_close(run("multislerp", [base, ft], 0, [{}, {"weight": 0.2}]), ft)
    # antipodal with equal weights: two models interpolate linearly, three are an error
    v = torch.randn(10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = run("multislerp", [v, -v], None, [{"weight": 1}, {"weight": 1}])
    torch.testing.assert_close(out, torch.zeros_like(v), atol=1e-12, rtol=0)
    with pytest.raises(MethodError, match="zero"):
        run("multislerp", [v, -v, v, -v], None, [{"weight": 1}] * 4)


@pytest.mark.parametrize("t", [0.0, 0.01, 0.05, 1.0])
def test_nearswap(t):
    base, other = family(2, scale=0.05)
    out = run("nearswap", [base, other], 0, t=t)
    torch.testing.assert_close(out, ref_nearswap(base, other, t), **F64)
    # the base may come second in the inputs
    torch.testing.assert_close(run("nearswap", [other, base], 1, t=t), out, **F64)
    if t == 0.0:
        torch.testing.assert_close(out, base, atol=0, rtol=0)
    if t == 1.0:
        torch.testing.assert_close(out, other, **F64)


@pytest.mark.parametrize("shape", [(12, 20), (9, 3), (64,)])
def test_arcee_fusion(shape):
    base, other = family(2, shape, scale=0.3)
    out = run("arcee_fusion", [base, other], 0)
    expected = ref_arcee_fusion(base, other)
    torch.testing.assert_close(out, expected, **F64)
    taken = (out == other).sum().item()
    assert 0 < taken < base.numel()  # an outlier fence: some, not all, elements are taken
    f32 = run("arcee_fusion", [base.float(), other.float()], 0)
    torch.testing.assert_close(f32.double(), ref_arcee_fusion(base.float(), other.float()), **F32)


def test_arcee_fusion_identical_models_keep_the_base():
    base, _ = family(2)
    torch.testing.assert_close(run("arcee_fusion", [base, base.clone()], 0), base, atol=0, rtol=0)


@pytest.mark.parametrize("epsilon", [1e-5, 0.03])
@pytest.mark.parametrize("plus", [False, True])
def test_ram(epsilon, plus):
    inputs = family(4, sparse=0.5)
    method = "ramplus_tl" if plus else "ram"
    out = run(method, inputs, 0, epsilon=epsilon)
    torch.testing.assert_close(out, ref_ram(inputs, 0, epsilon, plus=plus), **F64)
    f32 = [t.float() for t in inputs]
    torch.testing.assert_close(run(method, f32, 0, epsilon=epsilon).double(), ref_ram(f32, 0, epsilon, plus=plus), **F32)


@pytest.mark.parametrize("r, alpha", [(0.5, 2.0), (1.0, 0.0), (0.1, 100.0)])
def test_ramplus_tl_parameters(r, alpha):
    inputs = family(3, sparse=0.6)
    torch.testing.assert_close(
        run("ramplus_tl", inputs, 0, r=r, alpha=alpha), ref_ram(inputs, 0, plus=True, r=r, alpha=alpha), **F64
    )


def test_ram_unique_and_shared_by_hand():
    base = torch.zeros(4, dtype=torch.float64)
    a = torch.tensor([1.0, 2.0, 0.0, 0.0], dtype=torch.float64)
    b = torch.tensor([3.0, 0.0, 0.0, 5.0], dtype=torch.float64)
    # element 0 shared (mean 2), 1 unique to a, 2 untouched, 3 unique to b
    torch.testing.assert_close(run("ram", [base, a, b], 0), torch.tensor([2.0, 2.0, 0.0, 5.0], dtype=torch.float64))
    # a: 1 shared, 1 unique -> rho 1 -> clipped to alpha -> lambda 1 + r alpha; same for b
    out = run("ramplus_tl", [base, a, b], 0, r=0.5, alpha=0.4)
    torch.testing.assert_close(out, torch.tensor([2.0, 2.0 * 1.2, 0.0, 5.0 * 1.2], dtype=torch.float64))
    torch.testing.assert_close(run("ram", [base], 0), base)


@pytest.mark.parametrize("method", NEW_METHODS)
def test_bfloat16_in_bfloat16_or_float32_out(method):
    """16-bit inputs give a 16-bit result, except ramplus_tl (float32, as in mergekit: its
    scale factors are float32); the runtime casts every result to the output dtype."""
    inputs = [t.bfloat16() for t in family(3, sparse=0.3)]
    base_index = None if method == "karcher" else 0
    mps = None
    if method == "multislerp":
        mps = [{}, {"weight": 0.6}, {"weight": 0.4}]
    if method in ("nearswap", "arcee_fusion"):
        inputs = inputs[:2]
    params = {"t": 0.01} if method == "nearswap" else {}
    out = run(method, inputs, base_index, mps, **params)
    assert out.dtype == (torch.float32 if method == "ramplus_tl" else torch.bfloat16)
    assert out.shape == inputs[0].shape and torch.isfinite(out).all()


# -- breadcrumbs' per-row option (the paper's masks; mergekit ranks the whole tensor) -------------
def ref_breadcrumbs_rows(inputs, base_index, weights, density, gamma):
    base = inputs[base_index].double()
    out = base.clone()
    for i, x in enumerate(inputs):
        if i == base_index:
            continue
        delta = x.double() - base
        kept = torch.zeros_like(delta)
        for r in range(delta.shape[0]):
            row = flat64(delta[r])
            n = len(row)
            target, n_top = int(density * n), int(gamma * n)
            n_bottom = max(0, n - target - n_top)
            order = sorted(range(n), key=lambda j: (abs(row[j]), j))  # stable: ties by index
            for j in order[n_bottom:n_bottom + target]:
                kept[r, j] = row[j]
        out += weights[i] * kept
    return out


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_per_row_equals_the_row_by_row_reference(method):
    inputs = family(3, (12, 40), torch.float64, seed=7)
    weights = {1: 0.6, 2: 0.4}
    mps = [{}, {"weight": 0.6, "density": 0.5, "gamma": 0.1}, {"weight": 0.4, "density": 0.5, "gamma": 0.1}]
    rows = run(method, inputs, 0, mps, breadcrumbs_scope="row")
    whole = run(method, inputs, 0, mps)
    assert not torch.equal(rows, whole)  # the option changes which elements survive
    if method == "breadcrumbs":
        expected = ref_breadcrumbs_rows(inputs, 0, weights, 0.5, 0.1)
        assert torch.allclose(rows, expected, atol=1e-12, rtol=0)
    # every row keeps exactly its own share (for each model's delta)
    from raymerge.methods.sparsify import magnitude_outliers

    delta = inputs[1] - inputs[0]
    kept = magnitude_outliers(delta, 0.5, 0.1, per_row=True)
    assert all(int(torch.count_nonzero(kept[r])) == 20 for r in range(12))
    assert torch.equal(magnitude_outliers(delta, 1.0, 0.1, per_row=True), delta)
    with pytest.raises(MethodError):
        run(method, inputs, 0, mps, breadcrumbs_scope="column")
