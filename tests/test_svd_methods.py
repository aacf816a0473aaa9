"""TSV-Merge (`tsv`), LoRE-Merging (`lore`) and 1bit-Merging (`onebit`).

- each method's function against a reference written here from the formula (float64, loops,
  no helper of `raymerge.methods` besides the entry points and, for `onebit`, the documented
  pure helpers under test);
- recovery on synthetic task vectors built as known low-rank matrices plus small noise (error
  bounds justified where they are asserted);
- properties: LoRE on identical models returns the model, a base given to LoRE is ignored, TSV
  with one task is task arithmetic, 1bit compression is sign x scale exactly and `keep_full`
  models contribute their full task vectors, packing round-trips, storage sizes;
- the cost model's shape factor for SVD methods;
- end to end through `raymerge.merge` on the tiny llama fixtures: every output tensor equals the
  method's function applied to the saved inputs with the resolved parameters.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import raymerge
from raymerge.methods import MethodError, get_method
from raymerge.methods.onebit import (
    onebit_compress,
    onebit_storage_bits,
    onebit_total_storage_bits,
    pack_onebit,
    unpack_onebit,
)
from conftest import load_state

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """Small SVDs run in one thread: on a loaded 2-core machine, LAPACK's threads oversubscribe
    the cores and a 64 x 96 SVD takes ~50x longer with 2 threads than with 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run(name, inputs, base_index, model_params, params):
    spec = get_method(name)
    mps, ps = spec.resolve(model_params, params, base_index)
    return spec.fn(inputs, base_index=base_index, model_params=mps, params=ps, generator=None)


