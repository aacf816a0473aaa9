"""Every extension point is a registry of the merge methods' shape: a frozen spec, `register`,
a getter whose unknown-name error lists the choices, and a list of the names. A method or
objective registered here (and nowhere else) works end to end."""

from __future__ import annotations

import math

import pytest
import torch

import raymerge
from raymerge.config import ConfigError


# -- the built-ins, and one clear error for an unknown name ------------------------------------------------
def test_merge_methods_registry():
    from raymerge.methods import MethodError, available_methods, get_method

    assert {"linear", "ties", "dare_ties", "slerp", "model_stock"} <= set(available_methods())
    with pytest.raises(MethodError, match=r"unknown merge_method 'tie'; available: .*\bties\b"):
        get_method("tie")


def test_the_merge_method_specs_import_no_torch_and_name_functions_that_exist():
    """The catalog's specs are read without torch (config checks, `raymerge methods`, planning);
    each names its function by module and attribute, which must exist: a misspelt name would
    only fail when a merge calls it."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import sys
        from raymerge.methods import available_methods, get_method
        specs = [get_method(name) for name in available_methods()]
        assert "torch" not in sys.modules, "the method specs imported torch"
        import inspect
        for spec in specs:
            fn = spec.fn.resolve()
            assert callable(fn) and fn.__module__ == spec.fn.module, spec.name
            assert list(inspect.signature(fn).parameters) == [
                "inputs", "base_index", "model_params", "params", "generator"], spec.name
        print(len(specs))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) >= 23


def test_a_plugin_named_like_a_built_in_is_refused_when_registered():
    """Built-ins load on first use: registering first must still collide at once, and leave the
    registry whole."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        from raymerge.methods import MethodSpec, available_methods, register
        try:
            register(MethodSpec("ties", lambda *a, **k: None))
        except ValueError as err:
            assert "registered twice" in str(err), err
        else:
            raise AssertionError("no error")
        print(len(available_methods()))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) >= 23


def test_a_lazy_method_function_is_the_modules_function():
    from raymerge.methods import get_method
    from raymerge.methods.linear import linear
    from raymerge.methods.registry import LazyFunction

    spec = get_method("linear")
    assert spec.fn == LazyFunction("raymerge.methods.linear", "linear") and spec.fn.resolve() is linear
    xs = [torch.full((4,), float(v)) for v in (1, 3)]
    out = spec.fn(xs, base_index=None, model_params=[{"weight": 1.0}, {"weight": 1.0}], params={"normalize": True},
                  generator=None)
    assert torch.equal(out, torch.full((4,), 2.0))


def test_prune_methods_registry():
    from raymerge.pruning import PruningError
    from raymerge.pruning.methods import available_prune_methods, get_prune_method

    assert available_prune_methods() == ["magnitude", "sparsegpt", "wanda"]
    assert get_prune_method("magnitude").statistic is None and not get_prune_method("magnitude").needs_calibration
    assert get_prune_method("wanda").statistic == "norms"
    assert get_prune_method("sparsegpt").statistic == "hessian" and not get_prune_method("sparsegpt").reads_original
    with pytest.raises(PruningError, match=r"unknown prune method 'wnada'; available: magnitude, sparsegpt, wanda"):
        get_prune_method("wnada")


def test_prune_config_names_the_field_and_file(tmp_path):
    """The config package knows no registry (any method name parses); the job checks it against
    the registry before any work, naming the file and the field."""
    from raymerge.config.prune_config import parse_prune_config
    from raymerge.pruning.methods import check_config_method

    cfg = parse_prune_config({"model": "m", "method": "wnada", "sparsity": 0.5}, "prune.yaml")
    with pytest.raises(ConfigError) as err:
        check_config_method(cfg.method, cfg.calibration is not None, "prune.yaml")
    assert "prune.yaml" in str(err.value)
    assert "method: unknown prune method 'wnada'; available: magnitude, sparsegpt, wanda" in str(err.value)
    cfg = parse_prune_config({"model": "m", "method": "wanda", "sparsity": 0.5}, "prune.yaml")
    with pytest.raises(ConfigError, match="prune.yaml: calibration: required for method wanda"):
        check_config_method(cfg.method, cfg.calibration is not None, "prune.yaml")
    # and through the job, before anything is opened: the model path does not even exist
    path = tmp_path / "prune.yaml"
    path.write_text("model: /nowhere\nmethod: wnada\nsparsity: 0.5\n")
    with pytest.raises(ConfigError, match=r"prune.yaml: method: unknown prune method 'wnada'"):
        raymerge.prune(str(path), tmp_path / "out", in_process=True, quiet=True)


