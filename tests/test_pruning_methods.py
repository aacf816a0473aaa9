"""raymerge.pruning: masks, scores, statistics, SparseGPT and layerwise sparsities (pure torch,
tiny tensors, no Ray). Naive reference implementations below are written with Python loops (and
explicit inverses for SparseGPT) so that they share no code with the module under test."""

from __future__ import annotations

import math

import pytest
import torch

from raymerge.pruning import (
    FeatureNormStats,
    HessianStats,
    PruningError,
    achieved_sparsity,
    apply_mask,
    check_sparsity,
    explicit_sparsities,
    follows_nm,
    magnitude_scores,
    matrix_mask,
    mean_weighted_sparsity,
    nm_mask,
    outlier_ratio,
    owl_sparsities,
    parse_pattern,
    row_mask,
    sparsegpt_prune,
    uniform_sparsities,
    wanda_scores,
)
from raymerge.pruning.sparsegpt import block_counts


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- naive references -------------------------------------------------------------------------


def _lowest(values: list[float], k: int) -> set[int]:
    """Indices of the k lowest values; ties: lower index first."""
    return set(sorted(range(len(values)), key=lambda i: (values[i], i))[:k])


def naive_row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    rows, cols = scores.shape
    k = int(cols * sparsity)
    out = torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        for c in _lowest(scores[r].tolist(), k):
            out[r, c] = True
    return out


def naive_matrix_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    flat = scores.reshape(-1).tolist()
    out = torch.zeros(len(flat), dtype=torch.bool)
    for i in _lowest(flat, int(len(flat) * sparsity)):
        out[i] = True
    return out.reshape(scores.shape)


def naive_nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows, cols = scores.shape
    out = torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        for g in range(0, cols, m):
            for c in _lowest(scores[r, g : g + m].tolist(), n):
                out[r, g + c] = True
    return out


def naive_wanda(weight: torch.Tensor, sq_sum: torch.Tensor, a: float = 1.0, b: float = 1.0) -> torch.Tensor:
    rows, cols = weight.shape
    out = torch.zeros(rows, cols)
    for r in range(rows):
        for c in range(cols):
            out[r, c] = abs(float(weight[r, c])) ** a * math.sqrt(float(sq_sum[c])) ** b
    return out


def naive_sparsegpt(weight, hessian, sparsity, pattern=None, blocksize=None, damp=0.01):
    """Column-by-column OBS in float64 with explicit inverses of the remaining columns' Hessian
    (no Cholesky, no lazy batching). Unstructured masks are chosen at each block start on the
    current weights, saliency w_j^2 / [inv(H[j:, j:])]_00; N:M at every column j % M == 0."""
    W = weight.double().clone()
    H = hessian.double().clone()
    rows, cols = W.shape
    dead = torch.diagonal(H) == 0
    for j in range(cols):
        if dead[j]:
            H[j, j] = 1
            W[:, j] = 0
    H += damp * torch.diagonal(H).mean() * torch.eye(cols, dtype=torch.float64)
    blocksize = blocksize or cols
    inv_diag = [float(torch.linalg.inv(H[j:, j:])[0, 0]) for j in range(cols)]
    widths = [min(blocksize, cols - s) for s in range(0, cols, blocksize)]
    counts = block_counts(rows, widths, sparsity) if pattern is None else None
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for c in range(cols):
        if pattern is None and c % blocksize == 0:
            b = c // blocksize
            block = list(range(c, c + widths[b]))
            sal = [float(W[r, j]) ** 2 / inv_diag[j] for r in range(rows) for j in block]
            for flat in _lowest(sal, counts[b]):
                mask[flat // len(block), block[flat % len(block)]] = True
        if pattern is not None and c % pattern[1] == 0:
            n, m = pattern
            for r in range(rows):
                sal = [float(W[r, j]) ** 2 / inv_diag[j] for j in range(c, c + m)]
                for j in _lowest(sal, n):
                    mask[r, c + j] = True
        hinv = torch.linalg.inv(H[c:, c:])
        q = torch.where(mask[:, c], torch.zeros_like(W[:, c]), W[:, c])
        err = (W[:, c] - q) / hinv[0, 0]
        W[:, c:] -= err[:, None] * hinv[0, :][None, :]
        W[:, c] = q
    return W, mask


def _correlated_layer(seed: int, rows: int = 32, cols: int = 64, tokens: int = 512):
    g = _gen(seed)
    weight = torch.randn(rows, cols, generator=g)
    latent = torch.randn(tokens, 16, generator=g) @ torch.randn(16, cols, generator=g)
    scale = torch.rand(cols, generator=g) * 2 + 0.1
    x = (latent + 0.3 * torch.randn(tokens, cols, generator=g)) * scale
    return weight, x


def _recon_error(weight: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ weight.T - x @ pruned.T) ** 2).sum())