def rand(*shape, seed=0, scale=1.0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------
# References, written from the formulas
# ---------------------------------------------------------------------------------------------


def ref_polar(m):
    """Nearest matrix with orthonormal columns: P Q^T from m = P S Q^T."""
    p, _, qh = torch.linalg.svd(m, full_matrices=False)
    return p @ qh


def ref_tsv(base, fts, alpha, rank_fraction):
    base = base.to(F64)
    deltas = [f.to(F64) - base for f in fts]
    if base.dim() < 2:
        return base + alpha * sum(deltas) / len(deltas)
    shape = base.shape
    mats = [d.reshape(shape[0], -1) for d in deltas]
    m, n = mats[0].shape
    k = max(1, math.floor(rank_fraction * min(m, n) / len(mats)))
    u_cols, sigmas, v_cols = [], [], []
    for d in mats:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        for j in range(k):
            u_cols.append(u[:, j])
            sigmas.append(s[j])
            v_cols.append(vh[j, :])
    u_hat = torch.stack(u_cols, dim=1)
    v_hat = torch.stack(v_cols, dim=1)
    merged = ref_polar(u_hat) @ torch.diag(torch.stack(sigmas)) @ ref_polar(v_hat).T
    return base + alpha * merged.reshape(shape)


def ref_svt(x, mu):
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return u @ torch.diag(torch.clamp(s - mu, min=0)) @ vh


def ref_lore_estimate(thetas, mu, iterations):
    deltas = [torch.zeros_like(t) for t in thetas]
    theta0 = None
    for _ in range(iterations):
        theta0 = sum(t - d for t, d in zip(thetas, deltas)) / len(thetas)
        deltas = [ref_svt(t - theta0, mu) for t in thetas]
    return theta0, deltas


def ref_top_density(d, density):
    if density >= 1:
        return d
    flat = d.reshape(-1)
    k = max(1, int(density * flat.numel()))
    keep = torch.zeros_like(flat)
    keep[torch.argsort(flat.abs(), descending=True, stable=True)[:k]] = 1
    return (flat * keep).reshape(d.shape)


def ref_lore(models, weights, densities, mu, iterations, merge, lam):
    models = [m.to(F64) for m in models]
    if models[0].dim() < 2:
        return sum(models) / len(models)
    shape = models[0].shape
    theta0, deltas = ref_lore_estimate([m.reshape(shape[0], -1) for m in models], mu, iterations)
    if merge == "ties":
        ds = [w * ref_top_density(d, p) for d, w, p in zip(deltas, weights, densities)]
        total = sum(ds)
        elected = torch.where(total >= 0, 1.0, -1.0).to(F64)
        num = torch.zeros_like(total)
        den = torch.zeros_like(total)
        for d, w in zip(ds, weights):
            agree = (d * elected > 0).to(F64)
            num += d * agree
            den += w * agree
        merged = num / torch.where(den == 0, torch.ones_like(den), den)
    elif merge == "task_arithmetic":
        merged = sum(w * d for w, d in zip(weights, deltas))
    else:
        merged = sum(w * d for w, d in zip(weights, deltas)) / sum(weights)
    return (theta0 + lam * merged).reshape(shape)


def ref_onebit(base, fts, weights, keep_full, lam=1.0, normalize=False):
    base = base.to(F64)
    merged = torch.zeros_like(base)
    for f, w, keep in zip(fts, weights, keep_full):
        d = f.to(F64) - base
        if base.dim() >= 2 and not keep:
            d = torch.where(d >= 0, 1.0, -1.0).to(F64) * d.abs().mean()
        merged += w * d
    if normalize:
        merged /= sum(weights)
    return base + lam * merged


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def test_registry_defaults_and_checks():
    tsv, lore, onebit = get_method("tsv"), get_method("lore"), get_method("onebit")
    assert (tsv.base, lore.base, onebit.base) == ("required", "optional", "required")
    assert tsv.extra.get("svd") and lore.extra.get("svd") and not onebit.extra.get("svd")
    assert not (tsv.elementwise or lore.elementwise or onebit.elementwise)  # whole-tensor SVDs / scale
    _, p = tsv.resolve([{}, {}], {}, 0)
    assert p == {"alpha": 1.0, "rank_fraction": 1.0}
    mps, p = lore.resolve([{}, {}], {}, None)
    assert p == {"mu": 0.01, "iterations": 20, "merge": "ties", "lambda": 1.0}
    assert mps == [{"weight": 1.0, "density": 1.0}] * 2
    mps, p = onebit.resolve([{}, {"weight": 0.5}], {}, 0)
    assert mps == [{}, {"weight": 0.5, "keep_full": False}] and p == {"lambda": 1.0, "normalize": False}
    for spec, mps, params in [
        (tsv, [{}, {}], {"rank_fraction": 0}),
        (tsv, [{}, {}], {"rank_fraction": 1.5}),
        (lore, [{}, {}], {"iterations": 0}),
        (lore, [{}, {}], {"mu": -1}),
        (lore, [{}, {}], {"merge": "slerp"}),
        (onebit, [{}, {}], {}),  # weight is required
        (onebit, [{}, {"weight": 1, "keep_full": "attention"}], {}),
    ]:
        with pytest.raises(MethodError):
            spec.resolve(mps, params, 0)


# ---------------------------------------------------------------------------------------------
# TSV
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,rank_fraction,alpha",
    [((24, 40), 1.0, 1.0), ((40, 24), 0.5, 0.7), ((6, 4, 5), 1.0, 1.3), ((24, 40), 0.05, 1.0), ((33,), 1.0, 0.8)],
    ids=["2d", "tall-half", "3d", "tiny-rank", "1d"],
)
def test_tsv_matches_reference(shape, rank_fraction, alpha):
    base = rand(*shape, seed=1)
    fts = [base + rand(*shape, seed=10 + i, scale=0.1) for i in range(3)]
    out = run("tsv", [fts[0], base, fts[1], fts[2]], 1, [{}] * 4, {"alpha": alpha, "rank_fraction": rank_fraction})
    torch.testing.assert_close(out, ref_tsv(base, fts, alpha, rank_fraction), atol=1e-10, rtol=1e-9)


def test_tsv_float32_and_bfloat16():
    base = rand(24, 40, seed=1)
    fts = [base + rand(24, 40, seed=10 + i, scale=0.1) for i in range(3)]
    ref = ref_tsv(base, fts, 1.0, 1.0)
    out32 = run("tsv", [base.float(), *(f.float() for f in fts)], 0, [{}] * 4, {})
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, atol=1e-5, rtol=1e-5)
    out16 = run("tsv", [base.bfloat16(), *(f.bfloat16() for f in fts)], 0, [{}] * 4, {})
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16.float()).all()


def test_tsv_one_task_is_task_arithmetic():
    base = rand(20, 30, seed=1)
    ft = base + rand(20, 30, seed=2, scale=0.1)
    out = run("tsv", [base, ft], 0, [{}, {}], {"alpha": 0.6})
    torch.testing.assert_close(out, base + 0.6 * (ft - base), atol=1e-12, rtol=1e-10)


