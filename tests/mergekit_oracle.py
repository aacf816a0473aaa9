"""mergekit 0.1.5 as a test oracle, run from its own virtualenv.

This module owns everything about *running the reference implementation*:

* `mergekit_python()` builds (once, cached) a virtualenv holding ``mergekit==0.1.5`` and returns
  its interpreter, or ``None`` when it cannot be built (`mergekit_unavailable_reason()` says why).
  The venv is created with ``--system-site-packages`` so it reuses the system's CPU torch; pip
  runs with a constraints file pinning the already-installed torch version, so it can never
  replace torch with a multi-GB CUDA build. Concurrent builders (pytest-xdist workers, the
  benchmark) serialise on an ``fcntl`` lock next to the venv; a venv only counts as built once a
  marker file is written after a successful ``import mergekit`` of the right version, so a
  half-built venv (killed build) is wiped and rebuilt.
  When the tests run from a virtualenv, ``--system-site-packages`` would expose only the base
  interpreter's packages, so the running interpreter's site-packages are added with a ``.pth``
  file, and pip only runs once the new venv imports that same torch. A folder at the venv path
  that is not a virtualenv is never deleted; a hand-made venv that already runs mergekit 0.1.5
  is adopted as it is.
* `mergekit_args()` / `mergekit_env()` give ``mergekit-yaml``'s arguments and environment
  (CPU, quiet, a fixed random seed); `run_mergekit_many()` runs mergekit-yaml's own command for
  several configs in the session's one mergekit process (its imports paid once;
  `start_batch_server()` starts it early, in the background).
* `load_tensors()` and `assert_tensors_close()` compare merged checkpoints tensor by tensor.

Environment:
  RAYMERGE_MERGEKIT_VENV   where the venv lives (default ~/.cache/raymerge/mergekit-0.1.5-venv)
  RAYMERGE_NO_MERGEKIT=1   never build/use the venv (tests skip, benchmark skips mergekit)
"""

from __future__ import annotations

import atexit
import fcntl
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

MERGEKIT_VERSION = "0.1.5"
DEFAULT_VENV = Path.home() / ".cache" / "raymerge" / f"mergekit-{MERGEKIT_VERSION}-venv"
_MARKER = ".raymerge-mergekit-ok"
_BUILD_TIMEOUT_S = 1800

_state: dict[str, Any] = {"resolved": False, "python": None, "reason": None}
_resolve_lock = threading.Lock()


def venv_path() -> Path:
    return Path(os.environ.get("RAYMERGE_MERGEKIT_VENV") or DEFAULT_VENV).expanduser()


