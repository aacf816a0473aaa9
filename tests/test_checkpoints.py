"""Checkpoint I/O: lazy local sources (headers only, one tensor or a row range at a time),
opt-in pickles, header validation, the shard writer and atomic publish."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from raymerge.checkpoints import CheckpointError, OutputError, ShardFileWriter, StagedOutput, open_source, plan_shards
from raymerge.config.cluster import parse_size
from raymerge.checkpoints.local import LocalSource


@pytest.fixture
def sharded(tmp_path):
    """A two-shard checkpoint with an index, written by safetensors itself."""
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(6, 4, generator=g),
        "b.weight": torch.randn(5, generator=g).to(torch.bfloat16),
        "c.weight": torch.randn(3, 2, 2, generator=g).to(torch.float16),
        "d.buf": torch.arange(4, dtype=torch.int64),
    }
    save_file({k: tensors[k] for k in ("a.weight", "b.weight")}, str(tmp_path / "m-1.safetensors"))
    save_file({k: tensors[k] for k in ("c.weight", "d.buf")}, str(tmp_path / "m-2.safetensors"))
    weight_map = {"a.weight": "m-1.safetensors", "b.weight": "m-1.safetensors", "c.weight": "m-2.safetensors", "d.buf": "m-2.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return tmp_path, tensors


def test_lists_from_headers_and_reads_lazily(sharded):
    path, tensors = sharded
    src = open_source(str(path))
    infos = src.tensors()
    assert set(infos) == set(tensors)
    assert infos["c.weight"].shape == (3, 2, 2) and infos["c.weight"].dtype == torch.float16
    assert infos["c.weight"].file == "m-2.safetensors"
    assert src.bytes_read() == 0  # listing reads headers only
    for name, t in tensors.items():
        assert torch.equal(src.read(name), t)
    assert src.bytes_read() == sum(t.numel() * t.element_size() for t in tensors.values())
    assert src.config() == {"model_type": "llama"}
    src.close()


def test_dtype_codes_promote_as_torch_does_and_name_torchs_dtypes():
    """Planning works on safetensors codes without torch (`safetensors_format`): the working dtype
    it derives must be the one torch's promotion gives the tensors the workers read."""
    import itertools

    from raymerge.checkpoints.safetensors_format import (
        CODE_NAMES, ELEMENT_SIZES, dtype_code, element_size, promote_codes, torch_dtype,
    )

    for code in CODE_NAMES:
        dtype = torch_dtype(code)
        assert dtype_code(dtype) == code and torch_dtype(CODE_NAMES[code]) == dtype
        assert element_size(code) == ELEMENT_SIZES[code] == torch.empty((), dtype=dtype).element_size()
    for n in (2, 3):
        for codes in itertools.product(CODE_NAMES, repeat=n):
            want = torch_dtype(codes[0])
            for c in codes[1:]:
                want = torch.promote_types(want, torch_dtype(c))
            assert promote_codes(codes) == dtype_code(want), codes


def test_tensor_info_holds_a_dtype_code():
    from raymerge.checkpoints.source import TensorInfo

    info = TensorInfo("w", (2, 3), "BF16", "model.safetensors", 12)
    assert info.dtype == torch.bfloat16 and info.floating
    assert not TensorInfo("n", (1,), "I64", "model.safetensors", 8).floating
    with pytest.raises(TypeError, match="safetensors dtype code"):
        TensorInfo("w", (2, 3), torch.bfloat16, "model.safetensors", 12)


def test_row_range_reads_only_those_rows(sharded):
    path, tensors = sharded
    src = LocalSource(path)
    part = src.read("a.weight", rows=(2, 5))
    assert torch.equal(part, tensors["a.weight"][2:5])
    assert src.bytes_read() == 3 * 4 * 4
    with pytest.raises(CheckpointError, match="bad row range"):
        src.read("a.weight", rows=(4, 9))
    with pytest.raises(CheckpointError, match="no tensor 'zzz'"):
        src.read("zzz")


