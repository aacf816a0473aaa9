"""The one pool of actors every job runs on: start, call, replace, keep and shut down.

Every job — a merge, a prune, a search's pipelines, a guided merge's statistics pass — runs on an
`ActorPool` of `PoolActor`s (`runtime.pool_actor`: one actor class, composed of the capabilities
the jobs need: merge work, a block of decoder layers, pruning, trials, statistics). So:

- **One resource rule.** A pool of `n` actors is started with `runtime.actor_resources`: one GPU
  per actor, else fractional CPU shares, SPREAD over the nodes; a count the cluster cannot hold
  is refused at once (`ActorCountError`), never a silent hang. A job that needs several pools at
  once (a search's `concurrency` pipelines) computes the rule once for all their actors and gives
  it to each pool.
- **One call surface.** `pool.workers` are `ActorRef`s: `ref.method(...)` is
  `actor.method.remote(...)` on a Ray actor (an object reference) or the method of a `PoolActor`
  in this process (`ActorPool.in_process()`: no Ray, the value itself). `pool.get(handles)` turns
  either into values. Drivers are written once for both.
- **One fault policy.** A dead actor (`actor_lost`: its process killed, out of memory, its node
  lost) is replaced by a new one with the same resources (`replace`: one actor, whose unfinished
  work the merge requeues; `renew`: every actor, for jobs whose actors hold state the others
  depend on, which rerun their pass). Each job counts its replacements in a `Restarts`; after
  `MAX_WORKER_RESTARTS` the next loss ends the job with `WorkerLostError`, naming the actor and
  the count. A one-line warning names every loss that is survived.
- **Keep, replace, shut down.** Starting an actor costs a process and a torch import (about a
  second on a small CPU machine), so a merge pool may be kept for the next merge of this driver
  process (`acquire` / `release(pool, keep=True)`; `shutdown_kept`). A guided merge's statistics
  run on the merge's own pool, so a kept pool stays kept; a prune takes a kept pool of its size
  (`acquire`), and a job that needs other actors (a search, a pool of another size) shuts the
  kept one down first, so it never holds the slots they wait for.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional, Sequence, TypeVar

from raymerge.progress import bar as tqdm  # tqdm with raymerge.progress.bar_kwargs

from raymerge.runtime.actor_resources import ActorResources, actor_resources, check_actor_count, default_actor_count
from raymerge.runtime.pool_actor import ActorRef, PoolActor

T = TypeVar("T")

MAX_WORKER_RESTARTS = 3  # actors replaced per job before giving up
RESTART_TIMEOUT_S = 300.0  # how long a replacement may take to start (e.g. waiting for resources)


class WorkerLostError(RuntimeError):
    """Actors kept dying (or a replacement could not start): the job cannot go on. Not a user error."""


def actor_lost(err: BaseException) -> Optional[BaseException]:
    """The `RayActorError` behind `err` (directly, or as the cause of a task error), else None."""
    try:
        from ray.exceptions import RayActorError
    except ImportError:  # pragma: no cover - Ray is a dependency
        return None
    if isinstance(err, RayActorError):
        return err
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, RayActorError) else None


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class Restarts:
    """One job's budget of actor replacements (module docstring: the fault policy). `what` names
    the job in messages ("merge", "prune", "search", "guidance statistics")."""

    def __init__(self, what: str, limit: Optional[int] = None) -> None:
        self.what = what
        self.limit = MAX_WORKER_RESTARTS if limit is None else limit
        self.count = 0

    def lost(self, who: str, err: BaseException, then: str) -> None:
        """Count the loss of `who`; raise `WorkerLostError` past the limit, else warn (one line)
        that the job goes on with `then` (e.g. "rerunning its batches on a new actor")."""
        self.count += 1
        if self.count > self.limit:
            raise WorkerLostError(
                f"{self.what}: actors died {self.count} times (limit {self.limit} restarts); "
                f"last lost: {who}: {first_line(err)}"
            ) from err
        print(f"raymerge: warning: {self.what}: {who} died ({first_line(err)}); {then} "
              f"(restart {self.count} of {self.limit})", file=sys.stderr, flush=True)


class StageJob:
    """A job whose actors hold state the others depend on (a prune's pipeline, a guided merge's
    statistics pass, a search pipeline's resident layers): a lost actor's unfinished work is the
    whole pass. `run(attempt)` calls `attempt()`; when an actor of the watched pool dies during it,
    the loss is counted (`Restarts`: a warning, or `WorkerLostError` past the limit), every actor
    of the pool is replaced (`ActorPool.renew`: same resources, none of the lost state) and
    `attempt()` runs again from the start — which rewrites its output staging from scratch, so
    nothing a failed attempt half wrote is published. Any other error passes through unchanged."""

    def __init__(self, what: str) -> None:
        self.restarts = Restarts(what)
        self.pool: Optional["ActorPool"] = None

    def watch(self, pool: "ActorPool") -> None:
        """The pool the attempts run on (its `labels` name a lost actor)."""
        self.pool = pool

    def run(self, attempt: Callable[[], T]) -> T:
        """`attempt()`, rerun from the start after an actor died, a bounded number of times."""
        while True:
            try:
                return attempt()
            except Exception as err:  # noqa: BLE001 - only actor deaths are handled here
                lost = actor_lost(err)
                if lost is None:
                    raise
                self.lost(lost)

    def lost(self, err: BaseException) -> None:
        """Count the loss of the actor behind `err` and renew the pool (or raise `WorkerLostError`)."""
        who = self.pool.label_of(err) if self.pool is not None else "an actor"
        self.restarts.lost(who, err, "starting fresh actors and rerunning the pass")
        if self.pool is not None:
            self.pool.renew()


class ActorPool:
    """`n` `PoolActor`s started with one resource rule, or one in this process (`in_process`).

    `workers[i]` is actor i's `ActorRef`; `labels[i]` names it in messages (a job may relabel:
    "stage 0 (layers 0-3)"). `setup(ref)`, when set, is what a replacement runs before it takes
    work (a merge points it at the job: `ref.merge_begin(...)`). `cache` holds what jobs learned
    about these actors and keeps with a kept pool (the merge's calibrated speeds)."""

    def __init__(self, n: int, *, what: str, rule: Optional[ActorResources] = None) -> None:
        import ray

        self.remote = True
        self.what = what
        self.rule = rule if rule is not None else actor_resources(n, what=what)
        self._cls = ray.remote(PoolActor).options(max_concurrency=1, max_restarts=0, **self.rule.options)
        self.workers: list[ActorRef] = [ActorRef(self._start(i), True) for i in range(n)]
        self.labels = _labels(what, n)
        self.setup: Optional[Callable[[ActorRef], Any]] = None
        self.cache: dict[Any, Any] = {}
        self._infos: Optional[list[Any]] = None
        self._session = _ray_session()

    @classmethod
    def in_process(cls, what: str = "in-process worker", n: int = 1) -> "ActorPool":
        """`n` `PoolActor`s in this process: no Ray, calls return values (a merge runs the
        actors' queues on `n` threads: `runtime.executor`). The torch thread count is left as
        this process has it (a library must not change its caller's) except while a merge runs
        several actors at once; the numbers do not depend on it."""
        pool = cls.__new__(cls)
        pool.remote, pool.what, pool.rule, pool._cls = False, what, None, None
        pool.workers = [ActorRef(PoolActor(i), False) for i in range(n)]
        pool.labels = [what] if n == 1 else [f"{what} {i}" for i in range(n)]
        pool.setup, pool.cache, pool._infos, pool._session = None, {}, None, None
        return pool

    @property
    def key(self) -> Optional[tuple]:
        """What a kept pool must match to be reused: Ray session (job), size, resources, threads."""
        return _pool_key(self._session, len(self.workers), self.rule) if self.remote else None

    def _start(self, i: int) -> Any:
        assert self._cls is not None
        return self._cls.remote(i, self.rule.threads)

    def __len__(self) -> int:
        return len(self.workers)

    @property
    def actors(self) -> list[Any]:
        """The Ray actor handles (or in-process `PoolActor`s) behind the workers."""
        return [w.actor for w in self.workers]

    def label_of(self, err: BaseException) -> str:
        """The label of the actor a `RayActorError` is about ("an actor" when not one of ours)."""
        actor_id = getattr(err, "actor_id", None)
        for w, label in zip(self.workers, self.labels):
            own = getattr(w.actor, "_actor_id", None)
            if actor_id is not None and own is not None and own.hex() == actor_id:
                return label
        return "an actor"

    def infos(self) -> list[Any]:
        """What each actor reported about itself (`WorkerInfo`: node, host, pid, device, memory)."""
        if self._infos is None:
            self._infos = self.get([w.describe() for w in self.workers])
        return self._infos

    def get(self, handles: Any, desc: Optional[str] = None, quiet: bool = True) -> Any:
        """The values behind `handles` (in process: they are the values already); a progress bar
        over a list of handles when `desc` is given and not `quiet`."""
        if not self.remote:
            return handles
        import ray

        if isinstance(handles, list) and desc and not quiet:
            pending = list(handles)
            with tqdm(total=len(pending), desc=desc, unit="step", leave=False) as bar:
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    bar.update(len(done))
        return ray.get(handles)

    def map(self, call: Callable[[Any], Any], items: Sequence[Any], desc: Optional[str] = None,
            quiet: bool = True) -> list[Any]:
        """`call(item)` (calls on the actors, returning a handle) for each item, and the values,
        with one progress bar over the items when `desc` is given and not `quiet`, on Ray and in
        process alike: on Ray every call is submitted first and the bar counts them as they
        finish (`get`); in process a call runs when it is made, so the bar counts the calls."""
        if self.remote:
            return self.get([call(item) for item in items], desc, quiet)
        steps = tqdm(items, desc=desc, unit="step", leave=False, disable=quiet or not desc)
        return [call(item) for item in steps]

    def replace(self, i: int) -> Any:
        """Replace actor `i` (dead, or given up) by a new one with the same resources; returns the
        handle of its `setup` (work sent to it later runs after that), else of its `describe`."""
        self._end([self.workers[i]])
        self.workers[i] = ActorRef(self._start(i), True)
        self._infos = None
        return self.setup(self.workers[i]) if self.setup is not None else self.workers[i].describe()

    def renew(self) -> None:
        """Replace every actor (a stage job's rerun: their state is the pass's)."""
        for i in range(len(self.workers)):
            if self.remote:
                self.replace(i)
            else:
                self.workers[i].actor.close()

    def keep(self, indices: Sequence[int]) -> None:
        """Keep only the actors at `indices` (in that order); end the others."""
        chosen = set(indices)
        dropped = [w for i, w in enumerate(self.workers) if i not in chosen]
        self.workers = [self.workers[i] for i in indices]
        self.labels = [self.labels[i] for i in indices]
        self._infos = None
        self._end(dropped)

    def kill(self) -> None:
        """End the actors (in process: close their files)."""
        self._end(self.workers)
        self.workers = []

    def _end(self, workers: Sequence[ActorRef]) -> None:
        if not self.remote:
            for w in workers:
                w.actor.close()
            return
        import ray

        for w in workers:
            try:
                ray.kill(w.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass


def _labels(what: str, n: int) -> list[str]:
    """Default names of a pool's actors in messages: "merge worker 0", ..."""
    singular = what[:-1] if what.endswith("s") else what
    return [f"{singular} {i}" for i in range(n)]


def _ray_session() -> tuple:
    """This driver's Ray session: its job id with the id of the node it runs on. The job id alone
    repeats: the first driver of every new cluster is job 01000000, so after a `ray.shutdown()`
    and a new `ray.init()` a kept pool of the old cluster would match (its actors long gone)."""
    import ray

    context = ray.get_runtime_context()
    return (context.get_job_id(), context.get_node_id())


def _pool_key(session: tuple, n: int, rule: ActorResources) -> tuple:
    """What a kept pool must match to be reused: Ray session (job), size, resources, threads."""
    return (session, n, tuple(sorted(rule.options.items())), rule.threads)


# -- a pool kept between merges of this process ------------------------------------------------------
_kept: Optional[ActorPool] = None


def acquire(n: Optional[int], what: str = "merge workers") -> ActorPool:
    """The kept pool when it matches (same Ray session, size, resources), else a new pool of `n`
    actors (default: one per GPU, else per CPU); a kept pool that does not match is shut down
    first, so it does not hold the slots."""
    global _kept
    check_actor_count(n, "workers")
    n = n if n is not None else default_actor_count()
    rule = actor_resources(n, what=what)  # raises at once what the cluster cannot hold
    if _kept is not None:
        if _kept.key == _pool_key(_ray_session(), n, rule) and _kept.workers:
            pool, _kept = _kept, None
            pool.what, pool.labels = what, _labels(what, len(pool))
            return pool
        shutdown_kept()
    return ActorPool(n, what=what, rule=rule)


def release(pool: ActorPool, keep: bool) -> None:
    """Keep `pool` for the next job of this process (a merge's or a prune's, when asked), or end
    its actors."""
    global _kept
    if keep and pool.remote and pool.workers:
        pool.setup = None
        if _kept is not None and _kept is not pool:
            _kept.kill()
        _kept = pool
    else:
        pool.kill()


def kept() -> Optional[ActorPool]:
    """The pool kept by `keep_workers=True`, if any."""
    return _kept


def shutdown_kept() -> None:
    """End the pool kept by `keep_workers=True`, if any."""
    global _kept
    if _kept is not None:
        try:
            _kept.kill()
        except Exception:  # noqa: BLE001 - Ray may already be shut down
            pass
        _kept = None
