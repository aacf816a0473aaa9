"""Per-worker merge metrics (`raymerge.runtime.metrics`): what a worker records per batch, read
back from a recording registry, in process and from a Ray worker actor during a real Ray merge.

Ray's own metric values cannot be read back in this test environment: they are exported by each
node's metrics agent (installed with `ray[default]`, the `cluster` extra), which plain `ray` does
not start. So the Ray merge test swaps a `RecordingRegistry` into the (kept) worker actor with
`__ray_call__` and reads the values the actor recorded during the next merge; a separate test
checks that the real `ray.util.metrics` objects accept what the worker records.
"""

from __future__ import annotations

import pytest
import ray

import raymerge
from raymerge.runtime import actor_pool, metrics
from raymerge.runtime.metrics import RecordingRegistry, WorkerMetrics
from raymerge.runtime.worker import BatchStats


def _stats(**kw) -> BatchStats:
    base = dict(worker=3, operators=2, bytes_read=1000, bytes_written=400, seconds=0.5, peak_rss_bytes=1 << 20, peak_device_bytes=0)
    base.update(kw)
    return BatchStats(**base)


def test_recorded_values_add_up_per_worker_and_node():
    reg = RecordingRegistry()
    m = WorkerMetrics(3, registry=reg, node="node-a")
    m.record(_stats())
    m.record(_stats(operators=1, bytes_read=24, bytes_written=0, seconds=0.25, peak_device_bytes=5000))
    v = reg.values
    assert v[("raymerge_worker_bytes_read", "w3", "node-a")] == 1024
    assert v[("raymerge_worker_bytes_written", "w3", "node-a")] == 400  # a zero increment is skipped
    assert v[("raymerge_worker_tensors", "w3", "node-a")] == 3
    assert v[("raymerge_worker_busy_seconds", "w3", "node-a")] == 0.75
    assert v[("raymerge_worker_peak_device_bytes", "w3", "node-a")] == 5000


def test_no_ray_no_metrics(monkeypatch):
    monkeypatch.setattr(metrics, "_in_ray", lambda: False)
    m = WorkerMetrics(0)
    m.record(_stats())
    assert m._metrics is None


def test_a_failing_registry_never_fails_the_merge():
    def broken(kind, name, description, tag_keys):
        raise RuntimeError("no metrics today")

    m = WorkerMetrics(0, registry=broken, node="n")
    m.record(_stats())
    m.record(_stats())
    assert m._metrics is None


def test_ray_util_metrics_accept_what_a_worker_records(ray_session):
    m = WorkerMetrics(7)  # Ray is initialised: ray.util.metrics Counter / Gauge
    m.record(_stats())
    m.record(_stats(bytes_written=0, peak_device_bytes=123))
    assert m._metrics is not None and m._enabled, "recording into ray.util.metrics failed"
    assert type(m._metrics["bytes_read"]).__name__ == "Counter" and type(m._metrics["peak_device_bytes"]).__name__ == "Gauge"
    assert m.tags == {"worker": "w7", "node": ray.get_runtime_context().get_node_id()}


def test_a_ray_merge_worker_records_its_figures(ray_session, llama_models, tmp_path):
    # Run inside the worker actor by `__ray_call__` (nested, so cloudpickle sends them by value).
    def _install_recorder(actor_self):
        from raymerge.runtime.metrics import RecordingRegistry, WorkerMetrics

        reg = RecordingRegistry()
        actor_self.merging.metrics = WorkerMetrics(actor_self.worker_id, registry=reg)
        actor_self._test_registry = reg
        return True

    def _recorded(actor_self):
        return dict(actor_self._test_registry.values), actor_self.merging.metrics.tags

    def _ray_metrics_state(actor_self):
        m = actor_self.merging.metrics
        return m._enabled, None if m._metrics is None else sorted(type(x).__name__ for x in m._metrics.values())

    cfg = {
        "merge_method": "ties", "base_model": str(llama_models["base"]), "dtype": "float32",
        "models": [{"model": str(llama_models[f"ft{i}"]), "parameters": {"weight": 0.5, "density": 0.5}} for i in (1, 2)],
    }
    try:
        first = raymerge.merge(cfg, tmp_path / "first", workers=1, quiet=True, keep_workers=True)
        pool = actor_pool.kept()
        assert pool is not None and len(pool.workers) == 1
        actor = pool.workers[0].actor
        first_node = ray.get(actor.describe.remote()).node_id
        # the first merge recorded into Ray's own metrics, without error
        enabled, kinds = ray.get(actor.__ray_call__.remote(_ray_metrics_state))
        assert enabled and kinds == ["Counter"] * 4 + ["Gauge"], kinds
        assert ray.get(actor.__ray_call__.remote(_install_recorder))
        second = raymerge.merge(cfg, tmp_path / "second", workers=1, quiet=True, keep_workers=True)
        assert actor_pool.kept() is pool, "the kept worker ran the second merge"
        values, tags = ray.get(actor.__ray_call__.remote(_recorded))
    finally:
        actor_pool.shutdown_kept()
    worker, node = tags["worker"], tags["node"]
    assert worker == "w0" and node == first_node
    assert values[("raymerge_worker_bytes_read", worker, node)] == second.bytes_read > 0
    assert values[("raymerge_worker_bytes_written", worker, node)] == second.bytes_written > 0
    assert values[("raymerge_worker_tensors", worker, node)] == second.tensors
    assert 0 < values[("raymerge_worker_busy_seconds", worker, node)] <= second.seconds
    assert values[("raymerge_worker_peak_device_bytes", worker, node)] == 0  # CPU worker
    # the final summary is unchanged by the metrics
    assert second.summary().startswith(f"merged {second.tensors} tensors into {tmp_path / 'second'} in ")
    assert first.bytes_written == second.bytes_written


def _prometheus_agent() -> bool:
    try:
        import aiohttp  # noqa: F401  (ray[default]: the dashboard agent, which hosts the metrics agent)
        import prometheus_client  # noqa: F401

        return True
    except ImportError:
        return False


@pytest.mark.skipif(not _prometheus_agent(), reason="Ray's metrics agent needs ray[default] (pip install '.[cluster]')")
def test_ray_exports_the_worker_metrics_to_prometheus(ray_session, llama_models, tmp_path):
    """With ray[default], the values reach the node's Prometheus endpoint (as the dashboard and a
    Prometheus server read them), named `ray_raymerge_worker_*` (counters with `_total`)."""
    import time
    import urllib.request

    cfg = {
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": str(llama_models[f"ft{i}"]), "parameters": {"weight": 0.5}} for i in (1, 2)],
    }
    try:
        result = raymerge.merge(cfg, tmp_path / "out", workers=1, quiet=True, keep_workers=True)
        actor = actor_pool.kept().workers[0].actor
        worker_id = ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_worker_id()))
        port = ray._private.worker.global_worker.node.metrics_export_port
        wanted = {"ray_raymerge_worker_bytes_read_total": result.bytes_read,
                  "ray_raymerge_worker_bytes_written_total": result.bytes_written,
                  "ray_raymerge_worker_tensors_total": result.tensors}
        found: dict[str, float] = {}
        deadline = time.time() + 60  # Ray reports metrics every 10 s by default
        while time.time() < deadline and found.keys() != wanted.keys():
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            for line in text.splitlines():
                name = line.split("{", 1)[0]
                if name in wanted and f'WorkerId="{worker_id}"' in line and 'worker="w0"' in line:
                    found[name] = float(line.rsplit(" ", 1)[1])
            time.sleep(1)
    finally:
        actor_pool.shutdown_kept()
    assert found == {k: float(v) for k, v in wanted.items()}
