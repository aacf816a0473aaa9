"""raymerge: merge and prune large language model checkpoints on a Ray cluster.

Public API::

    import raymerge
    result = raymerge.merge("ties.yaml", "out/merged", workers=4)
    print(result.summary())
    pruned = raymerge.prune("wanda.yaml", "out/pruned")
    print(pruned.report.table())
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from raymerge.progress import quiet_third_party

quiet_third_party()  # before anything imports deepspeed (raymerge.progress; `-v` shows it all)

from raymerge.errors import ConfigError, RaymergeError  # noqa: E402  (imports nothing: cheap)

if TYPE_CHECKING:  # imported on first use (`__getattr__` below), not with the package
    from raymerge.checkpoints.source import CheckpointError
    from raymerge.checkpoints.writer import OutputError
    from raymerge.config.merge_config import MergeConfig
    from raymerge.methods import MethodError, available_methods
    from raymerge.runtime.merge import MergeResult
    from raymerge.runtime.merge_options import MergeOptions
    from raymerge.runtime.offline_plan import PlanReport

# Importing the package stays cheap (no torch, Ray, DeepSpeed or transformers): `raymerge --help`
# and errors in a config return at once (issue 18). The names below are the public API all the
# same; each is imported from its module the first time it is used (PEP 562).
_LAZY = {
    "CheckpointError": "raymerge.checkpoints.source",
    "OutputError": "raymerge.checkpoints.writer",
    "MergeConfig": "raymerge.config.merge_config",
    "MethodError": "raymerge.methods",
    "available_methods": "raymerge.methods",  # the specs (torch-free), registered on first use
    "MergeOptions": "raymerge.runtime.merge_options",
    "MergeResult": "raymerge.runtime.merge",
    "PlanReport": "raymerge.runtime.offline_plan",
}


def __getattr__(name: str) -> Any:
    """The lazily imported public names, and the subpackages (`raymerge.checkpoints`, ...), which
    `import raymerge` used to import as a side effect: `raymerge.runtime.merge` still works."""
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CheckpointError",
    "ConfigError",
    "MergeConfig",
    "MergeResult",
    "MethodError",
    "OutputError",
    "available_methods",
    "merge",
    "plan",
    "PlanReport",
    "RaymergeError",
    "prune",
    "optimize",
    "shutdown_workers",
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
    cluster: Union[str, Path, None] = None,
    planner: str = "milp",
    plan_time_limit: float = 10.0,
    keep_workers: bool = False,
    s3_endpoint_url: Optional[str] = None,
    scan_nonfinite: bool = False,
    resume: Optional[bool] = None,
    in_process: bool = False,
    copy_tokenizer: bool = True,
    write_model_card: bool = True,
    lora_merge_dtype: Optional[str] = None,
    trust_remote_code: bool = False,
) -> MergeResult:
    """Merge the models described by a mergekit-format config and publish the result at `output`.

    Args:
        config: path to a YAML file, a dict in the same format, or a `MergeConfig`.
        output: directory to create, or `s3://bucket/prefix` (shards are uploaded by the workers,
            `config.json` last); refused if it already holds a model unless `overwrite`.
        workers: number of workers: Ray actors, or threads in process (default: one per GPU, else one per CPU slot).
        overwrite: replace an existing output directory (only once the new one is complete).
        random_seed: seed of random methods (DARE, DELLA); with the tensor name it seeds each tensor.
        quiet: no progress bar.
        address: Ray cluster address (default: `RAY_ADDRESS`, else in process on a machine
            without a GPU (see `in_process`), else a local Ray); "local": a local Ray of its own.
        out_shard_size: largest output shard, e.g. "5GB" (the default), "2GiB", mergekit's "5B"
            (5 billion bytes) or a number of bytes.
        allow_pickle: accept `pytorch_model*.bin` inputs (loaded with `weights_only=True`).
        allow_mixed_architectures: merge models whose `config.json` architectures differ.
        cluster: a `clusters/` profile whose bandwidths (and address) the planner uses.
        planner: "milp" (default: PuLP/HiGHS, never worse than the greedy) or "lpt" (greedy).
        plan_time_limit: seconds the MILP may take.
        keep_workers: keep the worker actors for the next merge of this process (saves the
            worker start, about a second per worker process; `shutdown_workers()` ends them).
        s3_endpoint_url: endpoint of an S3-compatible store for `s3://` models and output
            (default: AWS, or `AWS_ENDPOINT_URL`); credentials come from boto3's default chain.
        scan_nonfinite: before any work, read every input tensor the merge uses once and fail
            on the first one holding NaN or Inf (costs a full read of the inputs).
        resume: reuse the finished shards of an interrupted run of this merge, kept in the
            staging folder beside `output` (each checked against its recorded sha256). None
            (default): automatically when that folder was made by this very merge (same config,
            inputs, raymerge version and shard size), else it is discarded; True: the same, but
            a folder from a different merge is an `OutputError` instead of being discarded;
            False: always start afresh. The output is byte-identical either way.
        in_process: run the workers as threads of this process (`workers`, default one per CPU
            core), without starting Ray or any actor (the same worker code and plan; the bytes
            equal a Ray merge's). The default on a machine without a GPU when nothing names a
            cluster (no `address`, `RAY_ADDRESS`, `cluster`, `keep_workers` or Ray session of this
            process). Refused with `address`.
        copy_tokenizer: copy the tokenizer (and generation) files of the donor or of
            `tokenizer_source` to the output (mergekit's `--copy-tokenizer`, default True).
        write_model_card: write `README.md` (a model card) and `mergekit_config.yml` (mergekit's
            `--write-model-card`, default True).
        lora_merge_dtype: the dtype in which models given with a LoRA adapter (`model+adapter`)
            are read, the adapter applied (mergekit's `--lora-merge-dtype`; default: as stored).
        trust_remote_code: run the Python code a model ships (the classes its `config.json` or
            `tokenizer_config.json` `auto_map` names), as transformers' `trust_remote_code`: for
            the tokenizers of a `tokenizer_source` / `tokenizer:` merge and for a guided merge's
            statistics pass, which builds the model's layers (default False: such a model is
            refused there, naming this option). A plain merge never runs model code.

    Returns:
        A `MergeResult`: output path, tensor count, bytes read/written, timings, peak memory,
        `plan`: the planner's predicted makespan next to the measured one, and what a resume
        reused (`reused_shards`) and how many worker actors were replaced (`worker_restarts`).

    Raises:
        ConfigError, CheckpointError, OutputError, MergePlanError: before anything is written.
    """
    from raymerge.runtime.merge import MergeOptions, run_merge

    options = MergeOptions(
        workers=workers,
        overwrite=overwrite,
        random_seed=random_seed,
        quiet=quiet,
        address=address,
        out_shard_size=out_shard_size,
        allow_pickle=allow_pickle,
        allow_mixed_architectures=allow_mixed_architectures,
        cluster=cluster,
        planner=planner,
        plan_time_limit=plan_time_limit,
        keep_workers=keep_workers,
        s3_endpoint_url=s3_endpoint_url,
        scan_nonfinite=scan_nonfinite,
        resume=resume,
        in_process=in_process,
        copy_tokenizer=copy_tokenizer,
        write_model_card=write_model_card,
        lora_merge_dtype=lora_merge_dtype,
        trust_remote_code=trust_remote_code,
    )
    return run_merge(config, output, options)


def plan(
    config: Union[str, Path, dict[str, Any], MergeConfig],
    *,
    cluster: Union[str, Path, None] = None,
    workers: Optional[int] = None,
    planner: str = "milp",
    time_limit: float = 10.0,
    allow_pickle: bool = False,
    allow_mixed_architectures: bool = False,
    s3_endpoint_url: Optional[str] = None,
) -> PlanReport:
    """Plan a merge without running it: from safetensors headers, or from `config.json` alone
    for models given as folders without weights (shape-only), so large merges can be planned
    anywhere. `cluster`: a `clusters/` profile (default: this machine, `workers` CPU slots or
    GPUs). Returns a `PlanReport` (`.summary()`, `.plan`, `.problem`)."""
    from raymerge.runtime.merge_options import MergeOptions
    from raymerge.runtime.offline_plan import plan_only  # no torch for safetensors inputs

    options = MergeOptions(
        workers=workers, cluster=cluster, planner=planner, plan_time_limit=time_limit,
        allow_pickle=allow_pickle, allow_mixed_architectures=allow_mixed_architectures,
        s3_endpoint_url=s3_endpoint_url,
    )
    return plan_only(config, options)


def shutdown_workers() -> None:
    """End the worker actors kept by `merge(..., keep_workers=True)`."""
    from raymerge.runtime.actor_pool import shutdown_kept

    shutdown_kept()


def prune(
    config: Union[str, Path, dict[str, Any]],
    output: Union[str, Path],
    *,
    stages: Optional[int] = None,
    in_process: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    address: Optional[str] = None,
    plot: Union[str, Path, None] = None,
    s3_endpoint_url: Optional[str] = None,
    allow_pickle: bool = False,
    workers: Optional[int] = None,
    trust_remote_code: bool = False,
    keep_workers: bool = False,
):
    """Prune the model of a prune config (see `raymerge.config.prune_config`) and publish it.

    Args:
        config: path to a YAML file, or a dict in the same format.
        output: directory to create, or `s3://bucket/prefix` (staged locally, uploaded by the
            workers, `config.json` last: as `merge`); refused if it already holds a model unless
            `overwrite`.
        stages: layer-stage workers the decoder layers are spread over, each holding a contiguous
            block (default: one per GPU, else one per CPU slot; never more than the layers). The
            same word as `optimize(stages=)` and `--stages` of `raymerge prune` and `search`.
        workers: the old name of `stages` (still accepted).
        in_process: run everything in this process, one stage, no Ray.
        overwrite: replace an existing output directory (only once the new one is complete).
        quiet: no progress bars.
        address: Ray cluster address (default: `RAY_ADDRESS`, else a local Ray).
        plot: write a per-layer sparsity chart (PNG) here.
        s3_endpoint_url: endpoint of an S3-compatible store for an `s3://` model and output.
        allow_pickle: accept `pytorch_model*.bin` and DeepSpeed ZeRO inputs (torch pickles). Only
            here or on the command line: a config file cannot opt in.
        trust_remote_code: build the model (on every stage worker) and its tokenizer from the
            Python code the model ships (its `auto_map`), as transformers' `trust_remote_code`
            (default False: such a model is refused, naming this option). Not in a config file.
        keep_workers: keep the stage actors for the next job of this process (a prune, or a
            merge, of as many actors; `shutdown_workers()` ends them), as `merge(keep_workers=)`.

    Returns:
        A `PruneResult`: output path, `report` (per-layer target and achieved sparsity, N:M
        validity, perplexity before/after; also written as `prune_report.json` in the output),
        stages, timings and peak worker memory.

    Raises:
        ConfigError, CheckpointError, OutputError: before anything is written.
    """
    from raymerge.runtime.prune import PruneOptions, run_prune

    if stages is not None and workers is not None and stages != workers:
        raise ConfigError(f"stages={stages} and workers={workers} name the same thing; give one")
    options = PruneOptions(
        workers=stages if stages is not None else workers, in_process=in_process, address=address, overwrite=overwrite, quiet=quiet, plot=plot,
        s3_endpoint_url=s3_endpoint_url, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
        keep_workers=keep_workers,
    )
    return run_prune(config, output, options)


def optimize(
    config: Union[str, Path, dict[str, Any]],
    output: Union[str, Path],
    *,
    stages: int = 1,
    in_process: bool = False,
    address: Optional[str] = None,
    quiet: bool = False,
    materialize: Union[bool, str, Path] = False,
    overwrite: bool = False,
    allow_pickle: bool = False,
    allow_mixed_architectures: bool = False,
    s3_endpoint_url: Optional[str] = None,
    trust_remote_code: bool = False,
):
    """Search merge coefficients or layerwise sparsities with Optuna (`raymerge search` on the
    command line; the config format is in `raymerge.config.search_config`). Named `optimize`
    because `raymerge.search` is the package that implements it.

    Each of the study's `concurrency` trials at a time runs on its own set of `stages` resident
    stage workers, which hold the input models' layers and re-merge (or re-mask) them in memory
    per trial; nothing is written per trial. `output` receives the study journal (rerunning
    continues the study), `best.yaml` (ready to run with `raymerge merge`/`prune`), and plots;
    `materialize=True` also writes the best model to `output/best-model`; a folder or an
    `s3://bucket/prefix` instead publishes it there, through the output path `merge` and `prune`
    use (checked before the study starts; `overwrite` replaces what it holds). A merge search opens and
    checks its inputs as `merge` does (`allow_pickle`, `allow_mixed_architectures`,
    `s3_endpoint_url`), and every trial is compiled by the same step, with the merge config's
    `raymerge: random_seed`: a trial is the model `raymerge merge best.yaml` writes.
    `trust_remote_code`: build the stages' layers and the tokenizer from the Python code the model
    ships (its `auto_map`), as transformers' `trust_remote_code` (default False: such a model is
    refused, naming this option); also used by `materialize`.

    Returns a `SearchResult` (`.study`, `.best_configs`, `.summary()`).
    """
    from raymerge.search.study import SearchOptions, run_search

    options = SearchOptions(stages=stages, in_process=in_process, address=address, quiet=quiet, materialize=materialize,
                            overwrite=overwrite, allow_pickle=allow_pickle, allow_mixed_architectures=allow_mixed_architectures,
                            s3_endpoint_url=s3_endpoint_url, trust_remote_code=trust_remote_code)
    return run_search(config, output, options)
