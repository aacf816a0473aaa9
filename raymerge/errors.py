"""The one base class of raymerge's user errors.

`RaymergeError` marks a user mistake (a bad config, model path, output path, method parameter,
calibration file, search range, ...): the CLI prints it as one line and exits 2; anything else
is a bug and keeps its traceback. Every user-error class of raymerge derives from it, and most
also from `ValueError` (as they did before there was a base), so `except ValueError` still works.

This module sits below every layer (it imports nothing), so any package, config/ and
checkpoints/ included, can derive from it. `planners/` is standalone and keeps its own
`PlanError` / `ProblemError`, which the CLI catches next to this one.
"""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class RaymergeError(Exception):
    """A user mistake: the CLI prints one line and exits 2. The message says what is wrong and
    where (file, key, tensor)."""


class ConfigError(RaymergeError, ValueError):
    """A config is invalid; the message names the file and the offending key. (Defined here, below
    every layer, so registries outside config/ can raise it; `raymerge.config` exports it.)"""


class CheckpointError(RaymergeError, ValueError):
    """An input checkpoint is missing, unreadable or inconsistent; the message names the file.
    (Defined here so that the command line can report a missing model folder before it imports
    torch; `raymerge.checkpoints` exports it.)"""


def user_cause(err: BaseException) -> BaseException:
    """The error a user should see: for an error re-raised from a Ray worker (Ray's
    `RayTaskError`, which carries the worker's exception as `.cause` and prints the remote
    traceback), the worker's own exception; else `err`. Duck-typed: this module imports nothing."""
    seen = 0
    while isinstance(getattr(err, "cause", None), BaseException) and seen < 16:
        err, seen = err.cause, seen + 1  # type: ignore[attr-defined]
    return err


def one_line(message: object) -> str:
    """A (possibly multi-line) error message as one line: a header line ending in ':' is joined
    with the first problem under it, and further lines are counted, not printed. An exception
    from a Ray worker is shown as the worker's exception, without the remote traceback or
    terminal colour codes."""
    if isinstance(message, BaseException):
        message = user_cause(message)
    lines = [line.strip() for line in _ANSI.sub("", str(message)).splitlines() if line.strip()]
    if not lines:
        return ""
    head, rest = lines[0], lines[1:]
    if head.endswith(":") and rest:
        head, rest = f"{head} {rest[0]}", rest[1:]
    if rest:
        head += f" (and {len(rest)} more problem{'s' if len(rest) > 1 else ''})"
    return head
