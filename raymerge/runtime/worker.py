"""Merge work: computing operators and writing their bytes, the `merging` capability of every
pool actor (`runtime.pool_actor.PoolActor`, run by `runtime.executor`).

A merge pool has one actor per GPU when the cluster has GPUs, else one per CPU slot. For each merge (a job) an
actor opens each input model's source once (headers only), reads just the tensors — or row
ranges of them, for parts of split operators — it is sent, merges them on its device and writes
each result at its precomputed offset in the staged shard files.
Only small metadata (operators in, statistics out) crosses the Ray object store: never weights.
"""

from __future__ import annotations

import math
import os
import resource
import socket
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from raymerge.checkpoints import CheckpointSource, ShardFileWriter, SourceSpec
from raymerge.checkpoints.safetensors_format import TensorEntry, tensor_bytes
from raymerge.runtime.actor_resources import host_memory_bytes, ray_if_imported
from raymerge.runtime.compute import compute_operator
from raymerge.runtime.costs import measure_seconds_per_element
from raymerge.runtime.metrics import WorkerMetrics
from raymerge.runtime.operators import MergeOperator


@dataclass(frozen=True)
class WriteTarget:
    filename: str
    entry: TensorEntry


@dataclass(frozen=True)
class WorkItem:
    """One part to compute: the whole operator (`rows` None) or rows [start, stop) of it."""

    op: MergeOperator
    target: WriteTarget
    rows: Optional[tuple[int, int]] = None

    @property
    def bytes_in(self) -> int:
        return self.op.bytes_in if self.rows is None else self.op.bytes_in * (self.rows[1] - self.rows[0]) // self.op.shape[0]


@dataclass
class BatchStats:
    worker: int
    operators: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    peak_device_bytes: int


@dataclass(frozen=True)
class JobEnd:
    """What a worker reports when a job's files are closed (`MergeWorkerImpl.finish`): its
    process's peak RSS and the input tensor bytes it read (fetched, for S3 or the Hub) in the
    job, its storage probe included."""

    peak_rss_bytes: int
    bytes_read: int


@dataclass(frozen=True)
class IoFigures:
    """What one worker measured of its job's storage (`MergeWorkerImpl.measure_io`): bytes/s
    reading the inputs (mapping or fetching them, and touching every byte once), bytes/s writing
    into its staging folder, and the fixed seconds one part costs besides (a small tensor read,
    merged and written)."""

    read_bandwidth: float
    write_bandwidth: float
    part_overhead_s: float


PROBE_TRIES = 5  # the storage probe's small parts (and small reads): best of this many
SMALL_READ_BYTES = 4 * 1024 * 1024  # a probe read below this is repeated (PROBE_TRIES)
IO_SAMPLE_BYTES = 32 * 1024 * 1024  # input bytes the read probe takes (rows of the job's largest tensor)


@dataclass(frozen=True)
class WorkerInfo:
    """Where a worker runs and what it has (memory: the GPU's, or the whole node's RAM)."""

    worker_id: int
    node_id: str
    host: str
    pid: int
    device: str
    memory_bytes: int


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


DEVICE_ENV = "RAYMERGE_DEVICE"  # "cpu": never compute on a GPU (see pick_device)


def pick_device() -> torch.device:
    """The device this process computes on: a GPU when it may use one, else the CPU.

    - In a Ray actor: the GPU Ray assigned it (`ray.get_gpu_ids()`; actors get one GPU each, see
      `runtime.actor_resources`), else the CPU, even on a GPU node: an actor started without a
      GPU may still see the node's GPUs (Ray leaves `CUDA_VISIBLE_DEVICES` unset for it when
      `RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0`, Ray's announced future default) and must not use one
      another actor was given.
    - Elsewhere (the in-process modes, `in_process=True`, run in the driver): the first GPU torch
      sees, unless `CUDA_VISIBLE_DEVICES` is set empty.

    `RAYMERGE_DEVICE=cpu` keeps every process on the CPU (actors of a local Ray started from that
    environment inherit it); the test suite sets it, so its byte-exact comparisons with CPU
    references hold on a GPU machine, and `tests/test_gpu.py` lifts it.
    """
    if os.environ.get(DEVICE_ENV, "").strip().lower() == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    assigned = _ray_actor_gpus()
    if assigned is not None:
        return torch.device("cuda") if assigned else torch.device("cpu")
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return torch.device("cpu")
    return torch.device("cuda")


