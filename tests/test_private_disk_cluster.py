"""S3 end to end on a cluster whose worker nodes share no disk (issue 16).

One `clusters/private_disk_cluster.py` cluster per test session: a Ray head (0 CPUs) and two
worker nodes (1 CPU each, `{"node_a": 1}` / `{"node_b": 1}`), each in its own mount namespace
with a private tmpfs of its own (its temp dir, Ray temp dir, HF cache and raymerge staging
dir); moto's S3 server on 127.0.0.1 is the only storage they share. The tests connect to the
head with raymerge's `address=` option, as a user would, once for the module, and their jobs keep
their actors for the next test's job (`keep_workers=True`; the tests are ordered so that a merge's
pool serves the prune and the guided merge that follow, before the failed prune and the search
end it): the suite starts 6-8 actors here instead of 18.

- S3 -> S3 merges (TIES, DARE with a seed) and a Wanda prune give the bytes of a single-node
  in-process run of the same config: each node stages the shards it writes on its own disk and
  uploads them itself; the driver reads none of them. (A prune's shard holding tensors of both
  stages has its pieces gathered on one node first: `runtime.prune.NodeStaging`.)
- A model on one node's private disk is not readable by the driver: a merge naming it fails
  with one line, before anything runs.
- A worker node killed mid-merge: a clear error (or a completed merge), and a rerun resumes from
  the shards already uploaded; the result is byte-identical to an uninterrupted run.

Where mount namespaces are not allowed (no root, no `unshare`), the tests skip with the reason.
Marked `cluster` (runs by default; `-m "not cluster"` leaves them out).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ACCESS_KEY, SECRET = "AKIARAYMERGETESTKEY01", "raymerge-test-SECRET-must-never-be-printed"
os.environ["AWS_ACCESS_KEY_ID"] = ACCESS_KEY
os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"

import raymerge  # noqa: E402
from raymerge.runtime.worker import IO_SAMPLE_BYTES  # noqa: E402
from raymerge.checkpoints import s3 as s3mod  # noqa: E402
from conftest import take_local_ray_down  # noqa: E402
from s3_server import serve  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clusters.private_disk_cluster import ClusterError, PrivateDiskCluster, namespaces_unavailable  # noqa: E402

pytestmark = pytest.mark.cluster

IN, OUT = "pc-models", "pc-out"
NAMED_FILES = ("README.md", "mergekit_config.yml")  # they name the input paths (local vs s3://)
SHARD = "300KB"


@pytest.fixture(scope="session")
def private_cluster(tmp_path_factory):
    """(cluster, s3 store): started once per session, stopped at its end."""
    why = namespaces_unavailable()
    if why is not None:
        pytest.skip(f"private-disk cluster unavailable: {why}")
    with serve((IN, OUT)) as store:
        env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
        # The nodes must not see the driver's files (pytest's temp folder: the local models).
        cluster = PrivateDiskCluster(workers=2, env=env, hidden=[str(tmp_path_factory.getbasetemp().parent)])
        try:
            cluster.start()
        except ClusterError as err:
            pytest.skip(f"private-disk cluster did not start: {err}")
        try:
            yield cluster, store
        finally:
            import ray

            raymerge.shutdown_workers()
            if ray.is_initialized():
                ray.shutdown()
            cluster.stop()


@pytest.fixture(scope="module")
def connected(private_cluster):
    """This module's one connection to the cluster, with this process first disconnected from any
    other Ray (raymerge connects with `address=`, as a user would, at the first job). The jobs keep
    their actors (`keep_workers=True`) for the next test's job, as a user's session of several
    jobs on one cluster would: a merge's pool serves the next merge, prune and guided merge of its
    size; a search ends it and starts its own. The session's local Ray, if it was up, comes back
    before the next test that is not a cluster test (`conftest.take_local_ray_down`)."""
    import ray

    address_before = os.environ.get("RAY_ADDRESS")
    raymerge.shutdown_workers()
    take_local_ray_down()
    yield private_cluster
    raymerge.shutdown_workers()
    if ray.is_initialized():
        ray.shutdown()  # leave no connection to the cluster: later tests start their own local Ray
    if address_before is None:  # ray.init(address=...) exports RAY_ADDRESS: a later ray.init() would join the cluster
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = address_before


@pytest.fixture
def cluster(connected, monkeypatch, tmp_path):
    """The connected cluster; the driver's S3 staging goes to a folder of this test."""
    monkeypatch.setenv(s3mod.STAGING_ENV, str(tmp_path / "driver-staging"))
    yield connected


@pytest.fixture(scope="session")
def s3_llama(private_cluster, llama_models) -> dict[str, str]:
    _, store = private_cluster
    urls = {}
    for name, path in llama_models.items():
        store.upload_folder(path, IN, f"llama/{name}")
        urls[name] = f"s3://{IN}/llama/{name}"
    return urls


