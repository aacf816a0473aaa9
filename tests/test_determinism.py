"""Same inputs -> the same bits, whatever the torch thread count (and so whatever the number of
workers, stages or nodes, which only change each process's thread count).

Every tensor here has at least 1M elements: torch splits a CPU reduction across threads only above
32768 elements, so smaller tensors could never catch a violation. Each case runs with 1 thread and
with 3 (more than this machine's cores is fine: the split follows the thread count, not the
cores) and compares the bits. `test_the_grid_catches_thread_dependent_sums` checks that these
sizes and thread counts do expose torch's native whole-tensor reduction, so the grid can fail.

The end-to-end check (1, 2 and 3 Ray workers give the same published bytes) is
`test_merge_determinism_across_workers` (1 and 3 workers on the local Ray) with
`test_merge_bytes_on_a_fake_two_node_cluster` (2 workers on two nodes).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from raymerge.methods import available_methods, get_method, reductions
from raymerge.pruning import FeatureNormStats, HessianStats, outlier_ratio, row_mask, sparsegpt_prune, wanda_scores

THREADS = (1, 3)
SHAPE = (1024, 1152)  # 1,179,648 elements
DTYPES = (torch.float32, torch.bfloat16)


@contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _same_for_every_thread_count(fn):
    results = []
    for n in THREADS:
        with threads(n):
            results.append(fn())
    first = results[0]
    for n, other in zip(THREADS[1:], results[1:]):
        firsts = first if isinstance(first, tuple) else (first,)
        others = other if isinstance(other, tuple) else (other,)
        for a, b in zip(firsts, others):
            assert a.dtype == b.dtype and torch.equal(a, b), f"differs between {THREADS[0]} and {n} threads"
    return first


def _models(n: int, dtype: torch.dtype, shape=SHAPE) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(shape, generator=g)
    common = torch.randn(shape, generator=g)
    out = [base]
    for _ in range(n - 1):
        out.append(base + 0.02 * (common + torch.randn(shape, generator=g)))
    return [t.to(dtype) for t in out]


# method -> (number of inputs, base index, model params of the non-base inputs, params)
WEIGHTED = [{"weight": 0.5, "density": 0.5}, {"weight": 0.3, "density": 0.7}, {"weight": 0.4, "density": 0.6}]
CASES = {
    "linear": (3, None, [{"weight": 0.2}, {"weight": 0.5}, {"weight": 0.3}], {}),
    "passthrough": (1, None, [{"scale": 0.7}], {}),
    "task_arithmetic": (4, 0, WEIGHTED, {}),
    "task_arithmetic rescale": (4, 0, WEIGHTED, {"rescale": True}),
    "ties": (4, 0, WEIGHTED, {}),
    "ties rescale": (4, 0, WEIGHTED, {"rescale": True}),
    "breadcrumbs": (4, 0, WEIGHTED, {"rescale": True}),
    "breadcrumbs_ties": (4, 0, WEIGHTED, {"rescale": True}),
    "dare_linear": (4, 0, WEIGHTED, {}),
    "dare_ties": (4, 0, WEIGHTED, {}),
    "della": (4, 0, WEIGHTED, {}),
    "della_linear": (4, 0, WEIGHTED, {}),
    "slerp": (2, 0, [{}], {"t": 0.3}),
    "nuslerp": (2, None, [{"weight": 0.3}, {"weight": 0.7}], {}),
    "nuslerp base": (3, 0, [{"weight": 0.3}, {"weight": 0.7}], {}),
    "nuslerp row_wise": (2, None, [{"weight": 0.3}, {"weight": 0.7}], {"nuslerp_row_wise": True, "nuslerp_flatten": False}),
    "model_stock": (4, 0, [{}, {}, {}], {}),
    "model_stock filter_wise": (4, 0, [{}, {}, {}], {"filter_wise": True}),
    "onebit": (3, 0, [{"weight": 0.5}, {"weight": 0.5}], {}),
    "tsv": (3, 0, [{}, {}], {}),
    "lore": (3, 0, [{"weight": 0.5}, {"weight": 0.5}], {"iterations": 2}),
    "sce": (4, 0, [{}, {}, {}], {}),
    "sce select_topk": (4, 0, [{}, {}, {}], {"select_topk": 0.3}),
    "sce one_model": (2, 0, [{}], {"select_topk": 0.5}),
    "karcher": (3, None, [{}, {}, {}], {"tol": 1e-9}),  # a small tol: the nearby directions still iterate
    "multislerp": (3, None, [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}], {}),
    "multislerp base": (4, 0, [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}], {"normalize_weights": False}),
    "nearswap": (2, 0, [{}], {"t": 0.01}),
    "arcee_fusion": (2, 0, [{}], {}),
    # epsilon near the deltas' scale (0.02): a mix of unique, shared and inactive elements
    "ram": (4, 0, [{}, {}, {}], {"epsilon": 0.03}),
    "ramplus_tl": (4, 0, [{}, {}, {}], {"epsilon": 0.03, "r": 0.5, "alpha": 1.0}),
}


def test_every_method_is_in_the_grid():
    assert {case.split()[0] for case in CASES} == set(available_methods())


def _run(case: str, dtype: torch.dtype) -> torch.Tensor:
    method = case.split()[0]
    n, base_index, model_params, params = CASES[case]
    inputs = _models(n, dtype, (512, 768) if method in ("tsv", "lore") else SHAPE)
    mps = [dict(m) for m in model_params]
    if base_index is not None:
        mps.insert(base_index, {})
    spec = get_method(method)
    mps, ps = spec.resolve(mps, dict(params), base_index)

    def once():
        generator = torch.Generator().manual_seed(7) if spec.random else None
        return spec.fn([x.clone() for x in inputs], base_index=base_index, model_params=mps, params=ps, generator=generator)

    return _same_for_every_thread_count(once)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_method_bits_do_not_depend_on_threads(case, dtype):
    out = _run(case, dtype)
    assert torch.isfinite(out.float()).all()


def test_the_grid_catches_thread_dependent_sums():
    """Torch's own whole-tensor sum differs between the grid's thread counts on these sizes (so a
    method that used it would fail the grid), and `reductions.total` does not."""
    x = _models(2, torch.float32)[1]
    native = []
    for n in THREADS:
        with threads(n):
            native.append(x.abs().sum())
    assert not torch.equal(native[0], native[1]), "torch's sum no longer splits by thread count: pick larger tensors"
    _same_for_every_thread_count(lambda: reductions.total(x.abs()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_reductions_match_torch_within_rounding(dtype):
    g = torch.Generator().manual_seed(3)
    for shape in [(7,), (40000,), (3, 1 << 20), (1, 70001)]:
        x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        exact = x.double().clone()
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(reductions.total(x).double(), exact.sum(), rtol=tol, atol=tol)
        torch.testing.assert_close(reductions.mean(x).double(), exact.mean(), rtol=tol, atol=tol)
        torch.testing.assert_close(reductions.vector_norm(x).double(), exact.norm(), rtol=tol, atol=tol)
        torch.testing.assert_close(reductions.dot(x, x).double(), (exact * exact).sum(), rtol=tol, atol=tol)
        assert reductions.total(x).dtype == x.sum().dtype
        kept = reductions.sum_dim(x, -1, keepdim=True)
        assert kept.shape == x.sum(-1, keepdim=True).shape
        torch.testing.assert_close(kept.double(), exact.sum(-1, keepdim=True), rtol=tol, atol=tol)
        assert reductions.norm_dim(x, -1).shape == torch.norm(x, dim=-1).shape
        assert torch.equal(x.double(), exact), "a reduction changed its input"


def test_small_tensors_keep_torchs_own_bits():
    """Below 32768 elements torch reduces serially: the helpers call it unchanged, so small
    merges keep matching mergekit bit for bit."""
    x = torch.randn(100, 300)
    assert torch.equal(reductions.total(x), x.sum())
    assert torch.equal(reductions.vector_norm(x), torch.linalg.vector_norm(x))
    assert torch.equal(reductions.sum_dim(x.reshape(1, -1), -1), x.reshape(1, -1).sum(-1))


def test_fixed_threads_restores_the_callers_count():
    with threads(3):
        with reductions.fixed_threads(1):
            assert torch.get_num_threads() == 1
            with reductions.fixed_threads(1):
                pass
        assert torch.get_num_threads() == 3


# -- pruning statistics, scores and masks ------------------------------------------------------------
def _activations(tokens: int = 2048, width: int = 768) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(tokens, width, generator=g)
    x[:, :8] *= 30  # outlier features, as LLMs have
    return x


def test_wanda_statistics_and_masks_do_not_depend_on_threads():
    w = torch.randn(1408, 768, generator=torch.Generator().manual_seed(6))
    x = _activations()

    def once():
        stats = FeatureNormStats(768)
        for chunk in x.split(512):
            stats.add(chunk)
        scores = wanda_scores(w, stats.sq_sum)
        return stats.sq_sum, scores, row_mask(scores, 0.5)

    _same_for_every_thread_count(once)


@pytest.mark.parametrize("pattern", [None, (2, 4)], ids=["unstructured", "2:4"])
def test_sparsegpt_hessian_and_masks_do_not_depend_on_threads(pattern):
    w = torch.randn(1408, 768, generator=torch.Generator().manual_seed(6))
    x = _activations()

    def once():
        stats = HessianStats(768)
        for chunk in x.split(512):
            stats.add(chunk)
        new_w, mask = sparsegpt_prune(w, stats.xtx / stats.tokens, 0.5, pattern=pattern)
        return stats.xtx, new_w, mask

    _same_for_every_thread_count(once)


def test_owl_outlier_ratio_does_not_depend_on_threads():
    scores = [torch.rand(1408, 768, generator=torch.Generator().manual_seed(k)) ** 4 for k in range(3)]
    ratios = set()
    for n in THREADS:
        with threads(n):
            ratios.add(outlier_ratio(scores, 5.0))
    assert len(ratios) == 1


# -- end to end: the published bytes for 1, 2 (on two nodes) and 3 Ray workers ----------------------
E2E_CASES = {
    "dare_ties": {"merge_method": "dare_ties"},
    "ties rescale": {"merge_method": "ties", "parameters": {"rescale": True}},
    "ties trim_scope model": {"merge_method": "ties", "parameters": {"trim_scope": "model"}},
    "della": {"merge_method": "della"},
    "dare_linear": {"merge_method": "dare_linear"},
    "della_linear": {"merge_method": "della_linear"},
    "breadcrumbs": {"merge_method": "breadcrumbs", "parameters": {"rescale": True}},
    "model_stock": {"merge_method": "model_stock", "no_weights": True},
    "slerp": {"merge_method": "slerp", "two": True, "parameters": {"t": 0.4}},
    "nuslerp": {"merge_method": "nuslerp", "two": True},
}


def _wide_families(root: Path, layers: int) -> dict[str, dict[str, Path]]:
    """A llama (hidden 512, intermediate 2048: MLP weights of 1,048,576 elements) of `layers`
    decoder layers and three fine-tunes, in float32 and bfloat16."""
    from raymerge.demo import build_tiny_model

    shape = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4)
    families = {}
    for dtype in (torch.float32, torch.bfloat16):
        folder = root / str(dtype).split(".")[-1]
        base = build_tiny_model(folder / "base", seed=0, dtype=dtype, config_overrides=shape)
        family = {"base": base}
        for i in range(3):
            family[f"ft{i + 1}"] = build_tiny_model(folder / f"ft{i + 1}", seed=10 + i, dtype=dtype, base=base, config_overrides=shape)
        families[str(dtype).split(".")[-1]] = family
    return families


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """The merge matrix's models: one decoder layer holds every kind of tensor (1M-element MLP
    weights, 262K-element attention ones, norms, embeddings, head), and a second would only double
    the same work."""
    return _wide_families(tmp_path_factory.mktemp("wide"), layers=1)


@pytest.fixture(scope="module")
def wide_two_layer_models(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """As `wide_models` with 2 decoder layers: the guided merges' 2 statistics stages hold one each."""
    return _wide_families(tmp_path_factory.mktemp("wide2"), layers=2)


