"""The model folder is a boundary: no file outside it is read, echoed or published (index entries
with `../` or absolute paths, symlinks that leave the folder), while a Hugging Face cache snapshot,
whose files are symlinks into the repository's `blobs/`, still opens."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import raymerge
from raymerge.checkpoints import CheckpointError, open_source

SECRET = b"TOPSECRET-do-not-echo"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _sharded(llama_models, tmp_path: Path) -> Path:
    return _copy(llama_models["ft2"], tmp_path / "model")  # ft2 is saved sharded (index + shards)


def _rewrite_index(folder: Path, entry: str) -> None:
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = sorted(data["weight_map"])[0]
    data["weight_map"][first] = entry
    index.write_text(json.dumps(data))


def _merge_cli(tmp_path: Path, model: Path, base: Path) -> subprocess.CompletedProcess:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(base), "parameters": {"weight": 0.5}}, {"model": str(model), "parameters": {"weight": 0.5}}]}))
    return subprocess.run([sys.executable, "-m", "raymerge.cli", "merge", str(cfg), str(tmp_path / "out"), "--in-process", "--quiet"],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_index_entries_outside_the_folder_are_refused_unread(llama_models, tmp_path, kind):
    model = _sharded(llama_models, tmp_path)
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(SECRET)
    if kind == "dotdot":
        entry = "../secret.safetensors"
    elif kind == "absolute":
        entry = str(secret)
    else:
        (model / "link.safetensors").symlink_to(secret)
        entry = "link.safetensors"
    _rewrite_index(model, entry)
    with pytest.raises(CheckpointError, match="points outside the model folder|not a file name inside"):
        open_source(str(model))
    done = _merge_cli(tmp_path, model, llama_models["base"])
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused" in lines[0] and "Traceback" not in done.stderr
    assert SECRET.decode() not in done.stderr + done.stdout and "TOPSECRET" not in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_valid_model_elsewhere_named_by_the_index_is_not_merged(llama_models, tmp_path):
    """Before: an index entry naming any valid safetensors file elsewhere was merged and published."""
    model = _sharded(llama_models, tmp_path)
    elsewhere = _copy(llama_models["ft1"], tmp_path / "elsewhere")
    _rewrite_index(model, str(elsewhere / "model.safetensors"))
    with pytest.raises(CheckpointError, match="outside the model folder|not a file name inside"):
        raymerge.merge({"merge_method": "linear", "models": [
            {"model": str(llama_models["base"]), "parameters": {"weight": 0.5}},
            {"model": str(model), "parameters": {"weight": 0.5}}]}, tmp_path / "out", in_process=True, quiet=True)
    assert not (tmp_path / "out").exists()


def test_tokenizer_symlink_outside_is_refused_and_nothing_published(llama_models, tmp_path):
    base = _copy(llama_models["base"], tmp_path / "base")
    secret = tmp_path / "secret.json"
    secret.write_bytes(SECRET)
    (base / "vocab.json").symlink_to(secret)
    with pytest.raises(CheckpointError, match="'vocab.json' points outside the model folder"):
        raymerge.merge({"merge_method": "linear", "base_model": str(base), "models": [
            {"model": str(base), "parameters": {"weight": 0.5}},
            {"model": str(llama_models["ft1"]), "parameters": {"weight": 0.5}}]}, tmp_path / "out", in_process=True, quiet=True)
    assert not (tmp_path / "out").exists()


def test_hub_cache_snapshot_symlinks_into_blobs_open(llama_models, tmp_path):
    """huggingface_hub's cache layout: snapshots/<rev>/<file> -> ../../blobs/<hash>."""
    repo = tmp_path / "hub" / "models--org--name"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(p for p in Path(llama_models["ft2"]).iterdir() if p.is_file())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    source = open_source(str(snapshot))
    reference = open_source(str(llama_models["ft2"]))
    assert source.tensors().keys() == reference.tensors().keys()
    name = sorted(source.tensors())[0]
    assert source.read(name).equal(reference.read(name))
    assert source.read_bytes("tokenizer.json") == reference.read_bytes("tokenizer.json")


def test_deepspeed_latest_tag_outside_the_folder_is_refused(tmp_path):
    from raymerge.checkpoints.deepspeed import find_tag_folder

    root, elsewhere = tmp_path / "ckpt", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (elsewhere / "mp_rank_00_model_states.pt").write_bytes(SECRET)
    (root / "latest").write_text("../elsewhere")
    with pytest.raises(CheckpointError, match="tag named by latest '../elsewhere' points outside the model folder"):
        find_tag_folder(root)
    (root / "latest").unlink()
    (root / "latest").symlink_to(tmp_path / "secret.txt")
    (tmp_path / "secret.txt").write_bytes(SECRET)
    with pytest.raises(CheckpointError, match="tag file 'latest' points outside") as err:
        find_tag_folder(root)
    assert "TOPSECRET" not in str(err.value)


def test_s3_index_entries_must_stay_under_the_prefix():
    from raymerge.checkpoints.local import check_relative_name

    for bad in ("../other/model.safetensors", "/abs.safetensors", "a/../../b.safetensors", ""):
        with pytest.raises(CheckpointError, match="not a file name inside the model folder"):
            check_relative_name(bad, "s3://b/m/model.safetensors.index.json", "shard")
    assert check_relative_name("model-00001-of-00002.safetensors", "x", "shard") == "model-00001-of-00002.safetensors"


# -- secrets and private staging (S3) ---------------------------------------------------------------
def test_credentials_in_the_endpoint_never_reach_a_message():
    from raymerge.checkpoints.s3 import explain, scrub

    url = "http://AKIAUSER:s3cr3tpass@127.0.0.1:1"
    assert "s3cr3tpass" not in scrub(f"Invalid endpoint: {url}", url) and "AKIAUSER" not in scrub(url, url)
    assert "s3cr3tpass" not in explain(ValueError(f"bad {url}"), "s3://b/k", "b", url)


def test_s3_staging_is_private_to_the_user(tmp_path, monkeypatch):
    import os
    import stat

    from raymerge.checkpoints import OutputError
    from raymerge.checkpoints.s3 import STAGING_ENV, S3StagedOutput

    monkeypatch.setenv(STAGING_ENV, str(tmp_path))
    out = S3StagedOutput("s3://bucket/model")
    parent = out.staging.parent
    assert parent.name == f"raymerge-{os.getuid()}" and stat.S_IMODE(parent.stat().st_mode) == 0o700
    parent.chmod(0o777)  # e.g. planted by another user, or opened up
    with pytest.raises(OutputError, match="is not private"):
        S3StagedOutput("s3://bucket/model")
    parent.rmdir()
    parent.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    with pytest.raises(OutputError, match="is not private"):
        S3StagedOutput("s3://bucket/model")
