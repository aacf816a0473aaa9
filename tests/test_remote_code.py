"""`--trust-remote-code` / `trust_remote_code=True` (issue 17): code a model ships is run only when asked.

The models here are the session's tiny llamas re-labelled as a model type transformers does not
know (`raymerge_custom`), whose config.json `auto_map` names a configuration and a modeling file
in the model folder (subclasses of transformers' llama classes; the modeling file imports the
configuration relatively, as Hub models do), and whose tokenizer is a custom class too. Nothing is
downloaded. Without the flag a prune and a guided merge are refused with a message naming it;
with it they run, and give exactly the bytes of the same job on the plain llama (same weights).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

import raymerge
from raymerge.checkpoints import CheckpointError
from raymerge.checkpoints.local import LocalSource
from raymerge.checkpoints.model_files import load_tokenizer
from raymerge.cli import main
from raymerge.demo import demo_text
from raymerge.errors import RaymergeError

CONFIGURATION = '''from transformers import LlamaConfig


class CustomConfig(LlamaConfig):
    model_type = "raymerge_custom"
'''

MODELING = '''from transformers import LlamaForCausalLM

from .configuration_custom import CustomConfig


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
'''

TOKENIZATION = '''from transformers import PreTrainedTokenizerFast


class CustomTokenizerFast(PreTrainedTokenizerFast):
    pass
'''


def _customise(plain: Path, folder: Path) -> Path:
    """A copy of the tiny model at `plain` that transformers can build only from its own code."""
    shutil.copytree(plain, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="raymerge_custom", architectures=["CustomForCausalLM"], auto_map={
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
    })
    (folder / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config.update(tokenizer_class="CustomTokenizerFast",
                      auto_map={"AutoTokenizer": [None, "tokenization_custom.CustomTokenizerFast"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    (folder / "configuration_custom.py").write_text(CONFIGURATION)
    (folder / "modeling_custom.py").write_text(MODELING)
    (folder / "tokenization_custom.py").write_text(TOKENIZATION)
    return folder


@pytest.fixture(scope="module")
def custom(llama_models, tmp_path_factory) -> dict[str, Path]:
    """base/ft1/ft2 of the llama family as custom-code models, and a calibration text."""
    root = tmp_path_factory.mktemp("remote-code")
    out = {name: _customise(llama_models[name], root / name) for name in ("base", "ft1", "ft2")}
    (root / "calib.txt").write_text(demo_text(8, 120, seed=5))
    out["calib"] = root / "calib.txt"
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def _prune_config(model: Path, calib: Path) -> dict:
    return {"model": str(model), "method": "wanda", "sparsity": 0.5, "batch_size": 2,
            "calibration": {"dataset": str(calib), "nsamples": 4, "seqlen": 24, "eval_samples": 2}}


def test_tokenizer_code_runs_only_when_trusted(custom):
    source = LocalSource(custom["base"])
    try:
        with pytest.raises(CheckpointError, match="--trust-remote-code"):
            load_tokenizer(source)
        assert type(load_tokenizer(source, trust_remote_code=True)).__name__ == "CustomTokenizerFast"
    finally:
        source.close()


def test_prune_needs_the_flag_and_then_equals_the_plain_model(custom, llama_models, tmp_path, capsys):
    cfg = tmp_path / "prune.yaml"
    cfg.write_text(yaml.safe_dump(_prune_config(custom["base"], custom["calib"])))
    assert main(["prune", str(cfg), str(tmp_path / "refused"), "--in-process", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--trust-remote-code" in err and "config.json" in err, err
    assert not (tmp_path / "refused").exists()

    assert main(["prune", str(cfg), str(tmp_path / "custom"), "--in-process", "--quiet", "--trust-remote-code"]) == 0
    plain = raymerge.prune(_prune_config(llama_models["base"], custom["calib"]), tmp_path / "plain",
                           in_process=True, quiet=True)
    assert _files(tmp_path / "custom") == _files(plain.output)


def _guided(models: dict[str, Path], calib: Path) -> dict:
    calibration = {"dataset": str(calib), "nsamples": 2, "seqlen": 16, "eval_samples": 0, "seed": 3}
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(models["base"]),
        "models": [{"model": str(models[m]), "parameters": {"weight": w}} for m, w in (("ft1", 0.6), ("ft2", 0.5))],
        "dtype": "float32",
        "raymerge": {"guidance": {"method": "acm", "calibration": calibration, "stages": 2}},
    }


def test_guided_merge_on_ray_stage_workers_needs_the_flag(custom, llama_models, ray_session, tmp_path):
    """The flag reaches the Ray stage actors of a guided merge's statistics pass (in their
    `PruneSettings`): the same coefficients and bytes as the plain llama family's merge."""
    with pytest.raises(RaymergeError, match="--trust-remote-code"):
        raymerge.merge(_guided(custom, custom["calib"]), tmp_path / "refused", in_process=True, quiet=True)
    assert not (tmp_path / "refused").exists()
    ours = raymerge.merge(_guided(custom, custom["calib"]), tmp_path / "custom", workers=2, quiet=True,
                          trust_remote_code=True)
    plain = raymerge.merge(_guided(llama_models, custom["calib"]), tmp_path / "plain", in_process=True, quiet=True)

    def by_name(coefficients: dict) -> dict:  # keyed by model path: the folders differ, the names do not
        return {Path(model).name: values for model, values in coefficients.items()}

    assert ours.guidance is not None and plain.guidance is not None and ours.guidance.coefficients
    assert by_name(ours.guidance.coefficients) == by_name(plain.guidance.coefficients)
    assert _files(tmp_path / "custom") == _files(tmp_path / "plain")


