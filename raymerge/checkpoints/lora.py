"""A model with a PEFT LoRA adapter applied, read as a checkpoint: mergekit's `model+lora`.

mergekit 0.1.5 merges a `MODEL+ADAPTER` reference by loading the whole model with transformers,
calling PEFT's `merge_and_unload()` and saving the result under `--lora-merge-cache` before the
merge starts. raymerge applies the adapter lazily instead: `LoraSource` lists the base model's
tensors and, when a worker reads a weight the adapter targets, returns

    W + scale * (B @ A)        (transposed for `fan_in_fan_out` layers and for embeddings)

computed for just that tensor (or row range) in float32, cast to the tensor's dtype and added in
it, as PEFT merges. `scale` is `lora_alpha / r` (`lora_alpha / sqrt(r)` with `use_rslora`), with
PEFT's per-module `rank_pattern` / `alpha_pattern`. Tensors saved whole in the adapter
(`modules_to_save`, e.g. a resized `lm_head`, and the `base_layer` copy PEFT saves of a
targeted embedding) replace the base's, before the update is added. With `lora_merge_dtype`
(`--lora-merge-dtype`), every floating-point tensor of the model is read in that dtype, as
mergekit loads the model in it. Nothing is written to disk and no model is built.

The adapter is a local folder or a Hub id (downloaded: `adapter_config.json`,
`adapter_model.safetensors`). Refused, with a message naming the adapter: other PEFT types than
LORA, DoRA (`use_dora`), LoRA biases, pickled adapters (`adapter_model.bin`), and a targeted
module that the model does not have.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional

import torch

from raymerge.checkpoints.json_limits import loads_bounded
from raymerge.checkpoints.local import inside, read_safetensors_header
from raymerge.checkpoints.safetensors_format import dtype_code
from raymerge.checkpoints.source import CheckpointError, CheckpointSource, TensorInfo

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
LORA_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _hub_adapter(path: str) -> bool:
    """Whether adapter `path` comes from the Hub (not a local folder); CheckpointError when it is neither."""
    if Path(path).expanduser().is_dir():
        return False
    from raymerge.checkpoints.hub_id import is_hub_reference

    if not is_hub_reference(path):
        raise CheckpointError(f"LoRA adapter not found: {path} (a local folder or a Hugging Face Hub id org/name)")
    return True


def pin_adapter(path: str, revision: Optional[str], endpoint: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """(revision, endpoint) that make every process read the same adapter files: for a Hub
    adapter, the commit sha `revision` (None: `main`) points to now, resolved once by the driver
    (`hub.pin_hub_reference`), and the endpoint; a local folder's as given."""
    if not _hub_adapter(path):
        return revision, endpoint
    from raymerge.checkpoints.hub import pin_hub_reference

    return pin_hub_reference(path, revision, endpoint, what="LoRA adapter")


def adapter_folder(path: str, revision: Optional[str], endpoint: Optional[str] = None) -> Path:
    """The local folder of adapter `path`: itself, or its Hub download at `revision` from
    `endpoint` (None: this process's HF_ENDPOINT)."""
    if not _hub_adapter(path):
        return Path(path).expanduser()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, revision=revision, endpoint=endpoint,
                                      allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS]))
    except Exception as err:  # noqa: BLE001 - hub errors come in many types
        raise CheckpointError(f"LoRA adapter not found: {path} is not a local folder, and fetching it from the "
                              f"Hugging Face Hub failed: {type(err).__name__}: {err}") from None


