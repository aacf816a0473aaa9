"""A merge, read as a checkpoint: prune the merged tensors without writing the merged model.

A prune config may name a `merge:` (a mergekit-format config) instead of a `model:`. The driver
compiles the merge (`runtime.compile`, the step `raymerge merge` uses) in `merged_spec` and hands the stage workers a picklable
`MergedSpec` where they would get a checkpoint's `SourceSpec`; each worker's `MergedSource`
computes a tensor with the merge's own code (`compute_operator`) the first time one of its
layers' tensors is read, and keeps it (a stage reads its tensors a few times: to build its
block, to prune, to copy the unpruned ones). Config.json and the tokenizer are the merge's
donor's, as a merge publishes them. So the pruned output equals pruning the written merge.
Merges whose slices change the layer stack are refused (merge first, then prune).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from raymerge.checkpoints import CheckpointSource, SourceSpec
from raymerge.checkpoints.model_files import merged_model_config
from raymerge.checkpoints.source import CheckpointError, TensorInfo
from raymerge.config.merge_config import ConfigError, parse_config
from raymerge.runtime.compute import compute_operator
from raymerge.runtime.compile import CompileOptions, compile_merge
from raymerge.runtime.operators import MergeOperator


@dataclass(frozen=True)
class MergedSpec:
    """What a worker needs to open the merged model (picklable; see the module docstring)."""

    label: str
    specs: tuple[SourceSpec, ...]
    operators: tuple[MergeOperator, ...]
    donor: int
    dtype: Optional[str] = None  # the merge's out_dtype or dtype (config.json says so, as a merge's does)
    untie: bool = False  # the merge stores a head a tied donor does not (`MergeProgram.tied_heads`)

    def open(self) -> "MergedSource":
        return MergedSource(self)


class MergedSource(CheckpointSource):
    """The merged tensors of a `MergedSpec`, computed on first read."""

    def __init__(self, spec: MergedSpec) -> None:
        self.location = spec.label
        self._ops = {op.name: op for op in spec.operators}
        self._specs = spec.specs
        self._donor_index = spec.donor
        self._dtype = spec.dtype
        self._untie = spec.untie
        self._sources: Optional[list[CheckpointSource]] = None
        self._cache: dict[str, torch.Tensor] = {}

    def _inputs(self) -> list[CheckpointSource]:
        if self._sources is None:
            self._sources = [s.open() for s in self._specs]
        return self._sources

    def tensors(self) -> dict[str, TensorInfo]:
        return {name: TensorInfo(name=name, shape=tuple(op.shape), code=op.out_dtype,
                                 file="(merged in memory)", nbytes=op.bytes_out) for name, op in self._ops.items()}

    def read(self, name: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        if name not in self._cache:
            op = self._ops.get(name)
            if op is None:
                raise CheckpointError(f"{self.location}: the merge has no output tensor {name}")
            self._cache[name] = compute_operator(op, self._inputs())
        t = self._cache[name]
        return t if rows is None else t[rows[0] : rows[1]]

    def read_json(self, filename: str) -> Optional[dict[str, Any]]:
        if filename == "config.json":
            return self.config()
        return self._inputs()[self._donor_index].read_json(filename)

    def read_bytes(self, filename: str) -> Optional[bytes]:
        return self._inputs()[self._donor_index].read_bytes(filename)

    def config(self) -> dict[str, Any]:
        return merged_model_config(self._inputs()[self._donor_index].config(), dtype=self._dtype, untie=self._untie)

    def close(self) -> None:
        for s in self._sources or []:
            s.close()
        self._sources = None
        self._cache.clear()


def merged_spec(merge: dict[str, Any], label: str, *, allow_pickle: bool = False, s3_endpoint_url: Optional[str] = None) -> MergedSpec:
    """Build the merge program of `merge` (a merge config dict) from headers; ConfigError naming `label`."""
    where = f"{label} (merge:)"
    cfg = parse_config(merge, where)
    unsupported = [k for k in ("tokenizer_source", "tokenizer", "chat_template") if getattr(cfg, k) is not None]
    if unsupported:
        raise ConfigError(f"{label}: merge: {', '.join(unsupported)} is not supported when pruning in the same job "
                          "(the output takes the donor model's tokenizer); merge first")
    compiled = compile_merge(cfg, CompileOptions(allow_pickle=allow_pickle, s3_endpoint_url=s3_endpoint_url), label=where)
    program = compiled.program
    if program.changes_layers:
        raise ConfigError(f"{label}: merge: slices that change the layer stack cannot be pruned in the same job; merge first")
    if cfg.raymerge is not None and (cfg.raymerge.guidance is not None or cfg.raymerge.export_task_vectors):
        raise ConfigError(f"{label}: merge: raymerge.guidance and export_task_vectors need `raymerge merge`; merge first")
    return MergedSpec(
        label=f"merge of {', '.join(str(m) for m in program.models)}",
        specs=tuple(compiled.specs), operators=tuple(program.operators), donor=program.donor,
        dtype=cfg.out_dtype or cfg.dtype, untie=bool(program.tied_heads),
    )
