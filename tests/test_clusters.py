"""Cluster profiles (`raymerge.config.cluster`) and the files shipped in clusters/.

Every profile loads and yields a consistent planner topology; sizes and bandwidths parse; bad
files fail with a `ConfigError` naming the file and the field; `auto` resolves; the Ray launcher
config validates against Ray's own schema; the KubeRay manifest has the documented shape; and a
profile feeds the planner.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import planners
from raymerge.config import ClusterProfile, ConfigError, load_cluster, local_profile
from raymerge.config.cluster import CPU_SPEED, GPU_SPEED, parse_bandwidth, parse_cluster, parse_size

CLUSTERS = Path(__file__).resolve().parent.parent / "clusters"
PROFILES = sorted(CLUSTERS.glob("*.yaml"))
GB, GiB = 1e9, 2**30
MACHINE = dict(cpus=8, memory_bytes=64 * GiB)


def _minimal(**worker_overrides) -> dict:
    worker = {"device": "cpu", "memory": "8GB", "speed": 1.0, "read_bandwidth": "1 GB/s", **worker_overrides}
    return {
        "name": "x",
        "node_groups": [{"name": "n", "count": 2, "network_bandwidth": "10 Gbps", "workers_per_node": 2, "worker": worker}],
    }


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# -- shipped profiles ---------------------------------------------------------------------------


def test_every_profile_is_shipped_and_tested():
    assert {p.name for p in PROFILES} >= {"local.yaml", "aws-4x8-a100.yaml", "cpu-8x16.yaml"}


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_shipped_profile_yields_consistent_topology(path: Path):
    profile = load_cluster(path)
    if profile.auto_fields():
        profile = profile.resolve_auto(**MACHINE)
    workers, nodes, remote = profile.planner_topology()
    groups = profile.node_groups
    assert len(nodes) == sum(g.count for g in groups)
    assert len(workers) == sum(g.count * g.workers_per_node for g in groups)
    assert [n.name for n in nodes] == profile.node_names()
    assert {w.node for w in workers} == {n.name for n in nodes}
    assert len({w.name for w in workers}) == len(workers)
    assert remote == profile.storage.remote_bandwidth
    if profile.launcher:
        assert (CLUSTERS / profile.launcher).is_file(), profile.launcher
    # the profile and the planner agree: a problem builds from it
    op = planners.Operator("t", bytes_read=1e9, bytes_written=1e9, compute_s=1.0, peak_memory=1e9)
    planners.MergeProblem([op], workers, nodes, remote_bandwidth=remote)


def test_aws_a100_profile_figures():
    workers, nodes, remote = load_cluster(CLUSTERS / "aws-4x8-a100.yaml").planner_topology()
    assert len(workers) == 32 and len(nodes) == 4
    assert [n.name for n in nodes] == ["gpu-0", "gpu-1", "gpu-2", "gpu-3"]
    assert workers[0].name == "gpu-0/w0" and workers[-1].name == "gpu-3/w7"
    assert {w.memory_bytes for w in workers} == {80e9}
    assert {n.network_bandwidth for n in nodes} == {100e9 / 8}
    assert {w.speed for w in workers} == {40.0}
    assert remote is None


def test_cpu_profile_figures():
    profile = load_cluster(CLUSTERS / "cpu-8x16.yaml")
    workers, nodes, remote = profile.planner_topology()
    assert len(nodes) == 8 and len(workers) == 128
    assert {w.memory_bytes for w in workers} == {7 * GiB}
    assert remote == 10e9 and profile.storage.inputs == "remote"


def test_local_yaml_matches_local_profile():
    shipped = load_cluster(CLUSTERS / "local.yaml")
    assert shipped.auto_fields()
    for machine in (MACHINE, dict(cpus=16, memory_bytes=128 * GiB, gpus=2, gpu_memory_bytes=24 * GiB)):
        resolved = shipped.resolve_auto(**machine)
        built = local_profile(**machine)
        assert resolved.planner_topology() == built.planner_topology()
        assert resolved.storage == built.storage


# -- parsing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        (80_000_000_000, 80e9), (1.5e9, 1.5e9), ("80GB", 80e9), ("80 GB", 80e9), ("80gb", 80e9),
        ("80 GiB", 80 * GiB), ("512M", 512e6), ("1.5 TB", 1.5e12), ("2KiB", 2048), ("100", 100), ("7 gib", 7 * GiB),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        (2e9, 2e9), ("25 GB/s", 25e9), ("25GBps", 25e9), ("2 GiB/s", 2 * GiB), ("500 MB/s", 500e6),
        ("100Gbps", 100e9 / 8), ("100 Gb/s", 100e9 / 8), ("100 Gbit/s", 100e9 / 8), ("12.5 Gbps", 12.5e9 / 8),
        ("400 Mbps", 50e6), ("1 B/s", 1),
    ],
)
def test_parse_bandwidth(text, expected):
    assert parse_bandwidth(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["fast", "10 Gbs", "10 GB", "-1 GB/s", "0", "inf", True, None, "10 XB/s"])
def test_parse_bandwidth_rejects(text):
    with pytest.raises(ValueError):
        parse_bandwidth(text)


@pytest.mark.parametrize("text", ["big", "-5GB", "0", "80 GB/s", False, None, "1e400"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


# -- errors name the file and the field ---------------------------------------------------------


def _error(tmp_path: Path, data: dict) -> str:
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        load_cluster(path)
    message = str(info.value)
    assert str(path) in message
    return message


def test_unknown_key_is_named(tmp_path):
    data = _minimal(memroy="8GB")
    message = _error(tmp_path, data)
    assert f"{tmp_path / 'x.yaml'}: node_groups[0].worker.memroy: unknown key" in message


def test_unknown_top_level_key(tmp_path):
    message = _error(tmp_path, {**_minimal(), "nodes": 3})
    assert "x.yaml: nodes: unknown key" in message


def test_negative_count(tmp_path):
    data = _minimal()
    data["node_groups"][0]["count"] = -4
    assert "x.yaml: node_groups[0].count: must be at least 1" in _error(tmp_path, data)


def test_bad_bandwidth_string(tmp_path):
    data = _minimal()
    data["node_groups"][0]["network_bandwidth"] = "10 Gbs"
    assert "x.yaml: node_groups[0].network_bandwidth: cannot parse bandwidth '10 Gbs'" in _error(tmp_path, data)


def test_bad_memory(tmp_path):
    assert "x.yaml: node_groups[0].worker.memory: cannot parse size" in _error(tmp_path, _minimal(memory="lots"))


def test_missing_worker(tmp_path):
    data = _minimal()
    del data["node_groups"][0]["worker"]
    assert "x.yaml: node_groups[0].worker: Field required" in _error(tmp_path, data)


def test_duplicate_group_and_bad_inputs(tmp_path):
    data = _minimal()
    data["node_groups"].append(dict(data["node_groups"][0]))
    data["storage"] = {"inputs": "nfs"}
    message = _error(tmp_path, data)
    assert "x.yaml: storage.inputs:" in message
    data["storage"] = {"inputs": "local"}
    assert "x.yaml: node_groups[1].name: duplicate node group name 'n'" in _error(tmp_path, data)


def test_empty_node_groups_and_missing_file(tmp_path):
    assert "x.yaml: node_groups:" in _error(tmp_path, {"name": "x", "node_groups": []})
    with pytest.raises(ConfigError, match="nope.yaml: cluster profile not found"):
        load_cluster(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="list.yaml: <top level>: a cluster profile must be a mapping"):
        load_cluster(tmp_path / "list.yaml")


# -- auto ---------------------------------------------------------------------------------------


def test_resolve_auto_cpu_machine():
    profile = load_cluster(CLUSTERS / "local.yaml")
    with pytest.raises(ConfigError, match=r"auto.*node_groups\[0\]\.workers_per_node.*resolve_auto"):
        profile.planner_topology()
    workers, nodes, _ = profile.resolve_auto(cpus=4, memory_bytes=16 * GiB).planner_topology()
    assert [w.name for w in workers] == ["local-0/w0", "local-0/w1", "local-0/w2", "local-0/w3"]
    assert {w.memory_bytes for w in workers} == {4 * GiB}
    assert {w.speed for w in workers} == {CPU_SPEED}
    assert [n.name for n in nodes] == ["local-0"]


def test_resolve_auto_gpu_machine():
    resolved = load_cluster(CLUSTERS / "local.yaml").resolve_auto(
        cpus=32, memory_bytes=256 * GiB, gpus=2, gpu_memory_bytes=24 * GiB
    )
    assert resolved.auto_fields() == []
    assert resolved.node_groups[0].worker.device == "gpu"
    workers, _, _ = resolved.planner_topology()
    assert len(workers) == 2
    assert {w.memory_bytes for w in workers} == {24 * GiB}
    assert {w.speed for w in workers} == {GPU_SPEED}


def test_resolve_auto_keeps_explicit_values_and_checks_inputs():
    data = _minimal(memory="auto")
    profile = parse_cluster(data)
    resolved = profile.resolve_auto(cpus=64, memory_bytes=32 * GiB)
    assert resolved.node_groups[0].workers_per_node == 2  # explicit, kept
    assert resolved.node_groups[0].worker.memory == 16 * GiB  # 32 GiB over 2 workers
    with pytest.raises(ValueError):
        profile.resolve_auto(cpus=0, memory_bytes=1)
    gpu_auto = parse_cluster(_minimal(device="gpu", memory="auto"))
    with pytest.raises(ConfigError, match="no GPU was detected"):
        gpu_auto.resolve_auto(cpus=4, memory_bytes=GiB)


def test_local_profile():
    profile = local_profile(cpus=2, memory_bytes=8 * GiB)
    assert isinstance(profile, ClusterProfile)
    workers, nodes, remote = profile.planner_topology()
    assert len(workers) == 2 and len(nodes) == 1 and remote is not None


# -- the launcher and KubeRay examples ----------------------------------------------------------


def test_ray_launcher_config_validates_against_rays_schema():
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is needed to check the launcher config")
    ray = pytest.importorskip("ray")
    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    if not schema_path.is_file():
        pytest.skip(f"this Ray ({ray.__version__}) ships no {schema_path.name}")
    config = yaml.safe_load((CLUSTERS / "ray" / "aws-4x8-a100.yaml").read_text())
    jsonschema.validate(config, json.loads(schema_path.read_text()))

    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    (worker,) = [t for name, t in types.items() if name != config["head_node_type"]]
    for node_type in (head, worker):
        assert node_type["node_config"]["InstanceType"] == "p4de.24xlarge"
        assert node_type["resources"]["GPU"] == 8
    assert worker["min_workers"] == worker["max_workers"] == config["max_workers"] == 3
    assert any("pip install" in c and "raymerge" in c for c in config["setup_commands"])


def test_kuberay_manifest_shape():
    docs = list(yaml.safe_load_all((CLUSTERS / "kuberay" / "raycluster-4x8-gpu.yaml").read_text()))
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    (group,) = cluster["spec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 4
    (container,) = group["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["image"].startswith("rayproject/ray:2.") and container["image"].endswith("-py311-gpu")
    assert cluster["spec"]["rayVersion"] in container["image"]
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    for pod in (cluster["spec"]["headGroupSpec"]["template"]["spec"], group["template"]["spec"]):
        (shared,) = [v for v in pod["volumes"] if v["name"] == "shared"]
        assert shared["persistentVolumeClaim"]["claimName"] in claims
        assert {"name": "shared", "mountPath": "/shared"} in pod["containers"][0]["volumeMounts"]


# -- the planner, offline, on a profile ---------------------------------------------------------


def test_planner_solves_a_problem_on_the_cpu_profile():
    workers, nodes, remote = load_cluster(CLUSTERS / "cpu-8x16.yaml").planner_topology()
    ops = [
        planners.Operator(
            f"layers.{i}.mlp", bytes_read=3 * 2e8, bytes_written=2e8, compute_s=0.5, peak_memory=8e8,
            split_degrees=(1, 2, 4),
        )
        for i in range(12)
    ]
    ops.append(planners.Operator("embed", bytes_read=3 * 1e9, bytes_written=1e9, compute_s=2.0, peak_memory=12e9,
                                 split_degrees=(1, 2, 4)))  # 12 GB: must be split to fit 7 GiB workers
    problem = planners.MergeProblem(ops, workers, nodes, remote_bandwidth=remote)
    plan = planners.solve(problem, time_limit=20)
    planners.validate(problem, plan)
    assert plan.makespan >= plan.lower_bound > 0
    assert {a.of for a in plan.assignments if a.operator == "embed"} <= {2, 4}  # 12 GB > 7 GiB per worker
    assert plan.objective <= planners.lpt(problem).objective * (1 + 1e-3) + 1e-9
