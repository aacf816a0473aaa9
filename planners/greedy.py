"""The greedy baseline (LPT with splits) and a solver-independent lower bound on the makespan.

`lower_bound(problem)` is the largest of these bounds, each valid for every plan:
- work: the sum over operators of their shortest whole-operator time on any worker that can hold
  them, divided by the number of workers (the busy time of all workers together);
- compute: total `compute_s` over the sum of worker speeds (IO only adds to it);
- largest operator: the best makespan of the single hardest operator on its own, over its
  allowed splits (exact: the d-th smallest of `k * part_time(w)` over workers and k = 1..d);
- network: bytes that must cross some node link (all writes; reads unless the input's node has
  a worker that can hold the operator) over the summed bandwidth of the nodes that have workers;
- remote storage: bytes to and from remote storage over `remote_bandwidth`, when it is given;
- LP relaxation: operators spread fractionally over groups of interchangeable workers, each
  group's time within (workers in it) x T and each node link's within T (in closed form for one
  group of equal workers; else solved with HiGHS or CBC through PuLP in milliseconds, and left
  out if PuLP has no solver). It subsumes `work` and
  `network`, and is what makes the bound tight when workers differ in speed or locality.
The first three are the textbook P||Cmax bounds (total work over capacity, largest job).

`lpt(problem)` places operators longest first (by their shortest whole time). For each one it
tries the allowed split degrees in increasing order: parts go one by one to the worker where
they finish earliest, counting the node links as resources too, and the degree kept is the one
with the lowest `max(floor, makespan so far) + split_penalty * (d - 1)`, the smallest on ties.
So an operator is split only when it does not fit whole, or when keeping it whole would push
the makespan past the floor by more than the penalty. An un-splitting pass then re-places each
split operator with fewer parts wherever that lowers the objective. Which floor is best depends
on the problem (too low: many splits that buy little; too high: an unbalanced end), so the
greedy runs with floor = lower bound * (1 + x) for a few x, including "never split unless it must"
(x = inf), and keeps the plan with the lowest objective, then the lowest makespan. It is
deterministic and costs a few tenths of a second on a 405B model over 128 workers.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import replace

from planners._tables import Tables
from planners.plan import Assignment, Plan, make_plan
from planners.problem import MergeProblem


def lower_bound(problem: MergeProblem) -> float:
    """The largest of the valid makespan bounds listed in the module docstring (seconds)."""
    return max(Tables(problem).bound_parts().values())


def lpt(problem: MergeProblem) -> Plan:
    """Longest-processing-time-first placement with split choice (module docstring); the plan
    has `solver="lpt"` and status "heuristic", or "optimal" when it meets the lower bound."""
    t0 = time.perf_counter()
    tab = Tables(problem)  # raises InfeasibleError naming an operator that fits nowhere
    bounds = tab.bound_parts()
    lb = max(bounds.values())
    degrees, workers = _lpt_choices(tab, lb)
    plan = make_plan(
        problem, _assignments(problem, degrees, workers), solver="lpt", status="heuristic",
        solve_seconds=0.0, lower_bound=lb,
        info={"bounds": bounds, "objective_bound": lb + problem.split_penalty * tab.min_extra_parts()},
    )
    # Optimal only when it meets the bound on the objective: makespan = bound, no avoidable split.
    proven = plan.objective <= plan.info["objective_bound"] * (1 + 1e-12)
    return replace(plan, status="optimal" if proven else "heuristic", solve_seconds=time.perf_counter() - t0)


def _assignments(problem: MergeProblem, degrees: list[int], workers: list[list[int]]) -> list[Assignment]:
    """Concrete assignments from each operator's degree and part workers (indices)."""
    out = []
    for i, op in enumerate(problem.operators):
        for part, w in enumerate(workers[i]):
            out.append(Assignment(op.name, part, degrees[i], problem.workers[w].name))
    return out


# Greedy runs: floor = lower bound * (1 + x); inf = split only to fit.
_FLOORS = (0.0, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, math.inf)


