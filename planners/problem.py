"""The placement problem: operators, workers on nodes, and the cost model every plan is judged by.

Units are plain everywhere: bytes, seconds, bytes per second. A worker's `speed` is relative
(1.0 = the machine `compute_s` was measured on).

Cost model
----------
An operator `o` may be split row-wise into `d` equal parts, `d` one of `o.split_degrees`. A part
of `o` split `d` ways, run on worker `w` of node `n`, takes

    time(o, d, w) = o.compute_s / d / w.speed
                  + (o.bytes_read / d) / read_rate(o, w)
                  + (o.bytes_written / d) / write_rate(w)

and needs `o.peak_memory / d` bytes on `w` (it must fit in `w.memory_bytes`). Reading, computing
and writing one part happen one after the other; a worker runs one part at a time, so its
memory limit applies to each part on its own, and its load is the sum of its parts' times.

Where bytes come from and go:
- `o.input_location == n.name` (the inputs are on the worker's own node's local disk):
  `read_rate = w.read_bandwidth`, and nothing crosses the network.
- `o.input_location is None` (remote storage: S3, a shared filesystem):
  `read_rate = min(w.read_bandwidth, n.network_bandwidth, remote_bandwidth)`.
- `o.input_location` is another node `m`: `read_rate = min(w.read_bandwidth,
  n.network_bandwidth, m.network_bandwidth)`.
- Outputs always go to shared storage that every node sees (the merge writes straight into the
  output shards): `write_rate = min(w.write_bandwidth, n.network_bandwidth, remote_bandwidth)`.

A single part may use its node's whole link, but the workers of a node share it: every byte a
node's workers read from off the node, plus every byte they write, crosses that node's link,
and the total must fit in the makespan: `link_bytes(n) / n.network_bandwidth <= makespan`.
Likewise, when `remote_bandwidth` is given (the remote storage's aggregate throughput), every
byte read from or written to remote storage counts against it: `remote_bytes /
remote_bandwidth <= makespan`. Reads from another node's disk count on the reading node's link
only (links are taken as full duplex).

So the makespan of a plan is `max(max_w load(w), max_n link_bytes(n) / bandwidth(n),
remote_bytes / remote_bandwidth)`, and the planners minimise `makespan + split_penalty *
extra_parts`, where an operator split `d` ways contributes `d - 1` extra parts (each part costs
another task and another ranged read, so `split_penalty` is in seconds per extra part).

Splitting is exact in this model (no rows are re-read, no per-part overhead beyond the
penalty), so the whole operator on one worker always costs `d * time(o, d, w)` = `time(o, 1, w)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Optional


class ProblemError(ValueError):
    """The problem description itself is inconsistent (unknown node, negative size, ...)."""


def _positive(kind: str, name: str, attr: str, value: float, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        need = ">= 0" if allow_zero else "> 0"
        raise ProblemError(f"{kind} {name!r}: {attr} must be a finite number {need}, got {value!r}")


@dataclass(frozen=True)
class Operator:
    """One unit of work: typically one output tensor of a merge.

    `compute_s` is seconds on a speed-1.0 worker. `split_degrees` are the row-wise splits allowed
    (e.g. (1, 2, 4, 8)); a part of a `d`-way split does 1/d of everything. `input_location` is the
    node whose local disk holds the inputs, or None for remote storage.
    """

    name: str
    bytes_read: float
    bytes_written: float
    compute_s: float
    peak_memory: float
    split_degrees: tuple[int, ...] = (1,)
    input_location: Optional[str] = None

    def __post_init__(self) -> None:
        _check_name("operator", self.name)
        for attr in ("bytes_read", "bytes_written", "compute_s", "peak_memory"):
            _positive("operator", self.name, attr, getattr(self, attr), allow_zero=True)
        degrees = tuple(self.split_degrees)
        if not degrees or any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in degrees):
            raise ProblemError(
                f"operator {self.name!r}: split_degrees must be positive integers, got {self.split_degrees!r}"
            )
        object.__setattr__(self, "split_degrees", tuple(sorted(set(degrees))))


@dataclass(frozen=True)
class Worker:
    """One execution slot (a GPU, or a CPU slot) on a node; runs one part at a time."""

    name: str
    node: str
    memory_bytes: float
    speed: float
    read_bandwidth: float
    write_bandwidth: float = math.inf  # bytes/s into its output files (its disk, page cache)

    def __post_init__(self) -> None:
        _check_name("worker", self.name)
        _positive("worker", self.name, "memory_bytes", self.memory_bytes)
        _positive("worker", self.name, "speed", self.speed)
        _positive("worker", self.name, "read_bandwidth", self.read_bandwidth)
        if self.write_bandwidth != math.inf:  # unlimited: the node's link or the storage bounds writes
            _positive("worker", self.name, "write_bandwidth", self.write_bandwidth)


@dataclass(frozen=True)
class Node:
    """A machine; its workers share `network_bandwidth` (bytes/s in, counted with writes)."""

    name: str
    network_bandwidth: float

    def __post_init__(self) -> None:
        _check_name("node", self.name)
        _positive("node", self.name, "network_bandwidth", self.network_bandwidth)


def _check_name(kind: str, name: object) -> None:
    if not isinstance(name, str) or not name:
        raise ProblemError(f"{kind} name must be a non-empty string, got {name!r}")


def _unique(kind: str, names: Iterable[str]) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ProblemError(f"duplicate {kind} name {n!r}")
        seen.add(n)


@dataclass(frozen=True)
class MergeProblem:
    """Independent operators to place on workers (see the module docstring for the cost model).

    `remote_bandwidth`: aggregate bytes/s of remote storage, None = not a bottleneck.
    `split_penalty`: seconds added to the objective per extra part of a split operator.
    """

    operators: tuple[Operator, ...]
    workers: tuple[Worker, ...]
    nodes: tuple[Node, ...]
    remote_bandwidth: Optional[float] = None
    split_penalty: float = 1e-3

    def __post_init__(self) -> None:
        for attr in ("operators", "workers", "nodes"):
            object.__setattr__(self, attr, tuple(getattr(self, attr)))
        if not self.operators:
            raise ProblemError("a merge problem needs at least one operator")
        if not self.workers:
            raise ProblemError("a merge problem needs at least one worker")
        _unique("operator", (o.name for o in self.operators))
        _unique("worker", (w.name for w in self.workers))
        _unique("node", (n.name for n in self.nodes))
        nodes = {n.name for n in self.nodes}
        for w in self.workers:
            if w.node not in nodes:
                raise ProblemError(f"worker {w.name!r} is on node {w.node!r}, which is not in the problem's nodes")
        for o in self.operators:
            if o.input_location is not None and o.input_location not in nodes:
                raise ProblemError(
                    f"operator {o.name!r}: input_location {o.input_location!r} is not a node of the problem"
                )
        if self.remote_bandwidth is not None:
            _positive("problem", "remote storage", "remote_bandwidth", self.remote_bandwidth)
        _positive("problem", "merge", "split_penalty", self.split_penalty, allow_zero=True)

    # -- lookups -----------------------------------------------------------------------------

    @cached_property
    def _operator_index(self) -> dict[str, int]:
        return {o.name: i for i, o in enumerate(self.operators)}

    @cached_property
    def _worker_index(self) -> dict[str, int]:
        return {w.name: i for i, w in enumerate(self.workers)}

    @cached_property
    def _node_by_name(self) -> dict[str, Node]:
        return {n.name: n for n in self.nodes}

    def operator(self, name: str) -> Operator:
        return self.operators[self._operator_index[name]]

    def worker(self, name: str) -> Worker:
        return self.workers[self._worker_index[name]]

    def node(self, name: str) -> Node:
        return self._node_by_name[name]

    # -- cost model --------------------------------------------------------------------------

    def _remote_rate(self) -> float:
        return math.inf if self.remote_bandwidth is None else self.remote_bandwidth

    def read_rate(self, op: Operator, worker: Worker) -> float:
        """Bytes/s at which `worker` reads `op`'s inputs (see the module docstring)."""
        if op.input_location == worker.node:
            return worker.read_bandwidth
        link = self.node(worker.node).network_bandwidth
        source = self._remote_rate() if op.input_location is None else self.node(op.input_location).network_bandwidth
        return min(worker.read_bandwidth, link, source)

    def write_rate(self, worker: Worker) -> float:
        return min(worker.write_bandwidth, self.node(worker.node).network_bandwidth, self._remote_rate())

    def full_time(self, op: Operator, worker: Worker) -> float:
        """Seconds for the whole of `op` on `worker` (= `degree * part_time`)."""
        t = op.compute_s / worker.speed
        if op.bytes_read:
            t += op.bytes_read / self.read_rate(op, worker)
        if op.bytes_written:
            t += op.bytes_written / self.write_rate(worker)
        return t

    def part_time(self, op: Operator, degree: int, worker: Worker) -> float:
        """Seconds for one part of `op` split `degree` ways, on `worker`."""
        return self.full_time(op, worker) / degree

    def part_memory(self, op: Operator, degree: int) -> float:
        return op.peak_memory / degree

    def fits(self, op: Operator, degree: int, worker: Worker) -> bool:
        return op.peak_memory / degree <= worker.memory_bytes

    def link_bytes(self, op: Operator, worker: Worker) -> float:
        """Bytes of the whole of `op` that cross `worker`'s node link when run there."""
        reads = 0.0 if op.input_location == worker.node else op.bytes_read
        return reads + op.bytes_written

    def remote_bytes(self, op: Operator) -> float:
        """Bytes of the whole of `op` read from or written to remote storage (worker-independent)."""
        return (op.bytes_read if op.input_location is None else 0.0) + op.bytes_written

    def feasible_degrees(self, op: Operator) -> tuple[int, ...]:
        """The split degrees of `op` whose parts fit on at least one worker."""
        biggest = max(w.memory_bytes for w in self.workers)
        return tuple(d for d in op.split_degrees if op.peak_memory / d <= biggest)

    def check_feasible(self) -> None:
        """Raise `InfeasibleError` naming the first operator that no worker can hold even split."""
        from planners.plan import InfeasibleError, _fmt_bytes

        biggest = max(self.workers, key=lambda w: w.memory_bytes)
        for op in self.operators:
            if not self.feasible_degrees(op):
                d = max(op.split_degrees)
                raise InfeasibleError(
                    f"operator {op.name!r} does not fit on any worker: it needs "
                    f"{_fmt_bytes(op.peak_memory)}, {_fmt_bytes(op.peak_memory / d)} per part even split "
                    f"{d} ways (allowed splits {op.split_degrees}), and the largest worker "
                    f"{biggest.name!r} has {_fmt_bytes(biggest.memory_bytes)}",
                    operator=op.name,
                )

    @cached_property
    def worker_groups(self) -> tuple[tuple[int, ...], ...]:
        """Indices of interchangeable workers (same node, memory, speed and read bandwidth)."""
        groups: dict[tuple, list[int]] = {}
        for i, w in enumerate(self.workers):
            groups.setdefault((w.node, w.memory_bytes, w.speed, w.read_bandwidth, w.write_bandwidth), []).append(i)
        return tuple(tuple(g) for g in groups.values())


__all__ = ["Operator", "Worker", "Node", "MergeProblem", "ProblemError"]