def test_index_pointing_to_missing_shard(sharded):
    path, _ = sharded
    (path / "m-2.safetensors").unlink()
    with pytest.raises(CheckpointError, match="m-2.safetensors.*missing"):
        LocalSource(path)


def test_header_validation(tmp_path):
    f = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(4, 4)}, str(f))
    good = f.read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8 : 8 + n])
    header["w"]["data_offsets"] = [0, 1000]
    text = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(text)) + text + good[8 + n :])
    with pytest.raises(CheckpointError, match="offsets 0..1000 that do not match"):
        LocalSource(tmp_path)
    f.write_bytes(struct.pack("<Q", 10**12) + good[8:])
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        LocalSource(tmp_path)
    f.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        LocalSource(tmp_path)


def test_pickles_need_opt_in(tmp_path):
    torch.save({"w": torch.arange(6.0).reshape(2, 3)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        open_source(str(tmp_path))
    src = open_source(str(tmp_path), allow_pickle=True)
    assert src.tensors()["w"].shape == (2, 3)
    assert torch.equal(src.read("w", rows=(1, 2)), torch.tensor([[3.0, 4.0, 5.0]]))


def test_pickles_load_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="cannot load"):
        open_source(str(tmp_path), allow_pickle=True).tensors()


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(CheckpointError, match="model path not found"):
        open_source(str(tmp_path / "absent"))
    with pytest.raises(CheckpointError, match="no weights found"):
        open_source(str(tmp_path))


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("5B") == 5 * 10**9  # mergekit's "billion", as its --out-shard-size 5B
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size(1234) == 1234
    for bad in ("lots", "-1GB", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_writer_round_trip_through_safetensors(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": torch.randn(8, 16, generator=g).to(dt) for i, dt in enumerate([torch.float32, torch.bfloat16, torch.float16] * 3)}
    tensors["ids"] = torch.arange(7, dtype=torch.int64)
    from raymerge.checkpoints.safetensors_format import dtype_code

    layout = plan_shards([(n, dtype_code(t.dtype), tuple(t.shape)) for n, t in tensors.items()], max_shard_bytes=1200)
    assert len(layout.shards) > 2
    assert all(s.size - len(s.header) <= 1200 for s in layout.shards)
    out = StagedOutput(tmp_path / "out")
    out.prepare(layout)
    writer = ShardFileWriter(out.staging)
    for name in reversed(list(tensors)):  # any order: offsets are fixed
        writer.write(*layout.entry(name), tensors[name])
    writer.close()
    out.write_file("model.safetensors.index.json", layout.index_json())
    assert not (tmp_path / "out").exists()  # nothing visible before publish
    published = out.publish()
    loaded = {}
    for f in published.glob("*.safetensors"):
        loaded.update(load_file(str(f)))
    assert loaded.keys() == tensors.keys()
    for n, t in tensors.items():
        assert torch.equal(loaded[n], t)
    index = json.loads((published / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)


def test_writer_rejects_wrong_size(tmp_path):
    layout = plan_shards([("w", "F32", (2, 2))])
    out = StagedOutput(tmp_path / "out")
    out.prepare(layout)
    with pytest.raises(ValueError, match="layout expects 16"):
        ShardFileWriter(out.staging).write(*layout.entry("w"), torch.zeros(3))
    out.abort()
    assert not out.staging.exists()


def test_existing_output_refused_then_replaced_atomically(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "config.json").write_text("{}")
    with pytest.raises(OutputError, match="already holds a model"):
        StagedOutput(target).check_target()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        StagedOutput(tmp_path / "file").check_target()
    staged = StagedOutput(target, overwrite=True)
    staged.prepare(plan_shards([("w", "F32", (1,))]))
    staged.write_file("config.json", '{"new": true}')
    staged.publish()
    assert json.loads((target / "config.json").read_text()) == {"new": True}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
