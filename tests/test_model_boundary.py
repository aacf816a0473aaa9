"""The model folder is a boundary: no file outside it is read, echoed or published (index entries
with `../` or absolute paths, symlinks that leave the folder), while a Hugging Face cache snapshot,
whose files are symlinks into the repository's `blobs/`, still opens."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def _tiny_zero2(folder: Path) -> Path:
    """A one-rank ZeRO-2 checkpoint in DeepSpeed's file format (what `engine.save_checkpoint`
    writes, reduced to the keys read): `latest`, a tag folder with model and optimizer states,
    one trainable tensor `w` (2x3) = 0..5, and a config.json and vocab.json beside `latest`."""
    import torch

    tag = folder / "global_step1"
    tag.mkdir(parents=True)
    (folder / "latest").write_text("global_step1")
    torch.save({"param_shapes": [{"w": (2, 3)}], "dp_world_size": 1}, tag / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"zero_stage": 2, "partition_count": [1],
                                         "single_partition_of_fp32_groups": [torch.arange(6.0)]}},
               tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    (folder / "vocab.json").write_text("{}")
    return folder


def _refused_without_secret(open_or_read, entry: str) -> None:
    with pytest.raises(CheckpointError) as err:
        open_or_read()
    text = str(err.value)
    assert f"{entry!r} points outside the model folder; refused" in text and "\n" not in text, text
    assert "TOPSECRET" not in text


def test_deepspeed_side_files_outside_the_folder_are_refused_unread(tmp_path):
    """Before: `vocab.json -> /elsewhere` in a DeepSpeed checkpoint folder returned the outside
    bytes (side files were taken from the folder without the boundary check)."""
    import torch

    root = _tiny_zero2(tmp_path / "ckpt")
    src = open_source(str(root), allow_pickle=True)
    assert torch.equal(src.read("w"), torch.arange(6.0).view(2, 3)) and src.read_bytes("vocab.json") == b"{}"
    secret = tmp_path / "secret.json"
    secret.write_bytes(b'{"TOPSECRET": 1}')
    for name in ("vocab.json", "config.json"):
        (root / name).unlink()
        (root / name).symlink_to(secret)
        _refused_without_secret(lambda: open_source(str(root), allow_pickle=True).read_bytes(name), name)
    # a tag folder given directly takes side files from the folder holding `latest`: same rule
    _refused_without_secret(lambda: open_source(str(root / "global_step1"), allow_pickle=True).read_bytes("vocab.json"),
                            "vocab.json")
    # and from `config_from`, a Hugging Face folder of its own
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (hf / "tokenizer.json").symlink_to(secret)
    (root / "config.json").unlink()
    _refused_without_secret(lambda: open_source(str(root), allow_pickle=True, config_from=str(hf)).read_json("tokenizer.json"),
                            "tokenizer.json")


@pytest.mark.parametrize("link", ["state_file", "tag_folder"])
def test_deepspeed_state_files_outside_the_folder_are_refused(tmp_path, link):
    """State files are found by a glob in the tag folder: a state file that is a symlink to a file
    elsewhere, or a `global_step*` folder (found without `latest`) that is a symlink to another
    checkpoint, used to be loaded."""
    root = _tiny_zero2(tmp_path / "ckpt")
    elsewhere = _tiny_zero2(tmp_path / "elsewhere")
    optim = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    if link == "state_file":
        (root / "global_step1" / optim).unlink()
        (root / "global_step1" / optim).symlink_to(elsewhere / "global_step1" / optim)
        entry = f"global_step1/{optim}"
    else:
        shutil.rmtree(root / "global_step1")
        (root / "latest").unlink()
        (root / "global_step1").symlink_to(elsewhere / "global_step1", target_is_directory=True)
        entry = "global_step1/mp_rank_00_model_states.pt"
    _refused_without_secret(lambda: open_source(str(root), allow_pickle=True), entry)


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


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


CREDENTIAL_CASES = [("from_s3", "closed"), ("from_s3", "99999"), ("from_s3", "unclosed-ipv6"), ("to_s3", "closed"), ("to_s3", "abc")]


@pytest.fixture(scope="module")
def credential_runs(llama_models, tmp_path_factory) -> dict[tuple[str, str], Any]:
    """Each case's `raymerge merge` subprocess, all started at once (each is mostly one core's
    imports); a test waits for its own."""
    import os

    from conftest import Background

    env = dict(os.environ, AWS_MAX_ATTEMPTS="1", AWS_ACCESS_KEY_ID="AKIAENV", AWS_SECRET_ACCESS_KEY="envsecret",
               AWS_DEFAULT_REGION="us-east-1")
    runs = {}
    for direction, port in CREDENTIAL_CASES:
        folder = tmp_path_factory.mktemp(f"credentials-{direction}-{port}")
        host = "[::1" if port == "unclosed-ipv6" else "127.0.0.1"
        url = f"http://AKIAUSER:s3cr3tpass@{host}:{_closed_port() if port == 'closed' else port}"
        models = ["s3://bucket/a", "s3://bucket/b"] if direction == "from_s3" else [str(llama_models["base"]), str(llama_models["ft1"])]
        out = "s3://bucket/out" if direction == "to_s3" else str(folder / "out")
        cfg = folder / "cfg.yaml"
        cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 0.5}} for m in models]}))
        run = Background([sys.executable, "-m", "raymerge.cli", "merge", str(cfg), out, "--quiet", "--s3-endpoint-url", url],
                         folder, env=env, text=True)
        runs[(direction, port)] = (folder, run)
    yield runs
    for _, run in runs.values():
        run.kill()


@pytest.mark.parametrize(("direction", "port"), CREDENTIAL_CASES)
def test_cli_never_prints_credentials_of_the_endpoint(credential_runs, direction, port):
    """`raymerge merge ... --s3-endpoint-url http://KEY:SECRET@host:port` where nothing listens, or
    with a port botocore refuses: one line, exit 2, neither the key nor the secret anywhere."""
    folder, run = credential_runs[(direction, port)]
    done = run.result(timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("raymerge: error: ") and done.stdout == "", done.stderr
    for secret in ("s3cr3tpass", "AKIAUSER", "envsecret"):
        assert secret not in done.stderr + done.stdout, done.stderr
    assert not (folder / "out").exists()


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
