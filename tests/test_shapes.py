"""Shape-only sources: a config.json alone lists exactly what `save_pretrained` would store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from raymerge.checkpoints import CheckpointError, SourceSpec, open_source
from raymerge.checkpoints.local import LocalSource
from raymerge.checkpoints.shapes import ShapeOnlySource
from raymerge.config import load_config

REPO = Path(__file__).resolve().parent.parent
SHAPES = REPO / "examples" / "shapes"

TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=256,
)


def _save_tiny(root: Path, model_type: str, *, dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """A tiny random model saved with `save_pretrained` (safetensors) under `root/weights`."""
    cfg = AutoConfig.for_model(model_type, **{**TINY, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    out = root / "weights"
    model.save_pretrained(out)
    assert any(out.glob("*.safetensors"))
    return out


def _config_only(weights: Path, root: Path) -> Path:
    """A directory holding only the config.json of `weights`."""
    out = root / "config-only"
    out.mkdir()
    shutil.copy(weights / "config.json", out / "config.json")
    return out


def _listing(source) -> dict[str, tuple]:
    return {n: (i.shape, i.dtype, i.nbytes) for n, i in source.tensors().items()}


@pytest.mark.parametrize(
    "model_type, overrides, dtype",
    [
        ("llama", {"tie_word_embeddings": False}, torch.bfloat16),
        ("llama", {"tie_word_embeddings": True}, torch.float32),
        ("qwen2", {"tie_word_embeddings": True}, torch.bfloat16),
        ("qwen2", {"tie_word_embeddings": False}, torch.float16),
        ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}, torch.bfloat16),  # experts stored per expert
    ],
    ids=["llama", "llama-tied", "qwen2-tied", "qwen2", "mixtral"],
)
def test_lists_what_save_pretrained_stores(tmp_path, model_type, overrides, dtype):
    weights = _save_tiny(tmp_path, model_type, dtype=dtype, **overrides)
    real = LocalSource(weights)
    shapes = ShapeOnlySource(_config_only(weights, tmp_path))
    assert _listing(shapes) == _listing(real)
    assert {i.dtype for i in shapes.tensors().values()} == {dtype}
    tied = overrides.get("tie_word_embeddings", False)
    assert ("lm_head.weight" in shapes.tensors()) is not tied
    if model_type == "mixtral":  # fused in memory by transformers 5, stored per expert
        assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in shapes.tensors()


def test_config_without_dtype_means_float32(tmp_path):
    weights = _save_tiny(tmp_path, "llama")  # float32
    only = _config_only(weights, tmp_path)
    cfg = json.loads((only / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        cfg.pop(key, None)
    (only / "config.json").write_text(json.dumps(cfg))
    assert _listing(ShapeOnlySource(only)) == _listing(LocalSource(weights))


def test_old_torch_dtype_key_is_read(tmp_path):
    weights = _save_tiny(tmp_path, "llama", dtype=torch.bfloat16)
    only = _config_only(weights, tmp_path)
    cfg = json.loads((only / "config.json").read_text())
    cfg["torch_dtype"] = cfg.pop("dtype", cfg.get("torch_dtype"))  # as transformers 4.x wrote it
    (only / "config.json").write_text(json.dumps(cfg))
    assert {i.dtype for i in ShapeOnlySource(only).tensors().values()} == {torch.bfloat16}


def test_cannot_read_only_plan(tmp_path):
    weights = _save_tiny(tmp_path, "llama")
    only = _config_only(weights, tmp_path)
    src = ShapeOnlySource(only)
    with pytest.raises(CheckpointError, match=r"shape-only source \(config\.json without weights\).*not merged"):
        src.read("model.embed_tokens.weight")
    with pytest.raises(CheckpointError, match="shape-only"):
        src.read("model.embed_tokens.weight", rows=(0, 2))
    assert src.read_json("config.json") == json.loads((only / "config.json").read_text())
    assert src.config()["model_type"] == "llama"
    assert src.read_json("tokenizer_config.json") is None
    assert src.read_bytes("tokenizer.json") is None
    assert src.bytes_read() == 0


def test_open_source_needs_shape_only_for_a_config_alone(tmp_path):
    weights = _save_tiny(tmp_path, "llama")
    only = _config_only(weights, tmp_path)
    with pytest.raises(CheckpointError, match="no weights found.*raymerge plan"):
        open_source(str(only))
    with pytest.raises(CheckpointError, match="no weights found"):
        SourceSpec(str(only)).open()
    assert isinstance(open_source(str(only), shape_only=True), ShapeOnlySource)
    assert isinstance(SourceSpec(str(only), shape_only=True).open(), ShapeOnlySource)
    # a path to the config.json itself, only when shape_only
    assert isinstance(open_source(str(only / "config.json"), shape_only=True), ShapeOnlySource)
    with pytest.raises(CheckpointError, match="not found"):
        open_source(str(only / "config.json"))
    # a directory with weights is read from its real headers either way
    assert isinstance(open_source(str(weights), shape_only=True), LocalSource)
    # an empty directory keeps today's error, without the hint
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no weights found") as err:
        open_source(str(tmp_path / "empty"), shape_only=True)
    assert "raymerge plan" not in str(err.value)


def test_unknown_model_type_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(CheckpointError, match=r"config\.json: model_type 'no-such-model' is not known"):
        open_source(str(tmp_path), shape_only=True)


def _llama_count(cfg: dict) -> tuple[int, int]:
    """Tensors and parameters of a Llama checkpoint, from the architecture's formula."""
    h, inter, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    head_dim = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    per_layer = (
        h * h + 2 * h * kv + h * h  # q, k, v, o projections
        + 3 * h * inter  # gate, up, down
        + 2 * h  # input and post-attention RMSNorm
    )
    heads = 1 if cfg["tie_word_embeddings"] else 2  # embed_tokens (+ lm_head)
    params = heads * vocab * h + h + layers * per_layer  # + the final norm
    tensors = heads + 1 + 9 * layers
    return tensors, params


@pytest.mark.parametrize("name", ["llama-3-70b", "llama-3-8b"])
def test_shipped_llama3_configs(name):
    src = open_source(str(SHAPES / name), shape_only=True)  # no memory: built on the meta device
    cfg = json.loads((SHAPES / name / "config.json").read_text())
    tensors, params = _llama_count(cfg)
    infos = src.tensors()
    assert len(infos) == tensors
    assert sum(i.numel for i in infos.values()) == params
    assert {i.dtype for i in infos.values()} == {torch.bfloat16}
    assert sum(i.nbytes for i in infos.values()) == 2 * params
    assert infos["model.layers.0.self_attn.k_proj.weight"].shape == (1024, cfg["hidden_size"])
    if name == "llama-3-70b":
        assert tensors == 723
        assert params == pytest.approx(70.55e9, rel=1e-3)


def test_plan_70b_example_opens_shape_only(monkeypatch):
    monkeypatch.chdir(REPO)  # its model paths are relative to the current directory
    cfg, _ = load_config("examples/plan_70b.yaml")
    refs = cfg.referenced_models()
    assert len(refs) == 4  # base + 3 models, spelled apart so they stay distinct inputs
    for ref in refs:
        src = open_source(ref.path, shape_only=True)
        assert isinstance(src, ShapeOnlySource) and len(src.tensors()) == 723
        with pytest.raises(CheckpointError, match="no weights found"):
            open_source(ref.path)
