"""Stage actors that die during a prune (`runtime.actor_pool.StageJob`): the pass reruns on fresh actors
and gives the same bytes as an undisturbed run; stages that keep dying end the job with
`WorkerLostError` after `MAX_WORKER_RESTARTS` restarts, and nothing is published.

Deaths are injected from the driver at fixed points of the job (no sleeps): the stage actors'
PIDs come from `prune._describe` (what each actor's `describe()` reported, once per attempt), and the process is
SIGKILLed, as the merge tests do with worker actors (tests/test_resume.py).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

import raymerge.runtime.prune as prune
from raymerge.pruning.report import REPORT_FILE
from raymerge.runtime import actor_pool
from raymerge.runtime.actor_pool import WorkerLostError
from raymerge.runtime.prune import PruneOptions, run_prune


def _config(trained) -> dict:
    return {
        "model": str(trained["model"]), "method": "wanda", "sparsity": 0.5, "mode": "sequential",
        "calibration": {"dataset": str(trained["calib"]), "nsamples": 8, "seqlen": 32, "eval_samples": 4},
        "batch_size": 4,
    }


def _files(folder: Path) -> dict[str, bytes]:
    # The report holds timings and worker PIDs; everything else must be byte-identical.
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file() and f.name != REPORT_FILE}


def _kill(pid: int, timeout: float = 30.0) -> None:
    """SIGKILL `pid` and wait (bounded) until it no longer runs."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:  # a zombie (not reaped yet) is dead too
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return
        except (OSError, IndexError):
            return
        time.sleep(0.05)
    raise AssertionError(f"stage actor process {pid} still runs {timeout} s after SIGKILL")


@pytest.fixture
def started(monkeypatch):
    """Records the (pid per stage) of every set of stage actors a prune starts."""
    real = prune._describe
    attempts: list[list[int]] = []

    def recording(pool):
        infos = real(pool)
        attempts.append([info.pid for info in infos if info is not None])  # None: the in-process stage
        return infos

    monkeypatch.setattr(prune, "_describe", recording)
    return attempts


def test_killed_stage_is_replaced_and_output_identical(trained, tmp_path, ray_session, started, monkeypatch, capsys):
    # The undisturbed bytes from an in-process prune (the same bytes as any number of stages:
    # tests/test_determinism.py), which starts no actors.
    clean = run_prune(_config(trained), tmp_path / "clean", PruneOptions(in_process=True, quiet=True))

    real = prune.Pipeline.prune_sequential
    killed: list[int] = []

    def kill_then_prune(self, *args, **kwargs):
        # Mid-run: the stages are loaded and the dense perplexity pass is done. Kill the last stage
        # of the first disturbed attempt, then let the pipeline run into the dead actor.
        if not killed:
            killed.append(started[-1][-1])
            _kill(killed[0])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(prune.Pipeline, "prune_sequential", kill_then_prune)
    started.clear()
    result = run_prune(_config(trained), tmp_path / "disturbed", PruneOptions(workers=2, quiet=True))
    assert len(killed) == 1 and len(started) == 2, "exactly one replacement of the stage actors"
    assert killed[0] not in started[1]
    assert _files(result.output) == _files(clean.output)
    assert len(_files(result.output)) > 2
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning: prune: stage 1 (layers 2-3) died" in line]
    assert len(warnings) == 1, err
    assert not (tmp_path / ".disturbed.raymerge-staging").exists()


def test_stages_that_keep_dying_end_with_worker_lost(trained, tmp_path, ray_session, monkeypatch, capsys):
    real = prune._describe
    attempts: list[int] = []

    def describe_and_kill(pool):
        infos = real(pool)
        attempts.append(infos[0].pid)
        _kill(infos[0].pid)  # every attempt loses its first stage
        return infos

    monkeypatch.setattr(prune, "_describe", describe_and_kill)
    # A limit of 1 restart (the policy reads MAX_WORKER_RESTARTS when a job starts): the same
    # path as the default's 3, with 4 stage actors started instead of 8.
    limit = 1
    monkeypatch.setattr(actor_pool, "MAX_WORKER_RESTARTS", limit)
    out = tmp_path / "out"
    with pytest.raises(WorkerLostError) as info:
        run_prune(_config(trained), out, PruneOptions(workers=2, quiet=True))
    assert len(attempts) == limit + 1
    message = str(info.value)
    assert "\n" not in message
    assert f"actors died {limit + 1} times (limit {limit} restarts)" in message and "stage 0 (layers 0-1)" in message, message
    err = capsys.readouterr().err
    assert err.count("warning: prune: stage 0 (layers 0-1) died") == limit, err
    assert not out.exists(), "nothing may be published"
    assert not [p.name for p in tmp_path.iterdir() if "staging" in p.name]


def test_prune_keeps_its_stage_actors_when_asked(trained, tmp_path, ray_session):
    """`keep_workers`: the next prune with the same number of stages runs on the same actors
    (the pool is this process's, like a kept merge pool), with the same bytes."""
    from raymerge.runtime import actor_pool

    try:
        a = run_prune(_config(trained), tmp_path / "a", PruneOptions(workers=2, quiet=True, keep_workers=True))
        pool = actor_pool.kept()
        assert pool is not None and len(pool) == 2
        actors = list(pool.actors)
        import raymerge

        b = raymerge.prune(_config(trained), tmp_path / "b", stages=2, quiet=True, keep_workers=True)  # the public option
        assert actor_pool.kept() is pool and pool.actors == actors
        assert [s["worker"] for s in a.stages] == [s["worker"] for s in b.stages]  # same host:pid per stage
        assert _files(a.output) == _files(b.output)
    finally:
        actor_pool.shutdown_kept()
    assert actor_pool.kept() is None
