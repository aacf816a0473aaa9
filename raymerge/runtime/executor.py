"""Running merge operators on a pool of Ray worker actors, with a progress bar.

Scheduling: operators are sorted largest first (by input bytes) and handed out in small batches
to whichever worker is free (dynamic longest-processing-time list scheduling); each worker has
at most two batches queued, so a slow worker never holds a backlog. Where tensors go never
changes the output bytes: every operator writes at its precomputed offset.

Ray is started locally when no cluster is given (`address=None` and no `RAY_ADDRESS`); with an
address, the pool is spread over the cluster's nodes. The output staging folder must then be on
storage every node can write (a shared filesystem).
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Sequence

from tqdm.auto import tqdm

from raymerge.checkpoints import OutputLayout, SourceSpec
from raymerge.runtime.operators import MergeOperator
from raymerge.runtime.worker import BatchStats, MergeWorkerImpl, WriteTarget

BATCH_BYTES = 64 * 1024 * 1024
BATCH_OPS = 16
IN_FLIGHT_PER_WORKER = 2


@dataclass
class ExecutionStats:
    workers: int
    seconds: float
    bytes_read: int = 0
    bytes_written: int = 0
    operators: int = 0
    peak_worker_rss_bytes: int = 0
    peak_device_bytes: int = 0
    per_worker_seconds: dict[int, float] = field(default_factory=dict)


def ensure_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> None:
    """Connect to `address` (or RAY_ADDRESS), or start a local Ray; reuse an existing session."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = {"logging_level": "WARNING", "log_to_driver": True}
    if address is None:
        kwargs.update(include_dashboard=False, num_cpus=num_cpus)
    ray.init(address=address, **kwargs)


def default_worker_count() -> tuple[int, dict]:
    """One worker per GPU when the cluster has GPUs, else one per CPU slot."""
    import ray

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    if gpus > 0:
        return gpus, {"num_gpus": 1, "num_cpus": 1}
    return max(1, int(res.get("CPU", 1))), {"num_cpus": 1}


def make_batches(ops: Sequence[MergeOperator], layout: OutputLayout) -> deque:
    """Largest-first batches of (operator, write target), each a few MB or a few ops."""
    ordered = sorted(ops, key=lambda o: (-(o.bytes_in + o.bytes_out), o.index))
    batches: deque = deque()
    current: list[tuple[MergeOperator, WriteTarget]] = []
    size = 0
    for op in ordered:
        filename, entry = layout.entry(op.name)
        cost = op.bytes_in + op.bytes_out
        if current and (size + cost > BATCH_BYTES or len(current) >= BATCH_OPS):
            batches.append(current)
            current, size = [], 0
        current.append((op, WriteTarget(filename, entry)))
        size += cost
    if current:
        batches.append(current)
    return batches


def run_operators(
    ops: Sequence[MergeOperator],
    sources: Sequence[SourceSpec],
    layout: OutputLayout,
    staging: str,
    *,
    workers: Optional[int] = None,
    quiet: bool = False,
) -> ExecutionStats:
    """Compute and write every operator on a pool of Ray actors; return measured statistics."""
    import ray

    n_default, resources = default_worker_count()
    n = workers or n_default
    n = max(1, min(n, len(ops)))
    cpu_per_worker = max(1, int(ray.cluster_resources().get("CPU", 1)) // n) if "num_gpus" not in resources else 1
    actor_cls = ray.remote(MergeWorkerImpl).options(max_concurrency=1, **resources)
    start = time.perf_counter()
    actors = [actor_cls.remote(i, list(sources), staging, cpu_per_worker) for i in range(n)]
    stats = ExecutionStats(workers=n, seconds=0.0)
    batches = make_batches(ops, layout)
    total_bytes = sum(o.bytes_in for o in ops)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"merging on {n} worker(s)", disable=quiet, dynamic_ncols=True)
    pending: dict = {}
    in_flight = {i: 0 for i in range(n)}
    done_ops = 0
    try:
        while batches or pending:
            for i in range(n):
                while batches and in_flight[i] < IN_FLIGHT_PER_WORKER:
                    batch = batches.popleft()
                    ref = actors[i].run.remote(batch)
                    pending[ref] = (i, batch)
                    in_flight[i] += 1
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                i, batch = pending.pop(ref)
                in_flight[i] -= 1
                result: BatchStats = ray.get(ref)
                stats.bytes_read += result.bytes_read
                stats.bytes_written += result.bytes_written
                stats.operators += result.operators
                stats.peak_worker_rss_bytes = max(stats.peak_worker_rss_bytes, result.peak_rss_bytes)
                stats.peak_device_bytes = max(stats.peak_device_bytes, result.peak_device_bytes)
                stats.per_worker_seconds[i] = stats.per_worker_seconds.get(i, 0.0) + result.seconds
                done_ops += result.operators
                bar.update(sum(op.bytes_in for op, _ in batch))
                bar.set_postfix_str(f"{done_ops}/{len(ops)} tensors", refresh=False)
        peaks = ray.get([a.finish.remote() for a in actors])
        stats.peak_worker_rss_bytes = max([stats.peak_worker_rss_bytes, *peaks])
    finally:
        bar.close()
        for a in actors:
            ray.kill(a)
    stats.seconds = time.perf_counter() - start
    return stats