class _Pair:
    """One targeted module: its A and B tensors, scale, and how the product is laid out."""

    def __init__(self, a: str, b: str, scale: float, transpose: bool):
        self.a, self.b, self.scale, self.transpose = a, b, scale, transpose


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern: the first key that matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class LoraSource(CheckpointSource):
    """`base` with the LoRA adapter in folder `adapter` applied as tensors are read."""

    def __init__(self, base: CheckpointSource, adapter: Path, *, label: str, dtype: Optional[str] = None):
        self.base = base
        self.root = adapter
        self.location = f"{base.location}+{label}"
        self._dtype = LORA_DTYPES[dtype] if dtype else None
        self._bytes_read = 0
        cfg_path = adapter / ADAPTER_CONFIG
        if not cfg_path.is_file():
            raise CheckpointError(f"{adapter}: no {ADAPTER_CONFIG} (not a PEFT adapter folder)")
        cfg = loads_bounded(inside(adapter, ADAPTER_CONFIG, "adapter config").read_bytes(), str(cfg_path), CheckpointError)
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{cfg_path}: expected a JSON object")
        where = str(cfg_path)
        if cfg.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{where}: peft_type {cfg.get('peft_type')!r} is not supported (LoRA adapters only)")
        if cfg.get("use_dora"):
            raise CheckpointError(f"{where}: DoRA adapters (use_dora: true) are not supported; merge it with peft first")
        weights = adapter / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise CheckpointError(f"{adapter}: no {ADAPTER_WEIGHTS} (pickled adapter_model.bin files are not read)")
        self._weights = inside(adapter, ADAPTER_WEIGHTS, "adapter weights")
        header = read_safetensors_header(self._weights)
        base_infos = base.tensors()
        r_default, alpha_default = cfg.get("r", 8), cfg.get("lora_alpha", 8)
        rslora = bool(cfg.get("use_rslora"))
        fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
        self._pairs: dict[str, _Pair] = {}
        self._replaced: dict[str, str] = {}  # base tensor -> adapter tensor saved whole (modules_to_save)
        for key in header:
            if not key.startswith(_PREFIX):
                raise CheckpointError(f"{self._weights}: unexpected tensor {key!r} (PEFT adapters name them {_PREFIX}...)")
            name = key[len(_PREFIX):]
            if "lora_" in name and name.endswith(".bias"):
                raise CheckpointError(f"{self._weights}: LoRA biases ({key}) are not supported")
            if ".lora_B." in name or re.search(r"\.lora_embedding_B(\.[^.]+)?$", name):
                continue
            m = re.fullmatch(r"(.+)\.lora_A(?:\.[^.]+)?\.weight", name) or re.fullmatch(r"(.+)\.lora_embedding_A(?:\.[^.]+)?", name)
            if m is None:  # a whole tensor (modules_to_save)
                # `modules_to_save` copies, and the saved base weight of a targeted embedding
                target = re.sub(r"\.(?:modules_to_save(?:\.[^.]+)?|base_layer)\.(?=[^.]+$)", ".", name)
                if target not in base_infos:
                    raise CheckpointError(f"{self._weights}: {key!r} replaces {target!r}, which {base.location} does not have")
                self._replaced[target] = key
                continue
            module, embedding = m.group(1), "lora_embedding_A" in name
            b_key = key.replace("lora_embedding_A", "lora_embedding_B") if embedding else key.replace(".lora_A", ".lora_B")
            if b_key not in header:
                raise CheckpointError(f"{self._weights}: {key!r} has no {b_key!r}")
            target = f"{module}.weight"
            if target not in base_infos:
                raise CheckpointError(f"{self._weights}: the adapter targets {module!r}, but {base.location} has no tensor {target!r}")
            rank = _pattern_value(cfg.get("rank_pattern"), module, r_default)
            alpha = _pattern_value(cfg.get("alpha_pattern"), module, alpha_default)
            scale = alpha / math.sqrt(rank) if rslora else alpha / rank
            transpose = embedding or fan_in_fan_out  # the update is (B @ A)^T
            a_shape, b_shape = header[key].shape, header[b_key].shape
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                raise CheckpointError(f"{self._weights}: {module!r}: A {list(a_shape)} and B {list(b_shape)} do not multiply")
            got = (a_shape[1], b_shape[0]) if transpose else (b_shape[0], a_shape[1])
            expected = base_infos[target].shape
            if tuple(expected) != tuple(got):
                raise CheckpointError(f"{self._weights}: {module!r} update has shape {list(got)}, but {target!r} in "
                                      f"{base.location} is {list(expected)}")
            self._pairs[target] = _Pair(key, b_key, float(scale), transpose)
        self._header = header

    # -- CheckpointSource ----------------------------------------------------------------------
    def tensors(self) -> dict[str, TensorInfo]:
        out = {}
        for name, info in self.base.tensors().items():
            if name in self._replaced:
                e = self._header[self._replaced[name]]
                info = TensorInfo(name, tuple(e.shape), e.dtype, info.file, e.nbytes)
            if self._dtype is not None and info.dtype.is_floating_point and info.dtype != self._dtype:
                numel = math.prod(info.shape)
                info = TensorInfo(name, info.shape, dtype_code(self._dtype), info.file, numel * self._dtype.itemsize)
            out[name] = info
        return out

    def _adapter_tensor(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._weights), framework="pt") as f:
            t = f.get_tensor(key)
        self._bytes_read += t.numel() * t.element_size()
        return t

    def read(self, name: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        if name in self._replaced:
            t = self._adapter_tensor(self._replaced[name])
            t = t if rows is None else t[rows[0]:rows[1]].clone()
        else:
            t = self.base.read(name, rows)
        if self._dtype is not None and t.dtype.is_floating_point:
            t = t.to(self._dtype)
        pair = self._pairs.get(name)
        if pair is None:
            return t
        a = self._adapter_tensor(pair.a).float()
        b = self._adapter_tensor(pair.b).float()
        if pair.transpose:  # the update is (B @ A)^T: rows of it are rows of A^T times B^T
            a_t = a.t() if rows is None else a.t()[rows[0]:rows[1]]
            delta = a_t @ b.t()
        else:
            delta = (b if rows is None else b[rows[0]:rows[1]]) @ a
        return t + (delta * pair.scale).to(t.dtype)

    def read_bytes(self, filename: str) -> Optional[bytes]:
        return self.base.read_bytes(filename)

    def read_json(self, filename: str) -> Optional[dict[str, Any]]:
        return self.base.read_json(filename)

    def file_label(self, filename: str) -> str:
        return self.base.file_label(filename)

    def bytes_read(self) -> int:
        return self.base.bytes_read() + self._bytes_read

    def fingerprint_sources(self) -> list[CheckpointSource]:
        """The base model (for `runtime.recovery.input_fingerprint`; the adapter is `adapter_files`)."""
        return [self.base]

    def adapter_files(self) -> list[Path]:
        return [self.root / ADAPTER_CONFIG, self._weights]

    def close(self) -> None:
        self.base.close()