def test_tsv_model_equal_to_base_adds_nothing():
    """A zero task vector has only zero singular values: its (arbitrary) singular vectors are
    dropped instead of rotating the other task's; the result is the rank-k truncation of the
    other task vector with k = min(m, n) / 2."""
    base = rand(20, 30, seed=1)
    ft = base + rand(20, 30, seed=2, scale=0.1)
    out = run("tsv", [base, ft, base.clone()], 0, [{}] * 3, {})
    u, s, vh = torch.linalg.svd(ft - base, full_matrices=False)
    torch.testing.assert_close(out, base + u[:, :10] @ torch.diag(s[:10]) @ vh[:10], atol=1e-12, rtol=1e-10)
    assert torch.equal(run("tsv", [base, base.clone(), base.clone()], 0, [{}] * 3, {}), base)


def test_tsv_recovers_low_rank_task_vectors():
    """Three task vectors of rank 4 (singular values in [1, 2]) in mutually orthogonal row and
    column subspaces, plus i.i.d. noise of std 1e-3; rank budget 12 = 3 x 4. TSV's merged task
    vector is then the sum of the rank-4 truncations (the stacks are orthonormal already, the
    polar factor changes nothing). First-order perturbation theory bounds each truncation's error
    by about ||P_U N|| + ||N P_V|| ~ 1e-3 * sqrt(4 * (80 + 120)) ~ 0.03, i.e. ~1% of the summed
    signal's norm (~5): asserted below 3%, while the noise itself is ~3.5% of it (TSV removes
    most of the noise)."""
    g = torch.Generator().manual_seed(0)
    m, n, tasks, r = 80, 120, 3, 4
    q1, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=F64))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    signals = []
    for t in range(tasks):
        s = 1 + torch.rand(r, generator=g, dtype=F64)
        signals.append((q1[:, t * r:(t + 1) * r] * s) @ q2[:, t * r:(t + 1) * r].T)
    noise = [1e-3 * torch.randn(m, n, generator=g, dtype=F64) for _ in range(tasks)]
    base = torch.randn(m, n, generator=g, dtype=F64)
    fts = [base + L + N for L, N in zip(signals, noise)]
    out = run("tsv", [base, *fts], 0, [{}] * 4, {"rank_fraction": tasks * r / m})
    target = sum(signals)
    assert rel(out - base, target) < 0.03
    assert rel(sum(noise) + target, target) > 0.03  # the bound is tighter than the input's noise
    for L in signals:  # each task's part, read back through its own subspace, is recovered too
        u, _, vh = torch.linalg.svd(L, full_matrices=False)
        proj = u[:, :r] @ u[:, :r].T @ (out - base) @ vh[:r].T @ vh[:r]
        assert rel(proj, L) < 0.03


# ---------------------------------------------------------------------------------------------
# LoRE
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "merge,weights,densities,shape",
    [
        ("ties", [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], (24, 40)),
        ("ties", [0.7, 0.4, 1.2], [0.5, 0.8, 1.0], (40, 24)),
        ("task_arithmetic", [0.7, 0.4, 1.2], [1.0] * 3, (24, 40)),
        ("average", [0.7, 0.4, 1.2], [1.0] * 3, (6, 4, 5)),
        ("ties", [1.0, 1.0, 1.0], [1.0] * 3, (33,)),
    ],
    ids=["ties", "ties-weighted-trim", "task-arithmetic", "average-3d", "1d"],
)
def test_lore_matches_reference(merge, weights, densities, shape):
    center = rand(*shape, seed=1)
    models = [center + rand(*shape, seed=10 + i, scale=0.05) for i in range(3)]
    mps = [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    params = {"mu": 0.05, "iterations": 7, "merge": merge, "lambda": 0.9}
    out = run("lore", models, None, mps, params)
    ref = ref_lore(models, weights, densities, 0.05, 7, merge, 0.9)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)