# The 1-worker (in-process) bytes of each (case, dtype), kept by `test_merge_determinism_across_workers`
# for the faked 2-node cluster's comparison (which merges in process itself when it runs alone).
_E2E_REFERENCE: dict[tuple[str, str], dict[str, bytes]] = {}


def _e2e_config(case: str, family: dict[str, Path]) -> dict:
    spec = dict(E2E_CASES[case])
    two, no_weights = spec.pop("two", False), spec.pop("no_weights", False)
    names = ("ft1",) if two and spec["merge_method"] == "slerp" else ("ft1", "ft2") if two else ("ft1", "ft2", "ft3")
    models = [{"model": str(family[k])} for k in names]
    if not no_weights and spec["merge_method"] != "slerp":
        for m, w in zip(models, (0.5, 0.3, 0.4)):
            m["parameters"] = {"weight": w} if spec["merge_method"] == "nuslerp" else {"weight": w, "density": 0.6}
    cfg = {"base_model": str(family["base"]), "models": models, **spec}
    if spec["merge_method"] == "nuslerp":
        cfg.pop("base_model")
    return cfg


def test_merge_determinism_across_workers(ray_session, wide_models, tmp_path):
    """Every case, in float32 and bfloat16: 1 worker (in process: the same worker code on a
    thread of the driver, with both cores' torch threads) and 3 Ray workers on the 2-CPU session
    (3 share the CPUs fractionally, one torch thread each) publish the same bytes. Prints the
    matrix (method x dtype x workers). The 2-worker run of the matrix is
    `test_merge_bytes_on_a_fake_two_node_cluster`: 2 Ray workers of 1 CPU, as on this session,
    but on two nodes."""
    import raymerge
    from conftest import load_state

    outputs: dict[tuple[str, str, int], dict] = {}
    try:
        for workers in (1, 3):
            for dtype, family in wide_models.items():
                for case in E2E_CASES:
                    out = tmp_path / f"{case.replace(' ', '_')}-{dtype}-{workers}"
                    where = dict(in_process=True) if workers == 1 else dict(keep_workers=True)
                    raymerge.merge(_e2e_config(case, family), out, workers=workers, random_seed=7, quiet=True,
                                   out_shard_size="4MB", **where)
                    outputs[(case, dtype, workers)] = _file_bytes(out)
                    if workers == 1:
                        _E2E_REFERENCE[(case, dtype)] = outputs[(case, dtype, workers)]
    finally:
        raymerge.shutdown_workers()
    rows, differing = [], []
    for (case, dtype, workers), files in sorted(outputs.items()):
        same = files == outputs[(case, dtype, 1)]
        rows.append(f"{case:24s} {dtype:9s} workers={workers}: {'identical' if same else 'DIFFERENT'}")
        if not same:
            differing.append((case, dtype, workers))
    print("\n".join(rows))
    assert not differing, f"bytes depend on the worker count: {differing}"
    biggest = max(t.numel() for t in load_state(tmp_path / "dare_ties-bfloat16-1").values())
    assert biggest >= 1 << 20


