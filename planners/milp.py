"""The MILP planner: split degree and worker of every part, minimising makespan (PuLP).

Formulation (exact for the cost model in `planners.problem`, not a relaxation):
- Operators with identical cost rows (same time, link bytes and remote bytes on every worker
  group, same feasible splits) form a class `c` of `N_c` operators. Integers `k[c,d]` count the
  operators of class `c` split `d` ways (sum over d = N_c) and integers `n[c,d,w]` the parts of
  such splits placed on worker `w` (sum over w = d * k[c,d]); `n[c,d,w]` exists only where a
  part fits `w`'s memory. A 70B merge (723 tensors, five shapes) read from remote storage has
  five classes (times the number of input locations when inputs sit on node disks), so the model
  has classes x degrees x workers integers instead of one binary per (operator, part, worker).
- Continuous `T` (the makespan): every worker's load `sum n[c,d,w] * time(c,d,w) <= T`; every
  node link `sum over its workers of n[c,d,w] * link_bytes(c,w)/d / bandwidth <= T`; remote
  storage likewise when its bandwidth is given; and `T >= lower_bound(problem)` (a valid cut).
- Interchangeable workers (same node, memory, speed, read bandwidth) are ordered by load
  (`load(w_j) >= load(w_j+1)`), which removes symmetric copies of every solution.
- Objective: `T + split_penalty * sum (d - 1) * k[c,d]`.

The counts are expanded to concrete parts deterministically: within a class, operators in
problem order take the degrees in increasing order; the `d * k` part slots of a degree, listed
worker by worker, are dealt with stride `k`, so an operator gets two parts on one worker only
when that worker holds more than `k` of them.

Solving: HiGHS in-process (`pulp.HiGHS`, highspy) by default, PuLP's CBC (`COIN_CMD` or
`PULP_CBC_CMD`) when HiGHS is not available or when asked. `solve` first runs the LPT greedy:
- if the LPT plan is already within `gap` of the lower bound, or within `min_gain` seconds of it
  (a MILP could not gain more than that), no MILP is built at all (nor PuLP imported, when the
  lower bound needed none: one group of equal workers, `planners._tables.Tables.lp_bound`);
- otherwise the LPT plan is the MILP's warm start (HiGHS: `setSolution` on the highspy model,
  which PuLP 3.3 does not do itself; CBC: `warmStart=True`), and the MILP is capped at the LPT
  makespan (`T <= lpt makespan`), so `solve` never returns a slower plan than `lpt`, nor one with
  a higher objective. The cap means the MILP optimises over plans at least as fast as LPT's;
  a slower plan could only win on the objective by saving more in split penalties than it
  loses in makespan, which for a small penalty is what nobody wants.
- the plan returned is the MILP's when it is no worse than LPT's (`solver` "highs" or "cbc"),
  else LPT's (`solver` "lpt", with a note in `info`).

Status, from PuLP's two fields: a time-limited incumbent comes back as status "Optimal" with
`sol_status` 2 (IntegerFeasible), so only `sol_status` 1 counts as solved; even then, a solver
that stopped on its relative gap tolerance gives "within_gap", and only a zero gap "optimal".
"optimal" and "within_gap" refer to the objective over the capped plans.

Bounds: `plan.lower_bound` is a bound on the makespan, the combinatorial one from
`planners.greedy`, raised when the solver's dual bound `D` on the objective says more (any plan
no slower than LPT has makespan `>= D - split_penalty * (most extra parts any plan can have)`,
which only helps for tiny penalties). `info["objective_bound"]` bounds the objective, using `D`
when the solver reports it (HiGHS does; PuLP does not return CBC's).
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Optional

from planners._tables import Tables, lp_var
from planners._quiet import hush_highs_banner
from planners.greedy import _assignments, _lpt_choices
from planners.plan import Plan, PlanError, make_plan
from planners.problem import MergeProblem

if TYPE_CHECKING:  # imported where a MILP is built: `import planners` stays light
    import pulp


def available_solvers() -> list[str]:
    """The MILP back ends usable here, in order of preference ("highs", "cbc")."""
    import pulp

    names = set(pulp.listSolvers(onlyAvailable=True))
    out = []
    if "HiGHS" in names:
        out.append("highs")
    if "COIN_CMD" in names or "PULP_CBC_CMD" in names:
        out.append("cbc")
    return out


def solve(
    problem: MergeProblem,
    *,
    time_limit: float = 10.0,
    gap: float = 1e-3,
    solver: Optional[str] = None,
    threads: Optional[int] = None,
    warm_start: bool = True,
    msg: bool = False,
    min_gain: float = 0.0,
) -> Plan:
    """The best plan the MILP finds within `time_limit` seconds, never slower than `lpt`'s.

    `time_limit`: wall-clock seconds for the whole call (greedy, model building and solver; the
    solver gets what is left, at least 0.1 s). `gap`: relative optimality gap (on the
    objective) at which the solver may stop. `min_gain`: seconds; no MILP is built when the LPT
    plan's objective is within that of the lower bound, since no plan could gain more (status
    "heuristic" unless LPT is also within `gap`). The solver's availability is checked only
    when a MILP is built: where none is needed, `solver="cbc"` without CBC returns LPT's plan. `solver`:
    "highs", "cbc", or None for the first available. `warm_start`: start the solver from the
    LPT plan. `msg`: show the solver's log. Raises `InfeasibleError` naming the operator that
    fits no worker. See the module docstring for the model, `status` and the bounds.

    Deterministic when the solver finishes (status "optimal" or "within_gap", or the MILP is
    skipped); a plan cut off by the time limit depends on how far the solver got.
    """
    t0 = time.perf_counter()
    if not (time_limit > 0 and math.isfinite(time_limit)):
        raise ValueError(f"time_limit must be a positive number of seconds, got {time_limit!r}")
    if not 0 <= gap < 1:
        raise ValueError(f"gap must be in [0, 1), got {gap!r}")
    if not (min_gain >= 0 and math.isfinite(min_gain)):
        raise ValueError(f"min_gain must be a finite number of seconds >= 0, got {min_gain!r}")
    if solver not in (None, "highs", "cbc"):
        raise ValueError(f"solver must be 'highs', 'cbc' or None, got {solver!r}")
    tab = Tables(problem)  # raises InfeasibleError first
    bounds = tab.bound_parts()
    lb = max(bounds.values())
    penalty = problem.split_penalty
    objective_lb = lb + penalty * tab.min_extra_parts()

    lpt_degrees, lpt_workers = _lpt_choices(tab, lb)
    lpt_plan = make_plan(
        problem, _assignments(problem, lpt_degrees, lpt_workers), solver="lpt", status="heuristic",
        solve_seconds=0.0, lower_bound=lb,
    )
    info: dict[str, Any] = {
        "bounds": bounds,
        "lpt_makespan": lpt_plan.makespan,
        "lpt_objective": lpt_plan.objective,
        "objective_bound": objective_lb,
    }
    within_gap = lpt_plan.objective - objective_lb <= gap * lpt_plan.objective
    if within_gap or lpt_plan.objective - objective_lb <= min_gain:
        if lpt_plan.objective <= objective_lb * (1 + 1e-12):
            status = "optimal"
        else:
            status = "within_gap" if within_gap else "heuristic"
        why = ("within the requested gap of the lower bound" if within_gap else
               f"within {min_gain:g} s of the lower bound: no plan could gain more")
        info["milp"] = {"skipped": f"the LPT plan is {why}"}
        return replace(lpt_plan, status=status, solve_seconds=time.perf_counter() - t0, info=info)

    backend = _pick_solver(solver)
    model = _Model(tab, lb, cap=lpt_plan.makespan)
    if warm_start:
        model.set_start(lpt_degrees, lpt_workers)
    left = max(0.1, time_limit - (time.perf_counter() - t0))  # time_limit covers the whole call
    result = model.solve(backend, time_limit=left, gap=gap, threads=threads, msg=msg, warm_start=warm_start)
    info["milp"] = result["info"]

    dual = result["info"].get("dual_bound")
    if dual is not None and math.isfinite(dual):
        dual *= 1 - 1e-9  # solver tolerances
        # Plans slower than LPT have objective > lpt makespan; the others are >= dual.
        info["objective_bound"] = max(objective_lb, min(dual, lpt_plan.makespan))
        # Makespan: T >= objective - penalty * extra parts >= dual - penalty * (most extra parts).
        from_dual = min(dual, lpt_plan.makespan) - penalty * sum(d[-1] - 1 for d in tab.degrees)
        if from_dual > lb:
            bounds = dict(bounds, milp_dual=from_dual)
            info["bounds"] = bounds
            lb = from_dual

    best = lpt_plan
    if result["counts"] is not None:
        degrees, workers = model.expand(result["counts"])
        milp_plan = make_plan(
            problem, _assignments(problem, degrees, workers), solver=backend, status=result["status"],
            solve_seconds=0.0, lower_bound=lb,
        )
        info["improved_on_lpt"] = milp_plan.objective < lpt_plan.objective * (1 - 1e-12)
        if (milp_plan.objective <= lpt_plan.objective * (1 + 1e-12)
                and milp_plan.makespan <= lpt_plan.makespan * (1 + 1e-12)):
            best = milp_plan
        else:  # the start was not taken up, or rounding: LPT stays
            info["note"] = "the MILP incumbent was not better than LPT; returning the LPT plan"
    else:
        info["note"] = f"the MILP found no solution ({result['info'].get('sol_status')}); returning the LPT plan"
    if best is lpt_plan:
        # LPT is no worse than the MILP's incumbent; a proof about that incumbent covers it too.
        proven = result["counts"] is not None and result["status"] in ("optimal", "within_gap")
        status = result["status"] if proven else "heuristic"
    else:
        status = best.status
    lb = min(lb, best.makespan)
    gap_now = 0.0 if best.makespan <= 0 else max(0.0, (best.makespan - lb) / best.makespan)
    return replace(best, status=status, lower_bound=lb, gap=gap_now, solve_seconds=time.perf_counter() - t0, info=info)


def _pick_solver(solver: Optional[str]) -> str:
    have = available_solvers()
    if solver is None:
        if not have:
            raise RuntimeError("no MILP solver available to PuLP: install highspy (preferred) or pulp[cbc]")
        return have[0]
    if solver not in ("highs", "cbc"):
        raise ValueError(f"solver must be 'highs', 'cbc' or None, got {solver!r}")
    if solver not in have:
        raise RuntimeError(f"solver {solver!r} is not available to PuLP here (available: {have or 'none'})")
    return solver


def _highs_warm(**options: Any) -> Any:
    """A `pulp.HiGHS` that hands the variables' initial values to highspy as a starting solution."""
    return _highs_warm_class()(**options)