def test_lore_float32():
    center = rand(24, 40, seed=1)
    models = [center + rand(24, 40, seed=10 + i, scale=0.05) for i in range(3)]
    out = run("lore", [m.float() for m in models], None, [{}] * 3, {"mu": 0.05, "iterations": 5})
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_lore(models, [1.0] * 3, [1.0] * 3, 0.05, 5, "ties", 1.0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("merge", ["ties", "task_arithmetic", "average"])
def test_lore_identical_models_return_the_model(merge, dtype):
    model = rand(24, 40, seed=3, dtype=dtype)
    out = run("lore", [model.clone() for _ in range(3)], None, [{}] * 3, {"merge": merge})
    torch.testing.assert_close(out, model)
    assert out.dtype == dtype


def test_lore_ignores_the_base_model():
    center = rand(24, 40, seed=1)
    models = [center + rand(24, 40, seed=10 + i, scale=0.05) for i in range(3)]
    params = {"mu": 0.05, "iterations": 5}
    without = run("lore", models, None, [{}] * 3, params)
    with_base = run("lore", [models[0], rand(24, 40, seed=99), models[1], models[2]], 1, [{}, {}, {}, {}], params)
    torch.testing.assert_close(with_base, without, atol=0, rtol=0)


def test_lore_recovers_base_and_low_rank_task_vectors():
    """Four models theta_0 + L_i + N_i: L_i of rank 3 (random subspaces, singular values in
    [2, 4]), N_i i.i.d. noise of std 1e-3 (spectral norm ~ 1e-3 (sqrt(64) + sqrt(96)) ~ 0.018).
    With mu = 0.05 above the noise level, SVT removes the noise and keeps rank 3; what remains is
    SVT's shrinkage bias of about mu per singular value, ||bias|| ~ mu sqrt(3) ~ 0.09 against
    ||L_i|| ~ 5 (about 2%), plus the noise inside the kept subspaces (< 1%). Asserted: every
    delta_i within 6% of L_i, the estimated base within 3% of ||L_i|| of theta_0, rank 3.
    (Coordinate descent converges slowly when mu is small next to the task vectors' singular
    values, hence 200 rounds here; the tensors are small.)"""
    from raymerge.methods.lore import lore_estimate

    g = torch.Generator().manual_seed(0)
    m, n, r = 64, 96, 3
    signals = []
    for _ in range(4):
        u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=F64))
        v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=F64))
        signals.append((u * (2 + 2 * torch.rand(r, generator=g, dtype=F64))) @ v.T)
    theta0 = torch.randn(m, n, generator=g, dtype=F64)
    models = [theta0 + L + 1e-3 * torch.randn(m, n, generator=g, dtype=F64) for L in signals]
    est0, deltas = lore_estimate(models, 0.05, 200)
    for d, L in zip(deltas, signals):
        assert rel(d, L) < 0.06
        assert int(torch.linalg.matrix_rank(d)) == r
    assert float((est0 - theta0).norm()) < 0.03 * min(float(L.norm()) for L in signals)
    # the method's output is that estimate merged: task arithmetic with unit weights here
    out = run("lore", models, None, [{}] * 4, {"mu": 0.05, "iterations": 200, "merge": "task_arithmetic"})
    assert rel(out, theta0 + sum(signals)) < 0.06


# ---------------------------------------------------------------------------------------------
# 1bit
# ---------------------------------------------------------------------------------------------


def test_onebit_compression_is_sign_times_mean_abs():
    d = rand(16, 20, seed=4)
    d[0, 0] = 0.0
    c = onebit_compress(d)
    expected = torch.where(d >= 0, 1.0, -1.0).to(F64) * d.abs().mean()
    assert torch.equal(c, expected)
    assert c[0, 0] == d.abs().mean()  # sign(0) = +1: a one-bit code has no zero
    assert set(torch.unique(c.abs()).tolist()) == {float(d.abs().mean())}


@pytest.mark.parametrize("shape", [(24, 40), (6, 4, 5), (33,)], ids=["2d", "3d", "1d"])
def test_onebit_matches_reference(shape):
    base = rand(*shape, seed=1)
    fts = [base + rand(*shape, seed=10 + i, scale=0.05) for i in range(3)]
    weights, keep = [0.7, 0.4, 1.1], [False, True, False]
    mps = [{"weight": w, "keep_full": k} for w, k in zip(weights, keep)]
    for params in ({}, {"lambda": 0.8, "normalize": True}):
        out = run("onebit", [fts[0], fts[1], base, fts[2]], 2, [mps[0], mps[1], {}, mps[2]], params)
        ref = ref_onebit(base, fts, weights, keep, params.get("lambda", 1.0), params.get("normalize", False))
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)