def test_merge_determinism_across_in_process_threads(wide_models, tmp_path):
    """The default merge on a machine without a GPU runs its workers as threads of the driver,
    sharing the cores out as torch threads: 1, 2 and 3 of them publish the same bytes for every
    case, in float32 and bfloat16 (1 thread computes with all cores' torch threads, 2 and 3 with
    one each). The two cases whose bytes split most by threads (issue 14); every method's own
    thread grid is `test_merge_method_bits_do_not_depend_on_threads`, and in process against
    Ray workers, every case: `test_merge_determinism_across_workers`."""
    import raymerge

    differing = []
    for dtype, family in wide_models.items():
        for case in THREAD_SPLIT_CASES:
            first = None
            for workers in (1, 2, 3):
                out = tmp_path / f"{case.replace(' ', '_')}-{dtype}-{workers}"
                raymerge.merge(_e2e_config(case, family), out, in_process=True, workers=workers, random_seed=7,
                               quiet=True, out_shard_size="4MB")
                files = {f.name: f.read_bytes() for f in sorted(out.iterdir()) if f.is_file()}
                first = first or files
                if files != first:
                    differing.append((case, dtype, workers))
    assert not differing, f"bytes depend on the in-process thread count: {differing}"


THREAD_SPLIT_CASES = ("dare_ties", "ties rescale")  # the two whose bf16 bytes split the most (issue 14)


