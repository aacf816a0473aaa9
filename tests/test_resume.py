"""Resume and fault tolerance: a worker actor killed mid-merge is replaced, a killed driver's
merge resumes from its staging folder, a staging folder from another merge is discarded (or
refused with --resume), a corrupt finished shard is redone, workers that keep dying stop the
merge but leave it resumable. Every output is byte-identical to an uninterrupted merge, and
nothing appears at the output path before the merge is complete.

Merges are made long enough to interrupt by small batches (`executor.BATCH_OPS`) and a sharded
output (`SHARD`), whose shards workers fill one after another; interruptions are injected in
the driver through `ray.wait`, which the executor calls once per finished batch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import yaml

import raymerge
import raymerge.runtime.executor as executor
import raymerge.runtime.actor_pool as actor_pool
from raymerge.checkpoints.manifest import load_manifest
from raymerge.cli import main as cli_main

SHARD = "100KB"  # the tiny models' 0.6 MB of weights -> 7 shards
REPO = Path(__file__).resolve().parent.parent


def linear_config(p: dict[str, Path], w1: float = 0.5) -> dict:
    weights = (("ft1", w1), ("ft2", 0.3), ("ft3", 0.2))
    return {"merge_method": "linear", "dtype": "float32",
            "models": [{"model": str(p[k]), "parameters": {"weight": w}} for k, w in weights]}


def merge(cfg, out: Path, **kw):
    return raymerge.merge(cfg, out, quiet=True, out_shard_size=SHARD, planner="lpt", workers=2, keep_workers=True, **kw)


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file()}


def staging_of(out: Path) -> Path:
    return out.parent / f".{out.name}.raymerge-staging"


@pytest.fixture(scope="module")
def clean(ray_session, llama_models, tmp_path_factory) -> dict[str, bytes]:
    """The files of an uninterrupted merge of `linear_config` (the workers are kept for the
    module's merges, and shut down after it)."""
    out = tmp_path_factory.mktemp("clean") / "out"
    try:
        result = merge(linear_config(llama_models), out)
        assert result.reused_shards == 0 and result.worker_restarts == 0 and "resumed" not in result.summary()
        assert len([n for n in result.files if n.endswith(".safetensors")]) > 3
        yield file_bytes(out)
    finally:
        raymerge.shutdown_workers()


@pytest.fixture
def small_batches(monkeypatch):
    """One part per batch."""
    monkeypatch.setattr(executor, "BATCH_OPS", 1)


def wait_hook(monkeypatch, action):
    """Call `action(n)` before the executor's n-th `ray.wait` (n = 1, 2, ...)."""
    real = ray.wait
    calls = [0]

    def wait(*args, **kwargs):
        calls[0] += 1
        action(calls[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(ray, "wait", wait)


def interrupt(monkeypatch, staging: Path, *, after_shards: int = 0, after_waits: int = 1) -> None:
    """Ctrl-C in the driver once the manifest records `after_shards` shards (and `after_waits` waits)."""

    def action(n):
        state = load_manifest(staging)
        if n >= after_waits and state is not None and len(state.finished) >= after_shards:
            raise KeyboardInterrupt

    wait_hook(monkeypatch, action)


def test_killed_worker_actor_is_replaced(llama_models, tmp_path, monkeypatch, clean, small_batches):
    pools = []
    real_begin = executor.begin

    def begin(pool, *args):
        pools.append((pool, [info.pid for info in pool.infos()]))
        return real_begin(pool, *args)

    def action(n):
        if n == 3:  # worker 0 has batches in flight and more queued: SIGKILL its process
            os.kill(pools[0][1][0], signal.SIGKILL)

    monkeypatch.setattr(executor, "begin", begin)
    wait_hook(monkeypatch, action)
    out = tmp_path / "out"
    result = merge(linear_config(llama_models), out)
    assert result.worker_restarts == 1 and "1 worker restart(s)" in result.summary()
    assert file_bytes(out) == clean
    assert not staging_of(out).exists()


def test_worker_whose_node_is_marked_dead_late_ends_with_node_lost(llama_models, tmp_path, monkeypatch, small_batches):
    """On a cluster whose nodes stage their own shards, a worker's death can reach the driver
    before Ray marks its node dead (seen in CI): the replacement must not wait for the node (300 s)
    nor be taken for a worker that moved, but end the merge with the node-lost error."""
    from raymerge.runtime import merge as merge_runtime

    gone = "f" * 56  # worker 1 "runs" on this node, which Ray lists alive at first, then dead
    real_run_plan, pools, looks = merge_runtime.run_plan, [], []

    def run_plan(pool, queues, operators, **kwargs):
        pools.append([info.pid for info in pool.infos()])
        return real_run_plan(pool, queues, operators, **{**kwargs, "nodes": [pool.infos()[0].node_id, gone]})

    def alive_nodes():
        looks.append(1)
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        return alive | {gone} if len(looks) == 1 else alive

    def action(n):
        if n == 3:
            os.kill(pools[0][1], signal.SIGKILL)

    monkeypatch.setattr(merge_runtime, "run_plan", run_plan)
    monkeypatch.setattr(executor, "_alive_nodes", alive_nodes)
    wait_hook(monkeypatch, action)
    try:
        with pytest.raises(actor_pool.WorkerLostError, match="merge worker 1 .* was lost.*rerun the same merge"):
            merge(linear_config(llama_models), tmp_path / "out")
    finally:
        raymerge.shutdown_workers()
    assert len(looks) >= 2  # the replacement was asked for (the first look), then the node was found gone


def test_killed_driver_resumes_byte_identical(llama_models, tmp_path, clean, capsys):
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump(linear_config(llama_models)))
    out = tmp_path / "out"
    staging = staging_of(out)
    # The driver runs in a subprocess on this test session's Ray, with one part per batch and a
    # slowed driver loop, and is SIGKILLed once the manifest records a finished shard.
    script = (
        "import sys, time, ray\n"
        "import raymerge.runtime.executor as ex\n"
        "from raymerge.cli import main\n"
        "ex.BATCH_OPS = 1\n"
        "real = ray.wait\n"
        "ray.wait = lambda *a, **k: (time.sleep(0.2), real(*a, **k))[1]\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = [str(cfg), str(out), "--out-shard-size", SHARD, "--planner", "lpt", "--quiet"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    address = ray.get_runtime_context().gcs_address
    raymerge.shutdown_workers()
    proc = subprocess.Popen([sys.executable, "-c", script, "merge", *args, "--workers", "1", "--address", address],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        state = None
        while time.monotonic() < deadline and proc.poll() is None:
            state = load_manifest(staging)
            if state is not None and state.finished:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the merge ended before it could be killed:\n{proc.stdout.read().decode()[-3000:]}"
        assert state is not None and state.finished, "no shard was recorded in time"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        proc.stdout.close()
    assert not out.exists(), "something was published by a killed merge"
    state = load_manifest(staging)
    assert 0 < len(state.finished) < len(state.shards)
    mtimes = {name: (staging / name).stat().st_mtime_ns for name in state.finished}

    assert cli_main(["merge", *args, "--workers", "2", "--resume"]) == 0
    summary = capsys.readouterr().out
    assert f"resumed: reused {len(mtimes)} of {len(state.shards)} shard(s)" in summary
    assert file_bytes(out) == clean
    assert {name: (out / name).stat().st_mtime_ns for name in mtimes} == mtimes  # reused, not rewritten
    assert not staging.exists()


def test_staging_of_another_merge_is_discarded(llama_models, tmp_path, monkeypatch, clean, small_batches, caplog):
    out = tmp_path / "out"
    staging = staging_of(out)
    with monkeypatch.context() as m:
        interrupt(m, staging, after_waits=4)
        with pytest.raises(KeyboardInterrupt):
            merge(linear_config(llama_models, w1=0.4), out)
    assert staging.is_dir() and load_manifest(staging) is not None and not out.exists()
    before = (sorted(p.name for p in staging.iterdir()), load_manifest(staging))
    # --resume refuses to discard another merge's work, before anything starts.
    with pytest.raises(raymerge.OutputError, match="different merge"):
        merge(linear_config(llama_models), out, resume=True)
    assert (sorted(p.name for p in staging.iterdir()), load_manifest(staging)) == before
    # By default it is discarded (with a warning) and the merge starts afresh.
    result = merge(linear_config(llama_models), out)
    assert "was made by a different merge" in caplog.text
    assert result.reused_shards == 0 and "resumed" not in result.summary()
    assert file_bytes(out) == clean


def test_corrupt_finished_shard_is_redone(llama_models, tmp_path, monkeypatch, clean, small_batches):
    out = tmp_path / "out"
    staging = staging_of(out)
    with monkeypatch.context() as m:
        interrupt(m, staging, after_shards=2)
        with pytest.raises(KeyboardInterrupt):
            merge(linear_config(llama_models), out)
    state = load_manifest(staging)
    assert len(state.finished) >= 2 and not out.exists()
    bad = sorted(state.finished)[0]
    with open(staging / bad, "r+b") as f:  # flip the last byte (tensor data, not the header)
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    result = merge(linear_config(llama_models), out)
    assert result.reused_shards == len(state.finished) - 1
    assert f"failed the checksum and were redone ({bad})" in result.summary()
    assert file_bytes(out) == clean


def test_workers_that_keep_dying_end_the_merge_resumably(llama_models, tmp_path, monkeypatch, clean, small_batches):
    out = tmp_path / "out"
    pids = []
    real_begin = executor.begin

    def begin(pool, *args):
        pids.extend(info.pid for info in pool.infos())
        return real_begin(pool, *args)

    with monkeypatch.context() as m:
        m.setattr(actor_pool, "MAX_WORKER_RESTARTS", 0)
        m.setattr(executor, "begin", begin)
        wait_hook(m, lambda n: os.kill(pids[1], signal.SIGKILL) if n == 4 else None)
        with pytest.raises(actor_pool.WorkerLostError, match=r"merge: actors died 1 times \(limit 0 restarts\); last lost: merge worker 1"):
            merge(linear_config(llama_models), out)
    assert not out.exists() and load_manifest(staging_of(out)) is not None  # kept for a resume
    result = merge(linear_config(llama_models), out)
    assert "resumed: reused" in result.summary()
    assert file_bytes(out) == clean