def test_onebit_keep_full_and_compressed_parts():
    base = rand(24, 40, seed=1)
    d1, d2 = rand(24, 40, seed=2, scale=0.05), rand(24, 40, seed=3, scale=0.05)
    out = run("onebit", [base, base + d1, base + d2], 0, [{}, {"weight": 1.0, "keep_full": True}, {"weight": 1.0}], {})
    torch.testing.assert_close(out - base, d1 + onebit_compress(d2), atol=1e-12, rtol=1e-10)
    only_full = run("onebit", [base, base + d1], 0, [{}, {"weight": 0.5, "keep_full": True}], {})
    torch.testing.assert_close(only_full, base + 0.5 * d1, atol=1e-12, rtol=1e-10)
    only_bits = run("onebit", [base, base + d2], 0, [{}, {"weight": 1.0}], {})
    torch.testing.assert_close(only_bits - base, onebit_compress(d2), atol=1e-12, rtol=1e-10)
    bias = rand(30, seed=5)  # 1-D tensors keep full task vectors
    db = rand(30, seed=6, scale=0.05)
    torch.testing.assert_close(run("onebit", [bias, bias + db], 0, [{}, {"weight": 1.0}], {}), bias + db)


@pytest.mark.parametrize("shape", [(8, 8), (5, 7), (3,)])
def test_onebit_pack_round_trip(shape):
    for dtype in (torch.float32, torch.bfloat16):
        d = rand(*shape, seed=7, dtype=dtype)
        bits, scale = pack_onebit(d)
        assert bits.dtype == torch.uint8 and bits.numel() == math.ceil(math.prod(shape) / 8)
        assert torch.equal(unpack_onebit(bits, scale, shape, dtype), onebit_compress(d))


def test_onebit_storage_bits():
    assert onebit_storage_bits((4096, 4096)) == 4096 * 4096 + 16
    assert onebit_storage_bits((4096, 4096), keep_full=True) == 4096 * 4096 * 16
    assert onebit_storage_bits((4096,)) == 4096 * 16
    assert onebit_storage_bits((10, 10), value_bits=32, scale_bits=32) == 132
    assert onebit_total_storage_bits([((10, 10), False), ((10, 10), True), ((10,), False)]) == 116 + 1600 + 160


# ---------------------------------------------------------------------------------------------
# Cost model
# ---------------------------------------------------------------------------------------------


def test_cost_model_scales_svd_methods_with_the_smaller_dimension():
    from raymerge.runtime import costs
    from raymerge.runtime.operators import MergeOperator, TensorInput

    def op(method, shape):
        mps, params = get_method(method).resolve([{}] + [{"weight": 0.5}] * 3, {}, 0)
        return MergeOperator(
            index=0, name="w", method=method, inputs=tuple(TensorInput(i, "w", 4 * math.prod(shape)) for i in range(4)),
            base_index=0, model_params=tuple(mps), params=params, work_dtype=None, out_dtype="F32", shape=shape, seed=None,
        )

    low = min(costs.SVD_CALIBRATION_SHAPE)
    assert costs.shape_factor(op("tsv", (4096, 11008))) == 4096 / low
    assert costs.shape_factor(op("lore", (11008, 4096))) == 4096 / low
    assert costs.shape_factor(op("tsv", (4096,))) == 1 / low
    assert costs.shape_factor(op("onebit", (4096, 4096))) == 1.0
    assert costs.shape_factor(op("ties", (4096, 4096))) == 1.0
    for name in ("tsv", "lore", "onebit"):
        assert get_method(name).cost_ns is not None
    big, small = costs.planner_operator(op("tsv", (4096, 4096)), {}), costs.planner_operator(op("tsv", (1024, 4096)), {})
    per_element = (big.compute_s - costs.OPERATOR_OVERHEAD_S) / (4096 * 4096)
    assert per_element == pytest.approx(4 * (small.compute_s - costs.OPERATOR_OVERHEAD_S) / (1024 * 4096))
    assert costs.calibration_shape("lore") == costs.SVD_CALIBRATION_SHAPE
    assert costs.calibration_shape("ties") == costs.CALIBRATION_SHAPE
    # Calibration times a job of small tensors on its own largest shape, never more than the usual one.
    assert costs.job_calibration_shape(op("ties", (64, 128))) == (64, 128)
    assert costs.job_calibration_shape(op("ties", (300,))) == (300,)
    assert costs.job_calibration_shape(op("ties", (4096, 4096))) == costs.CALIBRATION_SHAPE
    assert costs.job_calibration_shape(op("tsv", (32, 32))) == costs.SVD_CALIBRATION_SHAPE  # shape_factor's base
    assert costs.measure_seconds_per_element(op("ties", (300,)), repeats=1) > 0
    assert costs.peak_memory(op("tsv", (64, 64))) > costs.peak_memory(op("task_arithmetic", (64, 64)))
    assert costs.measure_seconds_per_element(op("lore", (64, 64)), repeats=1) > 0