# -- row splits: only elementwise methods are split into row parts (`costs.split_degrees`) ----------
def _row_split_config(method: str, family: dict[str, Path]) -> dict:
    weights = (("ft1", 0.5), ("ft2", 0.3), ("ft3", 0.4))
    if method == "passthrough":
        return {"merge_method": method, "models": [{"model": str(family["ft1"]), "parameters": {"scale": 0.7}}]}
    if method == "linear":
        return {"merge_method": method, "models": [{"model": str(family[k]), "parameters": {"weight": w}} for k, w in weights]}
    cfg = {"merge_method": method, "base_model": str(family["base"])}
    if method == "nearswap":
        return {**cfg, "models": [{"model": str(family["ft1"])}], "parameters": {"t": 0.01}}
    if method == "ram":
        return {**cfg, "models": [{"model": str(family[k])} for k, _ in weights], "parameters": {"epsilon": 0.03}}
    return {**cfg, "models": [{"model": str(family[k]), "parameters": {"weight": w}} for k, w in weights]}


ROW_SPLIT_METHODS = ("linear", "nearswap", "passthrough", "ram", "task_arithmetic")


def test_every_elementwise_method_is_row_split_tested():
    assert set(ROW_SPLIT_METHODS) == {m for m in available_methods() if get_method(m).elementwise}


