"""Shared fixtures: one local Ray session for the whole run, and tiny models built once.

Ray: started once per test session with 2 CPUs and token auth off (loopback only). Tests that
need a multi-node `ray.cluster_utils.Cluster` use the `fake_cluster` fixture, which shuts the
shared session down (`take_local_ray_down`); it comes back before the next test that is not a
cluster test, so consecutive cluster tests do not restart it between each two.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite compares bytes with CPU references: compute on the CPU even on a GPU machine (also in
# the local Ray's actors, which inherit it); tests/test_gpu.py lifts it for its GPU runs.
os.environ.setdefault("RAYMERGE_DEVICE", "cpu")


def _start_local_ray() -> None:
    import ray

    if not ray.is_initialized():
        # address="local": a Ray of the suite's own, even when another cluster runs on this machine
        # (the private-disk test cluster, another user's): Ray's default would join that one.
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)


# Set by a cluster fixture that took the session's local Ray down: the next test that does not
# use such a fixture gets it back first (`pytest_runtest_setup`).
_LOCAL_RAY_TAKEN_DOWN = [False]
_OWN_CLUSTER_FIXTURES = {"fake_cluster", "cluster"}
_FAKE_CLUSTER_UP = [False]  # the module-scoped `fake_cluster` is connected


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray with 2 CPUs, shared by every test that merges."""
    import ray

    _start_local_ray()
    yield
    if ray.is_initialized():
        _end_kept_workers()
        ray.shutdown()


def _end_kept_workers() -> None:
    """Tests may leave a merge's workers kept (`keep_workers=True`) for the next test of the same
    size; they go before their Ray session does."""
    import raymerge

    raymerge.shutdown_workers()


def take_local_ray_down() -> None:
    """For a fixture that needs a cluster of its own: the session's local Ray (if up) goes down,
    and comes back before the next test that is not a cluster test. Not in the cluster fixtures'
    teardown, so that consecutive cluster tests do not start and stop it between each two (~6 s
    and ~8 CPU-seconds each time)."""
    import ray

    if ray.is_initialized():
        _end_kept_workers()
        ray.shutdown()
        _LOCAL_RAY_TAKEN_DOWN[0] = True


