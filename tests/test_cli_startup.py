"""Fixed costs out of the way (issue 18): `raymerge --help`, `--version`, a subcommand's `--help`,
errors in a config (not YAML, invalid, missing), a missing model folder, and a merge config its
method refuses (unknown merge_method or parameter, no base_model) are answered without importing
torch, Ray, DeepSpeed or transformers, which take seconds to import.

Each case runs `raymerge.cli.main` in a fresh interpreter and then lists which of those modules
are in `sys.modules`: a behaviour test, with no timing asserts (timings vary by machine). Also
checked: the public names of `import raymerge` are still there, imported on first use.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "deepspeed", "transformers", "pulp")

RUNNER = textwrap.dedent(
    """
    import contextlib, gc, io, json, sys
    import raymerge.cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = raymerge.cli.main(sys.argv[1:])
        except SystemExit as exit:
            code = exit.code
    heavy = sorted({m.split(".")[0] for m in sys.modules} & set(%r))
    print(json.dumps({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue(), "heavy": heavy,
                      "gc_threshold": gc.get_threshold()[0]}))
    """ % (HEAVY,)
)


def run_cli(*argv: str, cwd: Path = ROOT) -> dict:
    done = subprocess.run([sys.executable, "-c", RUNNER, *argv], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["merge", "--help"], ["plan", "--help"], ["prune", "--help"],
                                  ["search", "--help"]])
def test_help_imports_nothing_heavy(argv):
    result = run_cli(*argv)
    assert result["code"] == 0
    assert "usage: raymerge" in result["stdout"]
    assert result["heavy"] == []


def test_methods_lists_every_method_without_a_heavy_import():
    from raymerge.methods import available_methods
    from raymerge.runtime.guidance_methods import available_guidance_methods

    result = run_cli("methods")
    assert (result["code"], result["heavy"]) == (0, []), result
    listed = [line.split()[0] for line in result["stdout"].splitlines() if line and not line.startswith(" ")]
    assert listed[:len(available_methods())] == available_methods()
    for name in available_guidance_methods():
        assert f"\n    {name} " in result["stdout"], name


def test_version_imports_nothing_heavy():
    result = run_cli("--version")
    assert result["code"] == 0
    assert result["stdout"].startswith("raymerge ") and len(result["stdout"].split()) == 2
    assert result["heavy"] == []
    from raymerge.cli import GC_THRESHOLD

    assert result["gc_threshold"] == GC_THRESHOLD  # the command line's collector runs less often


CONFIGS = {
    "bad.yaml": ("models: [\n  - a\nmerge_method: : x\n", "invalid YAML in"),
    "unknown_key.yaml": ("merge_method: linear\nmodels:\n  - model: /nowhere\n    parameters: {weight: 1}\nbogus: 1\n",
                         "bogus: unknown key"),
    "not_a_mapping.yaml": ("- just\n- a list\n", "expected a mapping at the top level"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("command", ["merge", "plan", "prune", "search"])
def test_config_errors_before_any_heavy_import(tmp_path, name, command):
    text, expected = CONFIGS[name]
    config = tmp_path / name
    config.write_text(text)
    argv = [command, str(config)] + ([] if command == "plan" else [str(tmp_path / "out")])
    result = run_cli(*argv)
    assert result["code"] == 2, result
    lines = result["stderr"].splitlines()
    assert len(lines) == 1 and lines[0].startswith("raymerge: error: "), result["stderr"]
    if command in ("merge", "plan") or name == "bad.yaml":  # prune/search word their own validation errors
        assert expected in lines[0], lines[0]
    assert result["heavy"] == [], result
    assert not (tmp_path / "out").exists()


def test_missing_config_and_bad_count_before_any_heavy_import(tmp_path):
    result = run_cli("merge", str(tmp_path / "missing.yaml"), str(tmp_path / "out"))
    assert (result["code"], result["heavy"]) == (2, [])
    assert result["stderr"] == f"raymerge: error: merge config not found: {tmp_path / 'missing.yaml'}\n"
    # the job's own order: the worker count is checked before the config
    result = run_cli("merge", "--workers", "0", str(tmp_path / "missing.yaml"), str(tmp_path / "out"))
    assert (result["code"], result["heavy"]) == (2, [])
    assert result["stderr"] == "raymerge: error: workers must be at least 1 (got 0)\n"


@pytest.mark.parametrize(("command", "option", "value"), [("merge", "--workers", "-2"), ("plan", "--workers", "-1"),
                                                        ("prune", "--stages", "-1"), ("prune", "--stages", "0"),
                                                        ("search", "--stages", "-3")])
def test_a_negative_count_is_refused_before_any_heavy_import(tmp_path, command, option, value):
    """`--workers` / `--stages` below one: one line, exit 2, before the config is read (it does
    not exist here) and before torch or Ray is imported."""
    argv = [command, str(tmp_path / "missing.yaml")] + ([] if command == "plan" else [str(tmp_path / "out")])
    result = run_cli(*argv, f"{option}={value}")
    assert (result["code"], result["heavy"]) == (2, []), result
    assert result["stderr"] == f"raymerge: error: {option[2:]} must be at least 1 (got {value})\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["merge", "plan", "prune"])
def test_a_missing_model_folder_before_any_heavy_import(tmp_path, command):
    missing = tmp_path / "nowhere" / "model"
    if command == "prune":
        (tmp_path / "c.yaml").write_text(f"model: {missing}\nmethod: magnitude\nsparsity: 0.5\n")
    else:
        (tmp_path / "c.yaml").write_text(f"merge_method: linear\nmodels:\n  - model: {missing}\n"
                                         f"    parameters: {{weight: 1}}\n")
    argv = [command, str(tmp_path / "c.yaml")] + ([] if command == "plan" else [str(tmp_path / "out")])
    result = run_cli(*argv)
    assert (result["code"], result["heavy"]) == (2, [])
    assert result["stderr"] == f"raymerge: error: model path not found: {missing}\n"
    # the job itself says the same (the Python API, which imports what it needs)
    import raymerge

    api = {"merge": lambda: raymerge.merge(tmp_path / "c.yaml", tmp_path / "out", in_process=True, quiet=True),
           "plan": lambda: raymerge.plan(tmp_path / "c.yaml"),
           "prune": lambda: raymerge.prune(tmp_path / "c.yaml", tmp_path / "out", in_process=True, quiet=True)}
    with pytest.raises(raymerge.RaymergeError, match=f"^model path not found: {missing}$"):
        api[command]()


METHOD_MISTAKES = {
    "unknown_method": ("merge_method: tiez\nbase_model: {m}\nmodels:\n  - model: {m}\n    parameters: {{weight: 1}}\n",
                       "merge_method: unknown merge_method 'tiez'; available: "),
    "unknown_parameter": ("merge_method: ties\nbase_model: {m}\nmodels:\n  - model: {m}\n    parameters: {{weight: 1, densty: 0.5}}\n",
                          "models[0].parameters.densty: unknown parameter for merge_method 'ties'"),
    "no_base_model": ("merge_method: ties\nmodels:\n  - model: {m}\n    parameters: {{weight: 1}}\n",
                      "merge_method 'ties' needs a base_model"),
}


@pytest.mark.parametrize("mistake", sorted(METHOD_MISTAKES))
@pytest.mark.parametrize("command", ["merge", "plan"])
def test_a_config_its_method_refuses_before_any_heavy_import(tmp_path, llama_models, mistake, command):
    """Checked against the torch-free method specs (`runtime.method_config`), with the job's own
    message: the Python API, which compiles the config, says the same."""
    text, expected = METHOD_MISTAKES[mistake]
    config = tmp_path / "c.yaml"
    config.write_text(text.format(m=llama_models["base"]))
    argv = [command, str(config)] + ([] if command == "plan" else [str(tmp_path / "out")])
    result = run_cli(*argv)
    assert (result["code"], result["heavy"]) == (2, []), result
    line = f"raymerge: error: {config}: {expected}"
    assert result["stderr"].startswith(line) and result["stderr"].count("\n") == 1, result["stderr"]
    import raymerge

    job = {"merge": lambda: raymerge.merge(config, tmp_path / "out", in_process=True, quiet=True),
           "plan": lambda: raymerge.plan(config)}[command]
    with pytest.raises(raymerge.ConfigError) as err:
        job()
    assert f"raymerge: error: {err.value}\n" == result["stderr"]
    assert not (tmp_path / "out").exists()


def test_a_base_model_given_on_each_slice_is_enough(llama_models, tmp_path):
    """mergekit lets each slice name its base_model: the method check must not ask for a
    top-level one (the compiler refuses, per tensor, a slice that has none)."""
    import raymerge
    from raymerge.config import ConfigError

    base, ft = llama_models["base"], llama_models["ft1"]

    def slice_(with_base: bool, first: int, last: int) -> str:
        head = f"  - base_model: {base}\n    sources:\n" if with_base else "  - sources:\n"
        return (head + f"      - model: {base}\n        layer_range: [{first}, {last}]\n"
                f"      - model: {ft}\n        layer_range: [{first}, {last}]\n        parameters: {{weight: 1, density: 0.5}}\n")

    config = tmp_path / "c.yaml"
    config.write_text("merge_method: ties\nslices:\n" + slice_(True, 0, 1) + slice_(True, 1, 2))
    result = run_cli("plan", str(config), "--planner", "lpt")
    assert (result["code"], result["heavy"]) == (0, []), result
    assert raymerge.plan(config, planner="lpt").tensors > 0
    config.write_text("merge_method: ties\nslices:\n" + slice_(True, 0, 1) + slice_(False, 1, 2))
    with pytest.raises(ConfigError, match="merge_method 'ties' needs a base_model"):
        raymerge.plan(config, planner="lpt")


def test_plan_of_safetensors_models_imports_no_torch(llama_models, tmp_path):
    """`raymerge plan` on local safetensors models: headers, the method specs, the operators and
    the planner, all without torch (dtypes as safetensors codes); the same plan as the API's."""
    config = tmp_path / "c.yaml"
    config.write_text(f"merge_method: ties\nbase_model: {llama_models['base']}\nmodels:\n"
                      f"  - model: {llama_models['ft1']}\n    parameters: {{weight: 1, density: 0.5}}\n"
                      f"  - model: {llama_models['ft2']}\n    parameters: {{weight: 1, density: 0.5}}\n"
                      "dtype: bfloat16\n")
    result = run_cli("plan", str(config), "--workers", "2", "--planner", "lpt", "--json", str(tmp_path / "plan.json"))
    assert (result["code"], result["heavy"]) == (0, []), result
    assert "predicted makespan" in result["stdout"], result["stdout"]
    # The default planner too: a merge this small is within MILP_MIN_GAIN_S of its bound, so no
    # MILP is built and PuLP (counted as heavy here) is never imported.
    default = run_cli("plan", str(config), "--workers", "2")
    assert (default["code"], default["heavy"]) == (0, []), default
    assert "solver lpt" in default["stdout"], default["stdout"]
    import raymerge

    report = raymerge.plan(config, workers=2, planner="lpt")
    plan = json.loads((tmp_path / "plan.json").read_text())
    api = json.loads(json.dumps(report.plan.to_dict()))
    del plan["solve_seconds"], api["solve_seconds"]
    assert plan == api  # the same operators, costs and placement
    assert all(op.bytes_read > 0 for op in report.problem.operators)