# --- masks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.99])
def test_row_mask_exact_per_row_and_equals_naive(sparsity):
    scores = torch.rand(7, 40, generator=_gen(1))
    mask = row_mask(scores, sparsity)
    assert (mask.sum(dim=1) == int(40 * sparsity)).all()
    assert torch.equal(mask, naive_row_mask(scores, sparsity))


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.7])
def test_matrix_mask_exact_per_matrix_and_equals_naive(sparsity):
    scores = torch.rand(9, 30, generator=_gen(2))
    mask = matrix_mask(scores, sparsity)
    assert int(mask.sum()) == int(270 * sparsity)
    assert torch.equal(mask, naive_matrix_mask(scores, sparsity))


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_mask_exact_per_group_and_equals_naive(n, m):
    scores = torch.rand(6, 32, generator=_gen(3))
    mask = nm_mask(scores, n, m)
    assert (mask.reshape(6, -1, m).sum(dim=2) == n).all()
    assert torch.equal(mask, naive_nm_mask(scores, n, m))


def test_masks_with_many_ties_are_exact_and_lowest_index_first():
    scores = torch.randint(0, 3, (8, 32), generator=_gen(4)).float()
    rows = row_mask(scores, 0.5)
    assert (rows.sum(dim=1) == 16).all()
    assert torch.equal(rows, naive_row_mask(scores, 0.5))
    whole = matrix_mask(scores, 0.4)
    assert int(whole.sum()) == int(256 * 0.4)
    assert torch.equal(whole, naive_matrix_mask(scores, 0.4))
    nm = nm_mask(scores, 2, 4)
    assert (nm.reshape(8, -1, 4).sum(dim=2) == 2).all()
    assert torch.equal(nm, naive_nm_mask(scores, 2, 4))
    flat = torch.ones(2, 8)  # all equal: the lowest columns go first
    assert row_mask(flat, 0.5)[:, :4].all() and not row_mask(flat, 0.5)[:, 4:].any()
    assert matrix_mask(flat, 0.25)[0, :4].all() and int(matrix_mask(flat, 0.25).sum()) == 4


def test_masks_with_preexisting_zero_weights():
    weight = torch.randn(4, 16, generator=_gen(5))
    weight[:, :6] = 0  # 6 zeros per row, more than a 25% target (4)
    scores = magnitude_scores(weight)
    rows = row_mask(scores, 0.25)
    assert (rows.sum(dim=1) == 4).all() and rows[:, :4].all()  # zeros, lowest index first
    assert achieved_sparsity(rows) == 0.25
    assert achieved_sparsity(apply_mask(weight, rows)) == 6 / 16  # zeros outside the mask count
    nm = nm_mask(scores, 2, 4)
    assert (nm.reshape(4, -1, 4).sum(dim=2) == 2).all()
    assert torch.equal(nm, naive_nm_mask(scores, 2, 4))
    assert follows_nm(apply_mask(weight, nm), 2, 4)
    whole = matrix_mask(scores, 0.5)
    assert int(whole.sum()) == 32 and whole[:, :6].all()