def test_search_objectives_registry():
    from raymerge.search.objectives import available_objectives, get_objective

    assert available_objectives() == ["lm_eval", "perplexity", "reconstruction"]
    assert get_objective("lm_eval").direction == "maximize" and get_objective("reconstruction").reference
    assert get_objective("pkg.mod:fn").name == "pkg.mod:fn"  # user functions need no registration
    with pytest.raises(ConfigError, match=r"unknown objective 'perplexty': must be one of lm_eval, perplexity, reconstruction or 'package.module:function'"):
        get_objective("perplexty")


def test_search_config_rejects_an_unknown_objective_naming_the_field():
    from raymerge.config.search_config import load_search_config
    from raymerge.search.objectives import check_objectives

    cfg, _ = load_search_config({"merge": {}, "evaluation": {"dataset": "x"}, "objective": "perplexty"})
    with pytest.raises(ConfigError, match=r"invalid search config s.yaml: objective.kind: unknown objective 'perplexty'"):
        check_objectives(cfg.objectives, "s.yaml")


def test_guidance_methods_registry():
    from raymerge.runtime.guidance_methods import available_guidance_methods, get_guidance_method

    assert available_guidance_methods() == ["acm", "aim", "sens"]
    assert get_guidance_method("aim").parameter == "omega" and not get_guidance_method("aim").scales_task_vectors
    assert get_guidance_method("sens").task_calibration
    with pytest.raises(ConfigError, match=r"unknown guidance method 'acn'; available: acm, aim, sens"):
        get_guidance_method("acn")
    # each spec names its statistics pass, imported on the first call: it must exist
    import raymerge.runtime.guidance as guidance

    for name in available_guidance_methods():
        run = get_guidance_method(name).run
        assert run.module == "raymerge.runtime.guidance" and run.resolve() is getattr(guidance, f"run_{name}")


def test_guidance_config_names_the_field():
    from raymerge.config.guidance_config import parse_guidance_config
    from raymerge.runtime.guidance import check_against_registry, strength

    calib = {"dataset": "c.txt"}
    with pytest.raises(ConfigError, match=r"m.yaml: raymerge.guidance.method: unknown guidance method 'acn'"):
        check_against_registry(parse_guidance_config({"method": "acn", "calibration": calib}, "m.yaml"), "m.yaml")
    with pytest.raises(ConfigError, match=r"m.yaml: raymerge.guidance.theta: not a parameter of aim \(it has 'omega'\)"):
        check_against_registry(parse_guidance_config({"method": "aim", "theta": 1.0, "calibration": calib}, "m.yaml"), "m.yaml")
    assert strength(parse_guidance_config({"method": "acm", "calibration": calib})) == 10.0


# -- a prune method registered in this file works end to end ----------------------------------------------
def _random_score(weight, original, sparsity, stats, settings, name):
    """Prune a random `sparsity` of each row, seeded by the tensor's name (so runs repeat)."""
    from raymerge.pruning.methods import scored_mask

    gen = torch.Generator().manual_seed(sum(name.encode()))
    scores = torch.rand(original.shape, generator=gen)
    mask = scored_mask(scores, sparsity, settings.nm, name, per_row=True)
    return original.masked_fill(mask, 0), mask


@pytest.fixture
def random_score_method():
    from raymerge.pruning import methods

    spec = methods.register(methods.PruneMethodSpec("random-score", _random_score, doc="test only"))
    yield spec
    methods.REGISTRY.unregister(spec.name)