def test_a_long_calibration_run_is_not_repeated(monkeypatch):
    """Calibration: one warm-up run, then up to `repeats` timed runs, but no second one once a
    timed run took CALIBRATION_ENOUGH_S (an expensive method's calibration costs a third less)."""
    import dataclasses

    from raymerge.runtime import costs
    from raymerge.runtime.operators import MergeOperator, TensorInput

    spec = get_method("ties")
    calls = []
    N = 1 << 16  # elements: enough that the cost beyond a call's fixed cost is clearly positive

    def counted(inputs, **kwargs):
        if inputs[0].numel() == N:  # not the few elements its fixed cost is timed on
            calls.append(1)
        return spec.fn(inputs, **kwargs)

    monkeypatch.setattr(costs, "get_method", lambda name: dataclasses.replace(spec, fn=counted))
    mps, params = spec.resolve([{}] + [{"weight": 0.5}] * 2, {}, 0)
    ties_op = MergeOperator(index=0, name="w", method="ties", inputs=tuple(TensorInput(i, "w", 4 * N) for i in range(3)),
                            base_index=0, model_params=tuple(mps), params=params, work_dtype=None, out_dtype="F32",
                            shape=(N,), seed=None)
    for enough, expected in ((float("inf"), 3), (0.0, 2)):  # never long enough: warm-up + 2; always: warm-up + 1
        calls.clear()
        monkeypatch.setattr(costs, "CALIBRATION_ENOUGH_S", enough)
        assert costs.measure_seconds_per_element(ties_op, repeats=2) > 0
        assert len(calls) == expected, (enough, len(calls))


