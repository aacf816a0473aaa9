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
2. `reserve(layout, small_files, job)`: with a job identity (`recovery.job_identity`) and a
   resumable output, looks for a staging folder this very job left (`recovery.find_resumable`);
   then checks that the staging filesystem can hold the shards and small files.
3. `open(layout)`: the staging folder is set up — afresh, or keeping the verified shards of an
   interrupted run — with its resume manifest (`recovery.prepare_staging`). Workers write their
   tensors at their offsets into `staging`.
4. `publish(layout, files, spread)`: an S3 output's shards are uploaded first (by the job's
   worker actors when `spread` is given — `upload_on(actors)` — so the driver never moves
   weights); then the index and the small files, the manifest is removed, and the staging
   folder is published atomically: renamed onto a local path, or uploaded with the index and
   `config.json` last (`checkpoints.s3`). Until then nothing at the output looks like a model.
5. `fail(err)`: an interruption (Ctrl-C, lost workers) of a resumable job keeps the staging
   folder for a rerun; any other failure removes it and whatever an S3 upload had put.

A merge is resumable (its executor records finished shards). A prune is not yet: its stage
workers fill shards layer by layer with no per-shard progress, so it always starts afresh and
a failure always cleans up. This lives in `runtime/` rather than `checkpoints/` because it
drives worker actors (the uploads) and the resume logic; `checkpoints/` stays I/O only, no Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from raymerge.checkpoints.s3 import S3StagedOutput, balance_shards, resolve_endpoint_url
from raymerge.checkpoints.sinks import open_output
from raymerge.checkpoints.writer import OutputLayout, check_disk_space, protect
from raymerge.runtime.recovery import ResumeState, find_resumable, keeps_staging, prepare_staging

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

    def reserve(self, layout: OutputLayout, small_files: Sequence[FileData] = (), job: Optional[str] = None) -> None:
        """Before any work: find a resumable staging folder of `job` (resumable outputs only),
        then check that the staging filesystem holds the shards plus `small_files`."""
        self._job = job
        if self.resumable and job is not None:
            self._found = find_resumable(self.staged, layout, job, self.resume)
        index = layout.index_json() or ""
        small = sum(len(d.encode() if isinstance(d, str) else d) for d in (index, *small_files))
        check_disk_space(self.staging, layout, small)

    def open(self, layout: OutputLayout) -> ResumeState:
        """Set up the staging folder (every shard allocated; a resumed job keeps its verified
        shards) with the resume manifest; returns what was kept."""
        if self.resumable and self._job is not None:
            self.state = prepare_staging(self.staged, layout, self._job, self._found)
        else:
            self.staged.prepare(layout)
            self.state = None
        return self.state

    def publish(self, layout: OutputLayout, files: Mapping[str, FileData],
                spread: Optional[Callable[..., None]] = None) -> Union[Path, str]:
        """Upload an S3 output's shards (with `spread`, by the workers), write the index and
        `files`, drop the manifest, and publish atomically; returns the output location."""
        if self.remote:
            self.staged.upload_shards(spread)
        index = layout.index_json()
        if index is not None:
            self.staged.write_file("model.safetensors.index.json", index)
        for name, data in files.items():
            self.staged.write_file(name, data)
        if self.state is not None:
            self.state.manifest.discard()
        out = self.staged.publish()
        self.files = sorted(p.name for p in out.iterdir()) if isinstance(out, Path) else list(self.staged.published)
        return out

    def fail(self, err: BaseException) -> bool:
        """After a failure: keep the staging folder for a resume (interruptions of a resumable
        job; returns True) or remove it, with anything already uploaded (returns False)."""
        if self.resumable and keeps_staging(err):
            return True
        self.staged.abort()
        return False


def upload_on(actors: Sequence[Any]) -> Optional[Callable[..., None]]:
    """A `spread` for `JobOutput.publish` that has Ray worker actors (any class with an
    `upload_files(target, staging, names)` method) upload the shards, largest first to the least
    loaded; None without actors (the driver uploads)."""
    if not actors:
        return None

    def spread(target: Any, staging: str, shards: Sequence[tuple[str, int]]) -> None:
        import ray

        refs = [a.upload_files.remote(target, staging, names)
                for a, names in zip(actors, balance_shards(shards, len(actors))) if names]
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
