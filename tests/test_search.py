"""Searches: the optimum of a fixture built to have one is found; in-memory trial values equal
evaluating the materialised model; studies resume; concurrent trials equal sequential ones;
failed trials are recorded; prune searches keep the mean sparsity and export runnable configs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

import raymerge


@pytest.fixture(scope="session")
def opposite_finetunes(trained, tmp_path_factory) -> dict[str, Path]:
    """ft_plus = T + D and ft_minus = T - D around the trained model T: a normalised linear merge
    with weights (w, 1) is T + (w - 1)/(w + 1) D, so w = 1 recovers T, the best of the family."""
    from transformers import AutoModelForCausalLM

    from raymerge.demo import save_tiny_tokenizer

    root = tmp_path_factory.mktemp("opposite")
    base = AutoModelForCausalLM.from_pretrained(str(trained["model"]), dtype=torch.float32)
    gen = torch.Generator().manual_seed(7)
    deltas = {n: torch.randn(p.shape, generator=gen) * 0.5 * p.detach().std() for n, p in base.named_parameters() if p.dim() == 2}
    out = {}
    for sign, name in ((1.0, "plus"), (-1.0, "minus")):
        model = AutoModelForCausalLM.from_pretrained(str(trained["model"]), dtype=torch.float32)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in deltas:
                    p.add_(sign * deltas[n])
        model.save_pretrained(str(root / name))
        save_tiny_tokenizer(root / name)
        out[name] = root / name
    return out


def _merge_search(models, calib, n_trials=12, sampler="tpe", concurrency=1, objective="perplexity", w_range=None):
    return {
        "merge": {
            "merge_method": "linear",
            "models": [
                {"model": str(models["plus"]), "parameters": {"weight": w_range or {"low": 0.0, "high": 3.0}}},
                {"model": str(models["minus"]), "parameters": {"weight": 1.0}},
            ],
            "parameters": {"normalize": True},
            "dtype": "float32",
        },
        "objective": objective,
        "evaluation": {"dataset": str(calib), "seqlen": 64, "eval_samples": 6},
        "study": {"n_trials": n_trials, "sampler": sampler, "seed": 0, "concurrency": concurrency},
    }


def test_finds_the_known_optimum(opposite_finetunes, trained, tmp_path):
    cfg = _merge_search(opposite_finetunes, trained["calib"], n_trials=14)
    result = raymerge.optimize(cfg, tmp_path / "s", in_process=True, quiet=True)
    best = result.study.best_trial
    assert abs(best.params["merge.models.0.parameters.weight"] - 1.0) < 0.2, best.params
    assert result.completed == 14 and result.failed == 0
    exported = yaml.safe_load(result.best_configs[0].read_text())
    assert exported["models"][0]["parameters"]["weight"] == best.params["merge.models.0.parameters.weight"]
    assert (tmp_path / "s" / "history.png").is_file() and (tmp_path / "s" / "study.journal").is_file()


@pytest.mark.parametrize("tokenizer_source", [None, "union"])
def test_in_memory_value_equals_materialised_model(opposite_finetunes, trained, tmp_path, tokenizer_source):
    """A trial's value is the perplexity of the model its best.yaml builds. With a tokenizer
    choice too: the trial runs with the merged tokenizer and the merged vocabulary's rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raymerge.calibration import load_calibration
    from raymerge.config.calibration import CalibrationConfig

    cfg = _merge_search(opposite_finetunes, trained["calib"], n_trials=2, sampler="random")
    if tokenizer_source is not None:
        cfg["merge"]["tokenizer_source"] = tokenizer_source
    result = raymerge.optimize(cfg, tmp_path / "s", in_process=True, quiet=True, materialize=True)
    assert result.failed == 0
    model = AutoModelForCausalLM.from_pretrained(str(result.materialized), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(result.materialized))
    windows = load_calibration(CalibrationConfig(dataset=str(trained["calib"]), seqlen=64, eval_samples=6, nsamples=1), tok, 128)
    with torch.no_grad():
        nll = sum(model(input_ids=ids, labels=ids).loss.item() * ids.shape[0] * (ids.shape[1] - 1)
                  for ids in windows.heldout.split(8))
    ppl = math.exp(nll / (windows.heldout.shape[0] * (windows.heldout.shape[1] - 1)))
    assert result.study.best_trial.values[0] == pytest.approx(ppl, rel=1e-4)


