"""Shape-only checkpoints: every tensor a model *would* store, from its `config.json` alone.

`ShapeOnlySource` lets `raymerge plan` size a merge without the weights (a 70B plan on a
laptop): it builds the model class from the config on PyTorch's meta device (no memory is
allocated, a 70B model takes a few seconds) and lists the tensors exactly as `save_pretrained`
would write them:

- names: the model's `state_dict()` keys, minus `_keys_to_ignore_on_save`, minus tied aliases
  (no `lm_head.weight` when `tie_word_embeddings` is true) and with transformers' weight
  conversions reverted (e.g. fused MoE experts are stored per expert). These three steps are
  transformers' own functions, run on meta tensors, so the listing follows `save_pretrained`
  for every architecture transformers knows; with an older transformers that lacks them, tied
  aliases are dropped by parameter identity (the first name of each alias group is kept);
- class: the first entry of `architectures` when transformers has it, else the causal-LM class
  of `model_type` (custom `trust_remote_code` models are not supported: nothing is downloaded);
- dtypes: `save_pretrained` stores the model's dtype and records it in config.json as `dtype`
  (transformers >= 5) or `torch_dtype` (older); transformers reads either, and a config with
  neither is taken as float32 (what `from_config` builds by default, and so what it would save).

Nothing can be read: `read()` raises `CheckpointError` (a shape-only source can be planned,
never merged). `read_json("config.json")` and `read_bytes("config.json")` work; every other
file (tokenizer, generation config) is absent. `TensorInfo.file` is "" (there is no file).
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import torch

from raymerge.checkpoints.json_limits import loads_bounded
from raymerge.checkpoints.safetensors_format import dtype_code
from raymerge.checkpoints.source import CONFIG_FILE, CheckpointError, CheckpointSource, TensorInfo



def _saved_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The (meta) tensors `save_pretrained` would write for `model`, under their stored names."""
    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    try:
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict
    except ImportError:  # transformers < 5: no conversions; keep one name per shared parameter
        params = dict(model.named_parameters(remove_duplicate=False))
        seen: set[int] = set()
        out = {}
        for name, t in state.items():
            ident = id(params.get(name, t))
            if ident not in seen:
                seen.add(ident)
                out[name] = t
        return out
    state = remove_tied_weights_from_state_dict(state, model)
    return revert_weight_conversion(model, state)


@lru_cache(maxsize=8)
def _list_tensors(config_text: str) -> dict[str, TensorInfo]:
    """Build the model of a config.json on the meta device and list what it would save.

    Cached on the config text: a plan that names the same config several times (under different
    paths) builds it once. Raises ValueError; the caller names the file.
    """
    import transformers

    config = json.loads(config_text)
    if not (config.get("dtype") or config.get("torch_dtype")):
        config["dtype"] = "float32"  # not left to torch's default dtype, which callers may change
    model_type = config.get("model_type")
    if not model_type:
        raise ValueError("no model_type (a shape-only source needs a Hugging Face config.json)")
    try:
        config_cls = transformers.CONFIG_MAPPING[model_type]
    except KeyError:
        raise ValueError(
            f"model_type {model_type!r} is not known to transformers "
            f"{transformers.__version__}; shape-only planning needs an architecture transformers can build"
        ) from None
    archs = config.get("architectures") or []
    model_cls = getattr(transformers, archs[0], None) if archs else None
    try:
        cfg = config_cls.from_dict(config)
        with torch.device("meta"):
            if model_cls is not None:
                model = model_cls._from_config(cfg)
            else:
                model = transformers.AutoModelForCausalLM.from_config(cfg)
        state = _saved_state_dict(model)
    except Exception as err:  # noqa: BLE001 - model constructors raise anything on bad configs
        raise ValueError(
            f"cannot build the model from this config on the meta device ({type(err).__name__}: {err})"
        ) from None
    return {
        name: TensorInfo(name, tuple(t.shape), dtype_code(t.dtype), "", t.numel() * t.element_size())
        for name, t in state.items()
    }


class ShapeOnlySource(CheckpointSource):
    """The tensors (names, shapes, dtypes) a Hugging Face model would hold, from config.json alone.

    `path` is a directory holding `config.json`, or the `config.json` file itself.
    """

    def __init__(self, path: str | os.PathLike):
        given = Path(path)
        self.location = str(given)
        self.config_path = given / CONFIG_FILE if given.is_dir() else given
        if not self.config_path.is_file():
            raise CheckpointError(f"{self.config_path}: not found (a shape-only source needs a config.json)")
        try:
            self._config_bytes = self.config_path.read_bytes()
        except OSError as err:
            raise CheckpointError(f"{self.config_path}: unreadable config ({err})") from None
        self._config = loads_bounded(self._config_bytes, str(self.config_path), CheckpointError)
        if not isinstance(self._config, dict):
            raise CheckpointError(f"{self.config_path}: expected a JSON object")
        try:
            self._tensors = _list_tensors(self._config_bytes.decode())
        except ValueError as err:
            raise CheckpointError(f"{self.config_path}: {err}") from None

    # -- CheckpointSource ----------------------------------------------------------------------
    def tensors(self) -> dict[str, TensorInfo]:
        return dict(self._tensors)

    def read(self, name: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        raise CheckpointError(
            f"{self.location}: shape-only source (config.json without weights): tensor {name!r} "
            "has no data; it can be planned (`raymerge plan`) but not merged"
        )

    def read_json(self, filename: str) -> Optional[dict[str, Any]]:
        return json.loads(self._config_bytes) if filename == CONFIG_FILE else None

    def read_bytes(self, filename: str) -> Optional[bytes]:
        return self._config_bytes if filename == CONFIG_FILE else None

    def bytes_read(self) -> int:
        return 0
