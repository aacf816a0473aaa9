"""Precomputed cost tables shared by the greedy, the bounds and the MILP (private).

Workers are grouped into interchangeable groups (same node, memory, speed, read bandwidth), so
every per-worker quantity is computed once per group.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

from planners.problem import MergeProblem


def lp_var(lp: Any, name: str, low: float, up: Optional[float], cat: str) -> Any:
    """A PuLP variable attached to `lp` (PuLP >= 3.3's `add_variable`; a plain `LpVariable` on
    older PuLP). Shared by the MILP (`planners.milp`) and the LP bound (`Tables._solve_lp`)."""
    add = getattr(lp, "add_variable", None)
    if add is not None:
        return add(name, low, up, cat=cat)
    import pulp

    return pulp.LpVariable(name, lowBound=low, upBound=up, cat=cat)


class Tables:
    def __init__(self, problem: MergeProblem):
        problem.check_feasible()
        self.problem = problem
        self.groups = problem.worker_groups  # tuple of tuples of worker indices
        self.group_of = [0] * len(problem.workers)
        for g, members in enumerate(self.groups):
            for w in members:
                self.group_of[w] = g
        reps = [problem.workers[m[0]] for m in self.groups]
        self.group_node = [w.node for w in reps]
        self.group_memory = [w.memory_bytes for w in reps]
        self.node_bandwidth = {n.name: n.network_bandwidth for n in problem.nodes}
        self.remote_bandwidth = problem.remote_bandwidth
        self.penalty = problem.split_penalty
        ops = problem.operators
        self.full = [[problem.full_time(o, w) for w in reps] for o in ops]
        self.link = [[problem.link_bytes(o, w) for w in reps] for o in ops]
        self.remote = [problem.remote_bytes(o) for o in ops]
        # degrees[i]: feasible split degrees of operator i; fits[i][d]: groups where a part fits
        self._classes = None
        self._lp_bound: Optional[float] = None
        self.degrees = [problem.feasible_degrees(o) for o in ops]
        self.fits = [
            {d: tuple(g for g, w in enumerate(reps) if problem.fits(o, d, w)) for d in self.degrees[i]}
            for i, o in enumerate(ops)
        ]

    @property
    def classes(self) -> list[list[int]]:
        """Operators with identical cost rows (times, link and remote bytes, feasible splits and
        where they fit), in order of first appearance; members in problem order."""
        if self._classes is None:
            by_key: dict[tuple, list[int]] = {}
            for i in range(len(self.problem.operators)):
                key = (tuple(self.full[i]), tuple(self.link[i]), self.remote[i], self.degrees[i],
                       tuple(self.fits[i][d] for d in self.degrees[i]))
                by_key.setdefault(key, []).append(i)
            self._classes = list(by_key.values())
        return self._classes

    def best_full(self, i: int) -> float:
        """Shortest whole-operator time over the groups where some split of it fits."""
        return min(self.full[i][g] for g in self.fits[i][self.degrees[i][-1]])

    def single_operator_bound(self, i: int) -> float:
        """Exact shortest makespan of operator i alone (ignoring links): min over its degrees d
        of the d-th smallest of {k * part_time(w) : w where a part fits, k = 1..d}."""
        best = math.inf
        for d in self.degrees[i]:
            times = []
            for g in self.fits[i][d]:
                t = self.full[i][g] / d
                for _ in self.groups[g][:d]:  # at most d workers of the group can matter
                    times.extend(k * t for k in range(1, d + 1))
            times.sort()
            best = min(best, times[d - 1])
        return best

    def bound_parts(self) -> dict[str, float]:
        """Each valid lower bound on the makespan of any plan (see `planners.greedy.lower_bound`)."""
        p = self.problem
        n_ops = len(p.operators)
        work = sum(self.best_full(i) for i in range(n_ops)) / len(p.workers)
        compute = sum(o.compute_s for o in p.operators) / sum(w.speed for w in p.workers)
        largest = max(self.single_operator_bound(i) for i in range(n_ops))
        used_nodes = set(self.group_node)
        link_capacity = sum(self.node_bandwidth[n] for n in used_nodes)
        link_bytes = 0.0
        for i in range(n_ops):
            link_bytes += min(self.link[i][g] for g in self.fits[i][self.degrees[i][-1]])
        parts = {
            "work": work,
            "compute": compute,
            "largest_operator": largest,
            "network": link_bytes / link_capacity,
        }
        if self.remote_bandwidth is not None:
            parts["remote_storage"] = sum(self.remote) / self.remote_bandwidth
        lp = self.lp_bound()
        if lp is not None:
            parts["lp_relaxation"] = lp
        return parts

    def lp_bound(self) -> Optional[float]:
        """Optimum of the fractional relaxation (None when no LP solver is available).

        y[c,g] >= 0 operators' worth of class c run on worker group g (only where some allowed
        split of it fits g), sum_g y[c,g] = N_c; group g's total time sum_c y[c,g] * full[c][g]
        <= |g| * T; each node link's seconds <= T. Every plan gives such a y with its makespan as
        T, so the optimum is a bound. With unequal workers it is much stronger than `work`,
        which credits every worker with the best worker's speed and locality.
        """
        if self._lp_bound is not None:
            return self._lp_bound if self._lp_bound >= 0 else None
        self._lp_bound = self._one_group_bound() if len(self.groups) == 1 else self._solve_lp()
        return self._lp_bound if self._lp_bound >= 0 else None

    def _solve_lp(self) -> float:
        """The relaxation of `lp_bound` solved by an LP solver; -1.0 where none is available or
        it finds no optimum."""
        import pulp

        have = pulp.listSolvers(onlyAvailable=True)
        if "HiGHS" in have:
            from planners._quiet import hush_highs_banner

            hush_highs_banner()
            cmd = pulp.HiGHS(msg=False)
        elif "COIN_CMD" in have or "PULP_CBC_CMD" in have:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                cmd = (pulp.COIN_CMD if "COIN_CMD" in have else pulp.PULP_CBC_CMD)(msg=False)
        else:
            return -1.0
        lp = pulp.LpProblem("raymerge_bound", pulp.LpMinimize)
        T = lp_var(lp, "T", 0, None, pulp.LpContinuous)
        group_time: list[list] = [[] for _ in self.groups]
        link: dict[str, list] = {n: [] for n in self.node_bandwidth}
        for c, members in enumerate(self.classes):
            i = members[0]
            ys = []
            for g in self.fits[i][self.degrees[i][-1]]:
                y = lp_var(lp, f"y_{c}_{g}", 0, None, pulp.LpContinuous)
                ys.append(y)
                group_time[g].append(self.full[i][g] * y)
                node = self.group_node[g]
                if self.link[i][g]:
                    link[node].append(self.link[i][g] / self.node_bandwidth[node] * y)
            lp += pulp.lpSum(ys) == len(members), f"cover_{c}"
        for g, terms in enumerate(group_time):
            lp += pulp.lpSum(terms) <= len(self.groups[g]) * T, f"group_{g}"
        for j, terms in enumerate(link.values()):
            if terms:
                lp += pulp.lpSum(terms) <= T, f"link_{j}"
        lp += T
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            lp.solve(cmd)
        if lp.sol_status != pulp.LpSolutionOptimal or T.varValue is None:
            return -1.0
        return max(0.0, float(T.varValue) * (1 - 1e-7))  # LP tolerances

    def _one_group_bound(self) -> float:
        """`lp_bound` when all workers form one group, in closed form (no solver): every y[c,0] is
        N_c, so T is the larger of the group's total time over its size and its node's link
        seconds; -1.0 (no bound) when an operator fits nowhere, where the LP is infeasible."""
        n_ops = len(self.problem.operators)
        if any(0 not in self.fits[i][self.degrees[i][-1]] for i in range(n_ops)):
            return -1.0
        bound = sum(self.full[i][0] for i in range(n_ops)) / len(self.groups[0])
        bandwidth = self.node_bandwidth.get(self.group_node[0])
        if bandwidth:
            bound = max(bound, sum(self.link[i][0] for i in range(n_ops)) / bandwidth)
        return max(0.0, bound)

    def min_extra_parts(self) -> int:
        """Fewest extra parts any plan has (operators that must be split to fit)."""
        return sum(d[0] - 1 for d in self.degrees)