def test_resume_continues_without_repeating(opposite_finetunes, trained, tmp_path):
    cfg = _merge_search(opposite_finetunes, trained["calib"], n_trials=3, sampler="random")
    first = raymerge.optimize(cfg, tmp_path / "s", in_process=True, quiet=True)
    before = [(t.number, t.params, t.values) for t in first.study.trials]
    cfg["study"]["n_trials"] = 5
    second = raymerge.optimize(cfg, tmp_path / "s", in_process=True, quiet=True)
    assert second.trials_run == 2 and len(second.study.trials) == 5
    assert [(t.number, t.params, t.values) for t in second.study.trials[:3]] == before


def test_concurrent_trials_equal_sequential(opposite_finetunes, trained, tmp_path, ray_session):
    """Two pipelines of two stages on Ray score every trial as one in-process pipeline does; the
    Ray trials' time breakdown comes back from the stages (`test_trial_time_breakdown`). Those are
    4 stage actors on the session's 2 CPUs: they share them fractionally, never a hang (the one
    resource rule, `tests/test_actor_resources.py`)."""
    from conftest import finishes_within

    grid = {"choices": [0.5, 1.0, 1.5, 2.0]}
    seq = raymerge.optimize(_merge_search(opposite_finetunes, trained["calib"], 4, "grid", 1, w_range=grid),
                          tmp_path / "seq", in_process=True, quiet=True)
    raymerge.shutdown_workers()  # no kept pool holding the CPUs: the 4 actors share the 2 alone
    par = finishes_within(300, raymerge.optimize, _merge_search(opposite_finetunes, trained["calib"], 4, "grid", 2, w_range=grid),
                          tmp_path / "par", quiet=True, stages=2)
    assert par.completed == 4 and par.failed == 0
    _check_breakdown(par, 4)
    key = "merge.models.0.parameters.weight"
    a = {t.params[key]: t.values[0] for t in seq.study.trials}
    b = {t.params[key]: t.values[0] for t in par.study.trials}
    assert set(a) == {0.5, 1.0, 1.5, 2.0} and a.keys() == b.keys()
    for w in a:
        assert b[w] == pytest.approx(a[w], rel=1e-6), w
    assert min(a, key=a.get) == 1.0


def failing_objective(logits_fn, heldout):
    raise ValueError("objective refused this trial")