def test_row_split_parts_publish_the_bytes_of_whole_tensors(wide_models, tmp_path, monkeypatch):
    """Every method that may be split into row parts, in both dtypes: every splittable tensor cut
    into 4 parts dealt over 2 in-process workers publishes the bytes of one worker computing whole
    tensors (1M-element MLP weights)."""
    from conftest import force_row_splits

    import raymerge

    def run(method, dtype, family, name, workers):
        out = tmp_path / f"{method}-{dtype}-{name}"
        result = raymerge.merge(_row_split_config(method, family), out, in_process=True, workers=workers,
                                quiet=True, out_shard_size="4MB")
        return result, _file_bytes(out)

    whole = {(m, d): run(m, d, f, "whole", 1)[1] for d, f in wide_models.items() for m in ROW_SPLIT_METHODS}
    force_row_splits(monkeypatch)
    differing = []
    for dtype, family in wide_models.items():
        for method in ROW_SPLIT_METHODS:
            result, files = run(method, dtype, family, "split", 2)
            assert result.plan.parts > result.tensors, f"{method}: nothing was split"
            if files != whole[(method, dtype)]:
                differing.append((method, dtype))
    assert not differing, f"row-split parts change the bytes: {differing}"


# -- guided merges: statistics passes over stages, merges over workers --------------------------------
GUIDED_CASES = {"aim ties": ("aim", "ties"), "acm": ("acm", "task_arithmetic"), "sens": ("sens", "task_arithmetic")}


