"""A prune stage worker: one `PruneStage` and the shard writer its pruned tensors go to.

The Ray actor class wraps `PruneWorkerImpl`; the same class runs in the driver process for a
single-process prune, so both paths execute the same code. The worker reads its layers from the
checkpoint itself (it re-opens the source from a picklable spec), writes every tensor of its
layers (pruned ones masked, the rest copied byte for byte) at their precomputed offsets in the
staging shards, and reports per-module results and its peak memory at the end.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import torch

from raymerge.calibration.curation import mean_pooled_features
from raymerge.checkpoints import OutputLayout, ShardFileWriter, SourceSpec
from raymerge.pruning.stage import ModuleResult, PruneSettings, PruneStage
from raymerge.runtime.worker import WorkerInfo, _peak_rss_bytes, pick_device, worker_info


class PruneWorkerImpl:
    """Holds one stage of the pipeline (see the module docstring)."""

    def __init__(self, worker_id: int, threads: Optional[int] = None) -> None:
        self.worker_id = worker_id
        if threads:
            torch.set_num_threads(threads)
        self.device = pick_device()
        self.stage: Optional[PruneStage] = None
        self._writer: Optional[ShardFileWriter] = None
        self._layout: Optional[OutputLayout] = None
        self._source = None
        self.busy_seconds = 0.0

    def describe(self) -> WorkerInfo:
        return worker_info(self.worker_id, self.device)

    def load(
        self, config: dict[str, Any], spec: SourceSpec, first: int, last: int, settings: PruneSettings,
        embed: bool, head: bool, staging: Optional[str], layout: Optional[OutputLayout],
    ) -> int:
        """Build the stage; return its resident parameter bytes."""
        t0 = time.perf_counter()
        self._source = spec.open()
        self.stage = PruneStage(
            config, self._source, first, last, settings, embed=embed, head=head, device=str(self.device)
        )
        if staging is not None:
            self._writer, self._layout = ShardFileWriter(staging), layout
        self.busy_seconds += time.perf_counter() - t0
        return sum(p.numel() * p.element_size() for p in self.stage.block.model.parameters() if not p.is_meta)

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.busy_seconds += time.perf_counter() - t0

    # -- data flow (see PruneStage) ---------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._timed(self._stage().embed, input_ids).cpu()

    def forward(self, hidden: torch.Tensor, collect: Sequence[str] = (), emit: bool = True) -> Optional[torch.Tensor]:
        """Run the stage's layers; `emit=False` keeps the output here (a statistics-only pass)."""
        out = self._timed(self._stage().forward, hidden.to(self.device), tuple(collect))
        return out.cpu() if emit else None

    def store(self, hidden: torch.Tensor) -> None:
        self._stage().store(hidden.to(self.device))

    def store_all(self, hiddens: Sequence[torch.Tensor]) -> None:
        for h in hiddens:
            self.store(h)

    def loss(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
        return self._timed(self._stage().loss, hidden.to(self.device), input_ids)

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """Mean over positions of the hidden states (calibration curation's activation space)."""
        return mean_pooled_features(hidden).cpu()

    def outlier_ratios(self, m: float) -> dict[int, float]:
        return self._timed(self._stage().outlier_ratios, m)

    def clear_statistics(self) -> None:
        self._stage().clear_statistics()

    # -- pruning and writing ----------------------------------------------------------------
    def prune_sequential(self, sparsities: dict[int, float], emit: bool = True) -> Optional[list[torch.Tensor]]:
        outs = self._timed(self._stage().prune_sequential, sparsities, self._write_pruned)
        return [h.cpu() for h in outs] if emit else None

    def prune_collected(self, sparsities: dict[int, float]) -> None:
        self._timed(self._stage().prune_collected, sparsities, self._write_pruned)

    def _write_pruned(self, layer: int, module: str, weight: torch.Tensor, mask: torch.Tensor) -> None:
        if self._writer is None:
            return
        name = f"{self._stage().block.layers_path}.{layer}.{module}.weight"
        self._write(name, weight)

    def _write(self, name: str, tensor: torch.Tensor) -> None:
        assert self._writer is not None and self._layout is not None
        filename, entry = self._layout.entry(name)
        self._writer.write(filename, entry, tensor)

    def copy(self, names: Sequence[str]) -> int:
        """Copy tensors unchanged from the checkpoint to the output; return the bytes copied."""
        total = 0
        for name in names:
            tensor = self._source.read(name)
            self._write(name, tensor)
            total += tensor.numel() * tensor.element_size()
        return total

    def finish(self) -> tuple[list[ModuleResult], int, float]:
        """Close the output files; return module results, peak RSS bytes and busy seconds."""
        results = self._stage().results
        self.close()
        return results, _peak_rss_bytes(), self.busy_seconds

    def close(self) -> None:
        """Release the output files and the checkpoint source (idempotent)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._source is not None:
            self._source.close()
            self._source = None
        self.stage = None

    def upload_files(self, target, staging: str, filenames: Sequence[str]) -> int:
        """Upload finished shards of `staging` to an S3 output (`checkpoints.s3.S3Target`) with
        this process's own credentials (`runtime.output.upload_on`); returns the bytes uploaded."""
        from raymerge.checkpoints.s3 import upload_files

        return upload_files(target, staging, filenames)

    def _stage(self) -> PruneStage:
        if self.stage is None:
            raise RuntimeError("prune worker used before load()")
        return self.stage
