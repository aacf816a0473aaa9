"""The planner inside raymerge: the cost model, topologies, plans executed by the workers
(row-split parts included, bytes unchanged), predicted vs measured makespan, `raymerge plan`
and `merge --plan-only`."""

from __future__ import annotations

import json
from pathlib import Path

import planners
import pytest

import raymerge
import raymerge.runtime.costs as costs
import raymerge.runtime.merge as merge_module
from raymerge.cli import main as cli_main
from raymerge.runtime.compile import compile_merge
from raymerge.runtime.planning import (
    Topology,
    build_problem,
    calibrated_costs,
    plan_merge,
    topology_from_workers,
)
from raymerge.runtime.worker import WorkerInfo

from conftest import force_row_splits

REPO = Path(__file__).resolve().parent.parent


def linear_config(p: dict[str, Path]) -> dict:
    return {
        "merge_method": "linear",
        "models": [{"model": str(p[k]), "parameters": {"weight": w}} for k, w in (("ft1", 0.5), ("ft2", 0.3), ("ft3", 0.2))],
        "dtype": "float32",
    }


def program_of(cfg: dict):
    """The compiled operators of a merge config (headers only; no Ray)."""
    return compile_merge(cfg).program


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", ".json")}


# -- cost model --------------------------------------------------------------------------------


def test_cost_model_scales_with_elements_and_method(llama_models, monkeypatch):
    ops = {op.name: op for op in program_of(linear_config(llama_models)).operators}
    emb, norm = ops["model.embed_tokens.weight"], ops["model.norm.weight"]
    a, b = costs.planner_operator(emb, {}), costs.planner_operator(norm, {})
    assert a.bytes_read == emb.bytes_in and a.bytes_written == emb.bytes_out
    assert a.compute_s > b.compute_s > 0
    assert a.peak_memory >= emb.bytes_in  # at least the inputs are held
    # Calibrated figures replace the table's.
    key = costs.cost_key(emb)
    faster = costs.planner_operator(emb, {key: 1e-12})
    assert faster.compute_s < a.compute_s
    # Row splits: only for elementwise, deterministic methods on big enough 2-D tensors.
    assert a.split_degrees == (1,)  # tiny tensors are never worth splitting
    monkeypatch.setattr(costs, "SPLIT_MIN_BYTES", 0)
    assert costs.split_degrees(emb) == (1, 2, 4, 8)
    assert costs.split_degrees(norm) == (1,)  # 1-D
    ties = program_of({**linear_config(llama_models), "merge_method": "ties", "base_model": str(llama_models["base"]),
                       "models": [{"model": str(llama_models["ft1"]), "parameters": {"weight": 1, "density": 0.5}}]})
    ties_emb = next(op for op in ties.operators if op.name == "model.embed_tokens.weight")
    assert costs.split_degrees(ties_emb) == (1,)  # per-tensor trim needs the whole tensor
    assert costs.planner_operator(ties_emb, {}).compute_s > a.compute_s / 3 * 2  # TIES costs more per input


def test_part_rows_cover_the_tensor_exactly(llama_models):
    op = next(o for o in program_of(linear_config(llama_models)).operators if o.name == "model.embed_tokens.weight")
    for of in (1, 2, 4, 8):
        parts = [costs.part_rows(op, p, of) for p in range(of)]
        if of == 1:
            assert parts == [None]
            continue
        assert parts[0][0] == 0 and parts[-1][1] == op.shape[0]
        assert all(parts[i][1] == parts[i + 1][0] for i in range(of - 1))


def test_calibrated_costs_take_the_median_worker():
    keys = ["a", "b"]
    table, speeds = calibrated_costs(keys, [[1.0, 2.0], [2.0, 4.0], [1.0, 2.0]])
    assert table == {"a": 1.0, "b": 2.0}
    assert speeds == [1.0, 0.5, 1.0]


