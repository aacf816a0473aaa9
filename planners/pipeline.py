"""Pipelines: contiguous layer stages over an ordered list of workers (pruning, search evaluation).

Pruning calibration and search evaluation push hidden states through the layers in order, so a
worker holds a contiguous run of layers and passes activations on to the next worker. Given the
layers in model order and the workers in pipeline order, `plan_pipeline` cuts the layers into
contiguous stages, stage k on the k-th worker used (a worker may be left out, never reordered),
minimising the slowest stage:

    stage_seconds = sum(layer.compute_s for its layers) / worker.speed
    stage_memory  = sum(layer.memory_bytes for its layers) <= worker.memory_bytes

`compute_s` is a layer's time per batch on a speed-1.0 worker; memory is what the layer keeps
resident (weights plus its share of working memory). Moving activations between stages is not
modelled (small next to a layer's compute for calibration-sized batches).

Exact algorithm: the optimum equals some stage's time `(P[j] - P[i]) / speed` (P = prefix sums
of compute), and for a given limit T a greedy that gives each worker in turn the longest run
that fits both T and its memory places all layers whenever any plan does (a longer first stage
never hurts the rest, since every later suffix is a subset). Binary search over the sorted
candidate times with that greedy finds the optimum; the plan returned is the greedy's for it
(earlier workers take as many layers as the optimum allows).
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass
from typing import Sequence

from planners.plan import InfeasibleError, PlanError, _fmt_bytes
from planners.problem import ProblemError, Worker, _check_name, _positive, _unique


@dataclass(frozen=True)
class Layer:
    """One layer: seconds per batch on a speed-1.0 worker and resident bytes."""

    name: str
    compute_s: float
    memory_bytes: float

    def __post_init__(self) -> None:
        _check_name("layer", self.name)
        _positive("layer", self.name, "compute_s", self.compute_s, allow_zero=True)
        _positive("layer", self.name, "memory_bytes", self.memory_bytes, allow_zero=True)


@dataclass(frozen=True)
class PipelineProblem:
    """Layers in model order, workers in pipeline order."""

    layers: tuple[Layer, ...]
    workers: tuple[Worker, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "workers", tuple(self.workers))
        if not self.layers:
            raise ProblemError("a pipeline problem needs at least one layer")
        if not self.workers:
            raise ProblemError("a pipeline problem needs at least one worker")
        _unique("layer", (l.name for l in self.layers))
        _unique("worker", (w.name for w in self.workers))


@dataclass(frozen=True)
class Stage:
    """Layers `first`..`last` (inclusive, indices into the problem's layers) on `worker`."""

    worker: str
    first: int
    last: int
    seconds: float
    memory_bytes: float


@dataclass(frozen=True)
class PipelinePlan:
    """Stages in pipeline order; `makespan` is the slowest stage's seconds per batch."""

    stages: tuple[Stage, ...]
    makespan: float
    lower_bound: float
    gap: float
    solver: str
    status: str
    solve_seconds: float

    def layers_of(self, problem: PipelineProblem) -> dict[str, list[str]]:
        """Worker name -> the names of its layers, in order."""
        return {s.worker: [l.name for l in problem.layers[s.first:s.last + 1]] for s in self.stages}

    def to_dict(self) -> dict:
        return {
            "stages": [dict(vars(s)) for s in self.stages],
            "makespan": self.makespan,
            "lower_bound": self.lower_bound,
            "gap": self.gap,
            "solver": self.solver,
            "status": self.status,
            "solve_seconds": self.solve_seconds,
        }


def pipeline_lower_bound(problem: PipelineProblem) -> float:
    """max(total compute / summed speed, slowest layer on the fastest worker that can hold it)."""
    total = sum(l.compute_s for l in problem.layers) / sum(w.speed for w in problem.workers)
    worst = 0.0
    for l in problem.layers:
        speeds = [w.speed for w in problem.workers if l.memory_bytes <= w.memory_bytes]
        if speeds:
            worst = max(worst, l.compute_s / max(speeds))
    return max(total, worst)


def plan_pipeline(problem: PipelineProblem) -> PipelinePlan:
    """The optimal contiguous stages (module docstring); `InfeasibleError` names what cannot fit."""
    t0 = time.perf_counter()
    layers, workers = problem.layers, problem.workers
    P = [0.0]
    Q = [0.0]
    for l in layers:
        P.append(P[-1] + l.compute_s)
        Q.append(Q[-1] + l.memory_bytes)

    cuts = _greedy(P, Q, workers, math.inf)
    if cuts[-1][1] < len(layers):
        _raise_infeasible(problem, cuts[-1][1])
    candidates = sorted({(P[j] - P[i]) / s for s in {w.speed for w in workers}
                         for i in range(len(layers)) for j in range(i + 1, len(layers) + 1)})
    lo = bisect.bisect_left(candidates, pipeline_lower_bound(problem) * (1 - 1e-9))
    hi = len(candidates) - 1  # the largest candidate is the whole model on the slowest worker: >= any stage
    # smallest index whose candidate is feasible (the memory-only greedy succeeded, so hi is)
    while lo < hi:
        mid = (lo + hi) // 2
        if _greedy(P, Q, workers, candidates[mid])[-1][1] == len(layers):
            hi = mid
        else:
            lo = mid + 1
    best = candidates[hi]
    stages = []
    for k, (i, j) in enumerate(_greedy(P, Q, workers, best)):
        if j > i:
            stages.append(Stage(workers[k].name, i, j - 1, (P[j] - P[i]) / workers[k].speed, Q[j] - Q[i]))
    makespan = max(s.seconds for s in stages)
    lb = min(pipeline_lower_bound(problem), makespan)
    plan = PipelinePlan(
        stages=tuple(stages), makespan=makespan, lower_bound=lb,
        gap=0.0 if makespan <= 0 else (makespan - lb) / makespan,
        solver="exact", status="optimal", solve_seconds=time.perf_counter() - t0,
    )
    _validate_pipeline(problem, plan)
    return plan


def _greedy(P: Sequence[float], Q: Sequence[float], workers: Sequence[Worker], limit: float) -> list[tuple[int, int]]:
    """Per worker in order, the longest run [i, j) from where the previous one stopped that
    fits `limit` seconds and the worker's memory. Stops early once every layer is placed."""
    n = len(P) - 1
    out = []
    i = 0
    for w in workers:
        j = i
        while j < n and (P[j + 1] - P[i]) / w.speed <= limit and Q[j + 1] - Q[i] <= w.memory_bytes:
            j += 1
        out.append((i, j))
        i = j
        if i == n:
            break
    return out


def _raise_infeasible(problem: PipelineProblem, stuck: int) -> None:
    layer = problem.layers[stuck]
    biggest = max(problem.workers, key=lambda w: w.memory_bytes)
    if layer.memory_bytes > biggest.memory_bytes:
        raise InfeasibleError(
            f"layer {layer.name!r} needs {_fmt_bytes(layer.memory_bytes)}, more than any worker "
            f"(largest: {biggest.name!r} with {_fmt_bytes(biggest.memory_bytes)})", operator=layer.name,
        )
    rest = sum(l.memory_bytes for l in problem.layers[stuck:])
    raise InfeasibleError(
        f"the workers' memory runs out at layer {layer.name!r} (index {stuck}): placing the layers in "
        f"order on {len(problem.workers)} workers leaves {len(problem.layers) - stuck} layers "
        f"({_fmt_bytes(rest)}) with no worker left", operator=layer.name,
    )


def _validate_pipeline(problem: PipelineProblem, plan: PipelinePlan) -> None:
    """Contiguous cover of all layers, in order, workers used once each in pipeline order,
    memory respected, reported times consistent."""
    order = {w.name: k for k, w in enumerate(problem.workers)}
    nxt = 0
    last_worker = -1
    slowest = 0.0
    for s in plan.stages:
        if s.worker not in order:
            raise PlanError(f"stage on unknown worker {s.worker!r}", worker=s.worker)
        k = order[s.worker]
        if k <= last_worker:
            raise PlanError(f"worker {s.worker!r} is used out of pipeline order or twice", worker=s.worker)
        last_worker = k
        if s.first != nxt or s.last < s.first or s.last >= len(problem.layers):
            name = problem.layers[min(nxt, len(problem.layers) - 1)].name
            raise PlanError(
                f"stage on {s.worker!r} covers layers {s.first}..{s.last}, expected to start at {nxt} ({name!r})",
                operator=name, worker=s.worker,
            )
        w = problem.workers[k]
        mem = sum(l.memory_bytes for l in problem.layers[s.first:s.last + 1])
        if mem > w.memory_bytes:
            raise PlanError(
                f"layers {problem.layers[s.first].name!r}..{problem.layers[s.last].name!r} need "
                f"{_fmt_bytes(mem)} but worker {w.name!r} has {_fmt_bytes(w.memory_bytes)}",
                operator=problem.layers[s.first].name, worker=w.name,
            )
        secs = sum(l.compute_s for l in problem.layers[s.first:s.last + 1]) / w.speed
        if not math.isclose(secs, s.seconds, rel_tol=1e-9, abs_tol=1e-12):
            raise PlanError(f"stage on {w.name!r} reports {s.seconds!r} s, its layers take {secs!r} s", worker=w.name)
        slowest = max(slowest, secs)
        nxt = s.last + 1
    if nxt != len(problem.layers):
        name = problem.layers[nxt].name
        raise PlanError(f"layer {name!r} (and any after it) is in no stage", operator=name)
    if not math.isclose(slowest, plan.makespan, rel_tol=1e-9, abs_tol=1e-12):
        raise PlanError(f"plan reports makespan {plan.makespan!r}, its stages give {slowest!r}")


__all__ = ["Layer", "PipelineProblem", "Stage", "PipelinePlan", "plan_pipeline", "pipeline_lower_bound"]
