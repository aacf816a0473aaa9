"""Checkpoint I/O: lazy sources that read tensors from headers and offsets, and the shard writer.

The names below are imported from their modules on first use (PEP 562), not with the package:
`raymerge.checkpoints.hub_id` or `.output_name` (used before any work) then cost no torch or
DeepSpeed import, which `resolve` (through the DeepSpeed source) and `writer` would bring.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from raymerge.checkpoints.resolve import SourceSpec, open_source
    from raymerge.checkpoints.source import TOKENIZER_FILES, CheckpointError, CheckpointSource, TensorInfo
    from raymerge.checkpoints.writer import (
        OutputError,
        OutputLayout,
        ShardFileWriter,
        StagedOutput,
        plan_shards,
    )

_LAZY = {
    "SourceSpec": "resolve",
    "open_source": "resolve",
    "TOKENIZER_FILES": "source",
    "CheckpointError": "source",
    "CheckpointSource": "source",
    "TensorInfo": "source",
    "OutputError": "writer",
    "OutputLayout": "writer",
    "ShardFileWriter": "writer",
    "StagedOutput": "writer",
    "plan_shards": "writer",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CheckpointError",
    "CheckpointSource",
    "OutputError",
    "OutputLayout",
    "ShardFileWriter",
    "SourceSpec",
    "StagedOutput",
    "TOKENIZER_FILES",
    "TensorInfo",
    "open_source",
    "plan_shards",
]