def test_calibration_leaves_out_the_fixed_cost_per_call(monkeypatch):
    """A method that costs 20 ms per call plus 10 us per element is calibrated at 10 us per
    element: its fixed cost is in every part's measured overhead already (the gross figure,
    30 us per element on 1000 elements, counted it twice). A fake clock that only the method
    moves makes the figures exact."""
    import dataclasses
    import types

    from raymerge.runtime import costs
    from raymerge.runtime.operators import MergeOperator, TensorInput

    clock = [0.0]

    def fixed_plus_linear(inputs, **kwargs):
        clock[0] += 0.020 + 10e-6 * inputs[0].numel()
        return inputs[0]

    spec = get_method("linear")
    monkeypatch.setattr(costs, "get_method", lambda name: dataclasses.replace(spec, fn=fixed_plus_linear))
    monkeypatch.setattr(costs, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    mps, params = spec.resolve([{"weight": 0.5}] * 2, {}, None)
    op = MergeOperator(index=0, name="w", method="linear", inputs=tuple(TensorInput(i, "w", 4 * 1000) for i in range(2)),
                       base_index=None, model_params=tuple(mps), params=params, work_dtype=None, out_dtype="F32",
                       shape=(10, 100), seed=None)
    assert costs.tiny_shape(op.shape) == (4, 4)
    assert costs.measure_seconds_per_element(op) == pytest.approx(10e-6)


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------

KEEP_ATTN = [{"filter": "self_attn", "value": True}, {"value": False}]
KEEP_MLP = [{"filter": "mlp", "value": True}, {"value": False}]

# method: (base model or None, [(model, per-model parameters)], global parameters)
E2E = {
    "tsv": ("base", [("ft1", {}), ("ft2", {}), ("ft3", {})], {"alpha": 0.8, "rank_fraction": 0.5}),
    "lore": (
        None,
        [("ft1", {"weight": 0.7}), ("ft2", {"weight": 0.5, "density": 0.7}), ("ft3", {"weight": 1.0})],
        {"mu": 0.002, "iterations": 4, "lambda": 0.9},
    ),
    "onebit": (
        "base",
        [("ft1", {"weight": 0.6, "keep_full": KEEP_ATTN}), ("ft2", {"weight": 0.5, "keep_full": KEEP_MLP}), ("ft3", {"weight": 0.4})],
        {"lambda": 1.1},
    ),
}


def resolve_setting(value, name):
    if isinstance(value, list):
        return next(e["value"] for e in value if e.get("filter") is None or e["filter"] in name)
    return value


@pytest.fixture(scope="module")
def e2e_outputs(llama_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("svd-e2e")

    def one(method):
        base, models, params = E2E[method]
        cfg = {
            "merge_method": method,
            "models": [{"model": str(llama_models[k]), **({"parameters": mp} if mp else {})} for k, mp in models],
            "parameters": params,
            "dtype": "float32",
        }
        if base is not None:
            cfg["base_model"] = str(llama_models[base])
        return raymerge.merge(cfg, root / method, in_process=True, quiet=True).output

    with ThreadPoolExecutor(max_workers=1) as pool:  # in process, one after another (no Ray)
        futures = {m: pool.submit(one, m) for m in E2E}
        yield {m: f.result() for m, f in futures.items()}


@pytest.mark.parametrize("method", sorted(E2E))
def test_end_to_end_equals_the_method_per_tensor(method, e2e_outputs, llama_models):
    base, models, params = E2E[method]
    states = {k: load_state(p) for k, p in llama_models.items()}
    merged = load_state(e2e_outputs[method])
    assert sorted(merged) == sorted(states["base"])
    spec = get_method(method)
    keys = [k for k, _ in models] + ([base] if base is not None else [])
    base_index = len(models) if base is not None else None
    checked_svd = 0
    for name, out in merged.items():
        mps = [{p: resolve_setting(v, name) for p, v in mp.items()} for _, mp in models] + ([{}] if base is not None else [])
        rmps, rparams = spec.resolve(mps, {p: resolve_setting(v, name) for p, v in params.items()}, base_index)
        expected = spec.fn([states[k][name] for k in keys], base_index=base_index, model_params=rmps, params=rparams, generator=None)
        assert out.dtype == torch.float32 and out.shape == expected.shape, name
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4, msg=lambda m: f"{method} {name}: {m}")
        checked_svd += out.dim() == 2
        # the merge really changed the tensor (not a copy of one input)
        assert all(not torch.equal(out, states[k][name]) for k in keys), name
    assert checked_svd >= 10


def test_onebit_export_writes_the_compressed_task_vectors(llama_models, tmp_path):
    import json

    from safetensors.torch import load_file

    keep_attn = [{"filter": "self_attn", "value": True}, {"value": False}]
    cfg = {
        "merge_method": "onebit",
        "base_model": str(llama_models["base"]),
        "models": [
            {"model": str(llama_models["ft1"]), "parameters": {"weight": 1.0, "keep_full": keep_attn}},
            {"model": str(llama_models["ft2"]), "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
        "raymerge": {"export_task_vectors": True},
    }
    out = raymerge.merge(cfg, tmp_path / "out", in_process=True, quiet=True).output
    summary = json.loads((out / "task_vectors.json").read_text())
    base = load_state(llama_models["base"])
    assert sorted(summary) == sorted(str(llama_models[k]) for k in ("ft1", "ft2"))
    for key, keeps_attention in (("ft1", True), ("ft2", False)):
        entry = summary[str(llama_models[key])]
        vectors = load_file(str(out / entry["file"]))
        state = load_state(llama_models[key])
        stored_bits = 0
        for name, value in state.items():
            delta = value - base[name]
            full = delta.dim() < 2 or (keeps_attention and "self_attn" in name)
            if full:
                assert torch.equal(vectors[f"{name}.delta"], delta), name
                stored_bits += delta.numel() * 16
            else:
                got = unpack_onebit(vectors[f"{name}.bits"], vectors[f"{name}.scale"], delta.shape, delta.dtype)
                assert torch.equal(got, onebit_compress(delta)), name
                stored_bits += delta.numel() + 16
        assert entry["storage_bytes"] == (stored_bits + 7) // 8
        assert entry["full_bf16_bytes"] == sum(v.numel() for v in state.values()) * 2
    assert not list(out.glob("*.onebit.safetensors")) and (out / "model.safetensors").exists()


def test_task_vector_export_is_only_for_onebit(llama_models, tmp_path):
    from raymerge.config import ConfigError

    cfg = {"merge_method": "task_arithmetic", "base_model": str(llama_models["base"]),
           "models": [{"model": str(llama_models["ft1"]), "parameters": {"weight": 1.0}}],
           "raymerge": {"export_task_vectors": True}}
    with pytest.raises(ConfigError, match="export_task_vectors: only merge_method onebit"):
        raymerge.merge(cfg, tmp_path / "out", quiet=True)
