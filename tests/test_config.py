"""The mergekit YAML format: parsing, strictness (errors name the file and key), and parameter
resolution (precedence, filters, layer gradients)."""

from __future__ import annotations

import pytest
import yaml

from raymerge.config import ConfigError, load_config, parse_config
from raymerge.config.merge_config import ConditionalParameter
from raymerge.config.parameters import evaluate_setting, is_missing, resolve_parameter


def write(tmp_path, data, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_mergekit_slices_config_parses(tmp_path):
    path = write(tmp_path, """
slices:
  - sources:
      - model: org/a@rev1
        layer_range: [0, 8]
      - model: org/b
        layer_range: [0, 8]
merge_method: slerp
base_model: org/a@rev1
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
tokenizer_source: base
""")
    cfg, label = load_config(path)
    assert label == str(path)
    assert cfg.base_model.path == "org/a" and cfg.base_model.revision == "rev1"
    assert [str(m) for m in cfg.referenced_models()] == ["org/a@rev1", "org/b"]
    # round trip through YAML keeps the meaning
    again = parse_config(yaml.safe_load(cfg.to_yaml()), "<again>")
    assert again == cfg


@pytest.mark.parametrize(
    "data, pattern",
    [
        ({"merge_method": "ties", "models": [{"model": "a"}], "densty": 1}, r"densty: unknown key"),
        ({"merge_method": "ties", "models": [{"model": "a", "paramters": {}}]}, r"models.0.paramters: unknown key"),
        ({"merge_method": "ties"}, r"exactly one of 'models', 'slices'"),
        ({"merge_method": "ties", "models": [{"model": "a"}], "dtype": "fp8"}, r"dtype.*unknown dtype 'fp8'"),
        ({"merge_method": "ties", "models": [{"model": "a+lora+more"}]}, r"MODEL\[@REV\]\+LORA"),  # model+lora is read (LoRA)
        ({"merge_method": "x", "slices": [{"sources": [{"model": "a", "layer_range": [0, 4]}, {"model": "b", "layer_range": [0, 3]}]}]}, r"slices.0"),
        ({"models": [{"model": "a"}]}, r"merge_method"),
    ],
    ids=["top-key", "nested-key", "no-layout", "dtype", "lora", "slice-lengths", "no-method"],
)
def test_bad_configs_name_file_and_key(tmp_path, data, pattern):
    path = write(tmp_path, data, "my-merge.yaml")
    with pytest.raises(ConfigError, match=pattern) as err:
        load_config(path)
    assert "my-merge.yaml" in str(err.value)


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="invalid YAML in .*broken.yaml"):
        load_config(write(tmp_path, "merge_method: [unclosed", "broken.yaml"))
    with pytest.raises(ConfigError, match="merge config not found"):
        load_config(tmp_path / "nope.yaml")


def test_gradient_interpolates_like_mergekit():
    assert evaluate_setting([0.0, 1.0], "x", 0.25) == pytest.approx(0.25)
    assert evaluate_setting([0.0, 1.0, 0.0], "x", 0.75) == pytest.approx(0.5)
    assert evaluate_setting([0.2, 0.8], "x", 1.0) == pytest.approx(0.8)
    assert evaluate_setting(0.3, "x", 0.9) == 0.3
    assert evaluate_setting(["a", "b", "c"], "x", 0.6) == "b"  # non-numeric lists step


def test_filters_first_match_wins():
    setting = [
        ConditionalParameter(filter="self_attn", value=0.1),
        ConditionalParameter(filter="mlp", value=[0.0, 1.0]),
        ConditionalParameter(value=0.9),
    ]
    assert evaluate_setting(setting, "model.layers.3.self_attn.q_proj.weight", 0.5) == 0.1
    assert evaluate_setting(setting, "model.layers.3.mlp.up_proj.weight", 0.5) == pytest.approx(0.5)
    assert evaluate_setting(setting, "model.norm.weight", 0.0) == 0.9
    assert evaluate_setting(setting[:2], "model.norm.weight", 0.0) is None