class _State:
    """Loads of workers, node links and remote storage while the greedy places parts."""

    def __init__(self, tab: Tables):
        self.tab = tab
        self.loads = [0.0] * len(tab.problem.workers)
        self.link = {n: 0.0 for n in tab.node_bandwidth}  # seconds of use per node link
        self.remote = 0.0  # seconds of use of remote storage
        self.heaps = [[(0.0, w) for w in members] for members in tab.groups]

    def makespan(self) -> float:
        return max([self.remote, *self.loads, *self.link.values()])

    def place(self, i: int, d: int) -> tuple[list[int], dict[str, float], float]:
        """Tentatively place the d parts of operator i one by one where each finishes first
        (counting its node link); returns (workers, added link seconds, highest finish)."""
        tab = self.tab
        groups = tab.fits[i][d]
        local = {g: heapq.nsmallest(d, self.heaps[g]) for g in groups}  # sorted lists are heaps
        extra_link: dict[str, float] = {}
        workers = []
        span = 0.0
        for _ in range(d):
            pick = None
            for g in groups:
                load, w = local[g][0]
                node = tab.group_node[g]
                finish = load + tab.full[i][g] / d
                link_after = self.link[node] + extra_link.get(node, 0.0) + tab.link[i][g] / d / tab.node_bandwidth[node]
                key = (max(finish, link_after), finish, w)
                if pick is None or key < pick[0]:
                    pick = (key, g, w, finish, node, link_after)
            _, g, w, finish, node, link_after = pick
            heapq.heapreplace(local[g], (finish, w))
            extra_link[node] = link_after - self.link[node]
            workers.append(w)
            span = max(span, finish, link_after)
        return workers, extra_link, span

    def apply(self, i: int, d: int, workers: list[int], sign: float = 1.0) -> None:
        """Add (sign=1) or remove (sign=-1) the parts of operator i on these workers."""
        tab = self.tab
        touched = set()
        for w in workers:
            g = tab.group_of[w]
            self.loads[w] += sign * tab.full[i][g] / d
            node = tab.group_node[g]
            self.link[node] += sign * tab.link[i][g] / d / tab.node_bandwidth[node]
            touched.add(g)
        for g in touched:
            self.heaps[g] = [(self.loads[w], w) for w in tab.groups[g]]
            heapq.heapify(self.heaps[g])


def _lpt_choices(tab: Tables, lb: float) -> tuple[list[int], list[list[int]]]:
    """The best (objective, then makespan) of the greedy runs described in the module docstring."""
    def run(floor: float):
        degrees, workers, st = _lpt_run(tab, floor)
        return st.makespan() + tab.penalty * sum(d - 1 for d in degrees), st.makespan(), degrees, workers

    results = [run(lb * (1 + x)) for x in _FLOORS]
    _, _, degrees, workers = min(results, key=lambda r: (r[0], r[1]))
    return degrees, workers


def _lpt_run(tab: Tables, floor: float) -> tuple[list[int], list[list[int]], "_State"]:
    """One greedy pass with this floor (inf: split only to fit), then the un-splitting pass."""
    n_ops = len(tab.problem.operators)
    st = _State(tab)
    rb = tab.remote_bandwidth
    degrees_of = [0] * n_ops
    chosen: list[list[int]] = [[] for _ in range(n_ops)]
    makespan = 0.0
    for i in sorted(range(n_ops), key=lambda i: (-tab.best_full(i), i)):
        st.remote += tab.remote[i] / rb if rb else 0.0
        best = None
        for d in tab.degrees[i]:
            if best is not None and best[0] <= max(floor, makespan, st.remote) + tab.penalty * (d - 1):
                break  # no higher degree can cost less
            workers, _, span = st.place(i, d)
            span = max(span, makespan, st.remote)
            cost = max(floor, span) + tab.penalty * (d - 1)  # floor = inf: the smallest degree wins
            if best is None or cost < best[0] * (1 - 1e-12):
                best = (cost, d, workers, span)
        _, d, workers, makespan = best
        degrees_of[i], chosen[i] = d, workers
        st.apply(i, d, workers)
    _unsplit(st, degrees_of, chosen)
    return degrees_of, chosen, st


def _unsplit(st: _State, degrees_of: list[int], chosen: list[list[int]]) -> None:
    """Re-place each split operator (most parts first) with every allowed degree up to its own,
    keeping the change when the objective (makespan + penalty * extra parts) drops."""
    tab = st.tab
    split = sorted((i for i, d in enumerate(degrees_of) if d > 1), key=lambda i: (-degrees_of[i], -tab.best_full(i), i))
    for i in split:
        d0, w0 = degrees_of[i], chosen[i]
        current = st.makespan() + tab.penalty * (d0 - 1)
        st.apply(i, d0, w0, -1.0)
        best = None
        for d in tab.degrees[i]:
            if d > d0:
                break
            workers, extra_link, span = st.place(i, d)
            rest = st.makespan()
            cost = max(rest, span) + tab.penalty * (d - 1)
            if cost < current * (1 - 1e-12) and (best is None or cost < best[0]):
                best = (cost, d, workers)
        if best is None:
            st.apply(i, d0, w0)
        else:
            _, d, workers = best
            st.apply(i, d, workers)
            degrees_of[i], chosen[i] = d, workers


__all__ = ["lpt", "lower_bound"]