def test_matrix_mask_does_not_over_prune_on_threshold_ties():
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0], [2.0, 2.0, 3.0, 4.0]])
    mask = matrix_mask(scores, 0.25)  # 2 of 8; a `<=` threshold at value 2 would take 6
    assert mask.tolist() == [[True, True, False, False], [False, False, False, False]]


def test_follows_nm_and_achieved_sparsity():
    w = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]])
    assert follows_nm(w, 2, 4)
    assert not follows_nm(torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]]), 2, 4)
    assert not follows_nm(torch.zeros(1, 6), 2, 4)  # width not a multiple of 4
    assert achieved_sparsity(w) == 0.5
    assert achieved_sparsity(torch.tensor([True, False, False, False])) == 0.25


# --- scores -----------------------------------------------------------------------------------


def test_wanda_hand_cases_torchao():
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    sq_sum = torch.tensor([100.0, 10.0, 1.0, 0.1]) ** 2
    kept = apply_mask(weight, row_mask(wanda_scores(weight, sq_sum), 0.5))
    assert kept.tolist() == [[1.0, 2.0, 0.0, 0.0]]
    assert apply_mask(weight, row_mask(magnitude_scores(weight), 0.5)).tolist() == [[0.0, 0.0, 3.0, 4.0]]

    weight = torch.arange(1.0, 9.0).reshape(1, 8)
    kept = apply_mask(weight, nm_mask(wanda_scores(weight, torch.ones(8)), 2, 4))
    assert kept.tolist() == [[0.0, 0.0, 3.0, 4.0, 0.0, 0.0, 7.0, 8.0]]


@pytest.mark.parametrize("a,b", [(1.0, 1.0), (0.5, 2.0), (2.0, 0.0)])
def test_wanda_scores_equal_naive(a, b):
    weight = torch.randn(5, 12, generator=_gen(6))
    sq_sum = torch.rand(12, generator=_gen(7), dtype=torch.float64) * 50
    got = wanda_scores(weight, sq_sum, weight_exponent=a, norm_exponent=b)
    assert got.dtype == torch.float32 and got.shape == weight.shape
    torch.testing.assert_close(got, naive_wanda(weight, sq_sum, a, b), rtol=1e-5, atol=1e-6)
    assert torch.equal(magnitude_scores(weight.to(torch.bfloat16)), weight.to(torch.bfloat16).abs().float())


def test_wanda_scores_shape_errors():
    with pytest.raises(PruningError, match=r"length in_features=4.*\(3,\)"):
        wanda_scores(torch.ones(2, 4), torch.ones(3), name="layers.0.mlp.up_proj")
    with pytest.raises(PruningError, match="layers.0.mlp.up_proj"):
        wanda_scores(torch.ones(2, 4), torch.ones(3), name="layers.0.mlp.up_proj")
    with pytest.raises(PruningError, match="2-D"):
        wanda_scores(torch.ones(4), torch.ones(4))


# --- statistics -------------------------------------------------------------------------------


def test_feature_norm_stats_merge_equals_all_at_once_and_state_roundtrip():
    x = torch.randn(3, 10, 8, generator=_gen(8))
    whole = FeatureNormStats(8).add(x)
    assert whole.tokens == 30
    torch.testing.assert_close(whole.sq_sum, (x.double() ** 2).sum(dim=(0, 1)), rtol=1e-12, atol=0)
    left, right = FeatureNormStats(8).add(x[:1]), FeatureNormStats(8).add(x[1:].reshape(-1, 8))
    merged = FeatureNormStats.from_state(left.state()).merge(FeatureNormStats.from_state(right.state()))
    assert merged.tokens == 30 and merged.sq_sum.dtype == torch.float64
    torch.testing.assert_close(merged.sq_sum, whole.sq_sum, rtol=1e-12, atol=0)
    state = whole.state()
    assert set(state) == {"in_features", "sq_sum", "tokens"} and isinstance(state["tokens"], int)
    copy = FeatureNormStats.from_state(state)
    copy.add(x)
    torch.testing.assert_close(state["sq_sum"], (x.double() ** 2).sum(dim=(0, 1)), rtol=1e-12, atol=0)


