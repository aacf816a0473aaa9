"""A running merge's per-worker figures as Ray metrics, for the Ray dashboard and Prometheus.

Each merge worker (`runtime.worker.MergeWorkerImpl`) records every finished batch here:

| metric (Prometheus name: Ray prefixes `ray_`) | kind | meaning |
| --- | --- | --- |
| `raymerge_worker_bytes_read` | counter | input bytes the worker read (safetensors data, ranged GETs) |
| `raymerge_worker_bytes_written` | counter | output bytes it wrote into the staged shards |
| `raymerge_worker_tensors` | counter | parts it computed (an operator, or a row range of a split one) |
| `raymerge_worker_busy_seconds` | counter | seconds it spent computing batches (read, merge, write) |
| `raymerge_worker_peak_device_bytes` | gauge | its peak GPU memory in the current job (0 on a CPU worker) |

all tagged `worker` (the worker id, as in the plan: `w0`, `w1`, ...) and `node` (the Ray node id).
Rates come from the counters (`rate(ray_raymerge_worker_bytes_read[1m])` is a worker's read
bandwidth). The job's final summary is computed from the same `BatchStats` as before, unchanged.

Ray exports metrics through each node's metrics agent, which comes with `ray[default]` (the
`cluster` extra); with plain `ray` the values are recorded and dropped. Outside Ray (an in-process
merge with no Ray session) nothing is recorded at all: `WorkerMetrics` falls back to no-ops.
The metric objects come from a *registry* (`ray_registry`: `ray.util.metrics`); a
`RecordingRegistry` keeps the values in memory instead, which is how the tests read back what a
worker recorded (Ray's own values can be read only from the metrics agent's Prometheus endpoint).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from raymerge.runtime.actor_resources import ray_if_imported

TAG_KEYS = ("worker", "node")
COUNTERS = {
    "bytes_read": ("raymerge_worker_bytes_read", "Input bytes a raymerge merge worker read"),
    "bytes_written": ("raymerge_worker_bytes_written", "Output bytes a raymerge merge worker wrote"),
    "operators": ("raymerge_worker_tensors", "Tensors (or row ranges of split tensors) a raymerge merge worker computed"),
    "seconds": ("raymerge_worker_busy_seconds", "Seconds a raymerge merge worker spent computing batches"),
}
GAUGES = {
    "peak_device_bytes": ("raymerge_worker_peak_device_bytes", "Peak GPU memory of a raymerge merge worker in this job"),
}

Registry = Callable[[str, str, str, tuple], Any]  # (kind "counter"/"gauge", name, description, tag_keys) -> metric


def ray_registry(kind: str, name: str, description: str, tag_keys: tuple) -> Any:
    """A `ray.util.metrics` Counter or Gauge."""
    from ray.util.metrics import Counter, Gauge

    cls = Counter if kind == "counter" else Gauge
    return cls(name, description=description, tag_keys=tag_keys)


class RecordingRegistry:
    """A registry whose metrics keep their values in `values[(name, worker, node)]` (counters
    summed, gauges last set)."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str, str], float] = {}

    def __call__(self, kind: str, name: str, description: str, tag_keys: tuple) -> "_Recorded":
        return _Recorded(self.values, kind, name, tag_keys)


class _Recorded:
    def __init__(self, values: dict, kind: str, name: str, tag_keys: tuple) -> None:
        self.values, self.kind, self.name, self.tag_keys = values, kind, name, tag_keys

    def _key(self, tags: dict[str, str]) -> tuple[str, str, str]:
        if set(tags) != set(self.tag_keys):
            raise ValueError(f"{self.name}: tags {sorted(tags)} != {sorted(self.tag_keys)}")
        return (self.name, tags["worker"], tags["node"])

    def inc(self, value: float, tags: dict[str, str]) -> None:
        if self.kind != "counter" or value <= 0:
            raise ValueError(f"{self.name}: inc({value}) on a {self.kind}")
        key = self._key(tags)
        self.values[key] = self.values.get(key, 0.0) + value

    def set(self, value: float, tags: dict[str, str]) -> None:
        if self.kind != "gauge":
            raise ValueError(f"{self.name}: set() on a {self.kind}")
        self.values[self._key(tags)] = value


def _in_ray() -> bool:
    ray = ray_if_imported()
    if ray is None:
        return False
    try:
        return ray.is_initialized()
    except Exception:  # noqa: BLE001 - no Ray: no metrics
        return False


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001
        return "local"


class WorkerMetrics:
    """One merge worker's metrics. `registry=None`: Ray's when this process is connected to Ray,
    else no-ops. Creating the metric objects is deferred to the first `record`."""

    def __init__(self, worker_id: int, registry: Optional[Registry] = None, node: Optional[str] = None) -> None:
        self.worker_id = worker_id
        self._registry = registry
        self._node = node
        self._metrics: Optional[dict[str, Any]] = None
        self._enabled = True

    def _open(self) -> Optional[dict[str, Any]]:
        if self._metrics is not None or not self._enabled:
            return self._metrics
        registry = self._registry
        if registry is None:
            if not _in_ray():
                self._enabled = False
                return None
            registry = ray_registry
        try:
            metrics = {key: registry("counter", name, desc, TAG_KEYS) for key, (name, desc) in COUNTERS.items()}
            metrics.update({key: registry("gauge", name, desc, TAG_KEYS) for key, (name, desc) in GAUGES.items()})
        except Exception:  # noqa: BLE001 - metrics must never fail a merge
            self._enabled = False
            return None
        self._metrics = metrics
        if self._node is None:
            self._node = _node_id()
        return metrics

    @property
    def tags(self) -> dict[str, str]:
        return {"worker": f"w{self.worker_id}", "node": self._node or "local"}

    def record(self, stats: Any) -> None:
        """Count one finished batch (`runtime.worker.BatchStats`)."""
        metrics = self._open()
        if metrics is None:
            return
        tags = self.tags
        try:
            for key in COUNTERS:
                value = float(getattr(stats, key))
                if value > 0:  # Ray's Counter refuses 0 and negative increments
                    metrics[key].inc(value, tags=tags)
            for key in GAUGES:
                metrics[key].set(float(getattr(stats, key)), tags=tags)
        except Exception:  # noqa: BLE001 - metrics must never fail a merge
            self._enabled = False
            self._metrics = None