def test_a_registered_prune_method_runs_end_to_end(random_score_method, trained, tmp_path):
    from raymerge.runtime.prune import PruneOptions, run_prune
    from conftest import load_state

    cfg = {"model": str(trained["model"]), "method": "random-score", "sparsity": 0.5, "pattern": "2:4"}
    result = run_prune(cfg, tmp_path / "out", PruneOptions(in_process=True, quiet=True))
    assert result.report.method == "random-score"
    assert result.report.achieved_sparsity == pytest.approx(0.5)
    state = load_state(tmp_path / "out")
    w = state["model.layers.0.mlp.down_proj.weight"]
    assert (w.reshape(-1, 4) == 0).sum(1).eq(2).all()  # 2 of every 4 inputs pruned
    again = run_prune(cfg, tmp_path / "again", PruneOptions(in_process=True, quiet=True))
    assert torch.equal(load_state(tmp_path / "again")["model.layers.0.mlp.down_proj.weight"], w)
    assert again.report.achieved_sparsity == result.report.achieved_sparsity


# -- a search objective registered in this file scores trials ---------------------------------------------
def _neg_nll_submit(ctx):
    return [ctx.last_stage.loss(ctx.forward(ids), ids) for ids in ctx.batches()]


def _neg_nll_value(ctx, pending):
    parts = ctx.get(pending)
    return -sum(p[0] for p in parts) / sum(p[1] for p in parts)


@pytest.fixture
def neg_nll_objective():
    from raymerge.search import objectives

    spec = objectives.register(objectives.ObjectiveSpec("neg-nll", _neg_nll_submit, _neg_nll_value, direction="maximize"))
    yield spec
    objectives.REGISTRY.unregister(spec.name)


def test_a_registered_objective_scores_search_trials(neg_nll_objective, trained, tmp_path):
    cfg = {
        "prune": {"model": str(trained["model"]), "method": "wanda", "sparsity": 0.5,
                  "calibration": {"dataset": str(trained["calib"]), "nsamples": 4, "seqlen": 64, "eval_samples": 4}},
        "space": {"blocks": 2, "max_deviation": 0.1},
        "objective": ["perplexity", "neg-nll"],
        "study": {"n_trials": 2, "sampler": "random", "seed": 0},
    }
    result = raymerge.optimize(cfg, tmp_path / "s", in_process=True, quiet=True)
    assert result.completed == 2
    assert [d.name for d in result.study.directions] == ["MINIMIZE", "MAXIMIZE"]  # the spec's default direction
    for t in result.study.trials:
        ppl, neg_nll = t.values
        assert neg_nll == pytest.approx(-math.log(ppl), rel=1e-6)


# -- per-method knowledge lives on the merge method's spec -------------------------------------------------
def program_of(cfg: dict):
    """The compiled operators of a merge config (headers only; no Ray)."""
    from raymerge.runtime.compile import compile_merge

    return compile_merge(cfg).program


def test_merge_specs_carry_costs_copies_and_the_trim_key():
    import raymerge.runtime.costs as costs
    from raymerge.methods import available_methods, get_method
    from raymerge.methods.catalog import TRIM_THRESHOLD

    for name in available_methods():
        assert get_method(name).cost_ns is not None, name  # every built-in has a measured coefficient
    assert not hasattr(costs, "REFERENCE_NS_PER_INPUT_ELEMENT") and not hasattr(costs, "EXTRA_COPIES")
    assert get_method("ties").model_trim_key == TRIM_THRESHOLD and get_method("dare_ties").model_trim_key is None
    assert get_method("slerp").extra_copies(2) == 4.0 and get_method("della").extra_copies(3) == 9.0
    key = costs.CostKey("ties", 4, "BF16")
    assert costs.offline_seconds_per_element(key) == pytest.approx(15.0e-9 * 4)


