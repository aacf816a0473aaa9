"""The merge worker: a long-lived Ray actor that computes operators and writes their bytes.

One actor per GPU when the cluster has GPUs, else one per CPU slot. An actor opens each input
model's source once (headers only), reads just the tensors of the operators it is sent, merges
them on its device and writes each result at its precomputed offset in the staged shard files.
Only small metadata (operators in, statistics out) crosses the Ray object store: never weights.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from raymerge.checkpoints import CheckpointSource, ShardFileWriter, SourceSpec
from raymerge.checkpoints.safetensors_format import TensorEntry
from raymerge.runtime.compute import compute_operator
from raymerge.runtime.operators import MergeOperator


@dataclass(frozen=True)
class WriteTarget:
    filename: str
    entry: TensorEntry


@dataclass
class BatchStats:
    worker: int
    operators: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    peak_device_bytes: int


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class MergeWorkerImpl:
    """The worker's logic, usable without Ray (the Ray actor class wraps it)."""

    def __init__(self, worker_id: int, sources: Sequence[SourceSpec], staging: str, threads: Optional[int] = None):
        self.worker_id = worker_id
        self._specs = list(sources)
        self._sources: dict[int, CheckpointSource] = {}
        self._writer = ShardFileWriter(staging)
        if threads:
            torch.set_num_threads(threads)
        self.device = self._pick_device()

    @staticmethod
    def _pick_device() -> torch.device:
        if torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES", "") != "":
            return torch.device("cuda")
        return torch.device("cpu")

    def _source_list(self, op: MergeOperator) -> list[CheckpointSource]:
        for i in {inp.model for inp in op.inputs}:
            if i not in self._sources:
                self._sources[i] = self._specs[i].open()
        return self._sources  # type: ignore[return-value]  # indexed by model number

    def run(self, batch: Sequence[tuple[MergeOperator, WriteTarget]]) -> BatchStats:
        start = time.perf_counter()
        read_before = sum(s.bytes_read() for s in self._sources.values())
        written = 0
        for op, target in batch:
            sources = self._source_list(op)
            result = compute_operator(op, sources, self.device)  # type: ignore[arg-type]
            written += self._writer.write(target.filename, target.entry, result)
            del result
        read = sum(s.bytes_read() for s in self._sources.values()) - read_before
        device_peak = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else 0
        return BatchStats(self.worker_id, len(batch), read, written, time.perf_counter() - start, _peak_rss_bytes(), device_peak)

    def finish(self) -> int:
        """Flush and close output files; returns this process's peak RSS in bytes."""
        self._writer.close()
        for s in self._sources.values():
            s.close()
        self._sources.clear()
        return _peak_rss_bytes()

    def node(self) -> str:
        import socket

        return f"{socket.gethostname()}:{os.getpid()}"
