"""The one resource rule for Ray actor pools (`raymerge.runtime.actor_resources`): the rule on
made-up clusters, and on the 2-CPU test session more actors than CPUs run (fractional shares)
instead of hanging — a merge with 4 workers (same bytes as 1); a search with 2 stages x
concurrency 2 is `tests/test_search.py::test_concurrent_trials_equal_sequential` — while a count
below one fails at once, before Ray, with one line."""

from __future__ import annotations

import pytest
import yaml

import raymerge
from conftest import finishes_within
from raymerge.config import ConfigError
from raymerge.runtime.actor_resources import ActorCountError, actor_resources, check_actor_count, default_actor_count


def file_bytes(folder) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file()}


# -- the rule, on made-up clusters (no Ray) -------------------------------------------------------------
@pytest.mark.parametrize(
    "n, cpus, share, threads",
    [(1, 2, 2, 2), (2, 2, 1, 1), (3, 8, 2, 2), (3, 2, 0.6666, 1), (4, 2, 0.5, 1), (7, 2, 0.2857, 1), (16, 1, 0.0625, 1)],
)
def test_cpu_only_whole_shares_or_fractions(n, cpus, share, threads):
    rule = actor_resources(n, {"CPU": float(cpus), "memory": 1e9})
    assert rule.options == {"num_cpus": share, "scheduling_strategy": "SPREAD"}
    assert rule.threads == threads
    assert n * rule.cpus <= cpus  # all n fit: nobody waits for CPUs that never come
    assert isinstance(rule.options["num_cpus"], int) == (share >= 1)  # whole CPUs are whole


def test_shares_fit_each_node_not_only_the_total():
    # 2 actors of 2 CPUs fit the total of 4, but not nodes of 3 and 1 CPUs: one CPU each.
    assert actor_resources(2, {"CPU": 4.0}, nodes=[{"CPU": 3.0}, {"CPU": 1.0}]).cpus == 1
    # 3 actors on two 1-CPU nodes: halves (a third of 2 CPUs each would not fit either node twice).
    assert actor_resources(3, {"CPU": 2.0}, nodes=[{"CPU": 1.0}, {"CPU": 1.0}]).cpus == 0.5
    assert actor_resources(2, {"CPU": 2.0}, nodes=[{"CPU": 1.0}, {"CPU": 1.0}]).cpus == 1


def test_gpus_one_per_actor_or_a_clear_refusal():
    rule = actor_resources(2, {"CPU": 8.0, "GPU": 2.0})
    assert rule.options == {"num_gpus": 1, "num_cpus": 1, "scheduling_strategy": "SPREAD"} and rule.threads == 4
    few_cpus = actor_resources(4, {"CPU": 2.0, "GPU": 4.0})
    assert few_cpus.gpus == 1 and few_cpus.cpus == 0.5 and few_cpus.threads == 1
    with pytest.raises(ActorCountError, match=r"3 merge workers asked for, but the cluster has 2 GPU\(s\)") as err:
        actor_resources(3, {"CPU": 8.0, "GPU": 2.0}, what="merge workers")
    assert isinstance(err.value, ConfigError)  # a user error: the CLI exits 2 with one line
    assert default_actor_count({"CPU": 8.0, "GPU": 2.0}) == 2 and default_actor_count({"CPU": 3.0}) == 3


@pytest.mark.parametrize("n", [0, -1])
def test_fewer_than_one_actor_is_refused(n):
    with pytest.raises(ActorCountError, match=f"workers must be at least 1 \\(got {n}\\)"):
        check_actor_count(n, "workers")
    with pytest.raises(ActorCountError):
        actor_resources(n, {"CPU": 2.0})
    check_actor_count(None, "workers")  # the default


def test_a_share_finer_than_ray_allows_is_refused():
    with pytest.raises(ActorCountError, match="cannot be shared that finely"):
        actor_resources(30_000, {"CPU": 2.0})
    with pytest.raises(ActorCountError, match="no CPUs"):
        actor_resources(1, {"memory": 1e9})


# -- on the 2-CPU session: more actors than CPUs run ----------------------------------------------------
def test_more_merge_workers_than_cpus_run_and_give_the_same_bytes(ray_session, llama_models, tmp_path):
    import ray

    assert ray.cluster_resources().get("CPU") == 2
    raymerge.shutdown_workers()  # a kept pool would hold the CPUs
    cfg = {
        "merge_method": "ties",
        "base_model": str(llama_models["base"]),
        "models": [{"model": str(llama_models[k]), "parameters": {"weight": 0.5, "density": 0.6}} for k in ("ft1", "ft2")],
    }
    four = finishes_within(300, raymerge.merge, cfg, tmp_path / "four", workers=4, quiet=True, out_shard_size="300KB")
    # The reference in process (one in-process worker = one Ray worker: tests/test_determinism.py).
    one = raymerge.merge(cfg, tmp_path / "one", workers=1, quiet=True, out_shard_size="300KB", in_process=True)
    assert four.workers == 4 and one.workers == 1
    assert file_bytes(four.output) == file_bytes(one.output)


# -- a count below one: refused before Ray, one line ----------------------------------------------------
def test_cli_workers_zero_exits_2_with_one_line_before_ray(llama_models, tmp_path, capsys, monkeypatch):
    import raymerge.runtime.merge as merge_mod
    from raymerge.cli import main as cli_main

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not be started for a refused worker count")

    monkeypatch.setattr(merge_mod, "ensure_ray", no_ray)
    cfg_path = tmp_path / "linear.yaml"
    cfg_path.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(llama_models["ft1"]), "parameters": {"weight": 1.0}},
        {"model": str(llama_models["ft2"]), "parameters": {"weight": 1.0}}]}))
    for n in ("0", "-3"):
        assert cli_main(["merge", str(cfg_path), str(tmp_path / "out"), "--quiet", "--workers", n]) == 2
        captured = capsys.readouterr()
        assert captured.err.strip().splitlines() == [f"raymerge: error: workers must be at least 1 (got {n})"], captured.err
        assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "out").exists()
    with pytest.raises(ActorCountError, match="stages must be at least 1"):
        raymerge.optimize(str(tmp_path / "unused.yaml"), tmp_path / "s", stages=0, quiet=True)
    with pytest.raises(ActorCountError, match="stages must be at least 1"):
        raymerge.prune(str(tmp_path / "unused.yaml"), tmp_path / "p", stages=0, quiet=True)
    with pytest.raises(ActorCountError, match="stages must be at least 1"):  # the old spelling names the same thing
        raymerge.prune(str(tmp_path / "unused.yaml"), tmp_path / "p", workers=0, quiet=True)
