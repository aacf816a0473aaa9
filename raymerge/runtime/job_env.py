"""Refusing an output folder inside a Ray job's working directory.

`ray job submit --working-dir .` uploads the folder and runs the job's driver in Ray's unpacked
copy of it, `<session>/runtime_resources/working_dir_files/_ray_pkg_<hash>/` on the head node
(Ray 2.60: `ray._private.runtime_env.working_dir.WorkingDirPlugin`, which `cd`s there before
starting the driver). A relative output path such as `merged/` therefore lands in that copy,
which is the wrong place for a model in three ways: it exists on the head node only (the workers
on other nodes write their shards into their own nodes' copies, or fail), Ray may delete it
once the job is over (working dirs no job uses are evicted from Ray's cache when it passes
`RAY_RUNTIME_ENV_WORKING_DIR_CACHE_SIZE_GB`, 10 GB by default: `runtime_env/plugin.py`,
`uri_cache.py`), and the whole session folder is temporary. So merge, prune and search refuse such an output before any work, with one line
(the CLI exits 2), unless it is an `s3://` URL or an absolute path outside the working dir.

Detection: the driver's working directory lies under `.../runtime_resources/working_dir_files/
<package>/` (the path layout of every Ray-managed working dir), or the job's runtime env (the
`RAY_JOB_CONFIG_JSON_ENV_VAR` Ray's job supervisor sets for the driver) names a `working_dir`
other than a `local://` one (a `local://` working dir is a folder of the image that Ray uses in
place and never deletes, so it is not refused).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

from raymerge.errors import RaymergeError

JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # ray._private.runtime_env.constants.RAY_JOB_CONFIG_JSON_ENV_VAR
RESOURCES_DIR, WORKING_DIR_FILES = "runtime_resources", "working_dir_files"


class JobWorkingDirError(RaymergeError, ValueError):
    """The output would be written into a Ray job's working directory, which Ray may delete."""


def job_working_dir(cwd: Union[str, Path, None] = None) -> Optional[Path]:
    """The Ray-managed working directory this process runs in (the unpacked package folder), or
    None when it does not run in one."""
    here = Path(os.getcwd() if cwd is None else cwd).resolve()
    parts = here.parts
    for i in range(len(parts) - 2):
        if parts[i] == RESOURCES_DIR and parts[i + 1] == WORKING_DIR_FILES:
            return Path(*parts[: i + 3])
    if _job_config_working_dir():
        return here
    return None


def _job_config_working_dir() -> bool:
    """Whether the Ray job's runtime env (set for a submitted job's driver) has a working_dir
    that Ray unpacked (not a `local://` one, used in place)."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return False
    try:
        working_dir = (json.loads(raw).get("runtime_env") or {}).get("working_dir")
    except (ValueError, AttributeError):
        return False
    return isinstance(working_dir, str) and bool(working_dir) and not working_dir.startswith("local://")


def check_output_outside_job_dir(*outputs: Union[str, Path, None], cwd: Union[str, Path, None] = None) -> None:
    """Refuse (one line) an output that would land in a Ray job's working directory; None
    entries (an output not asked for) are skipped."""
    for output in outputs:
        if output is not None:
            _check_one(str(output), cwd)


def _check_one(text: str, cwd: Union[str, Path, None]) -> None:
    if "://" in text:  # s3:// (and any other URL): not a local folder
        return
    workdir = job_working_dir(cwd)
    if workdir is None:
        return
    base = Path(os.getcwd() if cwd is None else cwd)
    target = Path(os.path.abspath(base / Path(text).expanduser()))
    if not (_inside(target, workdir) or _inside(target.resolve(), workdir)):
        return
    raise JobWorkingDirError(
        f"output {text}: inside this Ray job's working directory ({workdir}), which exists on this node only and "
        f"which Ray may delete once the job is over; give an s3:// URL or an absolute path outside it, on storage every "
        f"node sees (e.g. /shared/models/out)"
    )


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        try:
            path.relative_to(folder.resolve())
            return True
        except ValueError:
            return False
