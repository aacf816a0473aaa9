"""The catalogue of bad inputs (README, "Bad inputs"): one test per entry.

Each bad input must fail up front — before Ray starts or a worker computes (`no_work` makes
starting Ray an error) — with one message naming the file and the tensor, and publish nothing:
no output folder, no staging folder beside it. Corrupt variants are copies of the tiny llama
models (`conftest.llama_models`; ft2 is sharded) with bytes edited in place.

S3 entries (bucket missing, access denied) need the moto server of `test_s3.py` and are tested
there: `test_missing_bucket_key_and_bad_endpoint`, `test_access_denied`.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml

import raymerge
from raymerge.checkpoints import writer as writer_mod
from raymerge.checkpoints.writer import allocate_shards, plan_shards
from raymerge.cli import main as cli_main
from raymerge.runtime.operators import MergePlanError

BAD = "model.layers.1.mlp.up_proj.weight"


def linear(*paths: Path) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in paths]}


@pytest.fixture
def models(llama_models):
    """base, ft1 (one file), ft2 (sharded): the inputs of every bad merge here."""
    return llama_models


@pytest.fixture
def no_work(monkeypatch):
    """Starting Ray or a worker pool is a test failure: every check here must come first."""
    import raymerge.runtime.merge as merge_mod

    def forbidden(*_a, **_k):
        raise AssertionError("work started (Ray or workers) before the bad input was reported")

    monkeypatch.setattr(merge_mod, "ensure_ray", forbidden)
    monkeypatch.setattr(merge_mod, "_start_pool", forbidden)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def header(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return 8 + n, json.loads(data[8 : 8 + n])


def shard_of(model: Path, tensor: str) -> Path:
    index = model / "model.safetensors.index.json"
    if index.exists():
        return model / json.loads(index.read_text())["weight_map"][tensor]
    return model / "model.safetensors"


def tensor_range(file: Path, tensor: str) -> tuple[int, int]:
    start, h = header(file)
    begin, end = h[tensor]["data_offsets"]
    return start + begin, start + end


def rewrite_header(file: Path, edit) -> None:
    data = file.read_bytes()
    start, h = header(file)
    edit(h)
    text = json.dumps(h).encode()
    text += b" " * (-(8 + len(text)) % 8)
    file.write_bytes(struct.pack("<Q", len(text)) + text + data[start:])


def rewrite_tensors(model: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    f = model / "model.safetensors"
    state = load_file(str(f))
    edit(state)
    save_file(state, str(f), metadata={"format": "pt"})


def assert_nothing_published(out: Path) -> None:
    assert not out.exists(), f"{out} was published"
    assert not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir()), "staging folder left behind"


def fails(cfg: dict, out: Path, exc=Exception, **kw) -> str:
    """Run the merge, expect `exc`; return its message (one line) after checking nothing was published."""
    with pytest.raises(exc) as err:
        raymerge.merge(cfg, out, quiet=True, **kw)
    text = str(err.value)
    assert "\n" not in text
    assert_nothing_published(out)
    return text


# -- 1. unreadable or corrupt headers ------------------------------------------------------------


def _bad_json(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[8:20] = b"{not json!!!"
    f.write_bytes(bytes(data))


def _bad_length(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 10**12) + data[8:])


def _bad_offsets(f: Path) -> None:
    rewrite_header(f, lambda h: h[BAD].__setitem__("data_offsets", [0, 1000]))


def _bad_dtype(f: Path) -> None:
    rewrite_header(f, lambda h: h[BAD].__setitem__("dtype", "F8_E9M9"))


def _too_short(f: Path) -> None:
    f.write_bytes(b"abc")


@pytest.mark.parametrize(
    "corrupt, pattern",
    [
        (_bad_json, r"model.safetensors: corrupt safetensors header \(invalid JSON"),
        (_bad_length, r"model.safetensors: corrupt safetensors header \(declared header length 1000000000000 bytes\)"),
        (_bad_offsets, rf"model.safetensors: tensor '{BAD}' has offsets 0..1000 that do not match shape \[128, 64\] and dtype F32"),
        (_bad_dtype, rf"model.safetensors: tensor '{BAD}' has unsupported dtype 'F8_E9M9'"),
        (_too_short, r"model.safetensors: not a safetensors file \(shorter than 8 bytes\)"),
    ],
    ids=["invalid-json", "header-length", "offsets", "dtype", "too-short"],
)
def test_corrupt_header(models, tmp_path, no_work, corrupt, pattern):
    bad = copy_model(models["ft1"], tmp_path / "bad")
    corrupt(bad / "model.safetensors")
    text = fails(linear(models["base"], bad, models["ft2"]), tmp_path / "out", raymerge.CheckpointError)
    assert text.startswith(str(bad / "model.safetensors") + ":")
    assert re.search(pattern, text), text


# -- 2. truncated shard files ---------------------------------------------------------------------


@pytest.mark.parametrize("which", ["ft1", "ft2"], ids=["single-file", "shard-of-sharded"])
def test_truncated_file(models, tmp_path, no_work, which):
    bad = copy_model(models[which], tmp_path / "bad")
    f = shard_of(bad, BAD)
    begin, end = tensor_range(f, BAD)
    size = begin + 100  # cut inside BAD: it and every tensor after it are incomplete
    f.write_bytes(f.read_bytes()[:size])
    others = [m for k, m in models.items() if k in ("base", "ft1", "ft2") and k != which]
    text = fails(linear(*others, bad), tmp_path / "out", raymerge.CheckpointError)
    assert text.startswith(f"{f}: truncated file: tensor '{BAD}' ends at byte {end} but the file has {size} bytes ("), text


# -- 3. a tensor missing in one model -------------------------------------------------------------


def test_missing_tensor(models, tmp_path, no_work):
    bad = copy_model(models["ft1"], tmp_path / "bad")
    rewrite_tensors(bad, lambda s: s.pop(BAD))
    text = fails(linear(models["base"], bad), tmp_path / "out", MergePlanError)
    assert text == f"tensor '{BAD}' is missing in model {bad} (needed for output tensor '{BAD}')"


# -- 4. shape and dtype mismatches ----------------------------------------------------------------


def test_shape_mismatch(models, tmp_path, no_work):
    bad = copy_model(models["ft1"], tmp_path / "bad")
    rewrite_tensors(bad, lambda s: s.__setitem__(BAD, torch.zeros(64, 128)))
    text = fails(linear(models["base"], bad), tmp_path / "out", MergePlanError)
    assert text == (
        f"shape mismatch for tensor '{BAD}': {models['base']}/model.safetensors: [128, 64], "
        f"{bad}/model.safetensors: [64, 128]"
    )


def test_dtype_mismatch(models, tmp_path, no_work):
    bad = copy_model(models["ft1"], tmp_path / "bad")
    rewrite_tensors(bad, lambda s: s.__setitem__(BAD, torch.zeros(128, 64, dtype=torch.int32)))
    text = fails(linear(models["base"], bad), tmp_path / "out", MergePlanError)
    assert text.startswith(
        f"dtype mismatch for tensor '{BAD}': {models['base']}/model.safetensors: F32, {bad}/model.safetensors: I32 ("
    )


def test_float_precisions_are_not_a_mismatch(models, llama_bf16_models, tmp_path):
    """float32 and bfloat16 inputs are merged in a common dtype (mergekit does the same)."""
    from raymerge.checkpoints import SourceSpec
    from raymerge.config import load_config
    from raymerge.runtime.operators import build_program

    cfg, _ = load_config(linear(models["base"], llama_bf16_models["ft1"]))
    sources = {ref: SourceSpec(ref.path).open() for ref in cfg.referenced_models()}
    program = build_program(cfg, sources)
    assert {op.out_dtype for op in program.operators} == {"F32"}


# -- 5. vocabulary size mismatch ------------------------------------------------------------------


def test_vocab_size_mismatch(models, tmp_path, no_work):
    bad = copy_model(models["ft1"], tmp_path / "bad")

    def grow(state):
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            state[name] = torch.cat([state[name], torch.zeros(2, state[name].shape[1])])

    rewrite_tensors(bad, grow)
    cfg_json = json.loads((bad / "config.json").read_text())
    cfg_json["vocab_size"] += 2
    (bad / "config.json").write_text(json.dumps(cfg_json))
    text = fails(linear(models["base"], bad), tmp_path / "out", MergePlanError)
    assert text.startswith(
        f"vocabulary size mismatch for tensor 'model.embed_tokens.weight': {models['base']}/model.safetensors has "
        f"38 rows, {bad}/model.safetensors has 40 rows; models with different vocabularies cannot be merged"
    ), text
    assert "model.resize_token_embeddings(40)" in text and "tokenizer_source" in text


# -- 6. NaN / Inf in the inputs (opt-in scan) -----------------------------------------------------


def poison(model: Path, tensor: str, nan: int, inf: int) -> Path:
    """Write `nan` NaNs and `inf` Infs (float32) into `tensor`, in place."""
    f = shard_of(model, tensor)
    begin, _ = tensor_range(f, tensor)
    with open(f, "r+b") as fh:
        for k, value in enumerate([math.nan] * nan + [math.inf] * inf):
            fh.seek(begin + 4 * (1500 * k + 3))  # spread over several row chunks
            fh.write(struct.pack("<f", value))
    return f


@pytest.mark.parametrize("which", ["ft1", "ft2"], ids=["single-file", "shard-of-sharded"])
def test_nonfinite_scan(models, tmp_path, no_work, monkeypatch, which):
    from raymerge.runtime import scan

    monkeypatch.setattr(scan, "CHUNK_BYTES", 4096)  # several row chunks per tensor: counts add up across chunks
    bad = copy_model(models[which], tmp_path / "bad")
    f = poison(bad, BAD, nan=3, inf=2)
    others = [m for k, m in models.items() if k in ("base", "ft1", "ft2") and k != which]
    text = fails(linear(*others, bad), tmp_path / "out", raymerge.CheckpointError, scan_nonfinite=True)
    assert text.startswith(f"{f}: tensor '{BAD}' has 3 NaN and 2 Inf value(s) of 8192 (found by --scan-nonfinite)"), text


def test_nonfinite_scan_from_the_cli(models, tmp_path, no_work, capsys):
    bad = copy_model(models["ft1"], tmp_path / "bad")
    f = poison(bad, "lm_head.weight", nan=0, inf=1)
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(linear(models["base"], bad)))
    assert cli_main(["merge", str(cfg_path), str(tmp_path / "out"), "--scan-nonfinite", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{f}: tensor 'lm_head.weight' has 0 NaN and 1 Inf value(s)" in err and "Traceback" not in err
    assert_nothing_published(tmp_path / "out")


def test_nonfinite_scan_passes_clean_inputs(models, tmp_path):
    """Opt-in: clean inputs are scanned (every byte the merge reads) and the merge then runs."""
    from raymerge.runtime import scan

    scanned = []
    real = scan.scan_nonfinite

    def spy(*a, **k):
        scanned.append(real(*a, **k))
        return scanned[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scan, "scan_nonfinite", spy)
        result = raymerge.merge(linear(models["base"], models["ft2"]), tmp_path / "out", quiet=True, in_process=True,
                                scan_nonfinite=True)
    assert scanned == [result.bytes_read]
    assert (tmp_path / "out" / "model.safetensors").exists()


# -- 7. mixed architectures ----------------------------------------------------------------------


def test_mixed_architectures(models, tmp_path, no_work):
    bad = copy_model(models["ft1"], tmp_path / "bad")
    cfg_json = json.loads((bad / "config.json").read_text())
    cfg_json.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (bad / "config.json").write_text(json.dumps(cfg_json))
    text = fails(linear(models["base"], bad, models["ft2"]), tmp_path / "out", MergePlanError)
    assert text == (
        f"models have different architectures (LlamaForCausalLM: {models['base']}, {models['ft2']}; "
        f"MistralForCausalLM: {bad}); pass --allow-mixed-architectures to merge anyway"
    )


# -- 8. output path not writable ------------------------------------------------------------------


def test_output_under_a_file(models, tmp_path, no_work):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "out"
    with pytest.raises(raymerge.OutputError) as err:
        raymerge.merge(linear(models["base"], models["ft1"]), out, quiet=True)
    assert str(err.value) == f"cannot create output folder {tmp_path / 'afile'}: File exists"
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_folder_not_writable(models, tmp_path, no_work):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        text = fails(linear(models["base"], models["ft1"]), parent / "out", raymerge.OutputError)
    finally:
        parent.chmod(0o755)
    assert text == f"output folder {parent} is not writable"


# -- 9. disk space for the output ----------------------------------------------------------------


def test_not_enough_disk_space(models, tmp_path, no_work, monkeypatch):
    seen = []

    def tiny_disk(path):
        seen.append(Path(path))
        return 1000

    monkeypatch.setattr(writer_mod, "free_bytes", tiny_disk)
    text = fails(linear(models["base"], models["ft1"]), tmp_path / "out", raymerge.OutputError)
    staging = tmp_path / ".out.raymerge-staging"
    assert seen == [staging]
    assert re.fullmatch(
        rf"not enough disk space for the output: its 1 shard\(s\) and small files need 6\d\d\.\d\d kB "
        rf"in the staging folder {re.escape(str(staging))}, whose filesystem has 1\.00 kB free \(6\d\d\.\d\d kB missing\)",
        text,
    ), text


def test_free_bytes_of_a_folder_not_created_yet(tmp_path):
    assert writer_mod.free_bytes(tmp_path / "a" / "b") == shutil.disk_usage(tmp_path).free


def test_full_disk_at_allocation_is_the_second_line(tmp_path, monkeypatch):
    def enospc(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", enospc)
    with pytest.raises(raymerge.OutputError, match=r"not enough disk space for .*model.safetensors \(\d+ bytes\)"):
        allocate_shards(tmp_path, plan_shards([("w", "F32", (10, 10))]))
