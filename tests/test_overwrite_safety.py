"""`--overwrite` replaces only a model folder (one raymerge or transformers wrote, nothing else in
it): never the current directory, an input's folder, a folder holding an input or the config, or a
folder with other content; the refusal does not invite `--overwrite`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from raymerge.cli import main as cli_main


def _config(folder: Path, models: dict[str, Path]) -> Path:
    cfg = folder / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(models["ft1"]), "parameters": {"weight": 0.5}},
        {"model": str(models["ft3"]), "parameters": {"weight": 0.5}}]}))
    return cfg


def _merge(cfg: Path, out, *extra: str) -> int:
    return cli_main(["merge", str(cfg), str(out), "--in-process", "--quiet", *extra])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_never_replaces_the_current_directory(llama_models, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    cfg = _config(work, llama_models)
    (work / "notes.txt").write_text("my notes")
    before = _snapshot(work)
    monkeypatch.chdir(work)
    assert _merge(cfg, ".", "--overwrite") == 2
    err = capsys.readouterr().err
    assert "current directory" in err and len(err.strip().splitlines()) == 1
    assert _snapshot(work) == before


def test_overwrite_never_replaces_a_folder_holding_the_inputs(llama_models, tmp_path, capsys):
    models = tmp_path / "models"
    local = {k: shutil.copytree(llama_models[k], models / k) for k in ("ft1", "ft3")}
    cfg = _config(tmp_path, local)
    before = _snapshot(models)
    assert _merge(cfg, models, "--overwrite") == 2
    assert "is or holds an input of this job" in capsys.readouterr().err
    assert _merge(cfg, local["ft1"], "--overwrite") == 2  # an input's own folder
    assert _merge(cfg, tmp_path, "--overwrite") == 2  # the folder holding the config
    assert _snapshot(models) == before and (tmp_path / "cfg.yaml").is_file()


def test_overwrite_replaces_a_model_but_not_a_folder_with_other_content(llama_models, tmp_path, capsys):
    cfg = _config(tmp_path, llama_models)
    out = tmp_path / "out"
    assert _merge(cfg, out) == 0
    assert _merge(cfg, out) == 2
    assert "already holds a model; pass --overwrite" in capsys.readouterr().err
    assert _merge(cfg, out, "--overwrite") == 0  # our own output: replaced
    (out / "notes.txt").write_text("keep me")
    assert _merge(cfg, out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert "is not replaced by --overwrite: it holds 'notes.txt'" in err
    assert (out / "notes.txt").read_text() == "keep me"
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.csv").write_text("1,2")
    assert _merge(cfg, other) == 2
    err = capsys.readouterr().err
    assert "exists and is not empty; choose a new folder" in err and "--overwrite" not in err
    assert _merge(cfg, other, "--overwrite") == 2 and (other / "data.csv").read_text() == "1,2"