def ties(p, **extra) -> dict:
    return {
        "merge_method": "ties", "base_model": str(p["base"]),
        "models": [
            {"model": str(p["ft1"]), "parameters": {"weight": 1.0, "density": [0.8, 0.4]}},
            {"model": str(p["ft2"]), "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": str(p["ft3"]), "parameters": {"weight": 0.9, "density": 0.6}},
        ],
        "parameters": {"normalize": True}, **extra,
    }


def dare(p) -> dict:
    cfg = ties(p, raymerge={"random_seed": 1234})
    cfg["merge_method"] = "dare_ties"
    return cfg


def local_files(cfg: dict, out: Path, shard: str = SHARD) -> dict[str, bytes]:
    """The single-node reference: the same config, in process, local output."""
    result = raymerge.merge(cfg, out, in_process=True, quiet=True, out_shard_size=shard)
    return {f.name: f.read_bytes() for f in sorted(result.output.iterdir())}


def without_named(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if k not in NAMED_FILES}


@pytest.mark.parametrize("make", [ties, dare], ids=["ties", "dare_seeded"])
def test_s3_merge_on_private_disks_matches_local(cluster, s3_llama, llama_models, tmp_path, make):
    c, store = cluster
    expected = local_files(make(llama_models), tmp_path / "ref")
    assert len([n for n in expected if n.endswith(".safetensors")]) > 1
    url = f"s3://{OUT}/{make.__name__}"
    result = raymerge.merge(make(s3_llama), url, address=c.address, workers=2, quiet=True, out_shard_size=SHARD,
                            s3_endpoint_url=store.url, keep_workers=True)
    assert result.output == url
    got = store.objects(OUT, make.__name__)
    assert without_named(got) == without_named(expected)
    # Each node fetched what its own parts read, plus the storage probe's sample (at most
    # IO_SAMPLE_BYTES per worker): not the model. (The plan may give one node every part.)
    print(f"{make.__name__} on private disks:", result.summary())
    assert len(result.per_node) == 2, result.per_node
    assert sum(row["needed"] for row in result.per_node.values()) == result.bytes_read
    for row in result.per_node.values():
        assert row["needed"] <= row["read"] <= row["needed"] + row["workers"] * IO_SAMPLE_BYTES
    # The driver staged only its small files; no shard bytes went through it.
    assert not (tmp_path / "driver-staging").exists() or not any((tmp_path / "driver-staging").rglob("*.safetensors"))
    # Each worker node staged its shards on its own disk, under the driver's staging path, and
    # removed that copy once the model was published: no model-sized leftovers on the nodes.
    _assert_no_node_keeps_shards(c, tmp_path / "driver-staging")


def test_input_on_one_nodes_private_disk_is_refused(cluster, llama_models, tmp_path):
    """A model copied onto node_a's private disk only: the driver (and node_b) cannot read it; a
    merge naming it fails at once with one line naming the path, and nothing is published."""
    c, store = cluster
    node = c.node("node_a")
    secret = str(Path(node.temp_dir).parent / "sentinel-model")  # inside node_a's private tmpfs
    # Copy the model into node_a's mount namespace (nsenter into the namespace of its processes).
    pid = next(iter(_pids(node)))
    src = llama_models["ft1"]
    for f in sorted(src.iterdir()):
        subprocess.run(["nsenter", "-t", str(pid), "-m", "sh", "-c", f"mkdir -p {secret} && cat > {secret}/{f.name}"],
                       input=f.read_bytes(), check=True)
    assert not Path(secret).exists()  # not on the driver's disk
    cfg = {"merge_method": "linear", "models": [{"model": str(llama_models["ft2"]), "parameters": {"weight": 0.5}},
                                                {"model": secret, "parameters": {"weight": 0.5}}]}
    url = f"s3://{OUT}/sentinel"
    with pytest.raises(Exception) as info:
        raymerge.merge(cfg, url, address=c.address, workers=2, quiet=True, s3_endpoint_url=store.url, keep_workers=True)
    message = str(info.value)
    assert secret in message and "\n" not in message.strip(), message
    assert store.objects(OUT, "sentinel") == {}


def _pids(node) -> list[int]:
    from clusters.private_disk_cluster import _pids_in

    return _pids_in(node.namespace)


def _assert_no_node_keeps_shards(c, staging: Path) -> None:
    """No worker node has a shard file under `staging` on its own disk (seen from inside its mount namespace)."""
    for name in ("node_a", "node_b"):
        pid = next(iter(_pids(c.node(name))))
        listing = subprocess.run(["nsenter", "-t", str(pid), "-m", "sh", "-c",
                                  f"find {staging} -name '*.safetensors' 2>/dev/null; true"],
                                 capture_output=True, text=True, check=True).stdout.split()
        assert listing == [], (name, listing)


