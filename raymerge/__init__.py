"""raymerge: merge and prune large language model checkpoints on a Ray cluster.

Public API::

    import raymerge
    result = raymerge.merge("ties.yaml", "out/merged", workers=4)
    print(result.summary())
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from raymerge.checkpoints import CheckpointError, OutputError
from raymerge.config import ConfigError, MergeConfig
from raymerge.methods import MethodError, available_methods
from raymerge.runtime.merge import MergeOptions, MergeResult

__all__ = [
    "CheckpointError",
    "ConfigError",
    "MergeConfig",
    "MergeResult",
    "MethodError",
    "OutputError",
    "available_methods",
    "merge",
]


def merge(
    config: Union[str, Path, dict[str, Any], MergeConfig],
    output: Union[str, Path],
    *,
    workers: Optional[int] = None,
    overwrite: bool = False,
    random_seed: Optional[int] = None,
    quiet: bool = False,
    address: Optional[str] = None,
    out_shard_size: Union[int, str, None] = None,
    allow_pickle: bool = False,
    allow_mixed_architectures: bool = False,
) -> MergeResult:
    """Merge the models described by a mergekit-format config and publish the result at `output`.

    Args:
        config: path to a YAML file, a dict in the same format, or a `MergeConfig`.
        output: directory to create; refused if it already holds a model unless `overwrite`.
        workers: number of worker actors (default: one per GPU, else one per CPU slot).
        overwrite: replace an existing output directory (only once the new one is complete).
        random_seed: seed of random methods (DARE, DELLA); with the tensor name it seeds each tensor.
        quiet: no progress bar.
        address: Ray cluster address (default: `RAY_ADDRESS`, else a local Ray).
        out_shard_size: largest output shard, e.g. "5GB" (the default) or a number of bytes.
        allow_pickle: accept `pytorch_model*.bin` inputs (loaded with `weights_only=True`).
        allow_mixed_architectures: merge models whose `config.json` architectures differ.

    Returns:
        A `MergeResult`: output path, tensor count, bytes read/written, timings, peak memory.

    Raises:
        ConfigError, CheckpointError, OutputError, MergePlanError: before anything is written.
    """
    from raymerge.runtime.merge import run_merge

    options = MergeOptions(
        workers=workers,
        overwrite=overwrite,
        random_seed=random_seed,
        quiet=quiet,
        address=address,
        out_shard_size=out_shard_size,
        allow_pickle=allow_pickle,
        allow_mixed_architectures=allow_mixed_architectures,
    )
    return run_merge(config, output, options)
