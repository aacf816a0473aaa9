"""What raymerge shows while it works, and what it keeps quiet.

- `bar(...)`: every progress bar of raymerge is a `tqdm` made here. On a terminal it redraws in
  place; when stderr is not a terminal (`ray job logs`, a CI log, `2> file`) it writes one plain
  line, ending in a newline (`LogLines`), at most every 30 s (and the last one), instead of a
  redraw per update that a log keeps as hundreds of states on one physical line.
- `phase(what)`: one line on stderr when a step that can take more than a few seconds starts
  (loading stages, a calibration pass, pruning, setting up a search), and one with its time when
  it ends, so no step is silent for a minute; `quiet=True` prints nothing.
- `quiet_third_party()`: drops messages of other libraries that say nothing to a raymerge user
  (DeepSpeed's "Setting accelerator to CPU" when accelerate imports it; the HiGHS banner is
  dropped in `planners.milp`). Real warnings are kept. `raymerge -v` (or `RAYMERGE_VERBOSE=1`)
  shows everything; it is read at import, so Ray workers started from that environment follow.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Any, Iterator

LOG_INTERVAL_S = 30.0  # seconds between progress lines when stderr is not a terminal


def verbose() -> bool:
    return os.environ.get("RAYMERGE_VERBOSE", "") not in ("", "0")


def is_terminal(stream: Any = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def bar_kwargs(**kwargs: Any) -> dict[str, Any]:
    """tqdm keyword arguments: the caller's, plus redraw-in-place on a terminal or periodic plain
    lines (every `LOG_INTERVAL_S`, fixed width, ASCII) when stderr is a log."""
    kwargs.setdefault("file", sys.stderr)
    if is_terminal(kwargs["file"]):
        kwargs.setdefault("dynamic_ncols", True)
    else:
        kwargs.pop("dynamic_ncols", None)
        file = kwargs["file"]
        kwargs.update(mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S, ncols=100, ascii=True,
                      dynamic_ncols=False, leave=True,  # a log keeps each bar's last state
                      file=file if isinstance(file, LogLines) else LogLines(file))
    return kwargs


class LogLines:
    """A stream for tqdm when the output is a log: each state tqdm writes becomes one line ending in
    a newline. tqdm redraws in place (`\\r` + state + padding, cursor moves for nested bars), which a
    log file keeps as one physical line holding every state; here the carriage returns, the padding,
    the cursor moves and tqdm's clearing writes (blank states) are dropped."""

    _CURSOR_UP = "\x1b[A"

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        for state in text.replace(self._CURSOR_UP, "").replace("\r", "\n").split("\n"):
            if state.strip():
                self.stream.write(state.rstrip() + "\n")
        return len(text)

    def flush(self) -> None:
        flush = getattr(self.stream, "flush", None)
        if flush is not None:
            flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:  # encoding, closed, ...: the wrapped stream's
        if name == "stream":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.stream, name)


def bar(iterable: Any = None, **kwargs: Any):
    """A tqdm progress bar with `bar_kwargs` (see the module docstring)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, **bar_kwargs(**kwargs))


@contextlib.contextmanager
def phase(what: str, quiet: bool = False) -> Iterator[None]:
    """'raymerge: WHAT ...' on stderr now and 'raymerge: WHAT: done in X s' when the block ends."""
    if quiet:
        yield
        return
    print(f"raymerge: {what} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    yield
    print(f"raymerge: {what}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


class DropMessages(logging.Filter):
    """Drops log records whose message starts with one of `prefixes` (a library's noise)."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


_DEEPSPEED_NOISE = DropMessages("Setting accelerator to CPU", "Setting ds_accelerator to")


def quiet_third_party() -> None:
    """Install the filters (idempotent; nothing with `RAYMERGE_VERBOSE` set). DeepSpeed creates its
    logger at import with its own handler and level, but keeps the filters already on it, so the
    filter is placed before anything imports deepspeed."""
    if verbose():
        return
    ds = logging.getLogger("DeepSpeed")
    if _DEEPSPEED_NOISE not in ds.filters:
        ds.addFilter(_DEEPSPEED_NOISE)




def set_verbose() -> None:
    """`raymerge -v`: show third-party messages too, here and in the Ray workers started from here."""
    os.environ["RAYMERGE_VERBOSE"] = "1"
    logging.getLogger("DeepSpeed").removeFilter(_DEEPSPEED_NOISE)


__all__ = ["DropMessages", "LogLines", "bar", "bar_kwargs", "phase", "quiet_third_party", "set_verbose", "verbose", "is_terminal", "LOG_INTERVAL_S"]