def test_hessian_stats_equals_xtx_over_tokens_and_merges():
    x = torch.randn(2, 25, 6, generator=_gen(9))
    flat = x.reshape(-1, 6).double()
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        whole = HessianStats(6, dtype=dtype).add(x)
        assert whole.tokens == 50 and whole.hessian().dtype == dtype
        torch.testing.assert_close(whole.hessian().double(), flat.T @ flat / 50, rtol=tol, atol=tol)
        left = HessianStats(6, dtype=dtype).add(x[0])
        right = HessianStats(6, dtype=dtype).add(x[1])
        merged = HessianStats.from_state(left.state()).merge(HessianStats.from_state(right.state()))
        assert merged.tokens == 50
        torch.testing.assert_close(merged.hessian(), whole.hessian(), rtol=tol, atol=tol)


def test_statistics_bad_inputs():
    with pytest.raises(PruningError, match=r"input shape \(4, 7\) does not end in in_features=8"):
        FeatureNormStats(8).add(torch.ones(4, 7))
    with pytest.raises(PruningError, match=r"input shape \(4, 7\) does not end in in_features=8"):
        HessianStats(8).add(torch.ones(4, 7))
    with pytest.raises(PruningError, match="cannot merge"):
        HessianStats(8).merge(HessianStats(7))
    with pytest.raises(PruningError, match="no calibration tokens"):
        HessianStats(8).hessian()


# --- SparseGPT --------------------------------------------------------------------------------


def test_sparsegpt_sparsity_zero_keeps_weights():
    weight, x = _correlated_layer(10)
    hessian = HessianStats(64).add(x).hessian()
    new, mask = sparsegpt_prune(weight, hessian, 0.0)
    assert not mask.any()
    torch.testing.assert_close(new, weight)


@pytest.mark.parametrize("seed", [11, 12])
def test_sparsegpt_beats_magnitude_and_wanda_on_reconstruction(seed):
    weight, x = _correlated_layer(seed)
    hessian = HessianStats(64).add(x).hessian()
    new, mask = sparsegpt_prune(weight, hessian, 0.5)
    assert int(mask.sum()) == 1024 and torch.equal(new == 0, mask)
    magnitude = apply_mask(weight, matrix_mask(magnitude_scores(weight), 0.5))
    wanda = apply_mask(weight, row_mask(wanda_scores(weight, FeatureNormStats(64).add(x).sq_sum), 0.5))
    err = _recon_error(weight, new, x)
    assert err < 0.7 * _recon_error(weight, magnitude, x)
    assert err < 0.7 * _recon_error(weight, wanda, x)


@pytest.mark.parametrize("sparsity,blocksize", [(0.5, 64), (0.3, 16), (0.7, 24), (0.45, 128)])
def test_sparsegpt_exact_counts_per_matrix_and_block(sparsity, blocksize):
    weight, x = _correlated_layer(13)
    new, mask = sparsegpt_prune(weight, HessianStats(64).add(x).hessian(), sparsity, blocksize=blocksize)
    assert int(mask.sum()) == int(32 * 64 * sparsity)
    assert bool((new[mask] == 0).all())
    for start in range(0, 64, blocksize):
        width = min(blocksize, 64 - start)
        got = int(mask[:, start : start + width].sum())
        assert math.floor(32 * width * sparsity) <= got <= math.ceil(32 * width * sparsity)


def test_block_counts_largest_remainder():
    assert block_counts(1, [3, 3, 3], 0.5) == [2, 1, 1]  # 1.5 each; total int(4.5) = 4
    assert block_counts(10, [10, 1], 0.9) == [90, 9]
    assert sum(block_counts(7, [5, 5, 3], 0.3)) == int(7 * 13 * 0.3)


@pytest.mark.parametrize("pattern,blocksize", [((2, 4), 128), ((2, 4), 16), ((4, 8), 16)])
def test_sparsegpt_nm_validity(pattern, blocksize):
    weight, x = _correlated_layer(14)
    n, m = pattern
    new, mask = sparsegpt_prune(weight, HessianStats(64).add(x).hessian(), n / m, pattern=pattern, blocksize=blocksize)
    assert (mask.reshape(32, -1, m).sum(dim=2) == n).all()
    assert follows_nm(new, n, m)
    assert bool((new[mask] == 0).all())


