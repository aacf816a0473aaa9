"""One writer per output: the lock a job holds on its staging folder while it writes and publishes.

The lock is a file beside the staging folder (`<staging>.lock`, e.g. `.out.raymerge-staging.lock`
next to `out/`), not inside it: the staging folder is wiped when a job starts afresh and renamed
onto the output when it publishes, and the lock must outlive both. A job takes it (`OutputLock.acquire`)
before it looks at the staging folder at all, and holds it until its output is published or its
failure handled; a second job on the same output is refused at once with one line naming the
output and the holder's pid (`OutputBusyError`, a user error: CLI exit 2), and touches nothing.

Mechanism: `fcntl.flock(LOCK_EX | LOCK_NB)` on the lock file, then the holder's `pid host` written
into it (only to name it in the refusal). The kernel drops a flock when its holder dies, whatever
the way (SIGKILL, OOM, power cut of a client), so a lock file left by a dead process is not a
lock: the next job takes it over without a pid check, and a live holder can never be taken over.
(This is why flock rather than an O_EXCL file with a pid: a pid check cannot tell a dead holder
on another host of a shared filesystem, nor a reused pid, from a live one.) The holder removes the
file when it releases; a job that locked a file that was removed meanwhile (it opened it just
before the holder released) sees that the path no longer names its file and tries again.

Limits: locks are per host where the filesystem does not share flocks (Linux NFSv4 does, through
its byte-range locks); two hosts staging the same `s3://` output each stage locally and are not
seen by each other. A process forked (not exec'd) while holding the lock shares it.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import Optional

from raymerge.errors import RaymergeError


class OutputBusyError(RaymergeError, ValueError):
    """Another raymerge job is writing the same output (it holds the output's lock)."""


class OutputLock:
    """The lock of one output (module docstring). `acquire` or raise; `release` when done."""

    def __init__(self, staging: str | os.PathLike, output: object):
        staging = Path(staging)
        self.path = staging.with_name(staging.name + ".lock")
        self.output = output  # for messages: the output as the user named it
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise `OutputBusyError` naming the output and the holder's pid."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise OutputBusyError(
                    f"output {self.output} is being written by another raymerge job ({holder}, lock {self.path}); "
                    f"wait for it to finish or choose another output"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the previous holder removed this file as it released: lock the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
            self._fd = fd
            return

    def release(self) -> None:
        """Remove the lock file and drop the lock (removed first, while still held: see `acquire`)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(fd)

    def __del__(self) -> None:  # a job dropped without release: the lock goes with it
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _read_holder(fd: int) -> str:
    """'pid N on HOST' from a lock file, or a neutral phrase when it says nothing yet."""
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
    except OSError:
        text = []
    if not text:
        return "pid unknown"
    return f"pid {text[0]}" + (f" on {text[1]}" if len(text) > 1 else "")
