"""One staged output for every job that writes a model: merge, prune, `search --materialize`
(which runs a merge or a prune of the best config) and the 1bit task-vector export (its files
are published with the merge they come from).

`JobOutput` puts, around the sinks of `checkpoints` (`writer.StagedOutput`: a local folder;
`s3.S3StagedOutput`: `s3://bucket/prefix`, staged in a local folder; picked by
`sinks.open_output`), the steps every job takes, in this order:

1. `JobOutput(output, overwrite=..., s3_endpoint_url=..., resume=...)` checks the target at once,
   before any work: a folder or prefix that holds something is refused unless `overwrite`; an
   unwritable folder, a missing bucket, denied access fail with one line naming the path. The
   S3 endpoint is resolved here, in the driver (the option, else `AWS_ENDPOINT_URL[_S3]`), and
   travels to workers in the picklable target, never through their environment.
2. `reserve(layout, small_files, job, inputs)`: takes the output's lock (`checkpoints.output_lock`:
   one writer per output; a second job is refused with one line naming the holder's pid and
   touches nothing), finishes or rolls back a publish that a crash interrupted
   (`writer.StagedOutput.recover`), checks the target again (another job may have published
   meanwhile); then, with a job identity (`recovery.job_identity`) and a resumable output, looks
   for a staging folder this very job left (`recovery.find_resumable`; a changed input file is
   named); then checks that the staging filesystem can hold the shards, the manifest and the
   small files, in filesystem blocks. `open` takes the lock too when a job skips `reserve`.
3. `open(layout)`: the staging folder is set up — afresh, or keeping the verified shards of an
   interrupted run — with its resume manifest (`recovery.prepare_staging`). Workers write their
   tensors at their offsets into `staging`.
4. `publish(layout, files, spread)`: an S3 output's shards are uploaded first (by the job's
   worker actors when `spread` is given — `upload_on(actors)` — so the driver never moves
   weights); then the index and the small files, and the staging folder is published
   atomically: renamed onto a local path (the manifest set aside meanwhile, see
   `writer.StagedOutput.publish`), or uploaded with the index and `config.json` last
   (`checkpoints.s3`; the manifest stays local and is removed with the staging folder after
   `config.json`). Until then nothing at the output looks
   like a model. The lock is released once published.
5. `fail(err)`: an interruption (Ctrl-C, a closed output pipe, lost workers) or a full disk of a
   resumable job keeps the staging folder for a rerun (a full disk only when some shard is
   finished: else the space is given back); any other failure removes it and whatever an S3
   upload had put. A full disk (ENOSPC) becomes one line (`DiskSpaceError`) saying how much
   space is missing. A job that never got the lock touches nothing. The lock is released.

A merge is resumable (its executor records finished shards). A prune is not yet: its stage
workers fill shards layer by layer with no per-shard progress, so it always starts afresh and
a failure always cleans up. This lives in `runtime/` rather than `checkpoints/` because it
drives worker actors (the uploads) and the resume logic; `checkpoints/` stays I/O only, no Ray.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from raymerge.checkpoints.manifest import load_manifest
from raymerge.checkpoints.output_lock import OutputLock
from raymerge.checkpoints.s3 import S3StagedOutput, balance_shards, resolve_endpoint_url
from raymerge.checkpoints.sinks import open_output
from raymerge.checkpoints.writer import (
    DiskSpaceError, OutputLayout, block_size, check_disk_space, free_bytes, human_bytes, output_files, pause_point,
    protect, space_needed,
)
from raymerge.runtime.recovery import (
    ResumeState, find_resumable, input_files, is_disk_full, keeps_staging, prepare_staging,
)

log = logging.getLogger("raymerge")

FileData = Union[bytes, str]


class JobOutput:
    """Where a job's model goes (module docstring): check, reserve, open, publish or fail."""

    def __init__(self, output: Union[str, Path], *, overwrite: bool = False, s3_endpoint_url: Optional[str] = None,
                 resume: Optional[bool] = False, resumable: bool = False, check: bool = True,
                 keep: Sequence[Union[str, Path]] = ()) -> None:
        """`keep`: the job's inputs (model folders, config file); a local output that is one of them,
        holds one, or is the current directory is refused (`checkpoints.writer.protect`)."""
        self.endpoint_url = resolve_endpoint_url(s3_endpoint_url)
        self.staged = open_output(output, overwrite=overwrite, s3_endpoint_url=self.endpoint_url)
        if not isinstance(self.staged, S3StagedOutput):
            protect(Path(output), [p for p in keep if Path(p).exists()])
        self.resumable = resumable
        self.resume = resume if resumable else False
        self.state: Optional[ResumeState] = None
        self.files: list[str] = []  # what was published (file or object names)
        self._job: Optional[str] = None
        self._found = None
        self._inputs: dict[str, Any] = {}
        self._layout: Optional[OutputLayout] = None
        self._small: list[int] = []
        self._check = check
        self._lock = OutputLock(self.staged.staging, self.location)
        if check:
            self.staged.check_target()

    @property
    def remote(self) -> bool:
        """True for an `s3://` output (staged locally, then uploaded)."""
        return isinstance(self.staged, S3StagedOutput)

    @property
    def staging(self) -> Path:
        return Path(self.staged.staging)

    @property
    def location(self) -> Union[Path, str]:
        """The output as the user will find it: a local folder, or the `s3://` URL."""
        return self.staged.output

    def lock(self) -> None:
        """Take the output's lock (or raise `OutputBusyError`), repair an interrupted publish, and
        check the target again; a no-op once held."""
        if self._lock.held:
            return
        self._lock.acquire()
        try:
            pause_point("locked")
            recover = getattr(self.staged, "recover", None)
            note = recover() if recover is not None else None
            if note:
                log.warning("%s", note)
            if self._check:
                self.staged.check_target()
        except BaseException:
            self._lock.release()
            raise

    def release(self) -> None:
        """Drop the output's lock (after publish or failure; safe to call twice). An S3 output's
        private staging parent goes too when nothing else is in it (as `S3StagedOutput` does)."""
        held = self._lock.held
        self._lock.release()
        if held and self.remote:
            try:
                self._lock.path.parent.rmdir()
            except OSError:
                pass  # another output's staging or lock is there

    def reserve(self, layout: OutputLayout, small_files: Sequence[FileData] = (), job: Optional[str] = None,
                inputs: Sequence[Mapping[str, Any]] = ()) -> None:
        """Before any work: take the lock (`lock`), find a resumable staging folder of `job`
        (resumable outputs only; `inputs`: the job's input fingerprints, recorded in the manifest),
        then check that the staging filesystem holds the shards plus `small_files`."""
        self.lock()
        try:
            self._job = job
            self._inputs = input_files(inputs)
            self._layout = layout
            index = layout.index_json() or ""
            self._small = [len(d.encode() if isinstance(d, str) else d) for d in (index, *small_files)]
            if self.resumable and job is not None:
                self._found = find_resumable(self.staged, layout, job, self.resume, self._inputs)
            check_disk_space(self.staging, layout, small_files=self._small)
        except BaseException:
            self.release()
            raise

    def open(self, layout: OutputLayout) -> ResumeState:
        """Set up the staging folder (every shard allocated; a resumed job keeps its verified
        shards) with the resume manifest; returns what was kept."""
        self.lock()
        if self._layout is None:
            self._layout = layout
        if self.resumable and self._job is not None:
            self.state = prepare_staging(self.staged, layout, self._job, self._found, self._inputs)
        else:
            self.staged.prepare(layout)
            self.state = None
        pause_point("open")
        return self.state

    def publish(self, layout: OutputLayout, files: Mapping[str, FileData],
                spread: Optional[Callable[..., None]] = None) -> Union[Path, str]:
        """Upload an S3 output's shards (with `spread`, by the workers), write the index and
        `files`, and publish atomically; returns the output location and releases the lock."""
        if self.remote:
            self.staged.upload_shards(spread)
        index = layout.index_json()
        if index is not None:
            self.staged.write_file("model.safetensors.index.json", index)
        for name, data in files.items():
            self.staged.write_file(name, data)
        # The manifest stays until the model is published (a local publish sets it aside itself,
        # crash-safe; an S3 publish leaves it out of the upload and removes the staging folder last).
        out = self.staged.publish()
        self.files = sorted(p.name for p in out.iterdir()) if isinstance(out, Path) else list(self.staged.published)
        self.release()
        return out

    def fail(self, err: BaseException) -> bool:
        """After a failure: keep the staging folder for a resume (interruptions and a full disk
        of a resumable job; returns True) or remove it, with anything already uploaded (returns
        False); then release the lock. A job that does not hold the lock touches nothing (the
        staging folder may be another job's). A full disk raises `DiskSpaceError` (one line: how
        much is missing) from `err`."""
        if not self._lock.held:
            return False
        try:
            kept = self.resumable and keeps_staging(err)
            if kept and is_disk_full(err) and not self._has_finished_shards():
                kept = False  # nothing worth a resume: give the space back
            if not kept:
                recover = getattr(self.staged, "recover", None)
                if recover is not None:
                    recover()  # a publish that failed half-way: the old output goes back first
                self.staged.abort()
            elif isinstance(err, (KeyboardInterrupt, BrokenPipeError)):
                err.add_note(f"staging folder {self.staging} kept: rerun the same job to resume")
            if is_disk_full(err) and not isinstance(err, DiskSpaceError):
                raise self._disk_full(err, kept) from err
            return kept
        finally:
            self.release()

    def _has_finished_shards(self) -> bool:
        """The staging folder holds shards recorded as finished (or a publish was under way)."""
        journal = getattr(self.staged, "journal", None)
        if journal is not None and journal.exists():
            return True
        found = load_manifest(self.staging)
        return bool(found and found.finished)

    def _disk_full(self, err: BaseException, kept: bool) -> DiskSpaceError:
        """One line for an ENOSPC met while writing: what failed and how much space is missing."""
        cause = getattr(err, "cause", None) or err
        what = f"writing {cause.filename} failed" if getattr(cause, "filename", None) else "a write failed"
        free = free_bytes(self.staging)
        block = block_size(self.staging)
        needed = space_needed(self.staging, output_files(self._layout, self._small), block) if self._layout else 0
        missing = max(needed - free, block)
        then = ("the finished shards are kept there: free space and rerun the same job to resume" if kept
                else "nothing was published")
        return DiskSpaceError(
            f"not enough disk space to finish the output {self.location}: {what} (no space left on device); "
            f"{human_bytes(missing)} more needed in {self.staging} ({human_bytes(free)} free); {then}", missing)


