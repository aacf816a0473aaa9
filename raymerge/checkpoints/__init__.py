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
from raymerge.config.cluster import parse_size  # the one size parser (cluster memory, out_shard_size)

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
    "parse_size",
    "plan_shards",
]
