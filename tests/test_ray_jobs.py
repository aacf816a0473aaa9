"""Running as a Ray job: outputs inside the job's working directory are refused (one line, exit
2), and the KubeRay RayJob manifest has the fields a retried, resumed S3 merge needs.

The working directory is faked with real folders under tmp_path laid out as Ray 2.60 lays out an
unpacked working dir (`<session>/runtime_resources/working_dir_files/_ray_pkg_<hash>/`), or with
the job config variable Ray's job supervisor sets for the driver (`RAY_JOB_CONFIG_JSON_ENV_VAR`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

import raymerge
from raymerge.runtime.job_env import JOB_CONFIG_ENV, JobWorkingDirError, check_output_outside_job_dir, job_working_dir

CLUSTERS = Path(__file__).resolve().parent.parent / "clusters"


@pytest.fixture
def ray_workdir(tmp_path, monkeypatch) -> Path:
    """A fake Ray-unpacked working dir, made the current directory."""
    pkg = tmp_path / "session_2026" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    (pkg / "examples").mkdir(parents=True)
    monkeypatch.chdir(pkg / "examples")  # the driver may run in a subfolder of it, too
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    return pkg


def test_ray_layout_is_detected(ray_workdir):
    assert job_working_dir() == ray_workdir.resolve()


@pytest.mark.parametrize("output", ["merged", "./out/merged", "../merged"])
def test_relative_outputs_inside_the_working_dir_are_refused(ray_workdir, output):
    with pytest.raises(JobWorkingDirError, match="inside this Ray job's working directory .* s3:// URL or an absolute path"):
        check_output_outside_job_dir(output)


def test_absolute_path_into_the_working_dir_is_refused(ray_workdir):
    with pytest.raises(JobWorkingDirError):
        check_output_outside_job_dir(ray_workdir / "models" / "out")


def test_s3_and_absolute_paths_outside_are_accepted(ray_workdir, tmp_path):
    check_output_outside_job_dir("s3://bucket/merged")
    check_output_outside_job_dir(tmp_path / "shared" / "merged")
    check_output_outside_job_dir(None)  # an output not asked for (search without --materialize)


def test_outside_a_ray_job_relative_paths_are_fine(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    assert job_working_dir() is None
    check_output_outside_job_dir("merged")


def test_job_config_variable_with_a_working_dir(tmp_path, monkeypatch):
    """A working dir Ray unpacked elsewhere (e.g. a custom temp dir): the job's runtime env says so."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0123abcd.zip"}, "metadata": {}}))
    assert job_working_dir() == tmp_path.resolve()
    with pytest.raises(JobWorkingDirError):
        check_output_outside_job_dir("merged")
    # a local:// working dir is a folder of the image, used in place and never deleted by Ray
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {"working_dir": "local:///app"}}))
    assert job_working_dir() is None
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {}}))  # a job without a working dir
    assert job_working_dir() is None
    monkeypatch.setenv(JOB_CONFIG_ENV, "not json")
    assert job_working_dir() is None


def test_merge_prune_and_search_refuse_before_any_work(ray_workdir, llama_models, capsys):
    """Through the CLI: one line, exit 2, nothing created."""
    from raymerge.cli import main

    cfg = ray_workdir / "ties.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(llama_models["base"]),
                                   "models": [{"model": str(llama_models["ft1"]), "parameters": {"weight": 1.0, "density": 0.5}}]}))
    assert main(["merge", str(cfg), "merged", "--in-process", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "working directory" in err[0] and "s3://" in err[0], err
    assert not (ray_workdir / "examples" / "merged").exists()
    assert not any(p.name.startswith(".merged") for p in (ray_workdir / "examples").iterdir())
    with pytest.raises(JobWorkingDirError):
        raymerge.prune({"model": str(llama_models["base"]), "method": "magnitude", "sparsity": 0.5}, "pruned", in_process=True, quiet=True)
    search = {"merge": {"merge_method": "linear", "models": [{"model": str(llama_models["base"]), "parameters": {"weight": 1.0}},
                                                            {"model": str(llama_models["ft1"]), "parameters": {"weight": {"low": 0.0, "high": 1.0}}}]},
              "objective": "perplexity", "evaluation": {"dataset": str(cfg), "seqlen": 8, "eval_samples": 1},
              "study": {"n_trials": 1}}
    with pytest.raises(JobWorkingDirError):
        raymerge.optimize(search, "study", in_process=True, quiet=True)
    assert sorted(os.listdir(ray_workdir / "examples")) == []


# -- the KubeRay RayJob manifest -------------------------------------------------------------------------
def test_rayjob_manifest_retries_and_resumes_an_s3_merge():
    doc = yaml.safe_load((CLUSTERS / "kuberay" / "rayjob-merge.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    argv = spec["entrypoint"].split()
    assert argv[:2] == ["raymerge", "merge"] and argv[-1].startswith("s3://")
    assert spec["backoffLimit"] >= 1 and spec["submitterConfig"]["backoffLimit"] >= 1
    assert spec["shutdownAfterJobFinishes"] is True
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(env) == {"env_vars"}, "no working_dir (outputs there would be deleted), no pip"
    assert not any(k.startswith("AWS_SECRET") or k in ("AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN") for k in env["env_vars"])
    staging = env["env_vars"]["RAYMERGE_STAGING_DIR"]
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    workers = cluster["workerGroupSpecs"][0]["template"]["spec"]
    for pod in (head, workers):
        mounts = {m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]}
        assert any(staging.startswith(m + "/") for m in mounts), "the staging dir must be on the shared volume"
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {"raymerge-shared"}
        assert pod["serviceAccountName"]  # S3 access from the service account's role, not from keys
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert workers["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert argv[2].startswith("/shared/")  # the config is read from the shared volume
