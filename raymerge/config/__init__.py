"""Merge configuration: mergekit's YAML format as pydantic models, and parameter resolution."""

from raymerge.config.merge_config import (
    ConfigError,
    MergeConfig,
    ModelRef,
    OutputSlice,
    InputSlice,
    load_config,
    parse_config,
)
from raymerge.config.parameters import evaluate_setting
from raymerge.config.cluster import ClusterProfile, load_cluster, local_profile

__all__ = [
    "ConfigError",
    "MergeConfig",
    "ModelRef",
    "OutputSlice",
    "InputSlice",
    "load_config",
    "parse_config",
    "evaluate_setting",
    "ClusterProfile",
    "load_cluster",
    "local_profile",
]