@functools.cache
def _highs_warm_class() -> type:
    """The class behind `_highs_warm`, made on first use: PuLP is imported only when a MILP is solved."""
    import pulp

    class HiGHSWarm(pulp.HiGHS):
        def callSolver(self, lp):  # noqa: N802 (PuLP's name)
            highspy = pulp.apis.highs_api.highspy
            cols = sorted(lp.variables(), key=lambda v: v.index)
            if cols and all(v.varValue is not None for v in cols):
                sol = highspy.HighsSolution()
                sol.col_value = [float(v.varValue) for v in cols]
                sol.value_valid = True
                lp.solverModel.setSolution(sol)
            super().callSolver(lp)

    return HiGHSWarm


class _Model:
    def __init__(self, tab: Tables, lb: float, cap: float):
        import pulp

        self.tab = tab
        p = tab.problem
        self.problem = p
        self.classes = tab.classes  # identical operators, in order of first appearance
        self.class_of = {i: c for c, members in enumerate(self.classes) for i in members}

        lp = pulp.LpProblem("raymerge_placement", pulp.LpMinimize)
        # T <= cap (the LPT makespan): solve() never returns a slower plan than LPT's
        self.T = lp_var(lp, "T", min(lb, cap), cap * (1 + 1e-9), pulp.LpContinuous)
        self.k: dict[tuple[int, int], Any] = {}
        self.n: dict[tuple[int, int, int], Any] = {}
        load_terms: list[list] = [[] for _ in p.workers]
        link_terms: dict[str, list] = {n: [] for n in tab.node_bandwidth}
        remote_terms = []
        split_terms = []
        for c, members in enumerate(self.classes):
            i0 = members[0]
            count = len(members)
            degrees = tab.degrees[i0]
            ks = []
            for d in degrees:
                if len(degrees) == 1:
                    k = count
                else:
                    k = lp_var(lp, f"k_{c}_{d}", 0, count, pulp.LpInteger)
                    ks.append(k)
                    if d > 1:
                        split_terms.append((d - 1) * k)
                self.k[c, d] = k
                parts = []
                for g in tab.fits[i0][d]:
                    t = tab.full[i0][g] / d
                    node = tab.group_node[g]
                    link_s = tab.link[i0][g] / d / tab.node_bandwidth[node]
                    for w in tab.groups[g]:
                        x = lp_var(lp, f"n_{c}_{d}_{w}", 0, d * count, pulp.LpInteger)
                        self.n[c, d, w] = x
                        parts.append(x)
                        load_terms[w].append(t * x)
                        if link_s:
                            link_terms[node].append(link_s * x)
                        if tab.remote_bandwidth is not None and tab.remote[i0]:
                            remote_terms.append(tab.remote[i0] / d / tab.remote_bandwidth * x)
                lp += pulp.lpSum(parts) == d * k, f"parts_{c}_{d}"
            if ks:
                lp += pulp.lpSum(ks) == count, f"split_{c}"
            else:
                split_terms.append((degrees[0] - 1) * count)
        self.loads = [pulp.lpSum(terms) for terms in load_terms]
        for w, expr in enumerate(self.loads):
            lp += expr <= self.T, f"load_{w}"
        self.shared = []  # node links and remote storage: seconds of use, each <= T
        for j, terms in enumerate(link_terms.values()):
            if terms:
                self.shared.append(pulp.lpSum(terms))
                lp += self.shared[-1] <= self.T, f"link_{j}"
        if remote_terms:
            self.shared.append(pulp.lpSum(remote_terms))
            lp += self.shared[-1] <= self.T, "remote"
        for members in tab.groups:  # symmetry: interchangeable workers ordered by load
            for a, b in zip(members, members[1:]):
                lp += self.loads[a] - self.loads[b] >= 0, f"sym_{a}_{b}"
        lp += self.T + tab.penalty * pulp.lpSum(split_terms)
        self.lp = lp

    def set_start(self, degrees: list[int], workers: list[list[int]]) -> None:
        """Initial values from a concrete plan, workers permuted within groups to satisfy the
        symmetry rows (loads descending)."""
        import pulp

        tab = self.tab
        per_worker: dict[int, dict[tuple[int, int], int]] = {w: {} for w in range(len(self.problem.workers))}
        load = [0.0] * len(self.problem.workers)
        k_counts: dict[tuple[int, int], int] = {}
        for i, (d, ws) in enumerate(zip(degrees, workers)):
            c = self.class_of[i]
            k_counts[c, d] = k_counts.get((c, d), 0) + 1
            for w in ws:
                per_worker[w][c, d] = per_worker[w].get((c, d), 0) + 1
                load[w] += tab.full[i][tab.group_of[w]] / d
        remap: dict[int, int] = {}
        for members in tab.groups:
            ranked = sorted(members, key=lambda w: (-load[w], w))
            remap.update(zip(ranked, members))  # heaviest bundle goes to the first member
        for (c, d, w), x in self.n.items():
            x.setInitialValue(0)
        for w, bundle in per_worker.items():
            for (c, d), cnt in bundle.items():
                self.n[c, d, remap[w]].setInitialValue(cnt)
        for (c, d), k in self.k.items():
            if isinstance(k, pulp.LpVariable):
                k.setInitialValue(k_counts.get((c, d), 0))
        value = max([self.T.lowBound] + [pulp.value(e) or 0.0 for e in self.loads + self.shared])
        self.T.setInitialValue(value)

    def solve(self, backend: str, *, time_limit: float, gap: float, threads: Optional[int], msg: bool,
              warm_start: bool) -> dict:
        import pulp

        lp = self.lp
        info: dict[str, Any] = {
            "solver": backend,
            "classes": len(self.classes),
            "integer_variables": sum(1 for v in lp.variables() if v.cat == pulp.LpInteger),
            "constraints": lp.numConstraints(),
            "time_limit": time_limit,
            "gap_limit": gap,
        }
        t0 = time.perf_counter()
        if backend == "highs":
            hush_highs_banner(msg)
            cmd = _highs_warm(msg=msg, timeLimit=time_limit, gapRel=gap, gapAbs=0.0, threads=threads)
            lp.solve(cmd)
            h = lp.solverModel
            hinfo = h.getInfo()
            info["model_status"] = h.modelStatusToString(h.getModelStatus())
            info["dual_bound"] = float(hinfo.mip_dual_bound)
            info["solver_gap"] = float(hinfo.mip_gap)
            info["nodes"] = int(hinfo.mip_node_count)
        else:
            names = pulp.listSolvers(onlyAvailable=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                cls = pulp.COIN_CMD if "COIN_CMD" in names else pulp.PULP_CBC_CMD
                cmd = cls(msg=msg, timeLimit=time_limit, gapRel=gap, threads=threads, warmStart=warm_start)
                lp.solve(cmd)
            info["dual_bound"] = None  # CBC prints it only to its log; PuLP does not return it
        info["seconds"] = time.perf_counter() - t0
        info["pulp_status"] = pulp.LpStatus[lp.status]
        info["sol_status"] = pulp.LpSolution[lp.sol_status]
        if lp.sol_status == pulp.LpSolutionOptimal:
            exact = gap == 0 or (info.get("solver_gap") is not None and info["solver_gap"] <= 1e-9)
            status = "optimal" if exact else "within_gap"
        elif lp.sol_status == pulp.LpSolutionIntegerFeasible:
            status = "time_limit"
        elif lp.sol_status == pulp.LpSolutionInfeasible:
            # The pre-check guarantees a plan exists (LPT found one): this is a solver failure.
            raise PlanError(f"the MILP solver ({backend}) reported the model infeasible, but a feasible plan exists")
        else:
            return {"status": "no_solution", "counts": None, "info": info}
        info["objective"] = pulp.value(lp.objective)
        counts = {key: int(round(x.varValue or 0.0)) for key, x in self.n.items()}
        return {"status": status, "counts": counts, "info": info}

    def expand(self, counts: dict[tuple[int, int, int], int]) -> tuple[list[int], list[list[int]]]:
        """Concrete (degree, part workers) per operator from the counts (module docstring)."""
        tab = self.tab
        n_ops = len(self.problem.operators)
        degrees = [0] * n_ops
        workers: list[list[int]] = [[] for _ in range(n_ops)]
        for c, members in enumerate(self.classes):
            pos = 0
            for d in tab.degrees[members[0]]:
                slots = []
                for w in range(len(self.problem.workers)):
                    slots.extend([w] * counts.get((c, d, w), 0))
                if len(slots) % d:
                    raise PlanError(f"internal error: {len(slots)} parts of degree {d} in class {c}")
                k = len(slots) // d
                ops = members[pos:pos + k]
                if len(ops) != k:
                    raise PlanError(f"internal error: class {c} has {len(members)} operators, counts need more")
                for j, i in enumerate(ops):
                    degrees[i] = d
                    workers[i] = [slots[j + part * k] for part in range(d)]
                pos += k
            if pos != len(members):
                raise PlanError(f"internal error: class {c}: {pos} of {len(members)} operators placed")
        return degrees, workers


__all__ = ["solve", "available_solvers"]