def test_a_registered_merge_method_declares_its_cost(llama_models):
    import raymerge.runtime.costs as costs
    from raymerge.methods import MethodSpec, ParamSpec, registry
    def first(inputs, *, base_index, model_params, params, generator):
        return inputs[0].clone()

    registry.register(MethodSpec("test_first", first, params=(ParamSpec("weight", per_model=True),), base="none",
                                 elementwise=True, cost_ns=7.0, extra_copies=lambda n: 1.0))
    try:
        cfg = {"merge_method": "test_first", "models": [{"model": str(llama_models[k])} for k in ("ft1", "ft2")]}
        op = program_of(cfg).operators[0]
        assert costs.offline_seconds_per_element(costs.cost_key(op)) == pytest.approx(7.0e-9 * 2)
        n = costs.elements(op)
        assert costs.peak_memory(op) == (2 + 1.0) * n * 4 + op.bytes_out
    finally:
        registry.REGISTRY.unregister("test_first")


def test_the_planner_times_the_dtype_the_workers_compute_in(llama_models):
    """float32 inputs written as bfloat16 without a config `dtype`: the workers compute in float32
    (the promotion of the inputs), and the cost model must time and size float32 too."""
    import raymerge.runtime.costs as costs
    from raymerge.runtime.compute import work_dtype
    cfg = {"merge_method": "linear", "out_dtype": "bfloat16",
           "models": [{"model": str(llama_models[k]), "parameters": {"weight": 0.5}} for k in ("ft1", "ft2")]}
    op = max(program_of(cfg).operators, key=costs.elements)
    assert op.out_dtype == "BF16"
    assert work_dtype(op, [torch.float32] * len(op.inputs)) == torch.float32
    assert op.work_dtype == "float32" and costs.cost_key(op).dtype == "F32"
    assert costs.peak_memory(op) == (len(op.inputs) + 0.0) * costs.elements(op) * 4 + op.bytes_out
    cfg["dtype"] = "bfloat16"  # a config dtype wins everywhere
    op = max(program_of(cfg).operators, key=costs.elements)
    assert op.work_dtype == "bfloat16" and costs.cost_key(op).dtype == "BF16"


# -- checkpoint sources ---------------------------------------------------------------------------------
def test_checkpoint_source_kinds_registry():
    from raymerge.checkpoints import CheckpointError
    from raymerge.checkpoints.resolve import available_source_kinds, get_source_kind

    assert available_source_kinds() == ["deepspeed", "shape-only", "local", "s3", "hub"]  # the order they are tried
    assert get_source_kind("deepspeed").config_from and not get_source_kind("local").config_from
    with pytest.raises(CheckpointError, match=r"unknown checkpoint source kind 'gcs'; available: deepspeed, hub, local, s3, shape-only"):
        get_source_kind("gcs")


def test_a_registered_source_kind_opens_model_references(llama_models):
    from raymerge.checkpoints import SourceSpec
    from raymerge.checkpoints import resolve
    from raymerge.checkpoints.local import LocalSource

    kind = resolve.SourceKind("alias", lambda p, o: p.startswith("alias://"),
                              lambda p, o: LocalSource(llama_models[p.removeprefix("alias://")], allow_pickle=o.allow_pickle))
    resolve.register_source(kind, before="hub")
    try:
        assert resolve.available_source_kinds()[-2:] == ["alias", "hub"]
        src, ref = SourceSpec("alias://ft1").open(), SourceSpec(str(llama_models["ft1"])).open()
        name = next(iter(ref.tensors()))
        assert torch.equal(src.read(name), ref.read(name))
        src.close()
        ref.close()
    finally:
        resolve.SOURCE_KINDS.unregister(kind.name)


def test_one_registry_shape():
    """Every extension point keeps its specs in the same `Registry`: duplicates refused, unknown
    names listed, `before=` ordering."""
    from dataclasses import dataclass

    from raymerge.registries import Registry

    @dataclass(frozen=True)
    class Spec:
        name: str

    reg: Registry[Spec] = Registry("widget", KeyError)
    reg.register(Spec("b"))
    reg.register(Spec("a"), before="b")
    assert [s.name for s in reg.in_order()] == ["a", "b"] and reg.names() == ["a", "b"]
    with pytest.raises(ValueError, match="widget 'a' registered twice"):
        reg.register(Spec("a"))
    with pytest.raises(KeyError, match="unknown widget 'c'; available: a, b"):
        reg.get("c")
    reg.unregister("a")
    assert "a" not in reg