def finishes_within(seconds: float, fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, failing the test if it runs longer than `seconds` (a hang fails
    instead of blocking the suite). A thread, not SIGALRM: Ray's `ray.get` does not return to
    Python for a signal handler while it waits. On a hang the Ray session is restarted, so the
    actors left waiting for resources do not block the tests after this one."""
    out: dict = {}

    def call() -> None:
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            out["error"] = err

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        import ray

        ray.shutdown()
        _start_local_ray()
        pytest.fail(f"still running after {seconds:.0f} s: actors waiting for resources the cluster cannot give?")
    if "error" in out:
        raise out["error"]
    return out["value"]


def subcommand_parsers() -> dict[str, Any]:
    """The `raymerge` CLI's subcommand parsers by name (`raymerge.cli.build_parser`), to read
    their options and help."""
    from raymerge.cli import build_parser

    parser = build_parser()
    return {name: p for a in parser._subparsers._group_actions for name, p in a.choices.items()}  # type: ignore[union-attr]


_STARTED_EARLY: dict[str, Any] = {}  # by test module name: what its `start_early` returned


def pytest_collection_finish(session):
    """Slow set-ups of one core that do not need the session's Ray start now, in the background,
    so that they overlap the tests before theirs: the session's mergekit process when mergekit
    differential tests are selected (its imports take ~10 s on the CI machine), and whatever a
    selected test module starts in its `start_early(config)` (e.g. the DeepSpeed checkpoint writer)."""
    if any(item.get_closest_marker("mergekit") for item in session.items):
        from mergekit_oracle import start_batch_server

        start_batch_server()
    modules = {item.module.__name__: item.module for item in session.items if getattr(item, "module", None) is not None}
    for name, module in modules.items():
        if callable(getattr(module, "start_early", None)):
            _STARTED_EARLY[name] = module.start_early(session.config)


def started_early(module_name: str) -> Any:
    """What the test module `module_name`'s `start_early` started at collection (once: a second
    call gets None), or None when it did not run (the module run some other way)."""
    return _STARTED_EARLY.pop(module_name, None)


class Background:
    """A subprocess a test module starts before its tests (`start_early`), so that it runs while
    the tests before them do; its stdout and stderr go to files in `folder` (a pipe nobody reads
    yet would fill and block it). Killed, with what it started, if the session ends first."""

    def __init__(self, argv: list[str], folder: Path, **popen: Any) -> None:
        self.stdout, self.stderr = folder / "stdout.txt", folder / "stderr.txt"
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, start_new_session=True, **popen)
        atexit.register(self.kill)

    def result(self, timeout: float) -> subprocess.CompletedProcess:
        """Wait for it (killed after `timeout` seconds): its exit code and output."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, self.stdout.read_text(),
                                           self.stderr.read_text())

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before any fixture of the test is set up (module-scoped ones included): the local Ray back
    if a cluster fixture took it down and this test does not use one."""
    if _FAKE_CLUSTER_UP[0] and "fake_cluster" not in getattr(item, "fixturenames", ()):
        pytest.fail(f"{item.nodeid} runs while its module's fake_cluster is connected: put the tests "
                    "that use fake_cluster last in their module", pytrace=False)
    if _LOCAL_RAY_TAKEN_DOWN[0] and not set(getattr(item, "fixturenames", ())) & _OWN_CLUSTER_FIXTURES:
        import ray

        _LOCAL_RAY_TAKEN_DOWN[0] = False
        if not ray.is_initialized():
            _start_local_ray()


@pytest.fixture(scope="module")
def fake_cluster():
    """A 2-node `ray.cluster_utils.Cluster` (1 CPU each) on this machine; yields the cluster.
    One per module (starting one and bringing the session's Ray back cost ~12 s): the tests that
    use it run last in their module, as a test after them would find the driver still connected
    to the cluster (`pytest_runtest_setup` refuses to run one)."""
    import ray
    from ray.cluster_utils import Cluster

    take_local_ray_down()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    _FAKE_CLUSTER_UP[0] = True
    try:
        yield cluster
    finally:
        _FAKE_CLUSTER_UP[0] = False
        _end_kept_workers()
        ray.shutdown()
        cluster.shutdown()  # the session's Ray comes back before the next test that asks for it


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


def _build_family(root: Path, arch: str, dtype_name: str, n: int = 3) -> dict[str, Path]:
    import torch

    from raymerge.demo import build_tiny_model

    dtype = getattr(torch, dtype_name)
    folder = root / f"{arch}-{dtype_name}"
    paths = {"base": build_tiny_model(folder / "base", arch=arch, seed=0, dtype=dtype)}
    for i in range(n):
        # ft2 is saved sharded, so sharded inputs are exercised by every merge test.
        shard = "200KB" if i == 1 else None
        paths[f"ft{i + 1}"] = build_tiny_model(
            folder / f"ft{i + 1}", arch=arch, seed=100 + i, dtype=dtype, base=paths["base"], max_shard_size=shard
        )
    return paths


@pytest.fixture(scope="session")
def llama_models(model_root) -> dict[str, Path]:
    """A tiny float32 llama base and three fine-tunes (ft2 sharded)."""
    return _build_family(model_root, "llama", "float32")


@pytest.fixture(scope="session")
def qwen2_models(model_root) -> dict[str, Path]:
    """A tiny float32 qwen2 base (attention biases) and three fine-tunes."""
    return _build_family(model_root, "qwen2", "float32")


@pytest.fixture(scope="session")
def llama_bf16_models(model_root) -> dict[str, Path]:
    """A tiny bfloat16 llama base and three fine-tunes."""
    return _build_family(model_root, "llama", "bfloat16")


def force_row_splits(monkeypatch) -> list:
    """Make every operator that may be row-split (`costs.split_degrees`) split 4 ways, parts dealt
    round-robin over the workers; returns the list the forced plans are appended to."""
    import planners

    import raymerge.runtime.costs as costs
    import raymerge.runtime.merge as merge_module

    monkeypatch.setattr(costs, "SPLIT_MIN_BYTES", 0)
    real = merge_module.plan_merge
    used: list = []

    def split_everything(ops, topology, table=None, **kw):
        plan, problem = real(ops, topology, table, **kw)
        names = [w.name for w in problem.workers]
        assignments, k = [], 0
        for op in problem.operators:
            of = 4 if 4 in op.split_degrees else 1
            for part in range(of):
                assignments.append(planners.Assignment(op.name, part, of, names[k % len(names)]))
                k += 1
        forced = planners.plan.make_plan(problem, assignments, solver="test", status="heuristic",
                                         solve_seconds=0.0, lower_bound=planners.lower_bound(problem))
        used.append(forced)
        return forced, problem

    monkeypatch.setattr(merge_module, "plan_merge", split_everything)
    return used


def load_state(path: Path) -> dict:
    """Every tensor of a saved model folder, by name (sharded or not)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny llama trained for a few hundred steps on `demo_text` (a second-order Markov
    language), with a few large-activation input features added by a function-preserving
    rescaling, as LLMs have (`raymerge.demo.add_outlier_features`); and held-out text."""
    from raymerge.demo import build_trained_model, demo_text

    root = tmp_path_factory.mktemp("trained")
    (root / "calib.txt").write_text(demo_text(24, 200, seed=1))
    model = build_trained_model(root / "model", demo_text(200, 200, seed=0), steps=250, outlier_features=True)
    return {"model": model, "calib": root / "calib.txt", "root": root}