def _guided_config(case: str, family: dict[str, Path], calib: Path, stages: int) -> dict:
    method, merge_method = GUIDED_CASES[case]
    extra = {"density": 0.6} if merge_method == "ties" else {}
    return {
        "merge_method": merge_method,
        "base_model": str(family["base"]),
        "models": [{"model": str(family[k]), "parameters": {"weight": w, **extra}} for k, w in (("ft1", 0.6), ("ft2", 0.5))],
        "raymerge": {"guidance": {"method": method, "stages": stages, "calibration": {
            "dataset": str(calib), "nsamples": 2, "seqlen": 16, "eval_samples": 0, "seed": 3}}},
    }


def _guided_files(folder: Path) -> dict[str, bytes]:
    """The published weights and the guidance report without its timing (the config file records
    the stage count, so it differs by design)."""
    files = {k: v for k, v in _file_bytes(folder).items() if k != "mergekit_config.yml"}
    report = json.loads(files["guidance.json"])
    report.pop("seconds", None)
    files["guidance.json"] = json.dumps(report, sort_keys=True).encode()
    return files


def test_guided_merge_bytes_do_not_depend_on_workers_or_stages(ray_session, wide_two_layer_models, tmp_path):
    """AIM (over TIES), ACM and Sens-Merging, in float32 and bfloat16, on the 1M-element llama: in
    process with 1 worker and 1 stage, and on Ray with 2 workers and 2 stages (one layer each),
    publish the same weights and the same statistics. Prints the matrix."""
    from raymerge.demo import demo_text

    import raymerge

    calib = tmp_path / "calib.txt"
    calib.write_text(demo_text(6, 60, seed=5))
    runs = {"in-process w1 s1": (dict(in_process=True, workers=1), 1),
            "ray w2 s2": (dict(workers=2, keep_workers=True), 2)}
    rows, differing = [], []
    try:
        for dtype, family in wide_two_layer_models.items():
            for case in GUIDED_CASES:
                first = None
                for run, (options, stages) in runs.items():
                    out = tmp_path / f"{case.replace(' ', '_')}-{dtype}-{run.replace(' ', '_')}"
                    raymerge.merge(_guided_config(case, family, calib, stages), out, quiet=True, out_shard_size="4MB",
                                   **options)
                    files = _guided_files(out)
                    first = first or files
                    same = files == first
                    rows.append(f"{case:9s} {dtype:9s} {run:17s}: {'identical' if same else 'DIFFERENT'}")
                    if not same:
                        differing.append((case, dtype, run))
    finally:
        raymerge.shutdown_workers()
    print("\n".join(rows))
    assert not differing, f"guided merges depend on the workers or stages: {differing}"


def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(Path(folder).iterdir()) if f.is_file() and f.name != "README.md"}


# -- end to end: prune masks and bytes for in-process, 1, 2 and 4 stages ----------------------------
# SparseGPT prunes the two 1M-element MLP input projections only: its column-by-column updates over
# every module would make this the slowest test of the suite, and those two hold the invariant.
MLP_IN = [r"mlp\.(gate|up)_proj"]
PRUNE_CASES = {
    "magnitude": {"method": "magnitude"},
    "wanda": {"method": "wanda"},
    "sparsegpt": {"method": "sparsegpt", "modules": MLP_IN},
    "sparsegpt 2:4": {"method": "sparsegpt", "pattern": "2:4", "modules": MLP_IN},
    "owl wanda": {"method": "wanda", "layerwise": {"owl": {"lambda": 0.1, "m": 3}}},
}


@pytest.fixture(scope="module")
def wide_prunable(tmp_path_factory) -> dict[str, Path]:
    """A llama with hidden 512, intermediate 2048 (1M-element MLP weights) and 4 layers, and
    calibration text."""
    from raymerge.demo import build_tiny_model, demo_text

    root = tmp_path_factory.mktemp("wide-prune")
    shape = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
    model = build_tiny_model(root / "model", seed=0, config_overrides=shape)
    (root / "calib.txt").write_text(demo_text(12, 120, seed=1))
    return {"model": model, "calib": root / "calib.txt"}


