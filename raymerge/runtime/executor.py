"""Running a plan on a pool of Ray worker actors, with a progress bar.

The pool: one actor per GPU when the cluster has GPUs, else one per CPU slot (`workers=N`
overrides); what each actor reserves, and its torch threads, is the one rule of
`runtime.actor_resources` (fractional CPU shares, or a refusal naming the GPUs). Starting an
actor costs a Python process and a torch import (about a second on a small CPU machine), so
a pool can outlive a merge: `acquire_pool(..., keep=True)` keeps it for the next merge of this
driver process (sweeps, pipelines); by default it is released (`release`) when the merge ends,
so it never holds CPU slots the caller may want for other Ray work.

Execution: the plan fixes which worker runs each part (`work_items`: in output order, shard by
shard, so shards finish one after another); each worker's parts are sent in small batches, at
most two queued per worker. Costs are predictions, so a worker
that runs out of work early takes batches not yet sent from the most loaded one (reported). Where parts go never changes the
output bytes: every part writes at its precomputed offset. The measured makespan (first batch
sent to last batch done) is returned next to each worker's busy seconds, so the planner's
prediction can be checked.

Fault tolerance: a worker actor that dies mid-merge (its process killed, out of memory, its
node lost) is replaced by a new actor with the same resources, pointed at the same job; the
batches it had been sent but not finished go back to the front of its queue, where the
replacement (or, by the same work stealing, another worker) runs them again. Rerunning a part
rewrites the same bytes at the same offsets, so the output does not change. After
`MAX_WORKER_RESTARTS` replacements in one merge, `WorkerLostError` ends it (the staging folder
is kept for a resume: `runtime.recovery`). `on_done(batch)` is called for each batch that
finished, which is how the driver learns which shards are complete.

Ray is started locally when no cluster is given (`address=None` and no `RAY_ADDRESS`); with an
address, the pool is spread over the cluster's nodes. The output staging folder must then be on
storage every node can write (a shared filesystem).

In process (`merge(..., in_process=True)`): a `LocalPool` holds one `MergeWorkerImpl` in the
driver, with the interface of `WorkerPool`; `run_plan` then runs the plan's work items (a plan
for that one worker) batch by batch in this process. Same worker code, same work items, no Ray:
for small merges and the test suite, where starting Ray and actors costs more than the merge.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from tqdm.auto import tqdm

from raymerge.checkpoints import OutputLayout, SourceSpec
from raymerge.runtime.actor_resources import actor_resources, check_actor_count, default_actor_count
from raymerge.runtime.costs import part_rows
from raymerge.runtime.operators import MergeOperator
from raymerge.runtime.worker import BatchStats, MergeWorkerImpl, WorkerInfo, WorkItem, WriteTarget

BATCH_BYTES = 64 * 1024 * 1024
BATCH_OPS = 16
IN_FLIGHT_PER_WORKER = 2
MAX_WORKER_RESTARTS = 3  # worker actors replaced per merge before giving up
RESTART_TIMEOUT_S = 300.0  # how long a replacement may take to start (e.g. waiting for resources)


class WorkerLostError(RuntimeError):
    """Worker actors kept dying (or a replacement could not start): the merge cannot go on."""


@dataclass
class ExecutionStats:
    workers: int
    seconds: float
    bytes_read: int = 0
    bytes_written: int = 0
    operators: int = 0
    parts: int = 0
    stolen_parts: int = 0  # parts run by another worker than planned (see run_plan)
    worker_restarts: int = 0  # worker actors that died and were replaced (see run_plan)
    peak_worker_rss_bytes: int = 0
    peak_device_bytes: int = 0
    per_worker_seconds: dict[int, float] = field(default_factory=dict)

    def add(self, worker: int, result: BatchStats) -> None:
        """Count one finished batch of `worker`."""
        self.bytes_read += result.bytes_read
        self.bytes_written += result.bytes_written
        self.parts += result.operators
        self.peak_worker_rss_bytes = max(self.peak_worker_rss_bytes, result.peak_rss_bytes)
        self.peak_device_bytes = max(self.peak_device_bytes, result.peak_device_bytes)
        self.per_worker_seconds[worker] = self.per_worker_seconds.get(worker, 0.0) + result.seconds


def ensure_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> None:
    """Connect to `address` (or RAY_ADDRESS; "auto" joins the cluster already running on this
    machine), else start a new local Ray of our own; reuse a session this process already has.

    With neither, a new local Ray is started even when a `ray start --head` is running here
    (`address="local"`): Ray's own default would join whichever local cluster it finds, so the
    same command could silently run on another user's cluster, or one of several."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": True}
    if address is None:
        address = "local"
        kwargs.update(include_dashboard=False, num_cpus=num_cpus)
    ray.init(address=address, **kwargs)


