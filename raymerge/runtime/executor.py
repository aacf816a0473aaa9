"""Running a merge plan on an actor pool (`runtime.actor_pool`), with a progress bar.

The pool: one actor per GPU when the cluster has GPUs, else one per CPU slot (`workers=N`
overrides); what each actor reserves, and its torch threads, is the one rule of
`runtime.actor_resources`, and a pool can be kept for the next merge of this driver process
(`actor_pool.acquire` / `release`). `begin` points the pool's actors at a merge (a replacement
actor is pointed at it too), `calibrate` times the job's methods for the planner, `finish`
closes the job's files.

Execution: the plan fixes which worker runs each part (`work_items`: in output order, shard by
shard, so shards finish one after another); each worker's parts are sent in small batches, at
most two queued per worker. Costs are predictions, so a worker
that runs out of work early takes batches not yet sent from the most loaded one (reported). Where parts go never changes the
output bytes: every part writes at its precomputed offset. The measured makespan (first batch
sent to last batch done) is returned next to each worker's busy seconds, so the planner's
prediction can be checked.

Fault tolerance (the pool's one policy, `actor_pool.Restarts`): a worker actor that dies
mid-merge (its process killed, out of memory, its node lost) is replaced by a new actor with
the same resources, pointed at the same job; the batches it had been sent but not finished go
back to the front of its queue, where the replacement (or, by the same work stealing, another
worker) runs them again. Rerunning a part rewrites the same bytes at the same offsets, so the
output does not change. After `MAX_WORKER_RESTARTS` replacements in one merge, `WorkerLostError`
ends it (the staging folder is kept for a resume: `runtime.recovery`). `on_done(batch)` is
called for each batch that finished, which is how the driver learns which shards are complete.

With an address, the pool is spread over the cluster's nodes, or over a local Ray of its own
(`address="local"`; with no address and no `RAY_ADDRESS` the merge runs in process unless a GPU is
there: `runtime.merge.local_by_default`). The output staging folder must be on storage every node
can write (a shared filesystem), unless the output is on S3 (each node stages its own shards).

In process: the pool is `ActorPool.in_process(n)`, `n` `PoolActor`s in the driver; `run_plan`
runs the plan's work items batch by batch, each worker's queue on a thread of its own with the
cores shared out as torch threads (`_run_threads`). Same actor code, same work items, same
bytes, no Ray and no worker processes to start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from raymerge.progress import DropMessages, verbose
from raymerge.progress import bar as tqdm  # tqdm with raymerge.progress.bar_kwargs

from raymerge.checkpoints import OutputLayout, SourceSpec
from raymerge.runtime import actor_pool
from raymerge.runtime.actor_pool import ActorPool, Restarts, WorkerLostError
from raymerge.runtime.costs import job_calibration_shape, part_rows
from raymerge.runtime.operators import MergeOperator
from raymerge.runtime.worker import BatchStats, WorkItem, WriteTarget

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
    parts: int = 0
    stolen_parts: int = 0  # parts run by another worker than planned (see run_plan)
    worker_restarts: int = 0  # worker actors that died and were replaced (see run_plan)
    peak_worker_rss_bytes: int = 0
    peak_device_bytes: int = 0
    per_worker_seconds: dict[int, float] = field(default_factory=dict)
    per_worker_needed: dict[int, int] = field(default_factory=dict)  # input bytes of the parts each ran

    def add(self, worker: int, result: BatchStats, needed: int = 0) -> None:
        """Count one finished batch of `worker` (`needed`: its parts' input bytes)."""
        self.per_worker_needed[worker] = self.per_worker_needed.get(worker, 0) + needed
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
    same command could silently run on another user's cluster, or one of several.

    A local Ray of our own listens on loopback only when this call is the process's first import
    of Ray (`import_ray_loopback_only`), and runs with Ray's token authentication
    (`local_ray_auth`): the token, readable by this user only, is what keeps other users of this
    machine (who can reach its loopback), and other machines where Ray was imported before, from
    running code in it."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None or address == "local":
        import_ray_loopback_only()
    import ray

    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": True}
    if address is None or address == "local":  # a new local Ray of our own (`address="local"` asks for one)
        address = "local"
        kwargs.update(include_dashboard=False, num_cpus=num_cpus)
        with local_ray_auth():
            ray.init(address=address, **kwargs)
        return
    ray.init(address=address, **kwargs)


LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray's multi-node switch, off by default on Windows and macOS


def import_ray_loopback_only() -> None:
    """Import Ray for the first time in this process so that a local Ray started next listens on
    loopback only.

    Ray 2.60 has no bind-address option: a local node's servers (gcs_server, raylets, core
    workers, the runtime-env agent) listen on the node IP, `::` for the gRPC servers. The node
    IP of a new local Ray is the loopback address where Ray's `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`
    is off (its default on Windows and macOS, which support single-node Ray only): every one of
    those servers then binds 127.0.0.1 (`::ffff:127.0.0.1`). Ray reads that variable once, when
    `ray._private.ray_constants` is imported, so it is set around that first import only: the
    processes this one starts later (a `ray start --address ...` joining a cluster) do not see
    it, and joining a cluster from this process (`address=...`) does not use the node IP. A
    variable the user set is theirs (left alone), and where Ray was imported already, its
    default stays (all interfaces; token authentication still applies)."""
    if "ray" in sys.modules or LOOPBACK_ENV in os.environ:
        return
    os.environ[LOOPBACK_ENV] = "0"
    try:
        import ray  # noqa: F401 - read by ray._private.ray_constants, once, here
    finally:
        del os.environ[LOOPBACK_ENV]


TOKEN_FILE = os.path.join("~", ".ray", "auth_token")  # where Ray keeps the token it generates


@contextlib.contextmanager
def local_ray_auth():
    """Around starting a local Ray of our own, unless the user set `RAY_AUTH_MODE` (respected:
    `disabled` is theirs to choose, e.g. on a loopback-only test machine): Ray then enables token
    authentication for a new local cluster by itself (Ray 2.60's default; the test checks it
    stays so), and its warning that it did is dropped (raymerge chose it; it says nothing to the
    user), except with `raymerge -v` (`RAYMERGE_VERBOSE`), which shows every note. A token file Ray generates here is made readable by this user only (Ray writes it
    with the umask's mode, e.g. 0644, readable by every local user); an existing one that other
    users can read is left alone, with a one-line warning."""
    if os.environ.get("RAY_AUTH_MODE") is not None:
        yield
        return
    path = os.path.expanduser(TOKEN_FILE)
    existed = os.path.exists(path)
    ray_auth_log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    chosen = DropMessages("Token authentication is enabled for this Ray cluster")
    if not verbose():
        ray_auth_log.addFilter(chosen)
    try:
        yield
    finally:
        ray_auth_log.removeFilter(chosen)
        _private_token_file(path, existed)


def _private_token_file(path: str, existed: bool) -> None:
    try:
        mode = os.stat(path).st_mode & 0o777
    except OSError:
        return
    if not mode & 0o077:
        return
    if not existed:
        os.chmod(path, 0o600)
    else:
        print(f"raymerge: warning: Ray's token file {path} can be read by other users (mode {mode:o}); "
              f"chmod 600 it so they cannot use this Ray", file=sys.stderr, flush=True)


def begin(pool: ActorPool, sources: Sequence[SourceSpec], staging: str, node_shards: Optional[tuple] = None) -> None:
    """Point every actor of `pool` at a merge (its sources and staging folder; `node_shards`:
    see `PoolActor.merge_begin`); a replacement actor is pointed at it too (`ActorPool.setup`)."""
    job = (list(sources), staging) if node_shards is None else (list(sources), staging, node_shards)
    pool.setup = lambda ref: ref.merge_begin(*job)
    pool.get([pool.setup(w) for w in pool.workers])


def calibrate(pool: ActorPool, samples: dict[Any, MergeOperator]) -> list[list[float]]:
    """Per actor, seconds per element of each sample's method (cached on the pool by key and
    calibration shape, so a kept pool calibrates a method once per shape: a small job's figures,
    timed on its own small tensors, are not reused for a large one). One actor of each group of
    alike actors measures for its group (`_per_actor`); where a node's actors have fewer cores
    than threads among them, the figures are scaled by how much fewer (`oversubscription`)."""
    cache: dict[Any, list[float]] = pool.cache.setdefault("calibration", {})
    keys = {k: (k, job_calibration_shape(op)) for k, op in samples.items()}
    missing = [k for k in samples if keys[k] not in cache]
    if missing:
        ops = [samples[k] for k in missing]
        rows = _per_actor(pool, lambda w: w.calibrate(ops), together=False)
        slower = oversubscription(pool)
        for j, k in enumerate(missing):
            cache[keys[k]] = [row[j] * factor for row, factor in zip(rows, slower)]
    return [[cache[keys[k]][w] for k in samples] for w in range(len(pool))]


def oversubscription(pool: ActorPool) -> list[float]:
    """Per actor, how much slower it computes than when measured alone because its node's CPU
    actors run more torch threads among them than the node has cores (at least 1): 3 one-thread
    actors of 2/3 CPU on a 2-CPU node, or 3 in-process workers on 2 cores, share 2 cores 3 ways
    (1.5). GPU actors compute on their own GPUs (1)."""
    if not pool.remote:
        threads, cores = local_threads(len(pool)) * len(pool), os.cpu_count() or 1
        return [max(1.0, threads / cores)] * len(pool)
    assert pool.rule is not None
    if pool.rule.gpus > 0:
        return [1.0] * len(pool)
    import ray

    cpus = {n["NodeID"]: n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")}
    nodes = [info.node_id for info in pool.infos()]
    threads = {node: nodes.count(node) * pool.rule.threads for node in nodes}
    return [max(1.0, threads[node] / cpus[node]) if cpus.get(node) else 1.0 for node in nodes]


def measure_io(pool: ActorPool, ops: Sequence[MergeOperator]) -> list:
    """Each actor's read, write and per-part figures on this job's own inputs and staging
    folder (`runtime.worker.IoFigures`), all actors at once, as they will run: the largest of
    `ops` is read (its first rows), the smallest merged for the fixed cost of a part."""
    by_rows = [op for op in ops if op.vocab is None and len(op.shape) >= 2] or list(ops)
    large = max(by_rows, key=lambda op: op.bytes_in)
    small = min(ops, key=lambda op: op.bytes_in)
    return _per_actor(pool, lambda w: w.measure_io(large, small))


@contextlib.contextmanager
def _in_process_threads(pool: ActorPool):
    """Around work of an in-process pool of several workers: torch's thread count as they will
    compute with (`local_threads`), then the caller's again. One in-process worker computes with
    the caller's count (`ActorPool.in_process`); a Ray pool's actors set their own. (Not
    `methods.reductions.fixed_threads`: its lock, held here for the whole merge, would block the
    workers' own factorisations, which take it on their threads.)"""
    if pool.remote or len(pool) == 1:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(local_threads(len(pool)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _gc_frozen():
    """Around in-process merge threads: the objects alive now (torch's, transformers', the
    plan's: a million or more) moved out of the garbage collector's sight, then back. A full
    collection walks them all while holding the GIL, stalling every worker thread between two
    torch calls; the merge's own short-lived objects are still collected."""
    import gc

    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _per_actor(pool: ActorPool, call: Callable[[Any], Any], together: bool = True) -> list:
    """`call(actor)`'s value for every actor of `pool`. `together`, every actor at once, as they
    will merge (storage: alone, an actor would not see what the others cost it in the kernel's
    page-cache and memory-map locks; on 2 cores two linear workers merge at about 0.75x the rate
    of one): each Ray actor measures for itself, in its own process (maybe on its own node); in
    process, every worker on a thread of its own with the torch threads they will merge with.
    Else (compute) one actor per group of alike actors (`alike`) measures for its group, the
    groups at once: alike actors compute alike, measuring all of a node's actors at once makes
    each look slower than it merges (by up to a fifth for TIES on 2 cores), and a pool of n
    actors on one node would spend n times the CPU on it; in process the first worker measures
    for all."""
    if pool.remote:
        if together:
            return pool.get([call(w) for w in pool.workers])
        group = alike(pool.infos())
        first = sorted(set(group))
        values = dict(zip(first, pool.get([call(pool.workers[i]) for i in first])))
        return [values[g] for g in group]
    with _in_process_threads(pool):
        if len(pool) == 1 or not together:
            return [call(pool.workers[0])] * len(pool)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(pool), thread_name_prefix="raymerge-calibrate") as threads:
            return list(threads.map(call, pool.workers))


def alike(infos: Sequence[Any]) -> list[int]:
    """For each actor (its `WorkerInfo`), the index of the first actor on the same node with the
    same kind of device and the same memory (of the GPU, or of the node): the one that measures
    the speed of both."""
    first: dict[tuple, int] = {}
    return [first.setdefault((info.node_id, info.device, info.memory_bytes), i) for i, info in enumerate(infos)]


def finish(pool: ActorPool) -> list[Any]:
    """Close every actor's merge files; what each reports (`worker.JobEnd`: peak RSS, input
    bytes read in the job)."""
    pool.setup = None
    return pool.get([w.merge_finish() for w in pool.workers])


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


def shards_on_one_node(queues: Sequence[Sequence[WorkItem]], nodes: Sequence[str],
                       shard_order: dict[str, int]) -> tuple[list[list[WorkItem]], dict[str, int]]:
    """The plan's queues changed so that every part of a shard runs on workers of one node (the
    node the plan gave most of the shard's input bytes; parts planned elsewhere go to the least
    loaded worker of that node), and for each shard the worker that finishes it there: for an
    output staged on each node's own disk (an S3 output on a cluster), where a shard can only be
    whole on one node. Bytes never depend on where parts run."""
    by_node: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        by_node.setdefault(node, []).append(i)
    load = [sum(item.bytes_in for item in q) for q in queues]
    per_shard: dict[str, dict[str, int]] = {}
    for i, q in enumerate(queues):
        for item in q:
            counts = per_shard.setdefault(item.target.filename, {})
            counts[nodes[i]] = counts.get(nodes[i], 0) + item.bytes_in + 1
    home = {name: max(sorted(c), key=lambda n: c[n]) for name, c in per_shard.items()}
    out: list[list[WorkItem]] = [[] for _ in queues]
    for i, q in enumerate(queues):
        for item in q:
            node = home[item.target.filename]
            if nodes[i] == node:
                out[i].append(item)
                continue
            j = min(by_node[node], key=lambda w: load[w])
            load[j] += item.bytes_in
            load[i] -= item.bytes_in
            out[j].append(item)
    sealer: dict[str, int] = {}
    for i, q in enumerate(out):
        for item in q:
            sealer.setdefault(item.target.filename, i)
    return [sorted(q, key=lambda item: shard_order[item.target.filename]) for q in out], sealer


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
    pool: ActorPool,
    queues: Sequence[Sequence[WorkItem]],
    operators: int,
    *,
    quiet: bool = False,
    may_take_from=None,
    on_done: Optional[Callable[[list[WorkItem]], None]] = None,
    nodes: Optional[Sequence[str]] = None,
) -> ExecutionStats:
    """Run each worker's queue on its actor (`begin` must have been called); measured stats.

    `nodes` (each worker's node id), for an output staged on each node's own disk: a worker
    whose node is lost, or whose replacement starts on another node, ends the merge at once
    (`WorkerLostError`: the parts it wrote are on that node's disk; a rerun resumes from the
    shards already finished), instead of rerunning its batches elsewhere.

    The plan is followed as made, with two corrections for reality: a worker that has finished
    its own queue while another still has batches waiting to be sent takes the last of them
    (`may_take_from(thief, owner)` says which workers may: e.g. not onto less memory), counted
    in `ExecutionStats.stolen_parts`; and a worker actor that dies is replaced, its unfinished
    batches requeued (module docstring), counted in `ExecutionStats.worker_restarts`.
    `on_done(batch)` is called for every batch once it has finished. An in-process pool runs the
    same batches in this process, one after another (`_run_local`).
    """
    if not pool.remote:
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
    restarts = Restarts("merge")
    finished = _batch_done(stats, bar, total_parts, on_done)
    start = time.perf_counter()

    def lost(i: int, err: BaseException, batch: Optional[list[WorkItem]] = None) -> None:
        """Worker `i` died (running `batch`): requeue what it had been sent, replace it (or give up)."""
        if nodes is not None and nodes[i] not in _alive_nodes():
            raise _node_lost(pool.labels[i], nodes[i]) from None
        unfinished = [] if batch is None else [batch]
        for ref, (j, sent) in list(pending.items()):
            if j == i:
                del pending[ref]
                unfinished.append(sent)
        pending_batches[i].extendleft(reversed(unfinished))
        in_flight[i] = 0
        stats.worker_restarts += 1
        restarts.lost(pool.labels[i], err, "a new actor reruns its unfinished batches")
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
                    pending[pool.workers[i].merge_run(batch)] = (i, batch)
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
                    if nodes is not None and nodes[i] not in _alive_nodes():
                        raise _node_lost(pool.labels[i], nodes[i])  # Ray saw the node go after the actor
                    if nodes is not None and ray.get(pool.workers[i].describe()).node_id != nodes[i]:
                        raise WorkerLostError(
                            f"merge: the replacement of {pool.labels[i]} started on another node than the parts "
                            f"it had written; rerun the same merge to resume (finished shards are kept)")
                    continue
                i, batch = pending.pop(ref)
                in_flight[i] -= 1
                try:
                    result: BatchStats = ray.get(ref)
                except RayActorError as err:
                    lost(i, err, batch)
                    continue
                finished(i, batch, result)
            now = time.perf_counter()
            alive = _alive_nodes() if nodes is not None and starting else set()
            for ref, (i, asked) in starting.items():
                # The actor's death can reach us before the node's: a replacement pinned to a node
                # that Ray has since marked dead can never start, so stop waiting for it.
                if nodes is not None and nodes[i] not in alive:
                    raise _node_lost(pool.labels[i], nodes[i])
                if now - asked > actor_pool.RESTART_TIMEOUT_S:
                    raise WorkerLostError(f"merge: a replacement for {pool.labels[i]} did not start within "
                                          f"{actor_pool.RESTART_TIMEOUT_S:.0f} s")
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - start
    return stats


def _node_lost(label: str, node_id: str) -> WorkerLostError:
    return WorkerLostError(
        f"merge: the node of {label} ({node_id[:12]}) was lost, with the parts it had written to its own disk; "
        f"rerun the same merge to resume (finished shards are kept)")


def _alive_nodes() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


def _run_local(
    pool: ActorPool,
    queues: Sequence[Sequence[WorkItem]],
    operators: int,
    *,
    quiet: bool = False,
    on_done: Optional[Callable[[list[WorkItem]], None]] = None,
) -> ExecutionStats:
    """`run_plan` on an in-process pool: each worker's queue in the same batches, in order, in this
    process; with several workers, each on a thread of its own (torch releases the GIL while it
    computes, reads and writes), with `local_threads` torch threads each, so they do not fight
    over the cores. A thread done with its queue takes batches from the others' (`_run_threads`);
    no restarts (nothing can die alone). `on_done` and the progress bar run on the calling thread."""
    n = len(pool)
    stats = ExecutionStats(workers=n, seconds=0.0, operators=operators)
    total_bytes = sum(item.bytes_in for q in queues for item in q)
    total_parts = sum(len(q) for q in queues)
    desc = "merging in process" if n == 1 else f"merging on {n} threads"
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, disable=quiet, dynamic_ncols=True)
    start = time.perf_counter()
    finished = _batch_done(stats, bar, total_parts, on_done)
    try:
        if n == 1:
            for batch in batches_of(queues[0]):
                finished(0, list(batch), pool.workers[0].merge_run(batch))
        else:
            _run_threads(pool, queues, finished, stats)
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - start
    return stats


def _batch_done(stats: ExecutionStats, bar: Any, total_parts: int,
                on_done: Optional[Callable[[list[WorkItem]], None]]) -> Callable[[int, list[WorkItem], BatchStats], None]:
    """What happens when worker i finished a batch: its figures counted, `on_done`, the bar."""
    done_parts = 0

    def finished(i: int, batch: list[WorkItem], result: BatchStats) -> None:
        nonlocal done_parts
        batch_bytes = sum(item.bytes_in for item in batch)
        stats.add(i, result, batch_bytes)
        done_parts += result.operators
        if on_done is not None:
            on_done(batch)
        bar.update(batch_bytes)
        bar.set_postfix_str(f"{done_parts}/{total_parts} parts", refresh=False)

    return finished


def local_threads(workers: int) -> int:
    """Torch threads of each of `workers` in-process workers: the cores shared out, at least one."""
    return max(1, (os.cpu_count() or 1) // workers)


def _run_threads(pool: ActorPool, queues: Sequence[Sequence[WorkItem]],
                 finished: Callable[[int, list[WorkItem], BatchStats], None], stats: ExecutionStats) -> None:
    """Run worker i's queue on thread i; `finished` for each batch, here, as they complete. A
    thread whose queue is empty takes the last batch of the queue with the most input bytes
    left (`_steal`, counted in `stats.stolen_parts`): the plan's estimates are never exact, and
    which thread runs a part does not change its bytes. The first error stops the other threads
    after their current batch and is raised. Torch's thread count (one per process) is
    `local_threads` meanwhile, then the caller's again."""
    import queue as queue_module
    import threading

    done: queue_module.Queue = queue_module.Queue()
    stop = threading.Event()
    pending = [batches_of(q) for q in queues]
    lock = threading.Lock()

    def next_batch(i: int) -> Optional[list[WorkItem]]:
        with lock:
            if pending[i]:
                return pending[i].popleft()
            batch = _steal(pending, i, lambda thief, owner: True)
            if batch is not None:
                stats.stolen_parts += len(batch)
            return batch

    def work(i: int) -> None:
        try:
            while not stop.is_set():
                batch = next_batch(i)
                if batch is None:
                    break
                done.put((i, list(batch), pool.workers[i].merge_run(batch), None))
        except BaseException as err:  # noqa: BLE001 - handed to the calling thread
            done.put((i, None, None, err))
        finally:
            done.put((i, None, None, None))  # this thread is over

    # A thread for every worker, its own queue empty or not: it may take the others' batches.
    threads = [threading.Thread(target=work, args=(i,), name=f"raymerge-worker-{i}", daemon=True)
               for i in range(len(pool))]
    with _in_process_threads(pool), _gc_frozen(), _joined(threads, stop):
        for t in threads:
            t.start()
        running, error = len(threads), None
        while running:
            i, batch, result, err = done.get()
            if batch is not None:
                finished(i, batch, result)
            elif err is not None:
                error = error or err
                stop.set()
            else:
                running -= 1
        if error is not None:
            raise error


@contextlib.contextmanager
def _joined(threads: list, stop: Any):
    """Leaving the block (done, an error, Ctrl-C): tell the threads to stop after their batch
    and wait for them, so no worker writes once the merge has ended."""
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            if t.ident is not None:  # started
                t.join()
