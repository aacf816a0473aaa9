"""End to end merges through the public API and the CLI: loadable output, placement-independent
bytes (1 worker, several, a faked 2-node cluster), output files, and bad inputs that must fail
before anything is published."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import raymerge
from raymerge.cli import main as cli_main
from conftest import load_state


def ties_config(p: dict[str, Path], **extra) -> dict:
    cfg = {
        "merge_method": "ties",
        "base_model": str(p["base"]),
        "models": [
            {"model": str(p["ft1"]), "parameters": {"weight": 1.0, "density": [0.8, 0.4]}},
            {"model": str(p["ft2"]), "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": str(p["ft3"]), "parameters": {"weight": [{"filter": "mlp", "value": 0.3}, {"value": 0.9}], "density": 0.6}},
        ],
        "parameters": {"normalize": True},
    }
    cfg.update(extra)
    return cfg


def dare_config(p: dict[str, Path]) -> dict:
    return {
        "merge_method": "dare_ties",
        "base_model": str(p["base"]),
        "models": [{"model": str(p[k]), "parameters": {"weight": 0.5, "density": 0.6}} for k in ("ft1", "ft2", "ft3")],
    }


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file()}


def test_output_loads_and_runs_forward(ray_session, llama_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = raymerge.merge(ties_config(llama_models), tmp_path / "out", quiet=True, workers=2, keep_workers=True)
    assert result.tensors == len(load_state(llama_models["base"]))
    assert result.bytes_read > 0 and result.bytes_written > 0
    model = AutoModelForCausalLM.from_pretrained(result.output)
    tok = AutoTokenizer.from_pretrained(result.output)
    ids = tok("the model merges weights", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    files = set(result.files)
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "mergekit_config.yml"} <= files
    assert yaml.safe_load((result.output / "mergekit_config.yml").read_text())["merge_method"] == "ties"
    assert "ties" in (result.output / "README.md").read_text()
    assert "merged 39 tensors" in result.summary() and "GB/s" in result.summary()


def test_qwen2_output_loads(qwen2_models, tmp_path):
    from transformers import AutoModelForCausalLM

    result = raymerge.merge(ties_config(qwen2_models, dtype="bfloat16", out_dtype="float16"), tmp_path / "out", quiet=True,
                            in_process=True)
    config = json.loads((result.output / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float16"
    state = load_state(result.output)
    assert any(k.endswith("q_proj.bias") for k in state)
    assert all(t.dtype == torch.float16 for t in state.values())
    model = AutoModelForCausalLM.from_pretrained(result.output)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits.float()).all()


@pytest.mark.parametrize("make_config", [ties_config, dare_config], ids=["ties", "dare_ties"])
def test_bytes_identical_for_any_worker_count(ray_session, llama_models, tmp_path, make_config):
    """Per-model density lists and filtered weights, sharded output: one in-process worker and two
    Ray workers (kept for the next test; in process equals one Ray worker on 1M-element tensors:
    tests/test_determinism.py) publish the same bytes."""
    cfg = make_config(llama_models)
    one = raymerge.merge(cfg, tmp_path / "one", workers=1, quiet=True, random_seed=7, out_shard_size="300KB",
                         in_process=True)
    two = raymerge.merge(cfg, tmp_path / "two", workers=2, quiet=True, random_seed=7, out_shard_size="300KB",
                         keep_workers=True)
    assert one.workers == 1 and two.workers == 2
    a, b = file_bytes(one.output), file_bytes(two.output)
    assert len([n for n in a if n.endswith(".safetensors")]) > 1  # really sharded
    assert a == b


def test_random_seed_changes_random_methods_only(llama_models, tmp_path):
    cfg = dare_config(llama_models)
    s1 = load_state(raymerge.merge(cfg, tmp_path / "s1", quiet=True, random_seed=1, in_process=True).output)
    s2 = load_state(raymerge.merge(cfg, tmp_path / "s2", quiet=True, random_seed=2, in_process=True).output)
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(s1[name], s2[name])


def test_slices_frankenmerge_updates_config(llama_models, tmp_path):
    from transformers import AutoModelForCausalLM

    p = llama_models
    cfg = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(p["ft1"]), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(p["ft2"]), "layer_range": [1, 4]}]},
        ],
        "dtype": "float32",
    }
    result = raymerge.merge(cfg, tmp_path / "frank", quiet=True, in_process=True)
    config = json.loads((result.output / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    out = load_state(result.output)
    ft1, ft2 = load_state(p["ft1"]), load_state(p["ft2"])
    assert torch.equal(out["model.layers.2.self_attn.q_proj.weight"], ft1["model.layers.2.self_attn.q_proj.weight"])
    assert torch.equal(out["model.layers.3.self_attn.q_proj.weight"], ft2["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(out["model.layers.5.mlp.down_proj.weight"], ft2["model.layers.3.mlp.down_proj.weight"])
    assert torch.equal(out["model.embed_tokens.weight"], ft1["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], ft2["lm_head.weight"])
    model = AutoModelForCausalLM.from_pretrained(result.output)
    assert len(model.model.layers) == 6
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))


def test_tokenizer_source_named_model(llama_models, tmp_path):
    p = llama_models
    tok_dir = tmp_path / "tok"
    shutil.copytree(p["ft3"], tok_dir)
    cfg_json = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg_json["model_max_length"] = 1234
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg_json))
    result = raymerge.merge(ties_config(p, tokenizer_source=str(tok_dir)), tmp_path / "out", quiet=True, in_process=True)
    assert json.loads((result.output / "tokenizer_config.json").read_text())["model_max_length"] == 1234


def test_cli_merge_and_overwrite(ray_session, llama_models, tmp_path, capsys):
    cfg_path = tmp_path / "ties.yaml"
    cfg_path.write_text(yaml.safe_dump(ties_config(llama_models)))
    out = tmp_path / "out"
    result_json = tmp_path / "result.json"
    assert cli_main(["merge", str(cfg_path), str(out), "--quiet", "--workers", "2", "--result-json", str(result_json)]) == 0
    assert "merged 39 tensors" in capsys.readouterr().out
    first = file_bytes(out)
    written = json.loads(result_json.read_text())  # --result-json: what the summary says, as JSON
    assert written["tensors"] == 39 and written["workers"] == 2 and written["bytes_read"] > 0
    assert set(written["timings"]) >= {"plan", "ray", "workers", "merge", "publish"}
    assert 0 < written["plan"]["predicted_makespan"] and 0 < written["plan"]["measured_makespan"] <= written["seconds"]
    assert cli_main(["merge", str(cfg_path), str(out), "--quiet"]) == 2
    assert "already holds a model" in capsys.readouterr().err and "--overwrite" not in str(out)
    assert cli_main(["merge", str(cfg_path), str(out), "--quiet", "--overwrite"]) == 0
    assert file_bytes(out) == first


def test_cli_help_and_methods(capsys):
    with pytest.raises(SystemExit):
        cli_main(["merge", "--help"])
    assert "--out-shard-size" in capsys.readouterr().out
    assert cli_main(["methods"]) == 0
    text = capsys.readouterr().out
    for name in raymerge.available_methods():
        assert text.count(f"\n{name}  (") + text.startswith(f"{name}  (") == 1


# -- bad inputs: a clear error and nothing published ---------------------------------------------


def assert_nothing_published(out: Path) -> None:
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir()), "staging left behind"


def test_missing_model_path(ray_session, llama_models, tmp_path):
    cfg = ties_config(llama_models)
    cfg["models"][1]["model"] = str(tmp_path / "nowhere")
    with pytest.raises(raymerge.CheckpointError, match="nowhere"):
        raymerge.merge(cfg, tmp_path / "out", quiet=True)
    assert_nothing_published(tmp_path / "out")


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_single(model: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(model / "model.safetensors"))
    edit(state)
    save_file(state, str(model / "model.safetensors"), metadata={"format": "pt"})


def test_shape_mismatch(ray_session, llama_models, tmp_path):
    bad = _copy_model(llama_models["ft1"], tmp_path / "bad")
    _rewrite_single(bad, lambda s: s.__setitem__("model.layers.1.mlp.up_proj.weight", torch.zeros(3, 3)))
    cfg = ties_config(llama_models)
    cfg["models"][0]["model"] = str(bad)
    with pytest.raises(Exception, match=r"shape mismatch for tensor 'model.layers.1.mlp.up_proj.weight'") as err:
        raymerge.merge(cfg, tmp_path / "out", quiet=True)
    assert "bad" in str(err.value)
    assert_nothing_published(tmp_path / "out")


def test_missing_tensor(ray_session, llama_models, tmp_path):
    bad = _copy_model(llama_models["ft1"], tmp_path / "bad")
    _rewrite_single(bad, lambda s: s.pop("model.layers.2.self_attn.k_proj.weight"))
    cfg = ties_config(llama_models)
    cfg["models"][0]["model"] = str(bad)
    with pytest.raises(Exception, match=r"'model.layers.2.self_attn.k_proj.weight' is missing in model .*bad"):
        raymerge.merge(cfg, tmp_path / "out", quiet=True)
    assert_nothing_published(tmp_path / "out")


def test_corrupt_safetensors_header(ray_session, llama_models, tmp_path):
    bad = _copy_model(llama_models["ft1"], tmp_path / "bad")
    f = bad / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"{not json!!!"
    f.write_bytes(bytes(data))
    cfg = ties_config(llama_models)
    cfg["models"][0]["model"] = str(bad)
    with pytest.raises(raymerge.CheckpointError, match="model.safetensors"):
        raymerge.merge(cfg, tmp_path / "out", quiet=True)
    assert_nothing_published(tmp_path / "out")


def test_truncated_safetensors_file(ray_session, llama_models, tmp_path):
    bad = _copy_model(llama_models["ft1"], tmp_path / "bad")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    cfg = ties_config(llama_models)
    cfg["models"][0]["model"] = str(bad)
    with pytest.raises(raymerge.CheckpointError, match="model.safetensors"):
        raymerge.merge(cfg, tmp_path / "out", quiet=True)
    assert_nothing_published(tmp_path / "out")


def test_unknown_method_names_the_file(llama_models, tmp_path):
    cfg_path = tmp_path / "bad.yaml"
    cfg_path.write_text(yaml.safe_dump(ties_config(llama_models, merge_method="tiess")))
    with pytest.raises(raymerge.ConfigError, match=r"bad.yaml.*merge_method.*'tiess'.*ties"):
        raymerge.merge(cfg_path, tmp_path / "out", quiet=True)
    assert_nothing_published(tmp_path / "out")


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda c: c["models"][0]["parameters"].__setitem__("density", 1.5), r"density.*must be in \[0, 1\]"),
        (lambda c: c["models"][0]["parameters"].__setitem__("density", "lots"), r"density"),
        (lambda c: c["parameters"].__setitem__("normalize", "maybe"), r"normalize.*true or false"),
        (lambda c: c["parameters"].__setitem__("densty", 0.5), r"parameters.densty: unknown parameter"),
        (lambda c: c["models"][1]["parameters"].pop("weight"), r"missing required per-model parameter 'weight'"),
        (lambda c: c.__setitem__("dtype", "float8"), r"dtype.*unknown dtype"),
        (lambda c: c.__setitem__("base_modle", "x"), r"base_modle: unknown key"),
    ],
    ids=["density-range", "density-type", "normalize-type", "unknown-param", "missing-weight", "dtype", "unknown-key"],
)
def test_bad_parameter_values(llama_models, tmp_path, edit, pattern):
    cfg = ties_config(llama_models)
    edit(cfg)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(raymerge.ConfigError, match=pattern) as err:
        raymerge.merge(cfg_path, tmp_path / "out", quiet=True)
    assert "cfg.yaml" in str(err.value)
    assert_nothing_published(tmp_path / "out")


def test_existing_output_is_refused_without_overwrite(llama_models, tmp_path):
    out = _copy_model(llama_models["ft3"], tmp_path / "out")
    before = file_bytes(out)
    with pytest.raises(raymerge.OutputError, match="already holds a model"):
        raymerge.merge(ties_config(llama_models), out, quiet=True)
    assert file_bytes(out) == before


def test_failure_during_merge_publishes_nothing(ray_session, llama_models, tmp_path):
    # density +/- epsilon outside (0, 1) is only detected when DELLA runs on a worker.
    cfg = {
        "merge_method": "della",
        "base_model": str(llama_models["base"]),
        "models": [{"model": str(llama_models[k]), "parameters": {"weight": 1.0, "density": 0.1, "epsilon": 0.2}} for k in ("ft1", "ft2")],
    }
    with pytest.raises(Exception, match="epsilon"):
        raymerge.merge(cfg, tmp_path / "out", quiet=True)
    assert_nothing_published(tmp_path / "out")


def test_cli_reports_user_errors_without_traceback(tmp_path, capsys):
    assert cli_main(["merge", str(tmp_path / "missing.yaml"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "merge config not found" in err and "Traceback" not in err
