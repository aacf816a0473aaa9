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
* `mergekit_command()` / `mergekit_env()` / `run_mergekit()` run ``mergekit-yaml`` on CPU,
  quiet, with a fixed random seed.
* `load_tensors()` and `assert_tensors_close()` compare merged checkpoints tensor by tensor.

Environment:
  RAYMERGE_MERGEKIT_VENV   where the venv lives (default ~/.cache/raymerge/mergekit-0.1.5-venv)
  RAYMERGE_NO_MERGEKIT=1   never build/use the venv (tests skip, benchmark skips mergekit)
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

MERGEKIT_VERSION = "0.1.5"
DEFAULT_VENV = Path.home() / ".cache" / "raymerge" / f"mergekit-{MERGEKIT_VERSION}-venv"
_MARKER = ".raymerge-mergekit-ok"
_BUILD_TIMEOUT_S = 1800

_state: dict[str, Any] = {"resolved": False, "python": None, "reason": None}


def venv_path() -> Path:
    return Path(os.environ.get("RAYMERGE_MERGEKIT_VENV") or DEFAULT_VENV).expanduser()


def mergekit_unavailable_reason() -> str | None:
    """Why `mergekit_python()` returned None (None if it has not failed)."""
    return _state["reason"]


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _installed_mergekit_version(python: Path) -> str | None:
    """The mergekit version importable by `python`, or None if `import mergekit` fails."""
    if not python.exists():
        return None
    code = "import mergekit, importlib.metadata as m; print(m.version('mergekit'))"
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


def _run_logged(cmd: list[str], log: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
    log.append(f"$ {' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")


def _build(venv: Path) -> None:
    """Create the venv at `venv` (caller holds the lock) and install mergekit into it."""
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    log: list[str] = []
    _run_logged([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], log)
    python = _venv_python(venv)

    # Pin torch to the version the system interpreter already has: pip then treats it as
    # satisfied (it is visible through --system-site-packages) and can never swap it for a
    # multi-GB CUDA wheel, whatever mergekit's dependencies ask for.
    pins = []
    for dist in ("torch",):
        try:
            pins.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    constraints = venv / "raymerge-constraints.txt"
    constraints.write_text("".join(f"{p}\n" for p in pins))
    _run_logged(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "-c", str(constraints), f"mergekit=={MERGEKIT_VERSION}"],
        log,
    )
    version = _installed_mergekit_version(python)
    if version != MERGEKIT_VERSION:
        raise RuntimeError(f"after install, `import mergekit` gives version {version!r}\n" + "\n".join(log)[-3000:])
    (venv / _MARKER).write_text(f"mergekit=={MERGEKIT_VERSION}\n" + "".join(f"{p}\n" for p in pins))


def mergekit_python() -> Path | None:
    """The python of a venv with mergekit==0.1.5, building it on first use; None if impossible."""
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
                    if not _is_ready(venv):
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


def mergekit_command(config_path: Path, out_dir: Path, *extra_args: str) -> list[str]:
    """argv for ``mergekit-yaml CONFIG OUT`` from the oracle venv, deterministic and on CPU."""
    python = mergekit_python()
    if python is None:
        raise RuntimeError(mergekit_unavailable_reason() or "mergekit venv unavailable")
    return [
        str(python.parent / "mergekit-yaml"),
        str(config_path),
        str(out_dir),
        "--random-seed", "0",
        "--device", "cpu",
        "--no-cuda",
        "--quiet",
        *extra_args,
    ]


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


def run_mergekit(config: Mapping[str, Any], out_dir: Path, *extra_args: str, timeout: float = 900) -> Path:
    """Write `config` as YAML beside `out_dir`, run mergekit-yaml into `out_dir`, return it."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    config_path = write_config(config, out_dir.parent / f"{out_dir.name}.mergekit.yml")
    cmd = mergekit_command(config_path, out_dir, *extra_args)
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=mergekit_env(), timeout=timeout,
        cwd=tempfile.gettempdir(),
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"mergekit-yaml failed ({proc.returncode}): {' '.join(cmd)}\n"
            f"--- stderr ---\n{proc.stderr[-6000:]}\n--- stdout ---\n{proc.stdout[-2000:]}"
        )
    return out_dir


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