def test_prune_s3_to_s3_on_private_disks_matches_local(cluster, s3_llama, llama_models, tmp_path):
    """Two stages on two nodes: shards holding tensors of both stages are gathered on one node
    (`runtime.prune.NodeStaging`); the bucket gets the in-process local prune's bytes."""
    from raymerge.demo import demo_text

    c, store = cluster
    calib_text = demo_text(8, 200, seed=2)
    (tmp_path / "calib.txt").write_text(calib_text)
    store.client.put_object(Bucket=IN, Key="calib.txt", Body=calib_text.encode())
    cfg = {"method": "wanda", "sparsity": 0.5, "out_shard_size": SHARD,
           "calibration": {"dataset": str(tmp_path / "calib.txt"), "nsamples": 4, "seqlen": 32, "eval_samples": 2}}
    local = raymerge.prune({**cfg, "model": str(llama_models["ft2"])}, tmp_path / "local", in_process=True, quiet=True)
    expected = {f.name: f.read_bytes() for f in sorted(local.output.iterdir())}
    url = f"s3://{OUT}/pruned"
    raymerge.prune({**cfg, "model": s3_llama["ft2"]}, url, address=c.address, workers=2, quiet=True,
                   s3_endpoint_url=store.url, keep_workers=True)
    got = store.objects(OUT, "pruned")
    assert sorted(got) == sorted(expected)
    # The config file names the model as given (an s3:// URL vs the local folder); the rest is equal.
    named = "raymerge_prune.yml"
    assert got[named] == expected[named].replace(str(llama_models["ft2"]).encode(), s3_llama["ft2"].encode())
    skip = ("prune_report.json", named)
    assert {k: v for k, v in got.items() if k not in skip} == {k: v for k, v in expected.items() if k not in skip}
    # The case this is about: two stages, and some shard holds tensors of both (gathered on one node).
    import json

    stages = json.loads(got["prune_report.json"])["stages"]
    assert len(stages) == 2, stages
    boundary = stages[1]["layers"][0]
    stage_of = {}
    for name, shard in json.loads(got["model.safetensors.index.json"])["weight_map"].items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else 0
        stage_of.setdefault(shard, set()).add(int(layer >= boundary))
    assert any(len(s) == 2 for s in stage_of.values()), stage_of
    # No node keeps its staging copy once the model is published.
    _assert_no_node_keeps_shards(c, tmp_path / "driver-staging")


def test_guided_merge_on_private_disks_matches_local(cluster, s3_llama, llama_models, tmp_path):
    """An ACM-guided TIES merge (a statistics pass on guidance stages, then the merge) S3 -> S3 on
    the private-disk cluster: the bytes of the same guided merge run in process to a local folder."""
    from raymerge.demo import demo_text

    c, store = cluster
    (tmp_path / "calib.txt").write_text(demo_text(8, 120, seed=5))

    def guided(p) -> dict:
        return ties(p, dtype="float32", raymerge={"guidance": {
            "method": "acm", "stages": 2,
            "calibration": {"dataset": str(tmp_path / "calib.txt"), "nsamples": 4, "seqlen": 24, "eval_samples": 0, "seed": 3}}})

    expected = local_files(guided(llama_models), tmp_path / "ref")
    url = f"s3://{OUT}/guided"
    result = raymerge.merge(guided(s3_llama), url, address=c.address, workers=2, quiet=True, out_shard_size=SHARD,
                            s3_endpoint_url=store.url, keep_workers=True)
    assert result.output == url and result.guidance is not None
    got = store.objects(OUT, "guided")
    skip = ("guidance.json",)  # names the inputs (local vs s3://), as README and the config copy do
    assert {k: v for k, v in without_named(got).items() if k not in skip} == \
        {k: v for k, v in without_named(expected).items() if k not in skip}
    _assert_no_node_keeps_shards(c, tmp_path / "driver-staging")