def test_failed_trials_are_recorded_and_the_study_goes_on(opposite_finetunes, trained, tmp_path, capsys):
    cfg = _merge_search(opposite_finetunes, trained["calib"], n_trials=2, sampler="random",
                        objective="tests.test_search:failing_objective")
    result = raymerge.optimize(cfg, tmp_path / "s", in_process=True, quiet=True)
    assert result.failed == 2 and result.completed == 0
    assert all("objective refused" in t.user_attrs["error"] for t in result.study.trials)
    # From the command line, a study whose every trial failed exits 1 with the first error.
    import yaml

    from raymerge.cli import main as cli_main

    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    code = cli_main(["search", str(tmp_path / "s.yaml"), str(tmp_path / "s-cli"), "--in-process", "--quiet"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("raymerge search: every trial failed (2); first error:") and "objective refused" in err[-1]


def test_prune_search_keeps_mean_sparsity_and_exports_a_runnable_config(trained, tmp_path):
    cfg = {
        "prune": {"model": str(trained["model"]), "method": "wanda", "sparsity": 0.5,
                  "calibration": {"dataset": str(trained["calib"]), "nsamples": 8, "seqlen": 64, "eval_samples": 4}},
        "space": {"blocks": 2, "max_deviation": 0.15, "exponents": True},
        "objective": ["perplexity", "reconstruction"],
        "study": {"n_trials": 4, "sampler": "nsga2", "seed": 1},
    }
    result = raymerge.optimize(cfg, tmp_path / "s", in_process=True, quiet=True)
    assert result.completed == 4 and (tmp_path / "s" / "pareto_front.png").is_file()
    for t in result.study.trials:
        s = t.user_attrs["layer_sparsities"]
        assert sum(s) / len(s) == pytest.approx(0.5, abs=1e-9)
    best = result.study.best_trials[0]
    path = result.best_configs[0]
    pruned = raymerge.prune(path, tmp_path / "pruned", in_process=True, quiet=True)
    assert pruned.report.perplexity_after == pytest.approx(best.values[0], rel=1e-4)


def test_search_space_ranges_knots_and_errors():
    from raymerge.search.space import SearchSpace, SearchSpaceError

    tree = {"models": [{"parameters": {"weight": {"low": 0.0, "high": 1.0, "step": 0.5},
                                       "density": [{"filter": "mlp", "value": {"low": 0.1, "high": 0.9, "knots": 3}}, {"value": 0.5}]}}]}
    space = SearchSpace(tree, "merge")
    names = [d.name for d in space.dimensions]
    assert names == ["merge.models.0.parameters.weight", "merge.models.0.parameters.density.0.value.k0",
                     "merge.models.0.parameters.density.0.value.k1", "merge.models.0.parameters.density.0.value.k2"]
    filled = space.fill(dict(zip(names, [0.5, 0.1, 0.2, 0.3])))
    assert filled["models"][0]["parameters"]["weight"] == 0.5
    assert filled["models"][0]["parameters"]["density"][0]["value"] == [0.1, 0.2, 0.3]
    assert tree["models"][0]["parameters"]["weight"]["low"] == 0.0  # the template is not modified
    assert space.dimensions[0].grid() == [0.0, 0.5, 1.0]
    with pytest.raises(SearchSpaceError, match="density.0.value.k0: the grid sampler needs `step` or `choices`"):
        space.grid()
    with pytest.raises(SearchSpaceError, match="no search range"):
        SearchSpace({"weight": 1.0})
    with pytest.raises(SearchSpaceError, match=r"weight: need numbers low < high"):
        SearchSpace({"weight": {"low": 1.0, "high": 0.5}})
    with pytest.raises(SearchSpaceError, match=r"weight: unknown keys \['hgih'\]"):
        SearchSpace({"weight": {"low": 0.0, "high": 1.0, "hgih": 2}})


def test_search_config_errors_name_the_field(tmp_path):
    from raymerge.config import ConfigError
    from raymerge.config.search_config import load_search_config

    with pytest.raises(ConfigError, match="exactly one of `merge:`"):
        load_search_config({"objective": "perplexity"})
    with pytest.raises(ConfigError, match=r"study.sampler"):
        load_search_config({"merge": {}, "evaluation": {"dataset": "x"}, "study": {"sampler": "bayes"}})
    from raymerge.search.objectives import check_objectives

    cfg, _ = load_search_config({"merge": {}, "evaluation": {"dataset": "x"}, "objective": {"kind": "accuracy"}})
    with pytest.raises(ConfigError, match=r"s.yaml: objective.kind: .*must be one of lm_eval, perplexity, reconstruction"):
        check_objectives(cfg.objectives, "s.yaml")


def test_cli_search(opposite_finetunes, trained, tmp_path, capsys):
    from raymerge.cli import main

    cfg = tmp_path / "search.yaml"
    cfg.write_text(yaml.safe_dump(_merge_search(opposite_finetunes, trained["calib"], n_trials=2, sampler="random")))
    assert main(["search", str(cfg), str(tmp_path / "out"), "--in-process", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "2 trials complete, 0 failed" in out and "best.yaml" in out


def test_lost_actor_is_replaced_and_the_study_goes_on(opposite_finetunes, trained, tmp_path, ray_session, monkeypatch):
    import ray

    from raymerge.search import study as study_mod

    original = study_mod._submit
    killed = []

    def submit_then_kill_once(trial, pipe, *args):
        handles = original(trial, pipe, *args)
        if not killed:
            ray.kill(pipe.driver.actors[0])
            killed.append(trial.number)
        return handles

    monkeypatch.setattr(study_mod, "_submit", submit_then_kill_once)
    cfg = _merge_search(opposite_finetunes, trained["calib"], n_trials=3, sampler="random")
    result = raymerge.optimize(cfg, tmp_path / "s", quiet=True)
    states = [t.state.name for t in result.study.trials]
    assert states[0] == "FAIL" and "Actor" in result.study.trials[0].user_attrs["error"], result.study.trials[0].user_attrs
    assert states[1:] == ["COMPLETE", "COMPLETE"]


def test_tied_embeddings_over_two_stages_equal_the_materialised_model(tmp_path, ray_session):
    """A merge search of tied-embedding models over two stages (embeddings on the first, the tied
    head on the last) scores exactly the model `raymerge merge` writes."""
    from transformers import AutoModelForCausalLM

    from raymerge.demo import build_tiny_model, demo_text

    over = {"tie_word_embeddings": True}
    base = build_tiny_model(tmp_path / "base", seed=0, config_overrides=over)
    fts = [build_tiny_model(tmp_path / f"ft{i}", seed=10 + i, base=base, delta_scale=0.5) for i in (1, 2)]
    (tmp_path / "heldout.txt").write_text(demo_text(6, 200, seed=5))
    cfg = {
        "merge": {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
                  "models": [{"model": str(fts[0]), "parameters": {"weight": {"choices": [0.3, 0.9]}}},
                             {"model": str(fts[1]), "parameters": {"weight": 0.5}}]},
        "evaluation": {"dataset": str(tmp_path / "heldout.txt"), "seqlen": 32, "eval_samples": 4},
        "study": {"n_trials": 2, "sampler": "grid"},
    }
    staged = raymerge.optimize(cfg, tmp_path / "s2", stages=2, quiet=True)
    single = raymerge.optimize(cfg, tmp_path / "s1", in_process=True, quiet=True, materialize=True)
    key = "merge.models.0.parameters.weight"
    a = {t.params[key]: t.values[0] for t in staged.study.trials}
    b = {t.params[key]: t.values[0] for t in single.study.trials}
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-6) for k in a)
    assert a[0.3] != pytest.approx(a[0.9], rel=1e-3)  # the weight matters: both stages got their tensors
    model = AutoModelForCausalLM.from_pretrained(str(single.materialized), dtype=torch.float32).eval()
    from raymerge.calibration import load_calibration
    from raymerge.config.calibration import CalibrationConfig
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(single.materialized))
    w = load_calibration(CalibrationConfig(dataset=str(tmp_path / "heldout.txt"), seqlen=32, eval_samples=4, nsamples=1), tok, 128).heldout
    with torch.no_grad():
        loss = model(input_ids=w, labels=w).loss.item()
    assert single.study.best_trial.values[0] == pytest.approx(math.exp(loss), rel=1e-4)


def _fake_lm_eval(monkeypatch, text: str, calls: list):
    """A stand-in for lm-evaluation-harness (its tasks need the Hub): `simple_evaluate` loads the
    model folder it is given with transformers, as lm-eval's `hf` model does, and scores it by
    minus its loss on `text`. It checks the written model, not the objective's arithmetic."""
    import importlib.machinery
    import sys
    import types

    from transformers import AutoModelForCausalLM, AutoTokenizer

    def simple_evaluate(model, model_args, tasks, num_fewshot=None, limit=None, batch_size=None, device=None, bootstrap_iters=None):
        assert model == "hf" and device in (None, "cpu") and bootstrap_iters in (None, 0)
        path = model_args["pretrained"]
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = AutoTokenizer.from_pretrained(path)(text, return_tensors="pt").input_ids[:, :96]
        with torch.no_grad():
            loss = float(m(ids, labels=ids).loss)
        calls.append((path, tasks, limit))
        return {"results": {t: {"acc,none": -loss * (1 + i)} for i, t in enumerate(tasks)}}

    fake = types.ModuleType("lm_eval")
    fake.__spec__ = importlib.machinery.ModuleSpec("lm_eval", None)
    fake.simple_evaluate = simple_evaluate
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    return simple_evaluate


def test_lm_eval_objective_scores_the_trial_model(opposite_finetunes, trained, tmp_path, monkeypatch):
    text = Path(trained["calib"]).read_text()
    calls: list = []
    evaluate = _fake_lm_eval(monkeypatch, text, calls)
    objective = {"kind": "lm_eval", "lm_eval": {"tasks": ["a", "b"], "limit": 5}}
    cfg = _merge_search(opposite_finetunes, trained["calib"], n_trials=2, sampler="random", objective=objective)
    result = raymerge.optimize(cfg, tmp_path / "s", in_process=True, quiet=True, materialize=True)
    assert result.completed == 2 and len(calls) == 2 and calls[0][1:] == (["a", "b"], 5)
    assert result.study.directions[0].name == "MAXIMIZE"
    assert not list((tmp_path / "s").glob("lm-eval-trial-*")), "trial models are deleted after scoring"
    # The best trial's value is the mean over tasks of lm-eval's metric on the written model,
    # which equals the materialised best model.
    again = evaluate("hf", {"pretrained": str(result.materialized)}, ["a", "b"])["results"]
    expected = (again["a"]["acc,none"] + again["b"]["acc,none"]) / 2
    assert result.study.best_trial.values[0] == pytest.approx(expected, rel=1e-5)
    assert result.study.best_trial.values[0] == max(t.values[0] for t in result.study.trials)


def test_lm_eval_objective_needs_tasks_and_the_library(tmp_path, monkeypatch):
    import sys

    from raymerge.config import ConfigError
    from raymerge.config.search_config import load_search_config

    base = {"merge": {"merge_method": "linear", "models": [{"model": "m", "parameters": {"weight": 1.0}}]},
            "evaluation": {"dataset": "x.txt"}}
    with pytest.raises(ConfigError, match="lm_eval needs its tasks"):
        load_search_config({**base, "objective": "lm_eval"})
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # find_spec: not importable
    with pytest.raises(ConfigError, match="pip install lm-eval"):
        load_search_config({**base, "objective": {"kind": "lm_eval", "lm_eval": {"tasks": ["arc_easy"]}}})


def _check_breakdown(result, trials: int) -> None:
    t = result.timings
    parts = [t.remerge, t.forward, t.optuna, t.compile, t.other]
    assert t.trials == trials and all(p >= 0 for p in parts), t
    assert sum(parts) <= t.total * (1 + 1e-9) and t.total > 0, t
    assert t.remerge > 0 and t.forward > 0, t  # the stages reported their calls
    assert "per trial" in result.summary() and "re-merge" in result.summary()


def test_trial_time_breakdown(opposite_finetunes, trained, tmp_path):
    """Each trial's time splits into re-merge, forward, Optuna, compile and transfer/other: none
    negative, together at most the trials' time; in process here, and on Ray with 2 stages x 2
    pipelines in `test_concurrent_trials_equal_sequential` (the stages' intervals come back with
    each trial)."""
    grid = {"choices": [0.5, 1.0, 1.5]}
    local = raymerge.optimize(_merge_search(opposite_finetunes, trained["calib"], 3, "grid", w_range=grid),
                              tmp_path / "local", in_process=True, quiet=True)
    _check_breakdown(local, 3)
    assert local.timings.compile > 0 and local.timings.optuna > 0
    prune = raymerge.optimize({
        "prune": {"model": str(trained["model"]), "method": "wanda", "sparsity": 0.5,
                  "calibration": {"dataset": str(trained["calib"]), "nsamples": 4, "seqlen": 64, "eval_samples": 2}},
        "space": {"max_deviation": 0.1, "owl": True, "exponents": True},
        "study": {"n_trials": 2, "sampler": "random", "seed": 0},
    }, tmp_path / "prune", in_process=True, quiet=True)
    _check_breakdown(prune, 2)


def test_trial_clock_parts_are_disjoint():
    """Overlapping intervals (parallel stages, a forward overlapping a re-merge) count once."""
    import time

    from raymerge.search.study import TrialTimes, _TrialClock

    clock = _TrialClock()
    time.sleep(0.05)
    s = clock.start
    clock.actors([[("remerge", s + 0.0, s + 0.02), ("forward", s + 0.01, s + 0.03)],
                  [("remerge", s + 0.005, s + 0.015), ("forward", s - 5.0, s + 1e6)]])  # clipped to the window
    times = TrialTimes()
    clock.add_to(times)
    assert times.trials == 1 and times.remerge == pytest.approx(0.02)
    assert times.forward == pytest.approx(times.total - 0.02) and times.other == pytest.approx(0.0, abs=1e-12)
    assert times.optuna == times.compile == 0.0


def test_trials_do_not_rebuild_the_vocabulary(opposite_finetunes, monkeypatch):
    """A search compiles every trial's merge config with one `MergeCompiler`: with a tokenizer
    choice the merged vocabulary is built once, not per trial (only the numbers change)."""
    import raymerge.runtime.vocabulary as vocabulary
    from raymerge.config.merge_config import parse_config
    from raymerge.runtime.compile import MergeCompiler

    built = []
    real = vocabulary.build_vocabulary
    monkeypatch.setattr(vocabulary, "build_vocabulary", lambda *a, **k: built.append(1) or real(*a, **k))
    with MergeCompiler() as compiler:
        for w in (0.5, 1.0, 1.5):
            cfg = {"merge_method": "linear", "tokenizer_source": "union", "dtype": "float32", "models": [
                {"model": str(opposite_finetunes["plus"]), "parameters": {"weight": w}},
                {"model": str(opposite_finetunes["minus"]), "parameters": {"weight": 1.0}}]}
            assert compiler.compile(parse_config(cfg, "trial"), "trial").program.operators
        cfg["tokenizer_source"] = "base"  # another choice: built again
        compiler.compile(parse_config(cfg, "trial"), "trial")
    assert len(built) == 2
