"""Checks of a search's output folder before a study starts: a folder, and a readable journal.

`raymerge search CONFIG OUT` keeps its study in `OUT/study.journal` (Optuna's journal file: one
JSON record per line, each an object with an `op_code`). Two mistakes used to surface as
tracebacks from deep inside Optuna or `Path.mkdir`: OUT being a file, and a journal that is not
one (edited by hand, another file under that name, bytes damaged). Both are one line here,
naming the path and the first bad line. Like Optuna, a last line that is incomplete (a write
interrupted by a crash) is tolerated: Optuna skips it.
"""

from __future__ import annotations

import json
from pathlib import Path

from raymerge.checkpoints.writer import OutputError


def check_search_output(out: Path, journal_name: str) -> None:
    """Refuse `out` when it is not a folder, or when `out/journal_name` exists and is corrupt."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"search output {out} is a file; the study folder (journal, best.yaml, plots) must be a folder")
    journal = out / journal_name
    if not journal.exists():
        return
    if not journal.is_file():
        raise OutputError(f"{journal}: not a file; move it away to start a new study")
    try:
        data = journal.read_bytes()
    except OSError as err:
        raise OutputError(f"{journal}: cannot read ({err.strerror})") from None
    lines = data.split(b"\n")
    for number, line in enumerate(lines, start=1):
        last = number >= len(lines) - 1  # the final record (or the empty text after the final newline)
        if not line.strip():
            if last:
                continue
            raise OutputError(f"{journal}: line {number} is empty; not an Optuna journal (move it away to start a new study)")
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            if last:
                continue  # an interrupted write: Optuna skips it too
            raise OutputError(f"{journal}: line {number} is not JSON; the journal is corrupt "
                              "(move it away to start a new study)") from None
        if not isinstance(record, dict) or not isinstance(record.get("op_code"), int):
            raise OutputError(f"{journal}: line {number} is not an Optuna journal record; the journal is corrupt "
                              "(move it away to start a new study)")
