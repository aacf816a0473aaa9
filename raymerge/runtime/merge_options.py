"""The options of a merge (`MergeOptions`) and the compile options they imply.

What `raymerge merge`, `raymerge plan` and the Python API pass down to the merge job and to
offline planning (`runtime.offline_plan`); importable without torch or Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from raymerge.config import ConfigError
from raymerge.runtime.compile import CompileOptions


@dataclass(frozen=True)
class MergeOptions:
    workers: Optional[int] = None
    overwrite: bool = False
    random_seed: Optional[int] = None
    quiet: bool = False
    address: Optional[str] = None
    out_shard_size: Union[int, str, None] = None
    allow_pickle: bool = False
    allow_mixed_architectures: bool = False
    cluster: Union[str, Path, None] = None
    planner: str = "milp"
    plan_time_limit: float = 10.0
    keep_workers: bool = False
    s3_endpoint_url: Optional[str] = None  # S3-compatible store for s3:// inputs and output
    resume: Optional[bool] = None  # None: resume when the staging folder holds this job (runtime.recovery)
    scan_nonfinite: bool = False  # read every input tensor once, before any work, for NaN/Inf
    in_process: bool = False  # the workers as threads of this process, no Ray (ActorPool.in_process())
    copy_tokenizer: bool = True  # copy the tokenizer files (mergekit's --copy-tokenizer)
    write_model_card: bool = True  # README.md and mergekit_config.yml (mergekit's --write-model-card)
    lora_merge_dtype: Optional[str] = None  # dtype of `model+lora` inputs (mergekit's --lora-merge-dtype)
    trust_remote_code: bool = False  # run code a model ships (auto_map): tokenizers, guided statistics' stages


def compile_options(options: MergeOptions, *, shape_only: bool = False) -> CompileOptions:
    """The options of a merge that decide its program and how its inputs are opened."""
    return CompileOptions(random_seed=options.random_seed, allow_pickle=options.allow_pickle,
                          allow_mixed_architectures=options.allow_mixed_architectures,
                          s3_endpoint_url=options.s3_endpoint_url, shape_only=shape_only,
                          lora_merge_dtype=lora_dtype(options.lora_merge_dtype),
                          trust_remote_code=options.trust_remote_code)


def lora_dtype(name: Optional[str]) -> Optional[str]:
    """`--lora-merge-dtype`: a floating dtype name (`torch.` prefix allowed), or ConfigError."""
    if name is None:
        return None
    from raymerge.config.merge_config import DTYPE_NAMES

    bare = name.removeprefix("torch.")
    if bare not in DTYPE_NAMES:
        raise ConfigError(f"lora_merge_dtype: unknown dtype {name!r}; use one of {', '.join(DTYPE_NAMES)}")
    return bare
