"""Checkpoint I/O: lazy sources that read tensors from headers and offsets, and the shard writer."""

from raymerge.checkpoints.resolve import SourceSpec, open_source
from raymerge.checkpoints.source import TOKENIZER_FILES, CheckpointError, CheckpointSource, TensorInfo
from raymerge.checkpoints.writer import (
    OutputError,
    OutputLayout,
    ShardFileWriter,
    StagedOutput,
    plan_shards,
)

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
