"""Compile once (`raymerge.runtime.compile`): a search trial is the model its best.yaml builds.

A `dare_ties` search with `raymerge: random_seed: 7` compiles each trial with the step
`raymerge merge` uses, so the operators (names, inputs, parameters, per-tensor seeds) and the
source specs of a trial equal those of `raymerge merge best.yaml`, the in-memory weights of the
best trial equal the written model's, and its objective value equals the value computed from
that model loaded with transformers. Search-config mistakes are config errors naming the file.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import raymerge

SEED = 7


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    from raymerge.demo import demo_text

    path = tmp_path_factory.mktemp("heldout") / "heldout.txt"
    path.write_text(demo_text(6, 200, seed=5))
    return path


def _dare_search(models: dict[str, Path], heldout: Path, n_trials: int = 2) -> dict:
    return {
        "merge": {
            "merge_method": "dare_ties",
            "base_model": str(models["base"]),
            "dtype": "float32",
            "models": [
                {"model": str(models["ft1"]), "parameters": {"weight": {"low": 0.3, "high": 1.0}, "density": {"low": 0.3, "high": 0.9}}},
                {"model": str(models["ft2"]), "parameters": {"weight": 0.5, "density": 0.5}},
            ],
            "raymerge": {"random_seed": SEED},
        },
        "evaluation": {"dataset": str(heldout), "seqlen": 32, "eval_samples": 4},
        "study": {"n_trials": n_trials, "sampler": "random", "seed": 0},
    }


def test_trial_operators_equal_the_merge_of_best_yaml(llama_models, heldout, tmp_path):
    """The operators and specs compiled for a trial are those `merge`, `plan` and merge-then-prune
    compile for the exported config: same names, inputs, parameters and per-tensor seeds."""
    from raymerge.config import load_config
    from raymerge.config.search_config import load_search_config
    from raymerge.runtime.compile import CompileOptions
    from raymerge.runtime.merge import MergeOptions, _prepare
    from raymerge.runtime.merged_source import merged_spec
    from raymerge.runtime.operators import tensor_seed
    from raymerge.search.study import _MergeTask

    cfg, _ = load_search_config(_dare_search(llama_models, heldout))
    task = _MergeTask(cfg, "search.yaml", CompileOptions())
    try:
        values = {d.name: d.high for d in task.space.dimensions}  # not the middle values it was built with
        trial_ops = task.operators(values)
        best = tmp_path / "best.yaml"
        best.write_text(yaml.safe_dump(task.space.fill(values), sort_keys=False))
        program, specs, _ = _prepare(*load_config(best), MergeOptions())
        assert task.models == program.models and task.specs == specs
        assert trial_ops == program.operators
        assert all(op.seed == tensor_seed(SEED, op.name) for op in trial_ops)  # the config's seed, not 0
        assert [(op.name, op.seed, op.inputs) for op in trial_ops] == [(op.name, op.seed, op.inputs) for op in program.operators]
        plan_program, _, _ = _prepare(*load_config(best), MergeOptions(), shape_only=True)  # plan / --plan-only
        assert plan_program.operators == program.operators
        pruned = merged_spec(yaml.safe_load(best.read_text()), "prune.yaml")  # merge-then-prune
        assert list(pruned.operators) == program.operators and list(pruned.specs) == specs
    finally:
        task.close()
    # The search's input options reach the specs its stage workers open.
    task = _MergeTask(cfg, "search.yaml", CompileOptions(allow_pickle=True, s3_endpoint_url="http://127.0.0.1:1"))
    try:
        assert all(s.allow_pickle and s.s3_endpoint_url == "http://127.0.0.1:1" for s in task.specs)
    finally:
        task.close()


def test_dare_ties_trial_value_equals_the_merged_model(llama_models, heldout, tmp_path, monkeypatch):
    """The best trial's in-memory weights and objective value are those of the model
    `raymerge.merge(best.yaml)` writes, loaded with transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raymerge.calibration import load_calibration
    from raymerge.config.calibration import CalibrationConfig
    from raymerge.pruning.report import perplexity
    from raymerge.search import study as study_mod

    states: list[dict[str, torch.Tensor]] = []
    original = study_mod._values

    def values_and_weights(p, *args):
        out = original(p, *args)
        names = p.driver.get(p.driver.workers[0].held_parameters())
        states.append(study_mod._gather(p, names))  # in-process: one pipeline, trials in order
        return out

    monkeypatch.setattr(study_mod, "_values", values_and_weights)
    cfg = _dare_search(llama_models, heldout)
    result = raymerge.optimize(cfg, tmp_path / "s", in_process=True, quiet=True)
    assert result.completed == 2 and len(states) == 2
    best = result.study.best_trial
    merged = raymerge.merge(result.best_configs[0], tmp_path / "merged", in_process=True, quiet=True)

    model = AutoModelForCausalLM.from_pretrained(str(merged.output), dtype=torch.float32).eval()
    written = dict(model.named_parameters())
    trial_state = states[best.number]
    assert trial_state.keys() == written.keys()
    for name, tensor in trial_state.items():
        assert torch.equal(tensor, written[name].detach()), name
    other = states[1 - best.number]
    assert any(not torch.equal(other[n], trial_state[n]) for n in trial_state)  # the trials differ

    # The objective as the search computes it (batches of `batch_size` windows, one window's
    # float32 logits at a time, float64 sums), from the written model: exactly equal.
    tok = AutoTokenizer.from_pretrained(str(merged.output))
    windows = load_calibration(CalibrationConfig(dataset=str(heldout), seqlen=32, eval_samples=4, nsamples=1), tok, 128).heldout
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in windows.split(8):
            logits = model(input_ids=batch, use_cache=False).logits.float()
            for lg, ids in zip(logits.split(1), batch.split(1)):
                total += float(torch.nn.functional.cross_entropy(lg[0, :-1], ids[0, 1:], reduction="sum").double())
            count += int(batch[:, 1:].numel())
    assert best.values[0] == perplexity(total, count)


def test_cli_search_config_mistake_names_the_file(llama_models, heldout, tmp_path):
    """A bad merge parameter inside a search config: exit 2, one line naming the search config
    file, no traceback (it used to name "<trial config>" in a TrialError traceback)."""
    cfg = _dare_search(llama_models, heldout)
    cfg["merge"]["models"][1]["parameters"] = {"weight": 0.5, "densty": 0.5}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    run = subprocess.run([sys.executable, "-m", "raymerge.cli", "search", str(bad), str(tmp_path / "out"), "--in-process", "--quiet"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.yaml" in lines[0] and "densty" in lines[0], run.stderr
    assert "Traceback" not in run.stderr and "<trial config>" not in run.stderr


def test_search_range_mistake_names_the_file(llama_models, heldout, tmp_path, capsys):
    from raymerge.cli import main

    cfg = _dare_search(llama_models, heldout)
    cfg["merge"]["models"][0]["parameters"]["weight"] = {"low": 1.0, "high": 0.5}
    bad = tmp_path / "bad-range.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    assert main(["search", str(bad), str(tmp_path / "out"), "--in-process", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad-range.yaml" in err[0] and "weight" in err[0], err
