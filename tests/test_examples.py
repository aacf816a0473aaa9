"""The shipped examples stay valid: every YAML parses and names known methods and parameters,
and the offline demos run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from raymerge.cli import main as cli_main
from raymerge.config import load_config
from raymerge.methods import get_method

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _parameter_names(cfg) -> set[str]:
    names: set[str] = set(cfg.parameters or {})
    for m in cfg.models or []:
        names |= set(m.parameters or {})
    for s in cfg.slices or []:
        names |= set(s.parameters or {})
        for src in s.sources:
            names |= set(src.parameters or {})
    return names


MERGE_EXAMPLES = sorted(p for p in EXAMPLES.glob("*.yaml") if not p.name.startswith(("prune_", "search_")))
SEARCH_EXAMPLES = sorted(EXAMPLES.glob("search_*.yaml"))
PRUNE_EXAMPLES = sorted(EXAMPLES.glob("prune_*.yaml"))


@pytest.mark.parametrize("path", PRUNE_EXAMPLES, ids=lambda p: p.name)
def test_prune_example_configs_are_valid(path):
    from raymerge.config.prune_config import load_prune_config

    cfg, _ = load_prune_config(path)
    assert cfg.calibration is not None and 0 < cfg.target_sparsity < 1


@pytest.mark.parametrize("path", SEARCH_EXAMPLES, ids=lambda p: p.name)
def test_search_example_configs_are_valid(path):
    from raymerge.config.search_config import load_search_config
    from raymerge.search.space import SearchSpace

    cfg, _ = load_search_config(path)
    if cfg.merge is not None:
        assert SearchSpace(cfg.merge).dimensions
        load_config(SearchSpace(cfg.merge).fill({d.name: d.low for d in SearchSpace(cfg.merge).dimensions}))


def test_prune_examples_exist():
    assert len(PRUNE_EXAMPLES) >= 2


@pytest.mark.parametrize("path", MERGE_EXAMPLES, ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    cfg, _ = load_config(path)
    spec = get_method(cfg.merge_method)
    unknown = _parameter_names(cfg) - spec.known_params()
    assert not unknown, f"{path.name}: parameters unknown to {spec.name}: {unknown}"


def test_demo_command_runs(ray_session, tmp_path, capsys):
    assert cli_main(["demo", "--workdir", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "merged 39 tensors" in out and "forward pass OK" in out
    assert (tmp_path / "merged" / "model.safetensors").exists()


def test_python_api_example_runs(tmp_path):
    """As a user runs it: a Python of its own, with no Ray session (so its merges run on worker
    threads: `raymerge.merge`'s default on a machine without a GPU)."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, str(EXAMPLES / "python_api.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("39 tensors") == 3, done.stdout


def test_merge_benchmark_references_read_every_byte(tmp_path):
    """`examples/benchmark_merge.py`'s references run and count what they read: both page-cache
    readers report every byte of the files (the mapped one in whole 8-byte words) over the seconds
    they took (the clock is made to advance 1 s per reading), and the method's own compute rate
    runs the configured method."""
    import importlib.util
    import time

    script = Path(__file__).resolve().parents[1] / "examples" / "benchmark_merge.py"
    spec = importlib.util.spec_from_file_location("benchmark_merge", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    files = [tmp_path / "a.bin", tmp_path / "b.bin"]
    files[0].write_bytes(b"\1" * (3 << 20))
    files[1].write_bytes(b"\2" * ((1 << 20) + 5))
    slept = []

    def slow_perf_counter(real=time.perf_counter):
        slept.append(1)
        return real() + len(slept)  # every call one second later: rate = counted bytes / seconds

    with pytest.MonkeyPatch.context() as patch:  # bench.time is the time module: restored after
        patch.setattr(bench.time, "perf_counter", slow_perf_counter)
        read, mapped = bench.read_rate(files, tries=1), bench.mapped_rate(files, tries=1)
    assert time.perf_counter is slow_perf_counter.__defaults__[0]
    assert read == pytest.approx((3 << 20) + (1 << 20) + 5, rel=0.2)  # all bytes, in ~1 s
    assert mapped == pytest.approx((3 << 20) + (1 << 20), rel=0.2)  # whole 8-byte words
    assert bench.page_cache_rate(files, tries=1) > 0
    config = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 0.5}},
                                                   {"model": "b", "parameters": {"weight": 0.5}}]}
    assert bench.method_compute_rate(config, elements=1 << 16, tries=1) > 0