# The in-process bytes of each prune case, kept by `test_prune_determinism_across_stages` for the
# faked 2-node cluster's 2-stage column (which prunes in process itself when it runs alone).
_PRUNE_REFERENCE: dict[str, dict[str, torch.Tensor]] = {}


def _prune_case_config(case: str, wide_prunable: dict[str, Path]) -> dict:
    return {
        "model": str(wide_prunable["model"]), "sparsity": 0.5, "batch_size": 4,
        "calibration": {"dataset": str(wide_prunable["calib"]), "nsamples": 8, "seqlen": 64, "eval_samples": 0},
        **PRUNE_CASES[case],
    }


def _prune_out(tmp_path: Path, case: str, run: str) -> Path:
    return tmp_path / f"{case.replace(' ', '_').replace(':', '-')}-{run.split()[0]}"


def test_prune_determinism_across_stages(ray_session, wide_prunable, tmp_path):
    """Every case: in-process and 1 and 4 stage actors (on 2 CPUs: 2 torch threads for the one
    stage, 1 for each of 4; 4 stages are more than the CPU slots, so they share them
    fractionally, one layer each: middle stages hold neither embeddings nor head) publish the
    same masks and the same bytes. Prints the matrix. The matrix's 2-stage column is
    `test_prune_stages_on_a_fake_two_node_cluster`: 2 stages of 1 CPU, as on this session, but
    on two nodes."""
    from conftest import load_state
    from raymerge.runtime.prune import PruneOptions, run_prune

    import raymerge

    # Runs outer, cases inner: each stage count's actors are kept from one case to the next
    # (`keep_workers`), so the matrix starts 2 pools rather than 10.
    runs = {"in-process": PruneOptions(in_process=True, quiet=True)}
    runs.update({f"{n} stage(s)": PruneOptions(workers=n, quiet=True, keep_workers=True) for n in (1, 4)})
    states: dict[str, dict[str, dict]] = {case: {} for case in PRUNE_CASES}
    try:
        for run, options in runs.items():
            for case in PRUNE_CASES:
                out = _prune_out(tmp_path, case, run)
                result = run_prune(_prune_case_config(case, wide_prunable), out, options)
                states[case][run] = load_state(out)
                if run == "in-process":
                    _PRUNE_REFERENCE[case] = states[case][run]
                if run == "4 stage(s)":  # more stages than the 2 CPU slots: one layer each, fractional shares
                    assert [s["layers"] for s in result.stages] == [[0, 0], [1, 1], [2, 2], [3, 3]], result.stages
    finally:
        raymerge.shutdown_workers()
    rows, differing = [], []
    for case in PRUNE_CASES:
        first = states[case]["in-process"]
        for run, state in states[case].items():
            same = state.keys() == first.keys() and all(torch.equal(state[k], first[k]) for k in first)
            rows.append(f"{case:14s} {run:11s}: {'identical' if same else 'DIFFERENT'}")
            if not same:
                differing.append((case, run))
    print("\n".join(rows))
    assert not differing, f"pruned bytes depend on the stage count: {differing}"