def mergekit_unavailable_reason() -> str | None:
    """Why `mergekit_python()` returned None (None if it has not failed)."""
    return _state["reason"]


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _installed_mergekit_version(python: Path, deep: bool = False) -> str | None:
    """The mergekit version importable by `python`, or None if `import mergekit` fails.

    `deep` also imports the ``mergekit-yaml`` entry point (torch, transformers, ...: seconds),
    which is what a merge needs; the shallow check is for an already verified venv.
    """
    if not python.exists():
        return None
    module = "mergekit.scripts.run_yaml" if deep else "mergekit"
    code = f"import {module}, importlib.metadata as m; print(m.version('mergekit'))"
    try:
        proc = subprocess.run(
            [str(python), "-c", code], capture_output=True, text=True, timeout=300, env=mergekit_env()
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else None


def _is_ready(venv: Path) -> bool:
    return (venv / _MARKER).exists() and _installed_mergekit_version(_venv_python(venv)) == MERGEKIT_VERSION


def _adopt(venv: Path) -> bool:
    """Accept a venv made by hand (no marker) that already runs mergekit==0.1.5, instead of
    wiping it: RAYMERGE_MERGEKIT_VENV may point at a user's own venv."""
    if (venv / _MARKER).exists() or not (venv / "pyvenv.cfg").exists():
        return False
    if _installed_mergekit_version(_venv_python(venv), deep=True) != MERGEKIT_VERSION:
        return False
    (venv / _MARKER).write_text(f"mergekit=={MERGEKIT_VERSION}\n(adopted: built outside raymerge)\n")
    return True


def _run_logged(cmd: list[str], log: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
    log.append(f"$ {' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        last = tail.splitlines()[-1] if tail else ""
        # the last line first: pytest's skip summary shows only a reason's first line
        raise RuntimeError(f"{last} (exit {proc.returncode}: {' '.join(cmd)})\n{tail}")


def _running_site_dirs() -> list[str]:
    """The site-packages folders of the interpreter running this code (where torch lives)."""
    import site
    import sysconfig

    dirs: list[str] = []
    for d in [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]:
        if d not in dirs and Path(d).is_dir():
            dirs.append(d)
    if site.ENABLE_USER_SITE and Path(site.getusersitepackages()).is_dir():
        dirs.append(site.getusersitepackages())
    return dirs


def _bridge_site_packages(python: Path, log: list[str]) -> None:
    """Make the running interpreter's packages (torch above all) visible inside the new venv.

    ``--system-site-packages`` exposes the *base* interpreter's site-packages only. When the
    tests run from a virtualenv (``.ci/setup.sh`` into a venv), torch lives in that venv's
    site-packages, which the oracle venv would not see: pip would then install the pinned torch
    itself, from PyPI the multi-GB CUDA build. A ``.pth`` file appending those folders to the
    oracle venv's ``sys.path`` (after its own site-packages, so its own installs still win)
    makes pip, and mergekit, use the running interpreter's torch.
    """
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"cannot locate the new venv's site-packages: {proc.stderr[-2000:]}")
    target = Path(proc.stdout.strip().splitlines()[-1])
    dirs = _running_site_dirs()
    (target / "raymerge-parent-site.pth").write_text("".join(f"{d}\n" for d in dirs))
    log.append(f"bridged site-packages into {target}: {dirs}")


def _check_torch_visible(python: Path, pins: list[str], log: list[str]) -> None:
    """Refuse to run pip unless the venv already imports the running interpreter's torch.

    Then pip sees the pinned torch as installed and never downloads one (a CUDA build, from
    PyPI); without this check a venv that cannot see torch would make pip fetch it.
    """
    if not pins:
        raise RuntimeError("torch is not installed in the running interpreter; refusing to let pip pick one")
    code = "import torch, importlib.metadata as m; print(m.version('torch')); print(torch.__file__)"
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=300, env=mergekit_env())
    lines = proc.stdout.strip().splitlines()
    log.append(f"torch seen by the venv: {lines}")
    ours = Path(torch.__file__).resolve()
    if proc.returncode != 0 or len(lines) < 2 or f"torch=={lines[-2]}" not in pins or Path(lines[-1]).resolve() != ours:
        raise RuntimeError(
            f"the venv does not use the installed torch ({', '.join(pins)} at {ours}): "
            f"{(proc.stderr or proc.stdout).strip()[-1000:]}"
        )


def _build(venv: Path) -> None:
    """Create the venv at `venv` (caller holds the lock) and install mergekit into it."""
    if venv.exists():
        # Only ever delete a (half-built) virtualenv, never a folder that holds something else.
        if not venv.is_dir() or not ((venv / "pyvenv.cfg").exists() or not any(venv.iterdir())):
            raise RuntimeError(f"{venv} exists and is not a virtualenv; refusing to delete it (set RAYMERGE_MERGEKIT_VENV)")
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    log: list[str] = []
    _run_logged([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], log)
    python = _venv_python(venv)
    _bridge_site_packages(python, log)

    # Pin torch to the version the system interpreter already has: pip then treats it as
    # satisfied (it is visible through --system-site-packages) and can never swap it for a
    # multi-GB CUDA wheel, whatever mergekit's dependencies ask for.
    pins = []
    for dist in ("torch",):
        try:
            pins.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    _check_torch_visible(python, pins, log)
    constraints = venv / "raymerge-constraints.txt"
    constraints.write_text("".join(f"{p}\n" for p in pins))
    _run_logged(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "-c", str(constraints), f"mergekit=={MERGEKIT_VERSION}"],
        log,
    )
    version = _installed_mergekit_version(python, deep=True)
    if version != MERGEKIT_VERSION:
        raise RuntimeError(f"after install, `import mergekit` gives version {version!r}\n" + "\n".join(log)[-3000:])
    _check_torch_visible(python, pins, log)  # pip kept the running interpreter's torch
    (venv / _MARKER).write_text(f"mergekit=={MERGEKIT_VERSION}\n" + "".join(f"{p}\n" for p in pins))


def mergekit_python() -> Path | None:
    """The python of a venv with mergekit==0.1.5, building it on first use; None if impossible.
    Thread-safe: the batch server may be resolving it in the background (`start_batch_server`)."""
    with _resolve_lock:
        return _resolve_python()