def test_public_api_is_imported_on_first_use():
    script = textwrap.dedent(
        """
        import sys
        import raymerge

        light = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "ray", "deepspeed", "transformers"})
        assert light == [], light
        from raymerge import ConfigError, RaymergeError, MergeConfig
        for name in raymerge.__all__:
            assert getattr(raymerge, name) is not None, name
        from raymerge.checkpoints.source import CheckpointError
        from raymerge.methods import MethodError
        from raymerge.runtime.merge import MergeOptions, MergeResult, PlanReport
        assert raymerge.CheckpointError is CheckpointError and raymerge.MethodError is MethodError
        assert (raymerge.MergeOptions, raymerge.MergeResult, raymerge.PlanReport) == (MergeOptions, MergeResult, PlanReport)
        assert issubclass(raymerge.OutputError, RaymergeError) and "ties" in raymerge.available_methods()
        assert raymerge.runtime.merge.run_merge  # subpackages are still attributes of the package
        try:
            raymerge.no_such_name
        except AttributeError:
            pass
        else:
            raise AssertionError("no AttributeError")
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split()[-1] == "ok", done.stderr[-3000:]


QUICK_EXIT = textwrap.dedent(
    """
    import atexit, os, sys, tempfile, threading, time
    class Teardown:
        def __del__(self):
            os.write(1, b" interpreter-teardown")  # a normal exit finalizes the module's objects
    witness = Teardown()
    scratch = tempfile.TemporaryDirectory(dir=sys.argv[1])  # removed by its finalizer at exit
    atexit.register(lambda: print("atexit handler ran"))
    sys.stdout.write("buffered-tail")  # no newline: still in the buffer at exit
    if sys.argv[2] == "thread":
        threading.Thread(target=lambda: (time.sleep(0.5), print("thread finished")), daemon=False).start()
    sys.argv = ["raymerge", *sys.argv[3:]]
    from raymerge.cli import run
    run()
    print("unreachable")
    """
)


@pytest.mark.parametrize("thread", ["none", "thread"])
def test_console_script_exits_quickly_but_completely(tmp_path, thread):
    """The console script (`cli.run`) skips the interpreter's teardown (`exit_quickly`), which
    takes a second after a merge; what a normal exit does that matters still happens: atexit
    handlers run, temporary folders are removed by their finalizers, buffered stdout is written,
    main's exit code is returned, and a running non-daemon thread is waited for."""
    done = subprocess.run([sys.executable, "-c", QUICK_EXIT, str(tmp_path), thread, "methods"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "linear" in done.stdout and "buffered-tail" in done.stdout and "atexit handler ran" in done.stdout
    assert "unreachable" not in done.stdout
    assert ("thread finished" in done.stdout) == (thread == "thread")
    assert ("interpreter-teardown" in done.stdout) == (thread == "thread")  # skipped unless a thread runs
    assert list(tmp_path.iterdir()) == []

    failed = subprocess.run([sys.executable, "-c", QUICK_EXIT, str(tmp_path), thread, "merge", str(tmp_path / "missing.yaml"),
                             str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2 and "missing.yaml" in failed.stderr and "Traceback" not in failed.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_console_script_is_the_quick_exit():
    """pyproject's `raymerge` entry point is `cli.run` (main() then the quick exit), not `main`."""
    text = (ROOT / "pyproject.toml").read_text()
    assert 'raymerge = "raymerge.cli:run"' in text


def test_an_in_process_merge_imports_no_ray(llama_models, tmp_path):
    """A merge that runs in process (no cluster named, or `--in-process`) never imports Ray: its
    workers used to import it only to ask whether they were Ray actors (a quarter of a second of
    every in-process merge)."""
    config = tmp_path / "c.yaml"
    config.write_text(f"merge_method: linear\nmodels:\n  - model: {llama_models['ft1']}\n    parameters: {{weight: 0.5}}\n"
                      f"  - model: {llama_models['ft2']}\n    parameters: {{weight: 0.5}}\n")
    result = run_cli("merge", str(config), str(tmp_path / "out"), "--in-process", "--quiet")
    assert result["code"] == 0, result
    assert "torch" in result["heavy"] and "ray" not in result["heavy"], result
    assert (tmp_path / "out" / "model.safetensors").exists() or list((tmp_path / "out").glob("*.safetensors"))


def test_help_and_readme_state_the_small_job_threshold_the_merge_uses():
    """`--workers`, `--in-process` and the README say which merges get one worker ("under N MiB"):
    N is `runtime.merge.SMALL_JOB_BYTES` (the CLI spells it out so `--help` imports no torch)."""
    import re

    from conftest import subcommand_parsers
    from raymerge.runtime.merge import SMALL_JOB_BYTES

    helps = {a.dest: " ".join((a.help or "").split()) for a in subcommand_parsers()["merge"]._actions}
    readme = " ".join((ROOT / "README.md").read_text().split())
    for where, text in (("--workers", helps["workers"]), ("--in-process", helps["in_process"]),
                        ("README.md", readme[readme.index("one for a merge reading"):][:60])):
        stated = re.search(r"under (\d+) MiB", text)
        assert stated, f"{where}: no 'under N MiB' in {text!r}"
        assert int(stated.group(1)) * 2**20 == SMALL_JOB_BYTES, f"{where} says {stated.group(0)}"