def test_precedence_model_over_global():
    scopes = [{"density": 0.2}, None, {"density": 0.9, "weight": 1.5}]
    assert resolve_parameter("density", scopes, "t", 0.0) == 0.2
    assert resolve_parameter("weight", scopes, "t", 0.0) == 1.5
    assert is_missing(resolve_parameter("gamma", scopes, "t", 0.0))


def test_user_errors_share_one_base_and_stay_value_errors():
    from planners import PlanError, ProblemError
    from raymerge.calibration import CalibrationError
    from raymerge.checkpoints import CheckpointError, OutputError
    from raymerge.checkpoints.safetensors_format import HeaderError
    from raymerge.cli import _user_error_types
    from raymerge.errors import RaymergeError
    from raymerge.methods import MethodError
    from raymerge.pruning import PruningError
    from raymerge.runtime.compute import OperatorError
    from raymerge.runtime.operators import MergePlanError
    from raymerge.runtime.prune import PruneError
    from raymerge.search.space import SearchSpaceError

    import raymerge

    value_errors = (ConfigError, CheckpointError, HeaderError, OutputError, MethodError, MergePlanError,
                    CalibrationError, PruningError, PruneError, SearchSpaceError)
    for cls in (*value_errors, OperatorError):
        assert issubclass(cls, RaymergeError), cls
    for cls in value_errors:
        assert issubclass(cls, ValueError), cls
    assert raymerge.RaymergeError is RaymergeError
    assert _user_error_types() == (RaymergeError, PlanError, ProblemError)  # planners/ stays standalone
    assert not issubclass(PlanError, RaymergeError)


def test_one_line_condenses_multi_line_messages():
    from raymerge.errors import one_line

    assert one_line("just this") == "just this"
    assert one_line("invalid merge config a.yaml:\n  densty: unknown key") == "invalid merge config a.yaml: densty: unknown key"
    assert one_line("invalid merge config a.yaml:\n  x: bad\n  y: bad\n  z: bad") == \
        "invalid merge config a.yaml: x: bad (and 2 more problems)"
    assert one_line("a.yaml: x: bad\na.yaml: y: bad") == "a.yaml: x: bad (and 1 more problem)"


def test_cli_prints_a_config_error_on_one_line(tmp_path, capsys):
    from raymerge.cli import main

    path = write(tmp_path, {"merge_method": "ties", "models": [{"model": "a"}], "densty": 1, "dtype": "fp8"}, "my-merge.yaml")
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("raymerge: error: invalid merge config ") and "my-merge.yaml" in err, err
    assert "(and 1 more problem)" in err and "Traceback" not in err, err


def test_cli_prints_a_search_config_error_on_one_line(tmp_path, capsys):
    from raymerge.cli import main

    path = write(tmp_path, {
        "merge": {"merge_method": "ties", "base_model": "./base",
                  "models": [{"model": "./ft1", "parameters": {"weight": {"low": 1.0, "high": 0.0}, "density": 0.5}}]},
        "evaluation": {"dataset": "heldout.txt", "seqlen": 16, "eval_samples": 2},
        "study": {"n_trials": 2},
    }, "my-search.yaml")
    assert main(["search", str(path), str(tmp_path / "out"), "--in-process", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "my-search.yaml" in err and "weight" in err and "Traceback" not in err, err


def test_the_same_model_listed_twice_is_an_error(tmp_path):
    from raymerge.config import ConfigError, load_config

    cfg = tmp_path / "twice.yaml"
    cfg.write_text("merge_method: linear\nmodels:\n  - model: ./a\n    parameters: {weight: 0.3}\n"
                   "  - model: ./b\n    parameters: {weight: 0.3}\n  - model: ./a\n    parameters: {weight: 0.4}\n")
    with pytest.raises(ConfigError, match=r"(?s)twice.yaml.*models: ./a is listed twice"):
        load_config(cfg)