@pytest.mark.parametrize("sparsity,blocksize", [(0.5, 64), (0.4, 16)])
def test_sparsegpt_equals_naive_column_by_column_obs(sparsity, blocksize):
    weight, x = _correlated_layer(15)
    hessian = HessianStats(64).add(x).hessian()
    new, mask = sparsegpt_prune(weight, hessian, sparsity, blocksize=blocksize)
    ref, ref_mask = naive_sparsegpt(weight, hessian, sparsity, blocksize=blocksize)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(new.double(), ref, rtol=1e-3, atol=1e-3)


def test_sparsegpt_nm_equals_naive():
    weight, x = _correlated_layer(16)
    hessian = HessianStats(64).add(x).hessian()
    new, mask = sparsegpt_prune(weight, hessian, 0.5, pattern=(2, 4), blocksize=16)
    ref, ref_mask = naive_sparsegpt(weight, hessian, 0.5, pattern=(2, 4))
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(new.double(), ref, rtol=1e-3, atol=1e-3)


def test_sparsegpt_dead_inputs_dtype_and_retry():
    weight, x = _correlated_layer(17)
    x[:, 5] = 0
    new, mask = sparsegpt_prune(weight.to(torch.bfloat16), HessianStats(64).add(x).hessian(), 0.5)
    assert new.dtype == torch.bfloat16 and (new[:, 5] == 0).all() and bool((new[mask] == 0).all())
    # slightly indefinite: dampening 0.01 fails, the x10 retry succeeds
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=_gen(18), dtype=torch.float64))
    eig = torch.tensor([1.0] * 7 + [-0.05], dtype=torch.float64)
    indefinite = (q * eig) @ q.T
    new, mask = sparsegpt_prune(torch.randn(4, 8, generator=_gen(19)), indefinite.float(), 0.5)
    assert int(mask.sum()) == 16
    with pytest.raises(PruningError, match="layers.3.self_attn.q_proj.*not positive definite"):
        sparsegpt_prune(torch.ones(4, 8), -torch.eye(8), 0.5, name="layers.3.self_attn.q_proj")


def test_sparsegpt_bad_arguments():
    w, h = torch.ones(4, 8), torch.eye(8)
    with pytest.raises(PruningError, match=r"Hessian in layers.1.mlp.down_proj must be \[8, 8\]"):
        sparsegpt_prune(w, torch.eye(7), 0.5, name="layers.1.mlp.down_proj")
    with pytest.raises(PruningError, match="does not match pattern 2:4"):
        sparsegpt_prune(w, h, 0.3, pattern=(2, 4))
    with pytest.raises(PruningError, match="in_features 8 in down.*M=3"):
        sparsegpt_prune(w, h, 2 / 3, pattern=(2, 3), name="down")
    with pytest.raises(PruningError, match="blocksize 6 must be a multiple of M=4"):
        sparsegpt_prune(w, h, 0.5, pattern=(2, 4), blocksize=6)
    with pytest.raises(PruningError, match="non-finite"):
        sparsegpt_prune(w, torch.full((8, 8), float("nan")), 0.5)


# --- layerwise --------------------------------------------------------------------------------


def test_owl_mean_spread_and_monotone():
    ratios = [3.0, 7.5, 1.0, 12.0, 5.0, 5.5]
    target, lam = 0.6, 0.08
    s = owl_sparsities(ratios, target, lam)
    assert sum(s) / len(s) == pytest.approx(target, abs=1e-12)
    assert max(s) - min(s) == pytest.approx(2 * lam, abs=1e-12)
    assert all(abs(v - target) <= 2 * lam + 1e-12 for v in s)
    order = sorted(range(len(ratios)), key=lambda i: ratios[i])
    assert all(s[a] > s[b] for a, b in zip(order, order[1:]))  # more outliers -> lower sparsity
    # evenly spread ratios stay within +/- lam, ends exactly at target -/+ lam
    even = owl_sparsities([1.0, 2.0, 3.0, 4.0, 5.0], 0.5, 0.1)
    assert even == pytest.approx([0.6, 0.55, 0.5, 0.45, 0.4], abs=1e-12)