def _ray_actor_gpus() -> Optional[list]:
    """The GPU ids Ray assigned this process when it is a Ray actor, else None (not in Ray, or
    the driver)."""
    ray = ray_if_imported()
    if ray is None:
        return None
    try:
        if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
            return None
        return list(ray.get_gpu_ids())
    except Exception:  # noqa: BLE001 - no Ray here: not an actor
        return None


def worker_info(worker_id: int, device: torch.device) -> WorkerInfo:
    """Where this process runs and the memory it has (the GPU's, or the whole node's RAM)."""
    node_id = "local"
    ray = ray_if_imported()
    try:
        if ray is not None and ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray the node is this machine
        pass
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        memory = host_memory_bytes()
    return WorkerInfo(worker_id, node_id, socket.gethostname(), os.getpid(), device.type, int(memory))


def _probe_rows(op: MergeOperator, sample_bytes: int) -> Optional[tuple[int, int]]:
    """The first rows of `op` holding about `sample_bytes` of its inputs (all of it if smaller,
    or when it cannot be read by rows: a 1-D tensor, or a vocabulary-mapped one)."""
    if len(op.shape) < 2 or op.vocab is not None or op.bytes_in <= sample_bytes:
        return None
    rows = max(1, op.shape[0] * sample_bytes // op.bytes_in)
    return (0, min(rows, op.shape[0]))


PAGE = 4096


def _timed_read(op: MergeOperator, sources, rows) -> tuple[float, int]:
    """Seconds to read `op`'s inputs (their `rows`): map or fetch them and touch one byte of
    every page, which faults the mapped pages in; and the bytes read. What reading the bytes
    costs once they are in memory is the compute calibration's (it runs on resident tensors)."""
    start, size = time.perf_counter(), 0
    for i in op.inputs:
        t = sources[i.model].read(i.name, rows=rows)
        flat = t.contiguous().reshape(-1).view(torch.uint8)  # contiguous(): no copy when it already is
        flat[::PAGE].sum()
        size += flat.numel()
    return time.perf_counter() - start, size


class MergeWorkerImpl:
    """A pool actor's merge work (`PoolActor.merging`), usable on its own without Ray.

    A worker outlives one merge: `begin` points it at a job's sources and staging folder, `run`
    computes batches of parts, `finish` closes the job's files. `calibrate` times the job's
    methods on synthetic tensors for the planner; `histogram` serves whole-model TIES trimming.
    """

    def __init__(self, worker_id: int, threads: Optional[int] = None, device: Optional[torch.device] = None):
        self.worker_id = worker_id
        self._specs: list[SourceSpec] = []
        self._sources: dict[int, CheckpointSource] = {}
        self._writer: Optional[ShardFileWriter] = None
        if threads:
            torch.set_num_threads(threads)
        self.device = device if device is not None else pick_device()
        self.metrics = WorkerMetrics(worker_id)  # per-batch figures for the Ray dashboard (runtime.metrics)

    def describe(self) -> WorkerInfo:
        return worker_info(self.worker_id, self.device)

    def calibrate(self, ops: Sequence[MergeOperator]) -> list[float]:
        """Seconds per output element of each operator's method on this worker."""
        return [measure_seconds_per_element(op, self.device) for op in ops]

    def begin(self, sources: Sequence[SourceSpec], staging: str) -> None:
        self._close_job()
        self._specs = list(sources)
        self._writer = ShardFileWriter(staging)
        if self.device.type == "cuda":  # BatchStats.peak_device_bytes: this job's peak, not the actor's lifetime's
            torch.cuda.reset_peak_memory_stats(self.device)

    def _opened(self, op: MergeOperator) -> dict[int, CheckpointSource]:
        for i in {inp.model for inp in op.inputs}:
            if i not in self._sources:
                self._sources[i] = self._specs[i].open()
        return self._sources

    def measure_io(self, large: MergeOperator, small: MergeOperator, sample_bytes: int = IO_SAMPLE_BYTES) -> IoFigures:
        """Time this worker's storage on the job itself (after `begin`): read about `sample_bytes`
        of `large`'s inputs (its first rows) into memory, write as many bytes into a scratch
        file of the staging folder (removed again), and run `small` (read, merge, write to the
        scratch file) for the fixed cost of a part. Nothing of the output is touched."""
        if self._writer is None:
            raise RuntimeError("MergeWorker.measure_io called before begin()")
        # Best of PROBE_TRIES for the small part, and for the read when it is small: the first
        # pays one-time costs (code paths warming up, a file's first mapping) that a merge pays
        # once, not per part; a small read is all fixed cost. (A large one is read once: it may
        # come over the network.)
        rows = _probe_rows(large, sample_bytes)
        read_s, size = _timed_read(large, self._opened(large), rows)
        if size < SMALL_READ_BYTES:
            read_s = min(read_s, *(_timed_read(large, self._opened(large), rows)[0] for _ in range(PROBE_TRIES - 1)))
        # A read's fixed cost (opening the tensors' views, Python) is in the small part's
        # overhead below: the bandwidth is what the bytes beyond it cost (at most 10x the
        # gross figure, for a probe read that is itself all fixed cost).
        fixed_s = min(_timed_read(small, self._opened(small), None)[0] for _ in range(PROBE_TRIES))
        read_s = max(read_s - fixed_s, read_s / 10)
        data = torch.ones(max(size, 1), dtype=torch.uint8)  # resident before the clock starts
        scratch = self._writer.staging / f".io-probe-{os.getpid()}-{self.worker_id}"  # in-process workers share a pid
        write_bandwidth = math.inf
        overhead_s = math.inf
        for _ in range(PROBE_TRIES):
            start = time.perf_counter()
            small_bytes = tensor_bytes(compute_operator(small, self._opened(small), self.device))  # type: ignore[arg-type]
            overhead_s = min(overhead_s, time.perf_counter() - start)
        try:
            fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                start = time.perf_counter()
                os.pwrite(fd, small_bytes, 0)
                overhead_s += time.perf_counter() - start  # a part's write, besides its compute
                start = time.perf_counter()
                offset = os.pwrite(fd, tensor_bytes(data), len(small_bytes))
                write_bandwidth = offset / max(time.perf_counter() - start, 1e-9)
            finally:
                os.close(fd)
                scratch.unlink()
        except OSError:  # e.g. a full disk: the merge's own writes will say so, naming the shard
            pass
        return IoFigures(size / max(read_s, 1e-9), write_bandwidth, overhead_s)

    def run(self, batch: Sequence[WorkItem]) -> BatchStats:
        if self._writer is None:
            raise RuntimeError("MergeWorker.run called before begin()")
        start = time.perf_counter()
        read_before = sum(s.bytes_read() for s in self._sources.values())
        written = 0
        for item in batch:
            sources = self._opened(item.op)
            result = compute_operator(item.op, sources, self.device, rows=item.rows)  # type: ignore[arg-type]
            written += self._writer.write(item.target.filename, item.target.entry, result, rows=item.rows)
            del result
        read = sum(s.bytes_read() for s in self._sources.values()) - read_before
        device_peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0
        stats = BatchStats(self.worker_id, len(batch), read, written, time.perf_counter() - start, _peak_rss_bytes(), device_peak)
        self.metrics.record(stats)
        return stats

    def histogram(self, ops: Sequence[MergeOperator], high_bins: Optional[dict[int, int]] = None) -> dict[int, torch.Tensor]:
        from raymerge.runtime.global_trim import histogram_batch

        return histogram_batch(ops, self._opened, high_bins)

    def _close_job(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        for s in self._sources.values():
            s.close()
        self._sources.clear()

    def finish(self) -> JobEnd:
        """Close this job's output and input files; this process's peak RSS and the input bytes
        the job read here."""
        read = sum(s.bytes_read() for s in self._sources.values())
        self._close_job()
        return JobEnd(_peak_rss_bytes(), read)

    def upload_files(self, target, staging: str, filenames: Sequence[str]) -> int:
        """Upload finished shards of `staging` to an S3 output (`checkpoints.s3.S3Target`) with
        this process's own credentials; returns the bytes uploaded."""
        from raymerge.checkpoints.s3 import upload_files

        return upload_files(target, staging, filenames)