def test_topology_from_workers_splits_node_memory_among_cpu_workers():
    infos = [WorkerInfo(i, "n1" if i < 2 else "n2", "h", 1, "cpu", 10_000) for i in range(3)]
    topo = topology_from_workers(infos, [1.0, 1.0, 2.0])
    assert [w.node for w in topo.workers] == ["node0", "node0", "node1"]
    assert topo.workers[0].memory_bytes == pytest.approx(10_000 * 0.8 / 2)
    assert topo.workers[2].memory_bytes == pytest.approx(10_000 * 0.8)
    assert topo.workers[2].speed == 2.0
    assert topo.inputs == "remote" and topo.input_location() is None  # several nodes
    single = topology_from_workers(infos[:2], [1.0, 1.0])
    assert single.input_location() == "node0"


def test_infeasible_operator_is_named(llama_models):
    ops = program_of(linear_config(llama_models)).operators
    tiny = Topology((planners.Worker("w0", "n0", 1000.0, 1.0, 1e9),), (planners.Node("n0", 1e9),), None, "remote", "test")
    with pytest.raises(planners.InfeasibleError, match="does not fit on any worker"):
        plan_merge(ops, tiny)


def test_milp_plan_on_profile_is_never_worse_than_lpt(llama_models):
    from raymerge.config import load_cluster
    from raymerge.runtime.planning import topology_from_profile

    ops = program_of(linear_config(llama_models)).operators
    topo = topology_from_profile(load_cluster(REPO / "clusters" / "cpu-8x16.yaml"), "cpu-8x16")
    milp, problem = plan_merge(ops, topo, planner="milp", time_limit=5)
    lpt, _ = plan_merge(ops, topo, planner="lpt")
    assert milp.makespan <= lpt.makespan * (1 + 1e-9)
    assert 0 <= milp.gap <= 1 and milp.lower_bound <= milp.makespan
    planners.validate(problem, milp)


# -- plans executed by the workers ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_row_split_parts_give_identical_bytes(ray_session, llama_models, tmp_path, monkeypatch, method):
    cfg = linear_config(llama_models)
    if method == "task_arithmetic":
        cfg = {**cfg, "merge_method": "task_arithmetic", "base_model": str(llama_models["base"])}
    whole = raymerge.merge(cfg, tmp_path / "whole", workers=1, quiet=True, out_shard_size="300KB", in_process=True)
    used = force_row_splits(monkeypatch)
    split = raymerge.merge(cfg, tmp_path / "split", workers=2, quiet=True, out_shard_size="300KB", keep_workers=True)
    assert used and any(a.of == 4 for a in used[0].assignments)
    assert split.plan.parts > split.tensors  # parts really were split
    assert file_bytes(split.output) == file_bytes(whole.output)


def test_result_reports_predicted_and_measured_makespan(ray_session, llama_models, tmp_path):
    result = raymerge.merge(linear_config(llama_models), tmp_path / "out", workers=2, quiet=True, keep_workers=True)
    p = result.plan
    assert p is not None and p.predicted_makespan > 0 and p.measured_makespan > 0
    assert p.solver in ("lpt", "highs", "cbc") and p.status in ("optimal", "within_gap", "time_limit", "heuristic")
    assert len(p.predicted_busy) == 2 and set(p.measured_busy) <= set(p.predicted_busy)
    text = result.summary()
    assert "predicted makespan" in text and "measured" in text
    assert "workers measured: read" in text and "ms per part" in text  # the I/O probe's figures
    as_json = result.to_dict()
    assert as_json["plan"]["predicted_makespan"] == p.predicted_makespan and set(as_json["timings"]) >= {"ray", "merge"}
    json.dumps(as_json)


