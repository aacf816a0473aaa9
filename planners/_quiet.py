"""The HiGHS banner ("Running HiGHS 1.x ... Copyright ...") kept off the user's output.

highspy prints it from C++ to file descriptor 1 when the first `Highs` object of a process is
made, whatever `msg`/`output_flag` say; later ones print nothing. So, unless the caller asked for
the solver's log (`msg=True`) or `RAYMERGE_VERBOSE` is set, the first one is made here with
descriptor 1 pointed at /dev/null for that instant. Python's own `sys.stdout` is flushed first and
is not replaced, so nothing of ours is lost.
"""

from __future__ import annotations

import os
import sys

_done = False


def hush_highs_banner(msg: bool = False) -> None:
    global _done
    if _done or msg or os.environ.get("RAYMERGE_VERBOSE", "") not in ("", "0"):
        return
    _done = True
    import pulp

    highspy = getattr(getattr(pulp.apis, "highs_api", None), "highspy", None)  # pulp's own import of it
    if highspy is None:
        return
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
