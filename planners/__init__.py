"""Placement planning for raymerge (a PuLP MILP over operators and workers).

Standalone: imports pulp (HiGHS through pulp's highspy interface, CBC as the fallback) and the
standard library, nothing of torch, Ray or raymerge, so it can be used and tested on its own.
PuLP is imported when an LP or MILP is first built, not with the package (~0.25 s with HiGHS and
numpy): a plan on one group of equal workers whose greedy plan is already close to its lower
bound never needs it.

Two problems:
- `MergeProblem`: independent operators (one per output tensor) with bytes read and written,
  compute seconds, peak memory and allowed row-wise splits, placed on workers (memory, speed,
  read bandwidth) that sit on nodes sharing a network link. `solve` picks every operator's split
  degree and the worker of each part with a MILP, minimising the makespan plus a small penalty
  per extra part; `lpt` is the greedy baseline and `lower_bound` a solver-independent bound
  (`available_solvers()` lists the MILP back ends PuLP can use here). The cost model is in
  `planners.problem`, the greedy and the bounds in `planners.greedy`, the MILP in
  `planners.milp`.
- `PipelineProblem`: layers run in order (pruning calibration, search evaluation) cut into
  contiguous stages over an ordered list of workers; `plan_pipeline` minimises the slowest stage
  under per-worker memory, exactly.

Every plan is validated (`validate`) before it is returned and reports its makespan, a lower
bound, the gap between them, which solver produced it and an honest status ("optimal",
"within_gap", "time_limit" or "heuristic").

    from planners import MergeProblem, Operator, Worker, Node, solve
    plan = solve(MergeProblem(operators, workers, nodes), time_limit=10)
    print(plan.makespan, plan.lower_bound, plan.gap, plan.solver, plan.status)
"""

from planners.greedy import lower_bound, lpt
from planners.milp import available_solvers, solve
from planners.pipeline import Layer, PipelinePlan, PipelineProblem, Stage, plan_pipeline
from planners.plan import Assignment, InfeasibleError, Plan, PlanError, validate
from planners.problem import MergeProblem, Node, Operator, ProblemError, Worker

__all__ = [
    "Operator",
    "Worker",
    "Node",
    "MergeProblem",
    "Assignment",
    "Plan",
    "PlanError",
    "InfeasibleError",
    "ProblemError",
    "validate",
    "lower_bound",
    "lpt",
    "solve",
    "available_solvers",
    "Layer",
    "PipelineProblem",
    "Stage",
    "PipelinePlan",
    "plan_pipeline",
]