def test_workers_measure_read_write_and_part_costs_on_the_job_itself(llama_models, tmp_path):
    """The I/O probe reads the job's own inputs and writes a scratch file of the staging folder,
    which it removes: the staging folder is as it was, the figures are positive, and a topology
    built from them carries them to the planner (read and write bandwidth, part overhead)."""
    from raymerge.checkpoints import SourceSpec
    from raymerge.runtime.worker import IoFigures, MergeWorkerImpl

    cfg = linear_config(llama_models)
    ops = program_of(cfg).operators
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "keep.safetensors").write_bytes(b"x" * 10)
    worker = MergeWorkerImpl(0)
    worker.begin([SourceSpec(str(llama_models[k])) for k in ("ft1", "ft2", "ft3")], str(staging))
    large = max(ops, key=lambda op: op.bytes_in)
    small = min(ops, key=lambda op: op.bytes_in)
    io = worker.measure_io(large, small, sample_bytes=large.bytes_in // 3)
    worker.finish()
    assert io.read_bandwidth > 0 and io.write_bandwidth > 0 and io.part_overhead_s > 0
    assert sorted(p.name for p in staging.iterdir()) == ["keep.safetensors"]
    assert (staging / "keep.safetensors").read_bytes() == b"x" * 10
    infos = [WorkerInfo(i, "n1", "h", 1, "cpu", 10_000) for i in range(2)]
    figures = [IoFigures(3e9, 1e9, 0.004), IoFigures(1e9, 0.5e9, 0.002)]
    topo = topology_from_workers(infos, [1.0, 1.0], io=figures)
    assert [w.read_bandwidth for w in topo.workers] == [3e9, 1e9]
    assert [w.write_bandwidth for w in topo.workers] == [1e9, 0.5e9]
    assert topo.part_overhead_s == pytest.approx(0.003)
    problem = build_problem(ops, topo, {})
    op = problem.operators[0]
    assert op.compute_s == pytest.approx(costs.planner_operator(ops[0], {}, overhead_s=0.003).compute_s)
    assert problem.part_time(op, 1, topo.workers[1]) > problem.part_time(op, 1, topo.workers[0])


def test_read_bandwidth_leaves_out_a_reads_fixed_cost(llama_models, tmp_path, monkeypatch):
    """The probe's read bandwidth is what the bytes beyond a read's fixed cost take: that fixed
    cost (timed on the smallest operator's read) is in the part overhead already. A read of 10 MB
    in 11 ms whose fixed cost is 1 ms is 1 GB/s (not 0.91 GB/s)."""
    from raymerge.checkpoints import SourceSpec
    from raymerge.runtime import worker as worker_module
    from raymerge.runtime.worker import MergeWorkerImpl

    ops = program_of(linear_config(llama_models)).operators
    large = max(ops, key=lambda op: op.bytes_in)
    small = min(ops, key=lambda op: op.bytes_in)
    monkeypatch.setattr(worker_module, "_timed_read",
                        lambda op, sources, rows: (0.011, 10_000_000) if op is large else (0.001, small.bytes_in))
    staging = tmp_path / "staging"
    staging.mkdir()
    worker = MergeWorkerImpl(0)
    worker.begin([SourceSpec(str(llama_models[k])) for k in ("ft1", "ft2", "ft3")], str(staging))
    io = worker.measure_io(large, small)
    worker.finish()
    assert io.read_bandwidth == pytest.approx(1e9)


def test_calibration_is_cached_per_method_and_shape():
    """A pool (kept between jobs) times a cost key once per calibration shape: a small job's
    figures (its own small tensors) are not reused for a job of large tensors, and a second job of
    the same shape times nothing."""
    import math

    from raymerge.methods import get_method
    from raymerge.runtime import executor
    from raymerge.runtime.actor_pool import ActorPool
    from raymerge.runtime.operators import MergeOperator, TensorInput

    def op(shape):
        mps, params = get_method("task_arithmetic").resolve([{}, {"weight": 0.5}], {}, 0)
        return MergeOperator(index=0, name="w", method="task_arithmetic",
                             inputs=tuple(TensorInput(i, "w", 4 * math.prod(shape)) for i in range(2)),
                             base_index=0, model_params=tuple(mps), params=params, work_dtype=None, out_dtype="F32",
                             shape=shape, seed=None)

    pool = ActorPool.in_process(n=1)
    small, large = op((64, 128)), op((1024, 2048))
    key = costs.cost_key(small)
    assert costs.cost_key(large) == key
    executor.calibrate(pool, {key: small})
    executor.calibrate(pool, {key: small})
    assert len(pool.cache["calibration"]) == 1  # the same shape: timed once
    executor.calibrate(pool, {key: large})
    assert sorted(shape for _, shape in pool.cache["calibration"]) == [(64, 128), costs.CALIBRATION_SHAPE]


def test_one_actor_of_each_alike_group_calibrates_and_shared_cores_scale_its_figures(monkeypatch):
    """Compute is timed by one actor per node (and kind and size of device): 3 CPU actors on a
    2-CPU node and 1 on a 4-CPU node make two calls, not four, at once; the first node's actors
    share 2 cores 3 ways, so their figures are 1.5 times the measured one; GPU actors are not
    scaled. Storage is still timed by every actor (`together`)."""
    import ray

    from raymerge.methods import get_method
    from raymerge.runtime import executor
    from raymerge.runtime.actor_resources import ActorResources
    from raymerge.runtime.operators import MergeOperator, TensorInput

    mps, params = get_method("task_arithmetic").resolve([{}, {"weight": 0.5}], {}, 0)
    op = MergeOperator(index=0, name="w", method="task_arithmetic", inputs=tuple(TensorInput(i, "w", 4 * 64 * 128) for i in range(2)),
                       base_index=0, model_params=tuple(mps), params=params, work_dtype=None, out_dtype="F32",
                       shape=(64, 128), seed=None)

    class Actor:
        def __init__(self, i):
            self.i, self.calls = i, []

        def calibrate(self, ops):
            self.calls.append("calibrate")
            return [10.0 + self.i for _ in ops]

        def probe(self):
            self.calls.append("probe")
            return self.i

    class Pool:
        remote = True

        def __init__(self, infos, rule):
            self.workers, self._infos, self.rule, self.cache = [Actor(i) for i in range(len(infos))], infos, rule, {}

        def __len__(self):
            return len(self.workers)

        def infos(self):
            return self._infos

        def get(self, values):
            return values

    monkeypatch.setattr(ray, "nodes", lambda: [{"NodeID": "a", "Alive": True, "Resources": {"CPU": 2.0}},
                                               {"NodeID": "b", "Alive": True, "Resources": {"CPU": 4.0}}])
    infos = [WorkerInfo(i, node, "h", i, "cpu", 8 << 30) for i, node in enumerate("aaab")]
    pool = Pool(infos, ActorResources({"num_cpus": 2 / 3}, threads=1))
    rows = executor.calibrate(pool, {"k": op})
    assert [w.calls for w in pool.workers] == [["calibrate"], [], [], ["calibrate"]]
    assert rows == [[15.0], [15.0], [15.0], [13.0]]
    assert executor._per_actor(pool, lambda w: w.probe()) == [0, 1, 2, 3]  # storage: every actor
    gpus = Pool([WorkerInfo(i, "a", "h", i, "cuda", 80 << 30) for i in range(3)], ActorResources({"num_gpus": 1, "num_cpus": 1}, threads=1))
    assert executor.calibrate(gpus, {"k": op}) == [[10.0]] * 3
    assert executor.oversubscription(type("P", (), {"remote": False, "__len__": lambda self: 1})()) == [1.0]


def test_kept_worker_pool_is_reused(ray_session, llama_models, tmp_path):
    from raymerge.runtime import actor_pool

    cfg = linear_config(llama_models)
    try:
        a = raymerge.merge(cfg, tmp_path / "a", workers=1, quiet=True, keep_workers=True)
        pool = actor_pool.kept()
        assert pool is not None and len(pool) == 1
        actors = list(pool.actors)
        b = raymerge.merge(cfg, tmp_path / "b", workers=1, quiet=True, keep_workers=True)
        assert actor_pool.kept() is pool and pool.actors == actors  # same actors
        assert file_bytes(a.output) == file_bytes(b.output)
        # A Ray session of another cluster (after ray.shutdown() and a new ray.init(), whose first
        # driver is job 01000000 again): same job id, another node: the kept pool is not reused.
        job, node = actor_pool._ray_session()
        with pytest.MonkeyPatch.context() as m:
            m.setattr(actor_pool, "_ray_session", lambda: (job, "another-cluster-node"))
            fresh = actor_pool.acquire(1)
        assert fresh is not pool and actor_pool.kept() is None
        actor_pool.release(fresh, keep=False)
    finally:
        raymerge.shutdown_workers()
    assert actor_pool.kept() is None


# -- raymerge plan / merge --plan-only ---------------------------------------------------------------


def test_cli_plan_from_headers_with_profile_and_json(llama_models, tmp_path, capsys):
    cfg_path = tmp_path / "linear.yaml"
    cfg_path.write_text(json.dumps(linear_config(llama_models)))
    out_json = tmp_path / "plan.json"
    rc = cli_main(["plan", str(cfg_path), "--cluster", str(REPO / "clusters" / "aws-4x8-a100.yaml"), "--json", str(out_json)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "predicted makespan" in text and "lower bound" in text and "gap" in text and "solver" in text
    assert "gpu-3/w7" in text  # one row per worker of the profile
    data = json.loads(out_json.read_text())
    assert len({a["operator"] for a in data["assignments"]}) == len(program_of(linear_config(llama_models)).operators)


def test_merge_plan_only_starts_nothing_and_writes_nothing(llama_models, tmp_path, capsys, monkeypatch):
    import ray

    def no_ray(*a, **k):
        raise AssertionError("--plan-only must not start Ray")

    monkeypatch.setattr(ray, "init", no_ray)
    cfg_path = tmp_path / "linear.yaml"
    cfg_path.write_text(json.dumps(linear_config(llama_models)))
    out = tmp_path / "out"
    assert cli_main(["merge", str(cfg_path), str(out), "--plan-only", "--workers", "3"]) == 0
    assert not out.exists()
    text = capsys.readouterr().out
    assert "3 workers / 1 node(s)" in text and "predicted makespan" in text


def test_llama70b_plan_from_config_json_alone(monkeypatch):
    monkeypatch.chdir(REPO)  # the example's model paths are relative to the repository root
    report = raymerge.plan("examples/plan_70b.yaml", cluster="clusters/aws-4x8-a100.yaml", time_limit=10)
    assert report.tensors == 723 and len(report.problem.workers) == 32
    assert report.plan.gap <= 0.02 and report.plan.status in ("optimal", "within_gap")
    assert report.bytes_in == pytest.approx(4 * 70_553_706_496 * 2)  # four bf16 70B inputs
    planners.validate(report.problem, report.plan)
    with pytest.raises(raymerge.CheckpointError, match="shape-only|config.json"):
        raymerge.merge("examples/plan_70b.yaml", "/tmp/never-written", quiet=True)


def test_idle_worker_takes_unsent_batches_and_bytes_stay_identical(ray_session, llama_models, tmp_path, monkeypatch):
    cfg = linear_config(llama_models)
    reference = raymerge.merge(cfg, tmp_path / "ref", workers=1, quiet=True, out_shard_size="300KB", in_process=True)
    real = merge_module.plan_merge

    def all_on_first_worker(ops, topology, table=None, **kw):
        plan, problem = real(ops, topology, table, **kw)
        first = problem.workers[0].name
        assignments = [planners.Assignment(op.name, 0, 1, first) for op in problem.operators]
        return planners.plan.make_plan(problem, assignments, solver="test", status="heuristic", solve_seconds=0.0,
                                       lower_bound=planners.lower_bound(problem)), problem

    monkeypatch.setattr(merge_module, "plan_merge", all_on_first_worker)
    monkeypatch.setattr("raymerge.runtime.executor.BATCH_OPS", 1)  # many batches to share
    lopsided = raymerge.merge(cfg, tmp_path / "lopsided", workers=2, quiet=True, out_shard_size="300KB", keep_workers=True)
    assert lopsided.plan.moved_parts > 0
    assert "moved at run time" in lopsided.summary()
    assert file_bytes(lopsided.output) == file_bytes(reference.output)


def test_steal_takes_the_last_batch_of_the_busiest_allowed_worker():
    from collections import deque
    from types import SimpleNamespace

    from raymerge.runtime.executor import _steal

    def batch(*sizes):
        return [SimpleNamespace(bytes_in=s) for s in sizes]

    queues = [deque(), deque([batch(5), batch(1)]), deque([batch(10), batch(9), batch(2)])]
    taken = _steal(queues, 0, lambda thief, owner: True)
    assert [i.bytes_in for i in taken] == [2] and len(queues[2]) == 2
    assert _steal(queues, 0, lambda thief, owner: owner == 1)[0].bytes_in == 1
    assert _steal([deque(), deque()], 0, lambda t, o: True) is None