def test_a_failed_prune_on_private_disks_leaves_no_node_copies(cluster, s3_llama, tmp_path, monkeypatch):
    """A prune whose stages staged shards on two nodes fails after the stages wrote them: the
    error reaches the caller, no node keeps its copy, nothing is published."""
    from raymerge.demo import demo_text
    from raymerge.runtime import prune as prune_module

    c, store = cluster
    store.client.put_object(Bucket=IN, Key="calib-fail.txt", Body=demo_text(8, 200, seed=3).encode())
    (tmp_path / "calib.txt").write_text(demo_text(8, 200, seed=3))
    cfg = {"method": "magnitude", "sparsity": 0.5, "out_shard_size": SHARD, "model": s3_llama["ft2"],
           "calibration": {"dataset": str(tmp_path / "calib.txt"), "nsamples": 4, "seqlen": 32, "eval_samples": 2}}
    began = []

    def gather_fails(self, stages, staging):
        began.append(self.nodes)
        raise RuntimeError("injected failure before the shards are gathered")

    monkeypatch.setattr(prune_module.NodeStaging, "gather", gather_fails)
    with pytest.raises(RuntimeError, match="injected failure"):
        raymerge.prune(cfg, f"s3://{OUT}/pruned-fails", address=c.address, workers=2, quiet=True,
                       s3_endpoint_url=store.url, keep_workers=True)
    assert began and len(set(began[-1])) == 2  # the stages were on two nodes, each with its copy
    _assert_no_node_keeps_shards(c, tmp_path / "driver-staging")
    assert store.objects(OUT, "pruned-fails") == {}


def test_search_on_private_disks_materializes_the_bytes_of_a_local_merge(cluster, s3_llama, tmp_path):
    """A search whose inputs are in the bucket, its stages on two nodes that share no disk,
    3 trials, the best model materialized into the bucket: the bytes of the best config merged
    by a single process (in process, local output)."""
    from raymerge.demo import demo_text

    c, store = cluster
    (tmp_path / "calib.txt").write_text(demo_text(8, 200, seed=4))
    cfg = {
        "merge": {
            "merge_method": "linear",
            "models": [{"model": s3_llama["ft1"], "parameters": {"weight": {"low": 0.2, "high": 1.0}}},
                       {"model": s3_llama["ft3"], "parameters": {"weight": 1.0}}],
            "dtype": "float32",
        },
        "objective": "perplexity",
        "evaluation": {"dataset": str(tmp_path / "calib.txt"), "seqlen": 32, "eval_samples": 2},
        "study": {"n_trials": 3, "sampler": "random", "seed": 0},
    }
    url = f"s3://{OUT}/searched"
    result = raymerge.optimize(cfg, tmp_path / "study", stages=2, address=c.address, quiet=True, materialize=url,
                               s3_endpoint_url=store.url)
    assert result.materialized == url and len(result.study.trials) == 3
    local = raymerge.merge(result.best_configs[0], tmp_path / "local", in_process=True, quiet=True,
                           s3_endpoint_url=store.url)
    expected = {f.name: f.read_bytes() for f in sorted(local.output.iterdir())}
    assert without_named(store.objects(OUT, "searched")) == without_named(expected)
    _assert_no_node_keeps_shards(c, tmp_path / "driver-staging")


def test_worker_node_lost_mid_merge_then_rerun_resumes(cluster, s3_llama, llama_models, tmp_path, monkeypatch):
    """node_b is killed (every process of it) while the merge runs: the merge ends with a clear
    error naming the lost node (or completes on node_a); node_b is started again and the rerun
    resumes from the shards already uploaded, giving the uninterrupted bytes."""
    import threading

    c, store = cluster
    expected = local_files(ties(llama_models), tmp_path / "ref", shard="120KB")
    url = f"s3://{OUT}/node-lost"
    opts = dict(address=c.address, workers=2, quiet=True, out_shard_size="120KB", s3_endpoint_url=store.url)
    # Slow the shards' uploads down, so the kill lands mid-merge: each upload waits a little.
    killed = threading.Event()

    def kill_soon():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            listed = store.client.list_objects_v2(Bucket=OUT, Prefix="node-lost/").get("Contents", [])
            if any(o["Key"].endswith(".safetensors") for o in listed):
                break
            time.sleep(0.05)
        c.stop_node("node_b")
        killed.set()

    killer = threading.Thread(target=kill_soon, daemon=True)
    killer.start()
    try:
        raymerge.merge(ties(s3_llama), url, **opts)
        completed = True
    except Exception as err:  # noqa: BLE001 - the clear error is what is checked
        completed = False
        message = str(err)
        assert "lost" in message and "rerun" in message, message
    killer.join(60)
    assert killed.is_set()
    print("node-lost: merge", "completed" if completed else f"failed: {message}")
    if completed:
        assert without_named(store.objects(OUT, "node-lost")) == without_named(expected)
        return
    assert "config.json" not in store.objects(OUT, "node-lost")
    c.restart_node("node_b")
    import ray

    if ray.is_initialized():
        raymerge.shutdown_workers()
    result = raymerge.merge(ties(s3_llama), url, **opts)
    print("node-lost rerun:", result.resume_note)
    assert result.reused_shards >= 1, result.summary()
    assert without_named(store.objects(OUT, "node-lost")) == without_named(expected)
