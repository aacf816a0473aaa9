"""The checkpoint source interface: list tensors from headers alone, read one tensor (or rows).

Every kind of input — a local Hugging Face directory, an S3 prefix, a DeepSpeed ZeRO folder —
is a `CheckpointSource`. The runtime never touches files directly: the driver lists tensors
(names, shapes, dtypes, where the bytes are) to plan the merge, and each worker opens the same
source and reads only the tensors of its own operators.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from raymerge.checkpoints.json_limits import loads_bounded
from raymerge.checkpoints.safetensors_format import ELEMENT_SIZES, FLOAT_CODES, torch_dtype
from raymerge.errors import CheckpointError  # noqa: F401 - exported from here, as before

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorInfo:
    """What the headers say about one tensor of a checkpoint."""

    name: str
    shape: tuple[int, ...]
    code: str  # the safetensors dtype code ("BF16"): planning needs no torch; `dtype` is torch's
    file: str  # the file holding it, relative to the checkpoint root
    nbytes: int

    def __post_init__(self) -> None:
        if self.code not in ELEMENT_SIZES:
            raise TypeError(f"TensorInfo {self.name!r}: code must be a safetensors dtype code, got {self.code!r}")

    @property
    def dtype(self) -> "torch.dtype":
        return torch_dtype(self.code)

    @property
    def floating(self) -> bool:
        return self.code in FLOAT_CODES

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


CONFIG_FILE = "config.json"  # the model's configuration (architecture, sizes), next to the weights

# Files copied from a donor model next to the weights (tokenizer and generation settings).
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


class CheckpointSource(abc.ABC):
    """A model checkpoint that tensors can be read from lazily."""

    #: where the checkpoint lives, for messages (a path or URL)
    location: str

    @abc.abstractmethod
    def tensors(self) -> dict[str, TensorInfo]:
        """All tensors, from headers alone (no weights are read)."""

    @abc.abstractmethod
    def read(self, name: str, rows: Optional[tuple[int, int]] = None) -> "torch.Tensor":
        """Read tensor `name`, or rows [start, stop) of its first dimension, into memory."""

    def read_json(self, filename: str) -> Optional[dict[str, Any]]:
        """A JSON file of the checkpoint (e.g. `config.json`), or None when absent."""
        data = self.read_bytes(filename)
        if data is None:
            return None
        where = self.file_label(filename)
        value = loads_bounded(data, where, CheckpointError)  # nesting bounded, UTF-8, one line
        if not isinstance(value, dict):
            raise CheckpointError(f"{where}: expected a JSON object at the top level, got {type(value).__name__}")
        return value

    def file_label(self, filename: str) -> str:
        """How messages name a side file of the checkpoint."""
        return f"{self.location}/{filename}"

    @abc.abstractmethod
    def read_bytes(self, filename: str) -> Optional[bytes]:
        """A small side file (tokenizer files), or None when absent."""

    def config(self) -> dict[str, Any]:
        cfg = self.read_json("config.json")
        if cfg is None:
            raise CheckpointError(f"{self.location}: no config.json")
        return cfg

    def architecture(self) -> str:
        """The model's architecture from config.json (`architectures`, else `model_type`); a
        CheckpointError naming the file when config.json is missing or these keys are odd."""
        cfg = self.config()
        where = self.file_label("config.json")
        archs = cfg.get("architectures")
        if archs is not None:
            if not isinstance(archs, list) or not archs or not all(isinstance(a, str) and a for a in archs):
                raise CheckpointError(f"{where}: 'architectures' must be a non-empty list of names, got {archs!r:.80}")
            return ",".join(archs)
        model_type = cfg.get("model_type")
        if model_type is not None and not isinstance(model_type, str):
            raise CheckpointError(f"{where}: 'model_type' must be a name, got {model_type!r:.80}")
        return model_type or "?"

    def close(self) -> None:
        """Release open files or connections."""

    def bytes_read(self) -> int:
        """Tensor bytes read so far through this source (for I/O accounting)."""
        return 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"


def row_span(shape: tuple[int, ...], rows: tuple[int, int], row_size: int, where: str, name: str) -> tuple[int, int, tuple[int, ...]]:
    """Offsets [start * row_size, stop * row_size) of rows [start, stop) of tensor `name` of
    `shape`, and the shape of those rows; CheckpointError naming `where` for a bad range."""
    start, stop = rows
    if not shape or not (0 <= start <= stop <= shape[0]):
        raise CheckpointError(f"{where}: bad row range {rows} for {name!r} {list(shape)}")
    return start * row_size, stop * row_size, (stop - start,) + tuple(shape[1:])