def _tokenizer_folder(plain: Path, folder: Path, module_source: str, entry: str, tokenizer_class: str) -> Path:
    """A copy of the model at `plain` whose tokenizer_config.json names `entry` in its
    auto_map (and `tokenizer_class`), with `tokenization_custom.py` holding `module_source`."""
    shutil.copytree(plain, folder)
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config.update(tokenizer_class=tokenizer_class, auto_map={"AutoTokenizer": [None, entry]})
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    (folder / "tokenization_custom.py").write_text(module_source)
    return folder


def test_code_is_neither_read_nor_run_without_the_flag(llama_models, tmp_path):
    """Without the flag no code file is read: a module with an import-time side effect does not
    run, and a tokenizer transformers knows by its class loads as it did before the flag existed
    (an auto_map naming another repository, or a missing file, does not matter then)."""
    marker = tmp_path / "ran"
    noisy = f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import PreTrainedTokenizerFast\n" \
            "class CustomTokenizerFast(PreTrainedTokenizerFast):\n    pass\n"
    known = _tokenizer_folder(llama_models["base"], tmp_path / "known", noisy, "tokenization_custom.CustomTokenizerFast",
                              "PreTrainedTokenizerFast")
    other_repo = _tokenizer_folder(llama_models["base"], tmp_path / "other", noisy, "org/repo--tokenization_x.X",
                                   "PreTrainedTokenizerFast")
    plain = LocalSource(llama_models["base"])
    try:
        expected = load_tokenizer(plain)
    finally:
        plain.close()
    for folder in (known, other_repo):
        source = LocalSource(folder)
        try:
            tokenizer = load_tokenizer(source)
        finally:
            source.close()
        assert type(tokenizer) is type(expected) and tokenizer.get_vocab() == expected.get_vocab()
    assert not marker.exists(), "a code file ran without --trust-remote-code"


@pytest.mark.parametrize("import_line", ["from .../../escaped import x", "from ./../escaped import x", "from .a.b import x"])
def test_a_code_file_importing_outside_the_folder_is_refused_unread(llama_models, tmp_path, import_line):
    """A shipped module whose relative import names a path (`.../../x`) or a submodule is refused
    with one line, with the flag too: nothing outside the model folder is read, nothing is
    written outside a temporary folder."""
    (tmp_path / "escaped.py").write_text("SECRET = 'do-not-read'\n")
    source_text = f"{import_line}\nfrom transformers import PreTrainedTokenizerFast\n" \
                  "class CustomTokenizerFast(PreTrainedTokenizerFast):\n    pass\n"
    folder = _tokenizer_folder(llama_models["base"], tmp_path / "model" / "tok", source_text,
                               "tokenization_custom.CustomTokenizerFast", "CustomTokenizerFast")
    before = sorted(p.name for p in tmp_path.iterdir())
    source = LocalSource(folder)
    try:
        with pytest.raises(CheckpointError, match="not a module next to config.json") as err:
            load_tokenizer(source, trust_remote_code=True)
    finally:
        source.close()
    assert "do-not-read" not in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