def upload_on(actors: Sequence[Any], owners: Optional[Mapping[str, int]] = None) -> Optional[Callable[..., None]]:
    """A `spread` for `JobOutput.publish` that has Ray worker actors (any class with an
    `upload_files(target, staging, names)` method) upload the shards, largest first to the least
    loaded; None without actors (the driver uploads). With `owners` (shard name -> actor index),
    each shard is uploaded by its owner instead: the actor on whose node's own disk that shard is
    whole (a prune whose stages stage on private disks, `runtime.prune`)."""
    if not actors:
        return None

    def assign(shards: Sequence[tuple[str, int]]) -> list[list[str]]:
        if owners is None:
            return balance_shards(shards, len(actors))
        out: list[list[str]] = [[] for _ in actors]
        for name, _ in shards:
            out[owners[name]].append(name)
        return out

    def spread(target: Any, staging: str, shards: Sequence[tuple[str, int]]) -> None:
        import ray

        refs = [a.upload_files.remote(target, staging, names)
                for a, names in zip(actors, assign(shards)) if names]
        try:
            ray.get(refs)
        except Exception as err:  # noqa: BLE001 - a Ray task error wrapping ours
            for ref in refs:  # let the other uploads end before cleaning up after them
                try:
                    ray.get(ref)
                except Exception:  # noqa: BLE001
                    pass
            raise _unwrap_ray_error(err) from None

    return spread


def _unwrap_ray_error(err: BaseException) -> BaseException:
    """The user-facing error inside a Ray task error, if any."""
    from raymerge.checkpoints import CheckpointError, OutputError

    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, (OutputError, CheckpointError)) else err