# -- the faked 2-node cluster (last in the module: one cluster for both tests) ----------------------
def test_merge_bytes_on_a_fake_two_node_cluster(fake_cluster, wide_models, tmp_path):
    """Every end-to-end case's 1M-element merge on a faked 2-node cluster (2 workers of 1 CPU: one
    on each node, as each node has 1 CPU) publishes the bytes of 1 in-process worker (kept by the
    matrix, or merged here when this test runs alone), in both dtypes: the matrix's 2-worker run.
    (The module's faked 2-node cluster, shared with `test_prune_stages_on_a_fake_two_node_cluster`:
    the two run last in the module, so the session's local Ray is taken down and brought back once.)"""
    import ray

    import raymerge

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    rows, differing = [], []
    try:
        for dtype, family in wide_models.items():
            for case in E2E_CASES:
                cfg = _e2e_config(case, family)
                name = f"{case.replace(' ', '_')}-{dtype}"
                dist = raymerge.merge(cfg, tmp_path / f"{name}-2nodes", workers=2, random_seed=7, quiet=True,
                                      out_shard_size="4MB", keep_workers=True)
                assert len(dist.per_node) == 2, "the two workers share a node"
                reference = _E2E_REFERENCE.get((case, dtype))
                if reference is None:  # this test run alone: an in-process merge is the reference
                    reference = _file_bytes(raymerge.merge(cfg, tmp_path / f"{name}-local", random_seed=7, quiet=True,
                                                           in_process=True, out_shard_size="4MB").output)
                same = _file_bytes(dist.output) == reference
                rows.append(f"{case:24s} {dtype:9s} 2 nodes vs 1 worker: {'identical' if same else 'DIFFERENT'}")
                if not same:
                    differing.append((case, dtype))
    finally:
        raymerge.shutdown_workers()
    print("\n".join(rows))
    assert not differing, f"bytes differ on the fake 2-node cluster: {differing}"



def test_prune_stages_on_a_fake_two_node_cluster(fake_cluster, wide_prunable, trained, tmp_path):
    """Pruning on 2 stage actors (1 CPU each: one per node of the faked cluster, whose nodes have
    1 CPU each): every case of the prune matrix publishes the bytes of an in-process prune (the
    matrix's 2-stage column: `test_prune_determinism_across_stages` keeps them; run alone, this
    test prunes in process itself), and on the trained model Wanda (sequential) and SparseGPT
    (parallel) give the masks of an in-process prune, Wanda's bytes too, and the same perplexity
    after pruning. The two stage actors are kept from one prune to the next."""
    from conftest import load_state
    from raymerge.runtime.prune import PruneOptions, run_prune

    import ray

    import raymerge

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    try:
        rows, differing = [], []
        for case in PRUNE_CASES:
            cfg = _prune_case_config(case, wide_prunable)
            result = run_prune(cfg, _prune_out(tmp_path / "matrix", case, "2 stages"), PruneOptions(workers=2, quiet=True, keep_workers=True))
            assert [s["layers"] for s in result.stages] == [[0, 1], [2, 3]], result.stages
            reference = _PRUNE_REFERENCE.get(case)
            if reference is None:  # this test run alone: an in-process prune is the reference
                reference = load_state(run_prune(cfg, _prune_out(tmp_path / "matrix", case, "in-process"),
                                                 PruneOptions(in_process=True, quiet=True)).output)
            state = load_state(result.output)
            same = state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference)
            rows.append(f"{case:14s} 2 stages on 2 nodes: {'identical' if same else 'DIFFERENT'}")
            if not same:
                differing.append(case)
        print("\n".join(rows))
        assert not differing, f"pruned bytes on 2 stages over 2 nodes differ from in process: {differing}"
        for method, mode in (("wanda", "sequential"), ("sparsegpt", "parallel")):
            cfg = {
                "model": str(trained["model"]), "method": method, "mode": mode, "sparsity": 0.5, "batch_size": 4,
                "calibration": {"dataset": str(trained["calib"]), "nsamples": 16, "seqlen": 64, "eval_samples": 8},
            }
            single = run_prune(cfg, tmp_path / f"{method}-1", PruneOptions(in_process=True, quiet=True))
            multi = run_prune(cfg, tmp_path / f"{method}-2", PruneOptions(workers=2, quiet=True, keep_workers=True))
            assert [s["layers"] for s in multi.stages] == [[0, 1], [2, 3]], multi.stages
            a, b = load_state(single.output), load_state(multi.output)
            for name in a:
                assert torch.equal(a[name] == 0, b[name] == 0), f"{method}: {name} masks differ"
                if method == "wanda":
                    assert torch.equal(a[name], b[name]), name
            assert multi.report.perplexity_after == pytest.approx(single.report.perplexity_after, rel=1e-5)
    finally:
        raymerge.shutdown_workers()
