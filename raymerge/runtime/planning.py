"""From merge operators and a cluster to a placement plan (via the `planners` package).

Two ways to describe the cluster, one problem:
- offline, from a `clusters/` profile (`topology_from_profile`): `raymerge plan` and
  `raymerge merge --plan-only`, for a cluster that may not exist yet; compute costs come from
  the reference table in `raymerge.runtime.costs`;
- live, from the running worker actors (`topology_from_workers`): what each reported (node,
  device, memory) and how fast each ran the job's methods in calibration. Bandwidths are taken
  from a profile when one is given, else the defaults below (a single machine reading from its
  page cache or local disk; several nodes on a 10 GbE network).

`plan_merge` builds the `planners.MergeProblem` and solves it ("milp": HiGHS/CBC with the LPT
greedy as warm start and fallback; "lpt": the greedy alone). Every plan is validated by the
planner before it is returned; `plan_summary` and `Plan.load_table` print what it predicts.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import planners

from raymerge.runtime.costs import OPERATOR_OVERHEAD_S, CostKey, cost_key, planner_operator
from raymerge.runtime.operators import MergeOperator

LOCAL_READ_BANDWIDTH = 2e9  # bytes/s per worker: page cache or local NVMe, page faults included
LOCAL_NETWORK_BANDWIDTH = 20e9  # one machine: "network" is memory-to-disk, not a bottleneck
CLUSTER_NETWORK_BANDWIDTH = 1.25e9  # 10 GbE, when several nodes and no profile says otherwise
CPU_MEMORY_SHARE = 0.8  # of a node's RAM, split among its CPU workers
PLANNERS = ("milp", "lpt")


@dataclass(frozen=True)
class Topology:
    """Workers and nodes as the planner sees them, and where the inputs are read from."""

    workers: tuple[planners.Worker, ...]
    nodes: tuple[planners.Node, ...]
    remote_bandwidth: Optional[float]
    inputs: str  # "local": each node reads the inputs from its own disk; "remote": shared storage
    description: str
    part_overhead_s: float = OPERATOR_OVERHEAD_S  # fixed seconds of every part (measured live)

    def input_location(self) -> Optional[str]:
        """The node holding the inputs, for the cost model (None: remote storage)."""
        if self.inputs == "local" and len(self.nodes) == 1:
            return self.nodes[0].name
        return None


def topology_from_profile(profile, description: str) -> Topology:
    """A `raymerge.config.ClusterProfile` as a topology (no auto fields left)."""
    workers, nodes, remote = profile.planner_topology()
    return Topology(tuple(workers), tuple(nodes), remote, profile.storage.inputs, description)


def topology_from_workers(
    infos: Sequence, relative_speeds: Sequence[float], profile=None, description: str = "live Ray cluster",
    io: Optional[Sequence] = None,
) -> Topology:
    """The running workers (`WorkerInfo`s, in worker-id order) as a topology.

    `relative_speeds[i]`: worker i's speed relative to the cost model's figures (1.0 = as
    calibrated). Bandwidths come from `profile`'s first node group when given, else the
    defaults above. `io[i]` (`runtime.worker.IoFigures`, what worker i measured on the job's
    own inputs and staging folder) replaces the read bandwidth and sets the write bandwidth of
    worker i, and the median part overhead replaces the fixed one: the network figures still
    bound both (`planners.problem`'s cost model).
    """
    per_node: dict[str, int] = {}
    for info in infos:
        per_node[info.node_id] = per_node.get(info.node_id, 0) + 1
    node_names = {node: f"node{i}" for i, node in enumerate(dict.fromkeys(i.node_id for i in infos))}
    read_bw, net_bw, remote, inputs = _bandwidths(profile, len(per_node))
    workers = []
    for k, (info, speed) in enumerate(zip(infos, relative_speeds)):
        memory = info.memory_bytes if info.device == "cuda" else info.memory_bytes * CPU_MEMORY_SHARE / per_node[info.node_id]
        measured = io[k] if io is not None else None
        workers.append(planners.Worker(
            name=f"{node_names[info.node_id]}/w{info.worker_id}", node=node_names[info.node_id],
            memory_bytes=float(memory), speed=float(speed),
            read_bandwidth=float(measured.read_bandwidth) if measured is not None else read_bw,
            write_bandwidth=float(measured.write_bandwidth) if measured is not None else math.inf,
        ))
    nodes = tuple(planners.Node(name, net_bw) for name in node_names.values())
    overhead = statistics.median(f.part_overhead_s for f in io) if io else OPERATOR_OVERHEAD_S
    return Topology(tuple(workers), nodes, remote, inputs, description, part_overhead_s=overhead)


def calibration_note(topology: Topology) -> str:
    """The workers' measured I/O figures, for a merge's summary: median read and write bandwidth
    and fixed cost per part (what the predicted makespan is built from, besides compute)."""
    writes = [w.write_bandwidth for w in topology.workers if w.write_bandwidth != math.inf]
    if not writes:
        return ""
    read = statistics.median(w.read_bandwidth for w in topology.workers)
    return (f"workers measured: read {read / 1e9:.2f} GB/s, write {statistics.median(writes) / 1e9:.2f} GB/s, "
            f"{topology.part_overhead_s * 1e3:.1f} ms per part")


def _bandwidths(profile, n_nodes: int) -> tuple[float, float, Optional[float], str]:
    if profile is not None:
        workers, nodes, remote = profile.planner_topology()
        return workers[0].read_bandwidth, nodes[0].network_bandwidth, remote, profile.storage.inputs
    if n_nodes == 1:
        return LOCAL_READ_BANDWIDTH, LOCAL_NETWORK_BANDWIDTH, None, "local"
    return LOCAL_READ_BANDWIDTH, CLUSTER_NETWORK_BANDWIDTH, None, "remote"


def calibrated_costs(keys: Sequence[CostKey], per_worker: Sequence[Sequence[float]]) -> tuple[dict[CostKey, float], list[float]]:
    """From each worker's measured seconds per element (rows: workers, columns: `keys`), the
    cost table (median worker) and each worker's speed relative to it (median over keys)."""
    table = {k: statistics.median(row[j] for row in per_worker) for j, k in enumerate(keys)}
    speeds = []
    for row in per_worker:
        ratios = [table[k] / row[j] for j, k in enumerate(keys) if row[j] > 0 and table[k] > 0]
        speeds.append(statistics.median(ratios) if ratios else 1.0)
    return table, speeds


def build_problem(
    ops: Sequence[MergeOperator], topology: Topology, seconds_per_element: Mapping[CostKey, float]
) -> planners.MergeProblem:
    location = topology.input_location()
    operators = [planner_operator(op, seconds_per_element, location, topology.part_overhead_s) for op in ops]
    return planners.MergeProblem(operators, topology.workers, topology.nodes, remote_bandwidth=topology.remote_bandwidth)


MILP_MIN_GAIN_S = 0.1  # seconds: about what building and solving a small placement MILP takes


def plan_merge(
    ops: Sequence[MergeOperator],
    topology: Topology,
    seconds_per_element: Optional[Mapping[CostKey, float]] = None,
    *,
    planner: str = "milp",
    time_limit: float = 10.0,
) -> tuple[planners.Plan, planners.MergeProblem]:
    """Plan `ops` on `topology`; raises `planners.InfeasibleError` naming an operator that fits
    on no worker."""
    if planner not in PLANNERS:
        raise ValueError(f"unknown planner {planner!r} (expected one of {', '.join(PLANNERS)})")
    problem = build_problem(ops, topology, seconds_per_element or {})
    problem.check_feasible()
    # One solver thread: HiGHS keeps a pool of worker threads for the life of the process, which a
    # forked child inherits broken (a merge in a forked process would hang in the solver); the
    # placement MILP is small and HiGHS's MIP search gains little from more threads.
    # `min_gain`: a merge whose LPT plan is within MILP_MIN_GAIN_S of the lower bound (objective:
    # makespan plus the split penalty) keeps it; building and solving the MILP would cost about as
    # much (and importing PuLP, where the bound needed none).
    plan = (planners.lpt(problem) if planner == "lpt"
            else planners.solve(problem, time_limit=time_limit, threads=1, min_gain=MILP_MIN_GAIN_S))
    return plan, problem


def plan_summary(plan: planners.Plan, problem: planners.MergeProblem, topology: Topology) -> str:
    """Two lines: what was planned on what, and what the plan predicts and how it was found."""
    split = {a.operator for a in plan.assignments if a.of > 1}
    line1 = (
        f"{len(problem.operators)} operators ({len(split)} split row-wise, {plan.extra_parts} extra parts) on "
        f"{len(problem.workers)} workers / {len(problem.nodes)} node(s) [{topology.description}]"
    )
    line2 = (
        f"predicted makespan {plan.makespan:.2f} s, lower bound {plan.lower_bound:.2f} s, gap {plan.gap:.2%}; "
        f"solver {plan.solver} ({plan.status}) in {plan.solve_seconds:.2f} s"
    )
    return f"{line1}\n{line2}"


def cost_keys(ops: Sequence[MergeOperator]) -> list[CostKey]:
    return list(dict.fromkeys(cost_key(op) for op in ops))
