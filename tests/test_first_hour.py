"""The first hour without surprises: the README's runnable commands run as written, their output
is quiet when it is a log, plots say what they show, and one word names one idea on the CLI.

`test_readme_first_hour_block_runs` reads the ```bash block of README.md marked
`<!-- first-hour: runnable -->` and runs every command of it, in order, in one fresh Python
process (one import of torch instead of one per command; `raymerge.cli.main` is what the
`raymerge` script runs before its quick exit, `cli.exit_quickly`) with stdout and stderr as pipes, i.e. not a terminal, in a temporary
folder where `examples/` and `clusters/` are the repository's. Its environment has no
`RAY_AUTH_MODE` (so the demo's local Ray starts as a user's does, with token authentication) and
a temporary HOME (Ray's token file goes there, as in `tests/test_ray_session.py`).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from conftest import subcommand_parsers
from raymerge.cli import build_parser
from raymerge.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- first-hour: runnable -->"

# Messages of other libraries that say nothing to a raymerge user (README "The first hour").
NOISE = (
    "Running HiGHS",  # the solver's banner, printed from C++ by highspy
    "THIRD_PARTY_NOTICES",
    "Setting accelerator to CPU",  # DeepSpeed, when accelerate imports it
    "Setting ds_accelerator",
    "Token authentication is enabled",  # Ray: raymerge chose it
    "A new study created",  # Optuna's INFO log
    "Traceback",
)


def readme_blocks(text: str) -> list[tuple[bool, list[str]]]:
    """Each ```bash block of the README: (marked runnable, its commands without comments)."""
    blocks = []
    for m in re.finditer(r"(<!-- first-hour: runnable -->\n)?```bash\n(.*?)```", text, re.S):
        commands = []
        for line in m.group(2).replace("\\\n", " ").splitlines():  # continuation lines joined
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
        blocks.append((m.group(1) is not None, commands))
    return blocks


def first_hour_commands() -> list[str]:
    marked = [cmds for runnable, cmds in readme_blocks((ROOT / "README.md").read_text()) if runnable]
    assert len(marked) == 1, f"README.md should mark exactly one block with {MARKER}"
    return marked[0]


def test_the_runnable_block_is_what_the_first_hour_needs():
    commands = first_hour_commands()
    assert all(c.startswith("raymerge ") for c in commands), commands
    verbs = [shlex.split(c)[1] for c in commands]
    assert verbs[0] == "demo"  # it builds what the others use
    for verb in ("merge", "prune", "search", "plan"):
        assert verb in verbs, (verb, commands)
    for c in commands:  # each one parses with today's CLI (no stale flag in the README)
        build_parser().parse_args(shlex.split(c)[1:])


def readme_raymerge_commands(text: str) -> list[list[str]]:
    """The arguments of every `raymerge ...` command in every code block of the README (any
    language but the data formats): continuation lines joined, comments dropped, split at `&&`,
    `||`, `;` and `|`, leading `NAME=value` words skipped; a command run through another
    (`ray job submit ... -- raymerge merge ...`) counts too."""
    commands = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if m.group(1) in ("python", "yaml", "json"):
            continue
        for line in m.group(2).replace("\\\n", " ").splitlines():
            try:
                words = shlex.split(line, comments=True)
            except ValueError:  # not shell (a quoted message): no command
                continue
            segment: list[str] = []
            for word in [*words, ";"]:
                if word not in ("&&", "||", ";", "|"):
                    segment.append(word)
                    continue
                while segment and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", segment[0]):
                    segment.pop(0)
                if segment[:1] == ["raymerge"]:
                    commands.append(segment[1:])
                elif "--" in segment and segment[segment.index("--") + 1:][:1] == ["raymerge"]:
                    commands.append(segment[segment.index("--") + 2:])
                segment = []
    return commands


def test_every_readme_command_parses_with_the_cli():
    """Every `raymerge ...` command shown in the README parses with today's CLI parser, so a
    renamed or removed flag fails here instead of in a reader's shell."""
    import contextlib
    import io

    commands = readme_raymerge_commands((ROOT / "README.md").read_text())
    verbs = {c[0] for c in commands if c}
    assert {"demo", "merge", "prune", "search", "plan", "methods"} <= verbs, verbs  # the blocks were found
    assert ["merge", "ties.yaml", "s3://my-bucket/merged/ties"] in commands  # after `ray job submit ... --`
    parser = build_parser()
    for args in commands:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                parser.parse_args(args)
            except SystemExit:
                pytest.fail(f"README command does not parse: raymerge {shlex.join(args)}\n{err.getvalue()}")
    with contextlib.redirect_stderr(io.StringIO()), pytest.raises(SystemExit):  # the check can fail
        parser.parse_args(["merge", "cfg.yaml", "out", "--no-such-flag"])


RUNNER = textwrap.dedent(
    """
    import shlex, sys, time
    from raymerge.cli import main
    for i, line in enumerate(sys.argv[1:]):
        for stream in (sys.stdout, sys.stderr):
            print(f"=== {i}", file=stream, flush=True)
        t0 = time.perf_counter()
        code = main(shlex.split(line)[1:])
        sys.stdout.flush(); sys.stderr.flush()
        print(f"=== rc {i} {code} {time.perf_counter() - t0:.1f}", file=sys.stderr, flush=True)
        if code:
            break
    """
)


def _split(text: str) -> dict[int, str]:
    """Output per command, from the runner's `=== i` markers."""
    parts = re.split(r"^=== (\d+)\n", text, flags=re.M)
    return {int(parts[k]): parts[k + 1] for k in range(1, len(parts) - 1, 2)}


def start_early(config: pytest.Config) -> tuple[Path, list[str], Any]:
    """Start the block's run when the session's tests are collected (`conftest`): its ~20 s, much
    of them one core's, overlap the tests before this module's; `first_hour` waits for it."""
    return _start_block(config._tmp_path_factory.mktemp("first-hour"))  # type: ignore[attr-defined]


def _start_block(work: Path) -> tuple[Path, list[str], Any]:
    from conftest import Background

    for name in ("examples", "clusters"):
        (work / name).symlink_to(ROOT / name)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAYMERGE_VERBOSE")}
    env["HOME"] = str(work / "home")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    commands = first_hour_commands()
    logs = work / "logs"
    logs.mkdir()
    return work, commands, Background([sys.executable, "-c", RUNNER, *commands], logs, cwd=work, env=env, text=True)


@pytest.fixture(scope="module")
def first_hour(tmp_path_factory):
    from conftest import started_early

    work, commands, run = started_early(__name__) or _start_block(tmp_path_factory.mktemp("first-hour"))
    return work, commands, run.result(timeout=600)


def test_readme_first_hour_block_runs(first_hour):
    work, commands, done = first_hour
    codes = re.findall(r"^=== rc (\d+) (-?\d+) ([\d.]+)$", done.stderr, flags=re.M)
    assert done.returncode == 0, done.stderr[-4000:]
    assert [(int(i), int(c)) for i, c, _ in codes] == [(i, 0) for i in range(len(commands))], done.stderr[-4000:]
    out, err = _split(done.stdout), _split(done.stderr)
    assert "forward pass OK" in out[0]
    for path in ("demo/models/base/config.json", "demo/merged/model.safetensors", "demo/merged-again/model.safetensors",
                 "demo/pruned/prune_report.json", "demo/layers.png", "demo/study/best.yaml",
                 "demo/study/history.png", "demo/plan.png", "demo/plan-70b.png"):
        assert (work / path).exists(), path
    searches = [i for i, c in enumerate(commands) if shlex.split(c)[1] == "search"]
    assert len(searches) == 2
    assert "already has 4 finished trial(s)" in err[searches[1]]
    assert "0 run now" in out[searches[1]]


def test_first_hour_output_is_quiet_when_it_is_a_log(first_hour):
    """stdout and stderr are pipes here: no third-party banner or note, and a bounded number of
    progress lines (a bar writes its first and last state, not a redraw per update)."""
    work, commands, done = first_hour
    everything = done.stdout + done.stderr
    for noise in NOISE:
        assert noise not in everything, (noise, everything[-4000:])
    assert "\r" not in done.stderr  # each progress state is a line of its own in a log
    err = _split(done.stderr)
    merge_local = next(i for i, c in enumerate(commands) if shlex.split(c)[1] == "merge" and "--address local" in c)
    for step in (0, merge_local):  # the demo (worker threads) and the merge on a local Ray of its own
        lines = [x for x in err[step].split("\n") if x.strip() and not x.startswith("=== rc")]
        assert len(lines) <= 12, (step, lines)  # phases (start, end) and the merge bar's first and last state
        assert any(x.startswith("raymerge: starting the merge workers") for x in lines), (step, lines)
        bar_states = [x for x in lines if x.startswith(("merging on ", "merging in process"))]
        assert 1 <= len(bar_states) <= 3, (step, bar_states)
    prune = commands.index(next(c for c in commands if " prune " in f" {c} "))
    assert re.search(r"^raymerge: pruning \(wanda, sequential[;)].*: done in", err[prune], flags=re.M), err[prune]
    search = commands.index(next(c for c in commands if " search " in f" {c} "))
    assert "raymerge: loading the model's 4 layers" in err[search]


def test_verbose_flag_is_everywhere_and_shows_third_party_messages(monkeypatch):
    from raymerge import progress

    for command in ("merge", "prune", "search", "plan", "demo", "methods"):
        args = [command, "c.yaml", "out"] if command in ("merge", "prune", "search") else (
            [command, "c.yaml"] if command == "plan" else [command])
        assert build_parser().parse_args([*args, "-v"]).verbose
        assert not getattr(build_parser().parse_args(args), "verbose", False)
    assert build_parser().parse_args(["-v", "methods"]).verbose
    # recorded, so teardown restores the variable as it was (set_verbose below sets it directly)
    monkeypatch.setenv("RAYMERGE_VERBOSE", "")
    import logging

    ds = logging.getLogger("DeepSpeed")
    progress.quiet_third_party()
    assert progress._DEEPSPEED_NOISE in ds.filters
    try:
        progress.set_verbose()
        assert os.environ["RAYMERGE_VERBOSE"] == "1" and progress._DEEPSPEED_NOISE not in ds.filters
    finally:
        os.environ.pop("RAYMERGE_VERBOSE", None)
        progress.quiet_third_party()


def test_verbose_shows_rays_token_authentication_note(tmp_path, monkeypatch):
    """Ray's note that it enabled token authentication is dropped around starting a local Ray of
    our own, but not with `-v` (`RAYMERGE_VERBOSE=1`), which shows every third-party note."""
    import logging

    from raymerge.runtime.executor import local_ray_auth

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # Ray's token file would go here; none is made
    note = logging.getLogger("ray._private.authentication.authentication_token_setup")
    record = logging.LogRecord(note.name, logging.WARNING, __file__, 1,
                               "Token authentication is enabled for this Ray cluster", None, None)
    seen = {}
    for flag in ("", "1"):
        monkeypatch.setenv("RAYMERGE_VERBOSE", flag)
        with local_ray_auth():
            seen[flag] = bool(note.filter(record))
        assert note.filter(record)  # the filter goes with the context
    assert seen == {"": False, "1": True}


def test_highs_banner_is_dropped_at_the_file_descriptor():
    """highspy prints its banner from C++ on fd 1 for the first model of a process; the planners
    make that first one with fd 1 on /dev/null (the first-hour run checks a real merge's output)."""
    pytest.importorskip("highspy")
    script = textwrap.dedent(
        """
        import highspy
        from planners._quiet import hush_highs_banner  # needs the planners' own pulp to reach highspy
        print("before", flush=True)
        hush_highs_banner()
        highspy.Highs()
        print("after", flush=True)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "RAYMERGE_VERBOSE"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["before", "after"], done.stdout  # ours kept, the banner gone
    loud = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**env, "RAYMERGE_VERBOSE": "1"},
                          capture_output=True, text=True, timeout=120)
    assert "Running HiGHS" in loud.stdout  # -v shows it: the test can fail


def test_progress_bars_are_periodic_lines_in_a_log():
    import io

    from raymerge.progress import LOG_INTERVAL_S, bar_kwargs

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    log = bar_kwargs(file=io.StringIO(), dynamic_ncols=True)
    assert log["mininterval"] == LOG_INTERVAL_S == 30.0 and log["dynamic_ncols"] is False and log["ascii"] is True
    tty = bar_kwargs(file=Tty())
    assert tty["dynamic_ncols"] is True and "mininterval" not in tty
    from raymerge.progress import bar

    stream = io.StringIO()
    with bar(total=500, desc="steps", file=stream) as b:
        for _ in range(500):
            b.update(1)
    # Each state is a line of its own: split on newlines only (a redraw joined by "\r" would be
    # one physical line of a log file holding 0% and 100%).
    states = [x for x in stream.getvalue().split("\n") if x.strip()]
    assert 2 <= len(states) <= 3, states  # the first and last state, not 500 redraws
    assert "\r" not in stream.getvalue()
    assert states[0].startswith("steps:   0%") and states[-1].startswith("steps: 100%"), states
    assert all(len(x) <= 100 for x in states), states  # fixed width, no padding left behind
    quick = io.StringIO()  # a bar that asks not to be left: a log still keeps its last state
    with bar(total=3, desc="quick", file=quick, leave=False) as b:
        b.update(3)
    assert quick.getvalue().split("\n")[-2].startswith("quick: 100%"), quick.getvalue()
    sources = [p for p in (ROOT / "raymerge").rglob("*.py") if p.name != "progress.py"]
    direct = [str(p.relative_to(ROOT)) for p in sources if re.search(r"^\s*(from tqdm|import tqdm)", p.read_text(), re.M)]
    assert direct == [], f"make progress bars with raymerge.progress.bar: {direct}"


def test_one_flag_name_per_idea():
    """`--stages` is layer stages (prune, search), `--workers` merge workers (merge, plan, demo);
    prune's old `--workers` still works but is no longer shown."""
    parser = build_parser()
    sub = subcommand_parsers()
    assert parser.parse_args(["prune", "c.yaml", "out", "--stages", "3"]).stages == 3
    assert parser.parse_args(["prune", "c.yaml", "out", "--workers", "3"]).stages == 3  # hidden alias
    assert "--workers" not in sub["prune"].format_help() and "--stages" in sub["prune"].format_help()
    assert "--stages" in sub["search"].format_help()
    for command in ("merge", "plan", "demo"):
        assert "--workers" in sub[command].format_help() and "--stages" not in sub[command].format_help()


def test_demo_help_says_where_it_merges():
    """`raymerge demo` merges where `raymerge merge` would: on worker threads without a GPU or an
    address, not always "on a local Ray"."""
    sub = subcommand_parsers()
    text = " ".join(sub["demo"].format_help().split())
    assert "worker threads" in text and "merge them on a local Ray" not in text, text


def test_demo_removes_its_temporary_folder(tmp_path, monkeypatch, capsys):
    import tempfile

    from raymerge import cli

    made = []

    def fail(args, workdir):
        made.append(workdir)
        (workdir / "models").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(cli, "_run_demo", fail)
    assert cli_main(["demo", "--quiet"]) == 130
    assert made and made[0].name.startswith("raymerge-demo-") and not made[0].exists()
    assert "removed the temporary folder" in capsys.readouterr().out


def test_plan_summary_is_a_comparison():
    from raymerge.runtime.merge import PlanOutcome

    text = PlanOutcome(predicted_makespan=0.02, measured_makespan=0.09, lower_bound=0.02, gap=0.001, solver="highs",
                       status="within_gap", solve_seconds=0.01, parts=39).summary()
    assert "measured makespan 0.09 s vs predicted makespan 0.02 s (4.5x the prediction)" in text
    assert "%)" not in text.split(";")[1]  # no "(+350%)" that reads as an error


def _study(directions: list[str], n: int = 6):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=directions, sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(n):
        t = study.ask()
        x, y = t.suggest_float("weight", 0, 1), t.suggest_float("density", 0, 1)
        values = [(x - 0.3) ** 2 + y, x + y][: len(directions)]
        study.tell(t, values if len(values) > 1 else values[0])
    return study


def test_search_plots_name_the_objective_and_its_direction():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raymerge.config.search_config import Objective
    from raymerge.search.study import objective_label, plot_figures

    assert objective_label(Objective(kind="perplexity")) == "perplexity (lower is better)"
    assert objective_label(Objective(kind="reconstruction", direction="maximize")) == \
        "logit MSE vs the reference (higher is better)"
    assert objective_label(Objective(kind="reconstruction", reference="/models/base")) == "logit MSE vs base (lower is better)"

    figures = dict(plot_figures(_study(["minimize"]), ["perplexity (lower is better)"]))
    try:
        assert set(figures) == {"history.png", "importances.png"}
        history = figures["history.png"].axes[0]
        assert history.get_ylabel() == "perplexity (lower is better)"
        legend = [t.get_text() for t in history.get_legend().get_texts()]
        assert "perplexity (lower is better)" in legend and "Objective Value" not in legend
        importances = figures["importances.png"].axes[0]
        assert [t.get_text() for t in importances.get_legend().get_texts()] == ["perplexity (lower is better)"]
    finally:
        plt.close("all")

    labels = ["perplexity (lower is better)", "reconstruction (higher is better)"]
    figures = dict(plot_figures(_study(["minimize", "maximize"]), labels))
    try:
        pareto = figures["pareto_front.png"].axes[0]
        assert (pareto.get_xlabel(), pareto.get_ylabel()) == tuple(labels)
    finally:
        plt.close("all")


def test_prune_chart_labels_its_axes_layers_and_bars():
    """The prune's per-layer chart (`--plot`): integer layer ticks (not half layers), labelled
    axes, a legend naming target and achieved, read from the figure object."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raymerge.pruning.report import ModuleResult, PruneReport

    results = [ModuleResult(layer=i, module=m, target=0.5, zeros=40 + i, numel=100)
               for i in range(4) for m in ("mlp.up_proj", "mlp.down_proj")]
    report = PruneReport.build(results, method="wanda", pattern="unstructured", mode="sequential", target=0.5,
                               model_parameters=1000)
    fig = report.figure()
    try:
        ax = fig.axes[0]
        assert "layer" in ax.get_xlabel() and "sparsity" in ax.get_ylabel()
        assert list(ax.get_xticks()) == [0, 1, 2, 3]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3"]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["target", "achieved"]
        achieved = ax.containers[1]
        assert [round(b.get_height(), 2) for b in achieved] == [0.4, 0.41, 0.42, 0.43]
    finally:
        plt.close(fig)