def test_owl_uniform_and_clipping():
    assert owl_sparsities([4.0, 4.0, 4.0], 0.7, 0.1) == [0.7, 0.7, 0.7]
    assert owl_sparsities([1.0, 9.0], 0.7, 0.0) == [0.7, 0.7]
    low = owl_sparsities([0.0, 1.0, 10.0], 0.05, 0.1)  # the outlier-heavy layer would go below 0
    assert low[2] == 0.01 and all(0 <= v < 1 for v in low)
    high = owl_sparsities([0.0, 10.0, 10.0], 0.95, 0.1)  # the outlier-free layer would pass 1
    assert high[0] == 0.99 and all(0 <= v < 1 for v in high)


def test_outlier_ratio_hand_example():
    block = [torch.tensor([[1.0, 1.0], [1.0, 1.0]]), torch.tensor([1.0, 1.0, 1.0, 13.0])]
    assert outlier_ratio(block, 3.0) == 12.5  # mean 2.5, threshold 7.5: one of eight
    assert outlier_ratio([torch.tensor([1.0, 1.0, 1.0, 5.0])], 2.5) == 0.0  # strictly greater
    assert outlier_ratio([torch.tensor([1.0, 1.0, 1.0, 5.0])], 2.4) == 25.0


def test_uniform_explicit_and_weighted():
    assert uniform_sparsities(3, 0.5) == [0.5, 0.5, 0.5]
    assert explicit_sparsities([0.1, 0.2, 0], 3) == [0.1, 0.2, 0.0]
    assert mean_weighted_sparsity([0.5, 0.25], [100, 300]) == pytest.approx(0.3125)


# --- bad inputs -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [1.0, -0.1, "abc", float("nan"), True])
def test_bad_sparsity(bad):
    with pytest.raises(PruningError, match=r"sparsity must be .*\[0, 1\), got " + repr(bad).replace("(", r"\(")):
        check_sparsity(bad)
    with pytest.raises(PruningError, match="sparsity"):
        row_mask(torch.rand(2, 4), bad)


def test_patterns():
    assert parse_pattern("unstructured") is None
    assert parse_pattern("2:4") == (2, 4) and parse_pattern("4:8") == (4, 8) and parse_pattern("5:8") == (5, 8)
    for bad in ("4:2", "0:4", "4:4", "2-4", "", "structured"):
        with pytest.raises(PruningError, match=rf"unknown sparsity pattern '{bad}'.*'unstructured' or 'N:M'"):
            parse_pattern(bad)
    n, m = parse_pattern("2:3")
    with pytest.raises(PruningError, match="in_features 64 in layers.0.mlp.gate_proj is not a multiple of M=3.*2:3"):
        nm_mask(torch.rand(4, 64), n, m, name="layers.0.mlp.gate_proj")


def test_bad_layerwise_inputs():
    with pytest.raises(PruningError, match="got 3 values for 4 layers"):
        explicit_sparsities([0.5, 0.5, 0.5], 4)
    with pytest.raises(PruningError, match=r"layer sparsity \[2\] must be in \[0, 1\), got 1.5"):
        explicit_sparsities([0.5, 0.5, 1.5], 3)
    with pytest.raises(PruningError, match="lambda must be"):
        owl_sparsities([1.0, 2.0], 0.5, -0.1)
    with pytest.raises(PruningError, match="target sparsity must be in"):
        owl_sparsities([1.0, 2.0], 1.0, 0.1)
    with pytest.raises(PruningError, match="m must be"):
        outlier_ratio([torch.ones(3)], 0)
    with pytest.raises(PruningError, match="got 2 sparsities for 1 sizes"):
        mean_weighted_sparsity([0.5, 0.5], [10])
