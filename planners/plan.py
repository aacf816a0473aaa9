"""Plans, their evaluation under the problem's cost model, and validation.

A `Plan` is a list of `Assignment(operator, part, of, worker)`: part `part` (0-based) of
`operator` split `of` ways runs on `worker`. Every number a plan reports (makespan, per-worker
loads, link times, objective, gap) is recomputed here from the assignments with
`MergeProblem`'s cost model; nothing is taken from a solver's own objective, so a plan from the
MILP and one from the greedy are judged by the same ruler.

`status` says what is known about the plan's optimality, never more:
- "optimal": proven optimal for the objective (makespan + split penalty; for `solve`, among
  plans at least as fast as the greedy's, see `planners.milp`);
- "within_gap": proven within the requested relative gap of that optimum (a solver stopping on
  its gap tolerance reports "optimal" without being so);
- "time_limit": the best plan found before the time limit, no proof;
- "heuristic": no proof beyond the reported lower bound (greedy plans).
`gap` is always `(makespan - lower_bound) / makespan` against a solver-independent lower bound
(tightened by the MILP's dual bound when one is known), so it holds whatever produced the plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from planners.problem import MergeProblem


class PlanError(ValueError):
    """A plan is invalid for its problem, or no valid plan exists; names what is wrong."""

    def __init__(self, message: str, *, operator: Optional[str] = None, worker: Optional[str] = None):
        super().__init__(message)
        self.operator = operator
        self.worker = worker


class InfeasibleError(PlanError):
    """No plan exists: something does not fit on any worker, even split as far as allowed."""


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


@dataclass(frozen=True)
class Assignment:
    """Part `part` (0-based) of `operator` split `of` ways, run on `worker`."""

    operator: str
    part: int
    of: int
    worker: str


@dataclass(frozen=True)
class Plan:
    """A placement of every operator's parts on workers, with what is known about its quality."""

    assignments: tuple[Assignment, ...]
    makespan: float
    lower_bound: float
    gap: float
    solver: str
    status: str
    solve_seconds: float
    objective: float = 0.0
    extra_parts: int = 0
    loads: Mapping[str, float] = field(default_factory=dict, compare=False)
    link_seconds: Mapping[str, float] = field(default_factory=dict, compare=False)
    remote_seconds: float = 0.0
    info: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def parts_by_worker(self) -> dict[str, list[Assignment]]:
        """Each worker's parts, in plan order (workers with nothing get an empty list)."""
        out: dict[str, list[Assignment]] = {w: [] for w in self.loads}
        for a in self.assignments:
            out.setdefault(a.worker, []).append(a)
        return out

    def load_table(self, problem: Optional[MergeProblem] = None) -> str:
        """A text table: one row per worker (parts, seconds busy, share of the makespan)."""
        counts: dict[str, int] = {}
        for a in self.assignments:
            counts[a.worker] = counts.get(a.worker, 0) + 1
        names = [w.name for w in problem.workers] if problem is not None else list(self.loads)
        width = max([len("worker")] + [len(n) for n in names])
        lines = [f"{'worker':<{width}}  {'parts':>5}  {'busy s':>10}  {'of makespan':>11}"]
        for name in names:
            load = self.loads.get(name, 0.0)
            share = load / self.makespan if self.makespan > 0 else 0.0
            lines.append(f"{name:<{width}}  {counts.get(name, 0):>5}  {load:>10.3f}  {share:>10.1%}")
        for node, secs in self.link_seconds.items():
            lines.append(f"{'link ' + node:<{width}}  {'':>5}  {secs:>10.3f}  "
                         f"{(secs / self.makespan if self.makespan > 0 else 0.0):>10.1%}")
        if self.remote_seconds:
            lines.append(f"{'remote storage':<{width}}  {'':>5}  {self.remote_seconds:>10.3f}  "
                         f"{self.remote_seconds / self.makespan:>10.1%}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (floats that are infinite become None)."""

        def clean(x: Any) -> Any:
            if isinstance(x, float) and not math.isfinite(x):
                return None
            if isinstance(x, Mapping):
                return {str(k): clean(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [clean(v) for v in x]
            return x

        return clean({
            "assignments": [
                {"operator": a.operator, "part": a.part, "of": a.of, "worker": a.worker} for a in self.assignments
            ],
            "makespan": self.makespan,
            "lower_bound": self.lower_bound,
            "gap": self.gap,
            "objective": self.objective,
            "extra_parts": self.extra_parts,
            "solver": self.solver,
            "status": self.status,
            "solve_seconds": self.solve_seconds,
            "loads": dict(self.loads),
            "link_seconds": dict(self.link_seconds),
            "remote_seconds": self.remote_seconds,
            "info": dict(self.info),
        })


def _check_assignments(problem: MergeProblem, assignments: Sequence[Assignment]) -> None:
    """Every operator covered exactly once (all its parts, one split degree), memory respected."""
    parts: dict[str, list[Assignment]] = {}
    for a in assignments:
        try:
            op = problem.operator(a.operator)
        except KeyError:
            raise PlanError(f"plan assigns unknown operator {a.operator!r}", operator=a.operator) from None
        try:
            w = problem.worker(a.worker)
        except KeyError:
            raise PlanError(
                f"operator {a.operator!r} is assigned to unknown worker {a.worker!r}", operator=a.operator,
                worker=a.worker,
            ) from None
        if a.of not in op.split_degrees:
            raise PlanError(
                f"operator {op.name!r} is split {a.of} ways; allowed: {op.split_degrees}", operator=op.name
            )
        if not 0 <= a.part < a.of:
            raise PlanError(f"operator {op.name!r}: part {a.part} of {a.of} is out of range", operator=op.name)
        if not problem.fits(op, a.of, w):
            raise PlanError(
                f"operator {op.name!r} part {a.part}/{a.of} needs {_fmt_bytes(problem.part_memory(op, a.of))} "
                f"but worker {w.name!r} has {_fmt_bytes(w.memory_bytes)}",
                operator=op.name, worker=w.name,
            )
        parts.setdefault(a.operator, []).append(a)
    for op in problem.operators:
        got = parts.get(op.name)
        if not got:
            raise PlanError(f"operator {op.name!r} is not in the plan", operator=op.name)
        degrees = {a.of for a in got}
        if len(degrees) > 1:
            raise PlanError(f"operator {op.name!r} is split inconsistently: {sorted(degrees)}", operator=op.name)
        of = got[0].of
        seen = sorted(a.part for a in got)
        if seen != list(range(of)):
            raise PlanError(
                f"operator {op.name!r} must have parts 0..{of - 1} exactly once each, got {seen}", operator=op.name
            )


def evaluate(problem: MergeProblem, assignments: Sequence[Assignment]) -> dict[str, Any]:
    """Loads, link and remote-storage seconds, makespan, extra parts and objective of assignments.

    Assumes the assignments are valid (see `validate`).
    """
    loads = {w.name: 0.0 for w in problem.workers}
    link_bytes = {n.name: 0.0 for n in problem.nodes}
    remote = 0.0
    extra = 0
    for a in assignments:
        op = problem.operator(a.operator)
        w = problem.worker(a.worker)
        loads[w.name] += problem.part_time(op, a.of, w)
        link_bytes[w.node] += problem.link_bytes(op, w) / a.of
        remote += problem.remote_bytes(op) / a.of
        if a.part == 0:
            extra += a.of - 1
    link_seconds = {n.name: link_bytes[n.name] / n.network_bandwidth for n in problem.nodes}
    remote_seconds = 0.0 if problem.remote_bandwidth is None else remote / problem.remote_bandwidth
    makespan = max([0.0, remote_seconds, *loads.values(), *link_seconds.values()])
    return {
        "loads": loads,
        "link_seconds": link_seconds,
        "remote_seconds": remote_seconds,
        "makespan": makespan,
        "extra_parts": extra,
        "objective": makespan + problem.split_penalty * extra,
    }


def validate(problem: Any, plan: Any) -> None:
    """Raise `PlanError` (naming the operator or worker) unless `plan` is valid for `problem`.

    Merge plans: every operator covered exactly once (parts 0..of-1 of an allowed split, all
    with the same degree), every part fits its worker's memory, and the reported makespan and
    objective match the cost model. Pipeline plans are checked by `planners.pipeline`.
    """
    if not isinstance(problem, MergeProblem):
        from planners.pipeline import PipelinePlan, PipelineProblem, _validate_pipeline

        if isinstance(problem, PipelineProblem) and isinstance(plan, PipelinePlan):
            _validate_pipeline(problem, plan)
            return
        raise TypeError(f"cannot validate a {type(plan).__name__} against a {type(problem).__name__}")
    assignments = plan.assignments if isinstance(plan, Plan) else plan
    _check_assignments(problem, assignments)
    if isinstance(plan, Plan):
        ev = evaluate(problem, assignments)
        if not math.isclose(ev["makespan"], plan.makespan, rel_tol=1e-9, abs_tol=1e-12):
            raise PlanError(f"plan reports makespan {plan.makespan!r} but its assignments give {ev['makespan']!r}")
        if plan.lower_bound > plan.makespan * (1 + 1e-9) + 1e-12:
            raise PlanError(f"plan reports lower bound {plan.lower_bound!r} above its makespan {plan.makespan!r}")


def make_plan(
    problem: MergeProblem,
    assignments: Sequence[Assignment],
    *,
    solver: str,
    status: str,
    solve_seconds: float,
    lower_bound: float,
    info: Optional[Mapping[str, Any]] = None,
) -> Plan:
    """Validate `assignments`, evaluate them and wrap them in a `Plan` (used by every planner)."""
    assignments = tuple(assignments)
    _check_assignments(problem, assignments)
    ev = evaluate(problem, assignments)
    makespan = ev["makespan"]
    if lower_bound > makespan * (1 + 1e-7) + 1e-12:
        raise PlanError(  # a bug in a bound, never an input error: say so loudly
            f"internal error: lower bound {lower_bound!r} exceeds the makespan {makespan!r} of a valid plan"
        )
    lb = min(lower_bound, makespan)  # equal up to rounding
    gap = 0.0 if makespan <= 0 else max(0.0, (makespan - lb) / makespan)
    return Plan(
        assignments=assignments,
        makespan=makespan,
        lower_bound=lb,
        gap=gap,
        solver=solver,
        status=status,
        solve_seconds=solve_seconds,
        objective=ev["objective"],
        extra_parts=ev["extra_parts"],
        loads=ev["loads"],
        link_seconds=ev["link_seconds"],
        remote_seconds=ev["remote_seconds"],
        info=dict(info or {}),
    )


__all__ = ["Assignment", "Plan", "PlanError", "InfeasibleError", "validate", "evaluate", "make_plan"]
