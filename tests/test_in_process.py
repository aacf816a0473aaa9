"""`merge(..., in_process=True)`: the same worker code with no Ray, and the same bytes as on Ray.

The fast tests (method grid, mergekit differential, whole-model trim, SVD methods) merge in
process; this file is what lets them: an in-process merge gives the bytes of a Ray merge with 1
and with 2 workers, starts no Ray, and still reports the planner's prediction next to the
measured makespan.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import raymerge


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _config(method: str, models: dict[str, Path]) -> dict:
    params = {"density": 0.5, "weight": 0.6}
    return {
        "merge_method": method,
        "base_model": str(models["base"]),
        "models": [{"model": str(models[f"ft{i}"]), "parameters": params} for i in (1, 2, 3)],
        "parameters": {"normalize": True},
        "dtype": "float32",
    }


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_in_process_equals_ray_workers(method, llama_models, ray_session, tmp_path):
    cfg = _config(method, llama_models)
    local = raymerge.merge(cfg, tmp_path / "local", in_process=True, random_seed=7, quiet=True, out_shard_size="300KB")
    assert local.workers == 1  # a merge this small runs on one thread by default (test below)
    assert local.plan is not None and local.plan.measured_makespan > 0
    assert "measured" in local.summary() and "in process" in local.plan.report.topology.description
    expected = _files(tmp_path / "local")
    assert any(name.endswith(".safetensors") for name in expected) and len(expected) > 3
    # One Ray worker equals in process on 1M-element tensors (tests/test_determinism.py); two
    # here, kept for the next merge of the same size.
    for workers in (2,):
        out = tmp_path / f"ray{workers}"
        raymerge.merge(cfg, out, workers=workers, random_seed=7, quiet=True, out_shard_size="300KB", keep_workers=True)
        got = _files(out)
        assert got.keys() == expected.keys(), workers
        differ = [name for name in expected if got[name] != expected[name]]
        assert not differ, f"{method}: in process vs {workers} Ray worker(s): {differ} differ"


def test_default_in_process_workers_one_per_core_unless_the_merge_is_small(monkeypatch):
    """In process, by default: one worker thread per core, but one for a merge reading less than
    SMALL_JOB_BYTES (its tiny parts are Python's time, and threads take turns on the GIL for it)."""
    from raymerge.runtime import merge as merge_module

    monkeypatch.setattr(merge_module.os, "cpu_count", lambda: 4)
    small = merge_module.SMALL_JOB_BYTES
    assert merge_module._local_worker_count(small) == 4
    assert merge_module._local_worker_count(10 * small) == 4
    assert merge_module._local_worker_count(None) == 4
    assert merge_module._local_worker_count(small - 1) == 1
    assert merge_module._local_worker_count(0) == 1


def test_in_process_starts_no_ray(llama_models, tmp_path):
    # A subprocess: this test session may already have started Ray (the session fixture).
    cfg = _config("ties", llama_models)
    script = textwrap.dedent(f"""
        import sys, ray, raymerge
        assert not ray.is_initialized()
        result = raymerge.merge({cfg!r}, {str(tmp_path / 'out')!r}, in_process=True, quiet=True)
        assert result.plan is not None, "the planner step is kept"
        print("ray initialized:", ray.is_initialized())
        sys.exit(3 if ray.is_initialized() else 0)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ray initialized: False" in proc.stdout
    assert (tmp_path / "out" / "config.json").exists()


def test_in_process_refuses_ray_options(llama_models, tmp_path):
    cfg = _config("ties", llama_models)
    with pytest.raises(raymerge.ConfigError, match="in_process"):
        raymerge.merge(cfg, tmp_path / "b", in_process=True, address="ray://nowhere:10001")
    assert not (tmp_path / "b").exists()


def test_in_process_threads_give_the_bytes_of_one_thread_and_restore_torch_threads(llama_models, tmp_path, monkeypatch):
    """1, 2 and 3 in-process workers (threads) publish the same bytes; the caller's torch thread
    count is as it was afterwards; a method failing on one thread fails the merge with the
    tensor's name and publishes nothing."""
    import torch

    from raymerge.methods import registry

    cfg = _config("dare_ties", llama_models)
    before = torch.get_num_threads()
    outputs = {}
    for n in (1, 2, 3):
        result = raymerge.merge(cfg, tmp_path / f"t{n}", in_process=True, workers=n, random_seed=7, quiet=True,
                                out_shard_size="300KB")
        assert result.workers == n and f"{n} worker thread(s)" in result.plan.report.topology.description
        outputs[n] = _files(tmp_path / f"t{n}")
        assert torch.get_num_threads() == before
    assert outputs[2] == outputs[1] and outputs[3] == outputs[1]
    from dataclasses import replace as dc_replace

    from raymerge.runtime import compute

    spec = registry.get_method("dare_ties")

    def failing(inputs, **kw):
        if inputs[0].dim() == 2:  # every matrix fails: both threads have some
            raise RuntimeError("boom")
        return spec.fn(inputs, **kw)

    monkeypatch.setattr(compute, "get_method", lambda name: dc_replace(spec, fn=failing))
    with pytest.raises(raymerge.RaymergeError, match="failed on tensor"):
        raymerge.merge(cfg, tmp_path / "failed", in_process=True, workers=2, random_seed=7, quiet=True)
    assert not (tmp_path / "failed").exists() and torch.get_num_threads() == before


def test_a_merge_naming_no_cluster_runs_in_process_on_a_cpu_machine(monkeypatch):
    """`local_by_default`: threads in this process unless something asks for Ray (an address,
    RAY_ADDRESS, a cluster profile, kept workers, a Ray session of this process) or a GPU is there."""
    import ray

    from raymerge.runtime import merge as merge_runtime
    from raymerge.runtime import worker
    from raymerge.runtime.merge import MergeOptions, local_by_default

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert local_by_default(MergeOptions())
    assert local_by_default(MergeOptions(workers=3))
    assert not local_by_default(MergeOptions(address="local"))
    assert not local_by_default(MergeOptions(address="auto"))
    assert not local_by_default(MergeOptions(cluster="clusters/local.yaml"))
    assert not local_by_default(MergeOptions(keep_workers=True))
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert not local_by_default(MergeOptions())
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    assert not local_by_default(MergeOptions())
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(worker, "pick_device", lambda: torch_device("cuda"))
    assert not local_by_default(MergeOptions())
    assert merge_runtime  # the module the rule lives in


def torch_device(kind: str):
    import torch

    return torch.device(kind)


def test_cli_merge_in_process(llama_models, tmp_path):
    import yaml

    from raymerge.cli import main

    cfg_path = tmp_path / "ties.yaml"
    cfg_path.write_text(yaml.safe_dump(_config("ties", llama_models)))
    assert main(["merge", str(cfg_path), str(tmp_path / "out"), "--in-process", "--quiet"]) == 0
    assert (tmp_path / "out" / "config.json").exists()
    proc = subprocess.run([sys.executable, "-m", "raymerge.cli", "merge", "--help"], capture_output=True, text=True, timeout=120)
    assert "--in-process" in proc.stdout and "without Ray" in proc.stdout


def test_guided_merge_in_process_equals_ray(llama_models, ray_session, tmp_path):
    """The statistics pass of a guided merge runs as one stage in this process: same bytes as
    two Ray stage workers and one Ray merge worker."""
    from raymerge.demo import demo_text

    (tmp_path / "calib.txt").write_text(demo_text(8, 120, seed=5))
    calibration = {"dataset": str(tmp_path / "calib.txt"), "nsamples": 4, "seqlen": 24, "eval_samples": 0, "seed": 3}
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(llama_models["base"]),
        "models": [{"model": str(llama_models[m]), "parameters": {"weight": w}} for m, w in (("ft1", 0.6), ("ft2", 0.5))],
        "dtype": "float32",
        "raymerge": {"guidance": {"method": "acm", "calibration": calibration, "stages": 2}},
    }
    local = raymerge.merge(cfg, tmp_path / "local", in_process=True, quiet=True)
    assert local.guidance is not None
    raymerge.merge(cfg, tmp_path / "ray", workers=1, quiet=True)
    local_files, ray_files = _files(tmp_path / "local"), _files(tmp_path / "ray")
    reports = [json.loads(files.pop("guidance.json")) for files in (local_files, ray_files)]
    for report in reports:
        report.pop("seconds")  # how long the statistics pass took
    assert reports[0] == reports[1] and reports[0]["coefficients"]
    assert local_files == ray_files