def _resolve_python() -> Path | None:
    if _state["resolved"]:
        return _state["python"]
    _state["resolved"] = True
    if os.environ.get("RAYMERGE_NO_MERGEKIT", "") not in ("", "0"):
        _state["reason"] = "RAYMERGE_NO_MERGEKIT is set"
        return None
    venv = venv_path()
    try:
        if not _is_ready(venv):
            venv.parent.mkdir(parents=True, exist_ok=True)
            with open(venv.parent / f".{venv.name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be building it right now
                try:
                    if not _is_ready(venv) and not _adopt(venv):
                        _build(venv)
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
        _state["python"] = _venv_python(venv)
    except Exception as exc:  # no network, no pip index, disk full, ...
        _state["reason"] = f"cannot build a mergekit=={MERGEKIT_VERSION} venv at {venv}: {exc}"
        _state["python"] = None
    return _state["python"]


def mergekit_env() -> dict[str, str]:
    """Environment for a mergekit subprocess: CPU only, offline, no tokenizer thread pools."""
    env = dict(os.environ)
    env.update(
        CUDA_VISIBLE_DEVICES="",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONHASHSEED="0",
    )
    # the venv's console scripts must not pick up this repo or a foreign virtualenv
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    return env


def mergekit_args(config_path: Path, out_dir: Path, *extra_args: str) -> list[str]:
    """The arguments of ``mergekit-yaml CONFIG OUT``: deterministic, on CPU, quiet."""
    return [
        str(config_path),
        str(out_dir),
        "--random-seed", "0",
        "--device", "cpu",
        "--no-cuda",
        "--quiet",
        *extra_args,
    ]


def _require_python() -> Path:
    python = mergekit_python()
    if python is None:
        raise RuntimeError(mergekit_unavailable_reason() or "mergekit venv unavailable")
    return python


def write_config(config: Mapping[str, Any], path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(_plain(config), sort_keys=False))
    return path


def _plain(obj: Any) -> Any:
    """Paths -> str, tuples -> lists, recursively, so yaml.safe_dump accepts the config."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


# One mergekit process for the whole test session: it runs mergekit-yaml's own click command once
# per job (the same code path and options as separate `mergekit-yaml` processes) and pays
# mergekit's imports (about 10 s on the CI machine) once, not once per batch. Protocol on its
# stdin/stdout: a JSON line [jobs_file, results_file] in, a line "done" out when the results file
# is written; mergekit's own output goes to its stderr (a log file).
_SERVER_DRIVER = r"""
import json, os, sys, traceback
channel = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)
from mergekit.scripts.run_yaml import main
channel.write("ready\n"); channel.flush()
for line in sys.stdin:
    jobs_file, results_file = json.loads(line)
    errors = []
    for argv in json.load(open(jobs_file)):
        try:
            main.main(args=argv, standalone_mode=False)
            errors.append(None)
        except SystemExit as exc:
            errors.append(None if exc.code in (0, None) else f"mergekit-yaml exited with {exc.code}")
        except BaseException:
            errors.append(traceback.format_exc()[-6000:])
    with open(results_file, "w") as f:
        json.dump(errors, f)
    channel.write("done\n"); channel.flush()
