"""The fault policy of stage jobs (a prune's pipeline, a guided merge's statistics pass): the
merge pool's policy (`runtime.executor`), applied to a whole pass.

A stage actor holds state the other stages' work depends on (its loaded layers, the statistics
and hidden states it collected, the masks it has written so far), and that state died with it.
So the unfinished work of a lost stage is the whole pass: `StageJob.run(attempt)` calls
`attempt()`; when a stage actor dies during it (`ray.exceptions.RayActorError`, e.g. its process
was killed or ran out of memory), every stage actor the attempt started (`watch`) is killed, a
one-line warning names the stage, and `attempt()` runs again from the start — starting fresh
actors with the same resource rule and rewriting the output staging folder from scratch, so no
shard a failed attempt had half written survives into the published output. At most
`executor.MAX_WORKER_RESTARTS` replacements per job (the same bound as the merge pool); the next
loss ends the job with `executor.WorkerLostError` (not a user error, like merge's), naming the
stage and the number of attempts. Any other error is passed through unchanged.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional, Sequence, TypeVar

from raymerge.runtime.executor import MAX_WORKER_RESTARTS, WorkerLostError

T = TypeVar("T")


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


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class StageJob:
    """One stage job's bounded reruns (module docstring). `what` names the job in messages
    (e.g. "prune"); an attempt registers the stages it started with `watch`."""

    def __init__(self, what: str, max_restarts: int = MAX_WORKER_RESTARTS) -> None:
        self.what = what
        self.max_restarts = max_restarts
        self.restarts = 0  # stage actors lost (and the pass rerun) so far
        self.stages: Any = None  # the current attempt's `Stages`
        self._labels: dict[str, str] = {}

    def watch(self, stages: Any, labels: Optional[Sequence[str]] = None) -> None:
        """The current attempt's stages (`stage_actor.Stages`), with a label per stage for
        messages (default "stage k")."""
        self.stages = stages
        self._labels = {}
        if getattr(stages, "remote", False):
            for k, ref in enumerate(stages.workers):
                key = _actor_key(ref.actor)
                if key is not None:
                    self._labels[key] = labels[k] if labels is not None else f"stage {k}"

    def run(self, attempt: Callable[[], T]) -> T:
        """`attempt()`, rerun from the start after a stage actor died, at most `max_restarts` times."""
        while True:
            try:
                return attempt()
            except Exception as err:  # noqa: BLE001 - only actor deaths are handled here
                lost = actor_lost(err)
                if lost is None:
                    raise
                stage = self._labels.get(getattr(lost, "actor_id", None) or "", "a stage actor")
                self.kill()
                self.restarts += 1
                attempts = self.restarts
                if self.restarts > self.max_restarts:
                    raise WorkerLostError(
                        f"{self.what}: stage actors died in {attempts} attempts (limit {self.max_restarts} "
                        f"restarts); last lost: {stage}: {_first_line(lost)}"
                    ) from err
                print(f"raymerge: warning: {self.what}: {stage} died ({_first_line(lost)}); starting fresh "
                      f"stage actors and rerunning the pass (restart {self.restarts} of {self.max_restarts})",
                      file=sys.stderr, flush=True)

    def kill(self) -> None:
        """End the current attempt's stages (if any)."""
        if self.stages is None:
            return
        if not self.stages.remote:
            self.stages.kill()
        else:
            import ray

            for actor in self.stages.actors:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
        self.stages = None


def _actor_key(actor: Any) -> Optional[str]:
    actor_id = getattr(actor, "_actor_id", None)
    return actor_id.hex() if actor_id is not None else None