class WorkerPool:
    """Merge worker actors, what each reported about itself, and its calibration cache."""

    def __init__(self, n: int, resources: dict, threads: int):
        import ray

        self._actor_cls = ray.remote(MergeWorkerImpl).options(max_concurrency=1, **resources)
        self._threads = threads
        self._job: Optional[tuple[list[SourceSpec], str]] = None
        self.key = _pool_key(n, resources, threads)
        self.actors = [self._actor_cls.remote(i, threads) for i in range(n)]
        self._infos: Optional[list[WorkerInfo]] = None
        self.calibration: dict[Any, list[float]] = {}  # cost key -> seconds per element, per worker

    def __len__(self) -> int:
        return len(self.actors)

    def infos(self) -> list[WorkerInfo]:
        import ray

        if self._infos is None:
            self._infos = ray.get([a.describe.remote() for a in self.actors])
        return self._infos

    def calibrate(self, samples: dict[Any, MergeOperator]) -> list[list[float]]:
        """Per worker, seconds per element of each sample's method (cached by key)."""
        import ray

        missing = [k for k in samples if k not in self.calibration]
        if missing:
            ops = [samples[k] for k in missing]
            rows = ray.get([a.calibrate.remote(ops) for a in self.actors])
            for j, k in enumerate(missing):
                self.calibration[k] = [row[j] for row in rows]
        return [[self.calibration[k][w] for k in samples] for w in range(len(self.actors))]

    def begin(self, sources: Sequence[SourceSpec], staging: str) -> None:
        import ray

        self._job = (list(sources), staging)
        ray.get([a.begin.remote(list(sources), staging) for a in self.actors])

    def replace(self, i: int):
        """Replace actor `i` (dead, or to be given up) by a new one with the same resources and
        job; returns the ref of its `begin` (tasks sent to it later run after it)."""
        import ray

        try:
            ray.kill(self.actors[i], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.actors[i] = self._actor_cls.remote(i, self._threads)
        self._infos = None
        if self._job is None:
            return self.actors[i].describe.remote()
        return self.actors[i].begin.remote(*self._job)

    def finish(self) -> list[int]:
        import ray

        return ray.get([a.finish.remote() for a in self.actors])

    def kill(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


class LocalPool:
    """One merge worker in this process, behind `WorkerPool`'s interface (describe, calibrate,
    begin, run through `run_plan`, finish): a merge with `in_process=True` starts no Ray and no
    actor. It is the same `MergeWorkerImpl` a worker actor wraps, given the same work items of
    a plan made for one worker, so its bytes are those of a Ray merge with one worker. The
    torch thread count is left as this process has it (a library must not change its caller's);
    the numbers do not depend on it. `actors` is empty: there are no actors to upload S3
    shards, so the driver uploads them (`runtime.output.upload_on`)."""

    def __init__(self) -> None:
        self.workers = [MergeWorkerImpl(0)]
        self.actors: list = []
        self._infos: Optional[list[WorkerInfo]] = None
        self.calibration: dict[Any, list[float]] = {}

    def __len__(self) -> int:
        return len(self.workers)

    def infos(self) -> list[WorkerInfo]:
        if self._infos is None:
            self._infos = [w.describe() for w in self.workers]
        return self._infos

    def calibrate(self, samples: dict[Any, MergeOperator]) -> list[list[float]]:
        """Per worker, seconds per element of each sample's method (cached by key)."""
        missing = [k for k in samples if k not in self.calibration]
        if missing:
            rows = [w.calibrate([samples[k] for k in missing]) for w in self.workers]
            for j, k in enumerate(missing):
                self.calibration[k] = [row[j] for row in rows]
        return [[self.calibration[k][w] for k in samples] for w in range(len(self.workers))]

    def begin(self, sources: Sequence[SourceSpec], staging: str) -> None:
        for w in self.workers:
            w.begin(list(sources), staging)

    def finish(self) -> list[int]:
        return [w.finish() for w in self.workers]

    def kill(self) -> None:
        """Close the job's files (a failed merge); nothing to end."""
        for w in self.workers:
            w.finish()


_kept_pool: Optional[WorkerPool] = None


def _pool_key(n: int, resources: dict, threads: int) -> tuple:
    """What a kept pool must match to be reused: Ray session (job), size, resources, threads."""
    import ray

    return (ray.get_runtime_context().get_job_id(), n, tuple(sorted(resources.items())), threads)


def acquire_pool(workers: Optional[int] = None) -> WorkerPool:
    """The kept pool when it matches (same Ray session, size and resources), else a new one
    (the kept one, if any, is shut down first so it does not hold the CPU slots)."""
    global _kept_pool
    check_actor_count(workers, "workers")
    n = workers if workers is not None else default_actor_count()
    rule = actor_resources(n, what="merge workers")  # raises at once what the cluster cannot hold
    resources, threads = rule.options, rule.threads
    if _kept_pool is not None:
        if _kept_pool.key == _pool_key(n, resources, threads) and _kept_pool.actors:
            pool, _kept_pool = _kept_pool, None
            return pool
        shutdown_pool()
    return WorkerPool(n, resources, threads)


def release_pool(pool: WorkerPool, keep: bool) -> None:
    """Keep `pool` for the next merge of this process, or shut its actors down."""
    global _kept_pool
    if keep and pool.actors:
        if _kept_pool is not None and _kept_pool is not pool:
            _kept_pool.kill()
        _kept_pool = pool
    else:
        pool.kill()


def shutdown_pool() -> None:
    """Shut down the worker pool kept by `keep_workers=True`, if any."""
    global _kept_pool
    if _kept_pool is not None:
        try:
            _kept_pool.kill()
        except Exception:  # noqa: BLE001 - Ray may already be shut down
            pass
        _kept_pool = None


def work_items(plan, ops: Sequence[MergeOperator], layout: OutputLayout, worker_names: Sequence[str]) -> list[list[WorkItem]]:
    """Each worker's parts (by worker index) as work items, shard by shard in output order and
    in plan order within a shard: so shards are finished one after another, each recorded for
    a resume as soon as it is (`runtime.recovery`), rather than all at the end. The order never
    changes a worker's load, nor the bytes."""
    by_name = {op.name: op for op in ops}
    index = {name: i for i, name in enumerate(worker_names)}
    queues: list[list[WorkItem]] = [[] for _ in worker_names]
    for a in plan.assignments:
        op = by_name[a.operator]
        filename, entry = layout.entry(op.name)
        queues[index[a.worker]].append(WorkItem(op, WriteTarget(filename, entry), part_rows(op, a.part, a.of)))
    shard = {s.filename: i for i, s in enumerate(layout.shards)}
    return [sorted(q, key=lambda item: shard[item.target.filename]) for q in queues]


def batches_of(items: Sequence[WorkItem]) -> deque:
    """Consecutive items grouped into batches of at most BATCH_BYTES input bytes or BATCH_OPS."""
    batches: deque = deque()
    current: list[WorkItem] = []
    size = 0
    for item in items:
        cost = item.bytes_in
        if current and (size + cost > BATCH_BYTES or len(current) >= BATCH_OPS):
            batches.append(current)
            current, size = [], 0
        current.append(item)
        size += cost
    if current:
        batches.append(current)
    return batches


def _steal(pending_batches: list[deque], thief: int, may_take_from) -> Optional[list[WorkItem]]:
    """The last unsent batch of the worker with the most unsent input bytes that `thief` may
    take from (None when nobody has a batch to spare)."""
    best, best_bytes = None, 0
    for j, queue in enumerate(pending_batches):
        if j == thief or not queue or not may_take_from(thief, j):
            continue
        left = sum(item.bytes_in for batch in queue for item in batch)
        if left > best_bytes:
            best, best_bytes = j, left
    return None if best is None else pending_batches[best].pop()


def run_plan(
    pool: WorkerPool,
    queues: Sequence[Sequence[WorkItem]],
    operators: int,
    *,
    quiet: bool = False,
    may_take_from=None,
    on_done: Optional[Callable[[list[WorkItem]], None]] = None,
) -> ExecutionStats:
    """Run each worker's queue on its actor (`begin` must have been called); measured stats.

    The plan is followed as made, with two corrections for reality: a worker that has finished
    its own queue while another still has batches waiting to be sent takes the last of them
    (`may_take_from(thief, owner)` says which workers may: e.g. not onto less memory), counted
    in `ExecutionStats.stolen_parts`; and a worker actor that dies is replaced, its unfinished
    batches requeued (module docstring), counted in `ExecutionStats.worker_restarts`.
    `on_done(batch)` is called for every batch once it has finished. A `LocalPool` runs the
    same batches in this process, one after another (`_run_local`).
    """
    if isinstance(pool, LocalPool):
        return _run_local(pool, queues, operators, quiet=quiet, on_done=on_done)
    import ray
    from ray.exceptions import RayActorError

    n = len(pool)
    stats = ExecutionStats(workers=n, seconds=0.0, operators=operators)
    pending_batches = [batches_of(q) for q in queues]
    total_bytes = sum(item.bytes_in for q in queues for item in q)
    total_parts = sum(len(q) for q in queues)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"merging on {n} worker(s)", disable=quiet, dynamic_ncols=True)
    pending: dict = {}  # ref of a batch sent -> (worker, batch)
    starting: dict = {}  # ref of a replacement's begin -> (worker, when it was asked for)
    in_flight = [0] * n
    done_parts = 0
    start = time.perf_counter()

    def lost(i: int, err: BaseException, batch: Optional[list[WorkItem]] = None) -> None:
        """Worker `i` died (running `batch`): requeue what it had been sent, replace it (or give up)."""
        unfinished = [] if batch is None else [batch]
        for ref, (j, sent) in list(pending.items()):
            if j == i:
                del pending[ref]
                unfinished.append(sent)
        pending_batches[i].extendleft(reversed(unfinished))
        in_flight[i] = 0
        stats.worker_restarts += 1
        if stats.worker_restarts > MAX_WORKER_RESTARTS:
            raise WorkerLostError(
                f"worker actors died {stats.worker_restarts} times during this merge (limit {MAX_WORKER_RESTARTS}); "
                f"last: worker {i}: {err}"
            ) from err
        starting[pool.replace(i)] = (i, time.perf_counter())

    try:
        while any(pending_batches) or pending:
            busy = {i for i, _ in starting.values()}
            for i in range(n):
                if i in busy:
                    continue
                while in_flight[i] < IN_FLIGHT_PER_WORKER:
                    if pending_batches[i]:
                        batch = pending_batches[i].popleft()
                    elif may_take_from is not None and in_flight[i] == 0:
                        batch = _steal(pending_batches, i, may_take_from)
                        if batch is None:
                            break
                        stats.stolen_parts += len(batch)
                    else:
                        break
                    pending[pool.actors[i].run.remote(batch)] = (i, batch)
                    in_flight[i] += 1
            if not pending and not starting:
                raise RuntimeError("run_plan: work left but none sent")  # a bug: every worker with work sends it
            ready, _ = ray.wait(list(pending) + list(starting), num_returns=1, timeout=10.0)
            for ref in ready:
                if ref in starting:
                    i, _asked = starting.pop(ref)
                    try:
                        ray.get(ref)
                    except RayActorError as err:
                        lost(i, err)
                    continue
                i, batch = pending.pop(ref)
                in_flight[i] -= 1
                try:
                    result: BatchStats = ray.get(ref)
                except RayActorError as err:
                    lost(i, err, batch)
                    continue
                stats.add(i, result)
                done_parts += result.operators
                if on_done is not None:
                    on_done(batch)
                bar.update(sum(item.bytes_in for item in batch))
                bar.set_postfix_str(f"{done_parts}/{total_parts} parts", refresh=False)
            now = time.perf_counter()
            for ref, (i, asked) in starting.items():
                if now - asked > RESTART_TIMEOUT_S:
                    raise WorkerLostError(f"a replacement for worker {i} did not start within {RESTART_TIMEOUT_S:.0f} s")
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - start
    return stats


def _run_local(
    pool: LocalPool,
    queues: Sequence[Sequence[WorkItem]],
    operators: int,
    *,
    quiet: bool = False,
    on_done: Optional[Callable[[list[WorkItem]], None]] = None,
) -> ExecutionStats:
    """`run_plan` on a `LocalPool`: each worker's queue in the same batches, in order, in this
    process (no stealing: nothing runs beside it; no restarts: nothing can die alone)."""
    n = len(pool)
    stats = ExecutionStats(workers=n, seconds=0.0, operators=operators)
    total_bytes = sum(item.bytes_in for q in queues for item in q)
    total_parts = sum(len(q) for q in queues)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="merging in process", disable=quiet, dynamic_ncols=True)
    done_parts = 0
    start = time.perf_counter()
    try:
        for i, queue in enumerate(queues):
            for batch in batches_of(queue):
                result = pool.workers[i].run(batch)
                stats.add(i, result)
                done_parts += result.operators
                if on_done is not None:
                    on_done(list(batch))
                bar.update(sum(item.bytes_in for item in batch))
                bar.set_postfix_str(f"{done_parts}/{total_parts} parts", refresh=False)
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - start
    return stats