"""


class _BatchServer:
    """The session's mergekit process (`_SERVER_DRIVER`), started on first use or early, in the
    background, by `start_batch_server`."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # one batch at a time
        self.proc: subprocess.Popen | None = None
        self.folder = Path(tempfile.mkdtemp(prefix="mergekit-oracle-"))
        self.log = self.folder / "server.log"
        self.ready = False

    def start(self) -> None:
        python = _require_python()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(python), "-c", _SERVER_DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=log, text=True, env=mergekit_env(), cwd=self.folder,
            )
        self.ready = False

    def _line(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        timer = threading.Timer(timeout, self.proc.kill)  # a hung merge ends the server, not the suite
        timer.start()
        try:
            return self.proc.stdout.readline()
        finally:
            timer.cancel()

    def _fail(self, what: str) -> RuntimeError:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
        tail = self.log.read_text(errors="replace")[-6000:] if self.log.exists() else ""
        return RuntimeError(f"mergekit batch server {what} (exit {proc.returncode if proc else None})\n--- its log ---\n{tail}")

    def run(self, argvs: list[list[str]], timeout: float) -> list[str | None]:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self.start()
            assert self.proc is not None and self.proc.stdin is not None
            if not self.ready:
                if self._line(timeout).strip() != "ready":
                    raise self._fail("did not start")
                self.ready = True
            batch = tempfile.mkdtemp(dir=self.folder)
            jobs_file, results_file = Path(batch) / "jobs.json", Path(batch) / "results.json"
            jobs_file.write_text(json.dumps(argvs))
            try:
                self.proc.stdin.write(json.dumps([str(jobs_file), str(results_file)]) + "\n")
                self.proc.stdin.flush()
            except OSError:
                raise self._fail("died") from None
            if self._line(timeout).strip() != "done":
                raise self._fail(f"died or timed out ({timeout:.0f} s) during a batch of {len(argvs)} merges")
            errors = json.loads(results_file.read_text())
            shutil.rmtree(batch, ignore_errors=True)
            if len(errors) != len(argvs):
                raise self._fail(f"answered {len(errors)} of {len(argvs)} merges")
            return errors

    def stop(self) -> None:
        if self.proc is not None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except Exception:  # noqa: BLE001 - it is going away either way
                self.proc.kill()
            self.proc = None
        shutil.rmtree(self.folder, ignore_errors=True)


_server: list[_BatchServer] = []
_server_lock = threading.Lock()


def _batch_server() -> _BatchServer:
    with _server_lock:
        if not _server:
            _server.append(_BatchServer())
            atexit.register(_server[0].stop)
        return _server[0]


def start_batch_server() -> None:
    """Resolve the venv and start the session's mergekit process now, in a background thread, so
    its imports overlap other tests (conftest calls it when mergekit tests are selected). Any
    failure is left for the first batch to report."""

    def warm() -> None:
        if mergekit_python() is None:
            return
        server = _batch_server()
        with server.lock:
            if server.proc is None:
                server.start()

    threading.Thread(target=warm, name="mergekit-oracle-start", daemon=True).start()


def run_mergekit_many(
    jobs: Sequence[tuple], *extra_args: str, timeout: float = 1800
) -> dict[Path, str | None]:
    """Run mergekit-yaml once per (config, out_dir) job, all in the session's one mergekit
    process; a job may be (config, out_dir, args) to add command-line arguments of its own after
    `extra_args`.

    Each config is written as YAML beside its `out_dir`. Returns, per out_dir, None when that
    merge succeeded or the error (a traceback) when it failed; one failing config does not stop
    the others. Raises only if the mergekit process itself dies (or takes over `timeout`).
    """
    argvs = []
    for config, out_dir, *own in jobs:
        out_dir = Path(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        config_path = write_config(config, out_dir.parent / f"{out_dir.name}.mergekit.yml")
        argvs.append(mergekit_args(config_path, out_dir, *extra_args, *(own[0] if own else ())))
    _require_python()
    errors = _batch_server().run(argvs, timeout)
    return {Path(job[1]): err for job, err in zip(jobs, errors)}


def load_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file in `model_dir`, by name."""
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        for name, t in load_file(str(f)).items():
            if name in tensors:
                raise AssertionError(f"tensor {name!r} appears in more than one shard of {model_dir}")
            tensors[name] = t
    return tensors


def assert_tensors_close(
    actual: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    rtol: float = 1e-5,
    atol: float = 1e-6,
    *,
    check_dtype: bool = True,
) -> None:
    """Fail unless both have the same tensor names, shapes (and dtypes) and values within tolerance.

    On a value mismatch the message names the worst tensor (largest max |a - e| relative to the
    allowed ``atol + rtol * |e|``) and lists every failing tensor's max abs diff.
    """
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    if missing or extra:
        raise AssertionError(
            f"tensor names differ: missing {len(missing)} {missing[:10]}, unexpected {len(extra)} {extra[:10]}"
        )
    problems: list[str] = []
    failures: list[tuple[float, str, float, int]] = []
    for name in sorted(expected):
        a, e = actual[name], expected[name]
        if tuple(a.shape) != tuple(e.shape):
            problems.append(f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
            continue
        if check_dtype and a.dtype != e.dtype:
            problems.append(f"{name}: dtype {a.dtype} != expected {e.dtype}")
            continue
        a64, e64 = a.to(torch.float64), e.to(torch.float64)
        diff = (a64 - e64).abs()
        allowed = atol + rtol * e64.abs()
        bad = diff > allowed
        nan_mismatch = a64.isnan() != e64.isnan()
        bad = (bad & ~(a64.isnan() & e64.isnan())) | nan_mismatch
        if bool(bad.any()):
            ratio = float((diff / allowed).nan_to_num(float("inf")).max())
            failures.append((ratio, name, float(diff.nan_to_num(float("inf")).max()), int(bad.sum())))
    if problems:
        raise AssertionError("tensor mismatch:\n  " + "\n  ".join(problems))
    if failures:
        failures.sort(reverse=True)
        ratio, name, maxdiff, nbad = failures[0]
        lines = [f"{n}: max abs diff {d:.3e}, {k} elements out of tolerance" for _, n, d, k in failures[:20]]
        raise AssertionError(
            f"{len(failures)}/{len(expected)} tensors differ beyond rtol={rtol}, atol={atol}; "
            f"worst: {name} (max abs diff {maxdiff:.3e}, {ratio:.1f}x the tolerance)\n  " + "\n  ".join(lines)
        )
