"""Checking a local output path's *name* before any work: the checks `JobOutput` cannot see early.

A merge writes into a staging folder beside the output (`.NAME.raymerge-staging`) and, when it
replaces an existing model, moves that aside (`.NAME.raymerge-old-XXXXXXXX`). A name that fits the
filesystem's limit but not with those affixes, or an output path that is a dangling symlink, used
to fail only when the staging folder was created or renamed — after the merge had run. Both are
refused here, with one line naming the path, before Ray starts. S3 outputs have no such limits.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from raymerge.checkpoints.writer import OutputError

#: the longest affix raymerge adds to the output's name for a sibling folder (`writer.py`)
AFFIX = len(".") + len(".raymerge-old-") + 8


def _name_max(path: Path) -> int:
    """The filesystem's longest file name (bytes) where `path` would be created."""
    for folder in [path.parent, *path.parent.parents]:
        if folder.is_dir():
            try:
                return int(os.pathconf(folder, "PC_NAME_MAX"))
            except (OSError, ValueError):
                return 255
    return 255


def check_output_name(output: Union[str, Path]) -> None:
    """Refuse a local output that is a dangling symlink, or whose name (with raymerge's staging
    affixes) or any folder name is too long for the filesystem; OutputError naming the path."""
    if str(output).startswith("s3:/"):
        return
    path = Path(output).absolute()
    if path.is_symlink() and not path.exists():
        raise OutputError(f"output path {path} is a symlink to {os.readlink(path)}, which does not exist; "
                          "remove the link or choose another output path")
    limit = _name_max(path)
    for part in path.parent.parts:
        if len(os.fsencode(part)) > limit:
            raise OutputError(f"output path {path}: folder name {part[:40]!r}... is longer than the "
                              f"filesystem's {limit} bytes")
    size = len(os.fsencode(path.name))
    if size + AFFIX > limit:
        raise OutputError(
            f"output name {path.name[:40]!r}... is {size} bytes: the filesystem allows {limit}-byte names and "
            f"raymerge's staging folder beside the output adds {AFFIX}, so at most {limit - AFFIX} bytes"
        )
