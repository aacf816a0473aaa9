"""Writing a merged checkpoint: shard layout, parallel tensor writes, atomic publish.

1. The driver lays out every output shard from names, shapes and dtypes alone
   (`plan_shards`): a new shard starts when the next tensor would take the current one past
   `max_shard_bytes` (as mergekit and `save_pretrained` do). File names follow the Hugging Face
   convention: `model.safetensors` for one shard, else `model-0000i-of-0000N.safetensors` plus
   `model.safetensors.index.json`.
2. `StagedOutput.prepare` creates a staging folder beside the output (same filesystem, so the
   final rename is atomic) and pre-allocates each shard with its header.
3. Workers write each tensor's bytes at its precomputed offset (`ShardFileWriter`, `os.pwrite`),
   in any order, from any process that sees the staging folder. The bytes therefore never
   depend on how tensors were spread over workers.
4. `StagedOutput.publish` writes the index, `config.json`, tokenizer files and model card into the
   staging folder, fsyncs, and renames it onto the output path. Until that rename nothing at the
   output path exists, so a crash never leaves something there that loads as a model.

   The rename is made crash-safe by a journal (`StagedOutput.publish`, `StagedOutput.recover`):
   a kill at any point leaves either the old output or the new one in place plus what the next
   run needs to finish or roll back the swap, and never loses the finished shards.
5. Disk space (`check_disk_space`) is counted in filesystem blocks: each shard and small file
   rounded up to the allocation unit (`statvfs().f_frsize`), plus the resume manifest. A disk that
   fills anyway later (another writer took the space) fails with `DiskSpaceError`, which says how
   much is missing and is kept for a resume (`runtime.recovery.keeps_staging`).

`sinks.open_output` picks the sink: a local directory, or an `s3://bucket/prefix`, which stages the
same way in a local folder and then uploads (shards by the workers, `config.json` last; see
`raymerge.checkpoints.s3`).

Private-disk cluster nodes (an S3 output whose workers share no disk with the driver): each node
allocates its own copy of the staging shards it writes (`ensure_node_shards`; the driver's own
folder is recognised by its resume manifest, or by `mark_node_shards` for a prune, which has
none), byte ranges of a shard move between nodes' copies with `read_range` / `write_range` (a
prune's shard that two stages on two nodes write), and `drop_node_shards` removes a node's copy
once the output is published.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Collection, Iterable, Optional, Sequence

from raymerge.checkpoints.manifest import MANIFEST_NAME, fsync_dir
from raymerge.checkpoints.safetensors_format import TensorEntry, build_header, tensor_bytes
from raymerge.errors import RaymergeError

if TYPE_CHECKING:
    import torch

DEFAULT_SHARD_BYTES = 5 * 1000**3


class OutputError(RaymergeError, ValueError):
    """The output path cannot be written (exists already, not writable, ...)."""


class DiskSpaceError(OutputError):
    """The staging filesystem cannot hold the output; `missing` is how many bytes are lacking."""

    def __init__(self, message: str, missing: int = 0):
        super().__init__(message)
        self.missing = missing


PAUSE_ENV = "RAYMERGE_TEST_PAUSE_AT"


def pause_point(window: str) -> None:
    """Test hook for crash-recovery tests: when $RAYMERGE_TEST_PAUSE_AT names `window`, this
    process stops itself (SIGSTOP) there, so a test can SIGKILL it, or change the disk and SIGCONT
    it, at exactly that point. Windows: `locked` (output lock taken), `open` (staging folder set
    up), `publish-manifest-aside` (manifest moved out of the staging folder, nothing renamed yet),
    `publish-between-renames` (old output moved aside, staging not yet renamed). Unset, a no-op."""
    if os.environ.get(PAUSE_ENV) == window:
        os.kill(os.getpid(), signal.SIGSTOP)


@dataclass(frozen=True)
class ShardPlan:
    filename: str
    header: bytes
    entries: dict[str, TensorEntry]

    @property
    def size(self) -> int:
        return max((e.end for e in self.entries.values()), default=len(self.header))


@dataclass(frozen=True)
class OutputLayout:
    shards: tuple[ShardPlan, ...]
    shard_of: dict[str, int] = field(default_factory=dict)

    @property
    def total_tensor_bytes(self) -> int:
        return sum(e.nbytes for s in self.shards for e in s.entries.values())

    def entry(self, name: str) -> tuple[str, TensorEntry]:
        shard = self.shards[self.shard_of[name]]
        return shard.filename, shard.entries[name]

    def index_json(self) -> Optional[str]:
        if len(self.shards) == 1:
            return None
        weight_map = {n: self.shards[i].filename for n, i in self.shard_of.items()}
        data = {"metadata": {"total_size": self.total_tensor_bytes}, "weight_map": weight_map}
        return json.dumps(data, indent=2, sort_keys=False) + "\n"


def plan_shards(
    tensors: Iterable[tuple[str, str, tuple[int, ...]]], max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> OutputLayout:
    """Group (name, dtype code, shape) tensors, in order, into shards of at most max_shard_bytes."""
    from raymerge.checkpoints.safetensors_format import element_size

    groups: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    current = 0
    for name, code, shape in tensors:
        size = element_size(code)
        for d in shape:
            size *= d
        if groups[-1] and current + size > max_shard_bytes:
            groups.append([])
            current = 0
        groups[-1].append((name, code, shape))
        current += size
    if not groups[-1]:
        groups.pop()
    n = len(groups)
    shards = []
    shard_of: dict[str, int] = {}
    metadata = {"format": "pt"}
    for i, group in enumerate(groups):
        filename = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        header, entries = build_header(group, metadata)
        shards.append(ShardPlan(filename, header, entries))
        for name, _, _ in group:
            shard_of[name] = i
    return OutputLayout(tuple(shards), shard_of)


def holds_model(path: Path) -> bool:
    return path.is_dir() and (
        (path / "config.json").exists()
        or any(path.glob("*.safetensors"))
        or any(path.glob("*.bin"))
        or (path / "model.safetensors.index.json").exists()
    )


# What a folder written by raymerge (or transformers' save_pretrained) holds: `--overwrite`
# replaces a folder only when it has config.json and every entry is a regular file matching these.
MODEL_FOLDER_FILES = (
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "pytorch_model*.bin", "pytorch_model.bin.index.json", "tokenizer*", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.*", "README.md",
    "mergekit_config.yml", "raymerge_prune.yml", "prune_report.json", "guidance.json",
    "task_vectors.json", "task_vectors-*.onebit", "*.png",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json", "normalizer.json",
)


def replaceable_model(path: Path) -> Optional[str]:
    """None when `--overwrite` may replace the folder `path` (a model folder, nothing else in it);
    else why not."""
    import fnmatch

    if not (path / "config.json").is_file():
        return "it does not hold a model (no config.json)"
    for entry in path.iterdir():
        if entry.is_symlink() or not entry.is_file():
            return f"it holds {entry.name!r}, which is not a file of a model"
        if not any(fnmatch.fnmatch(entry.name, pattern) for pattern in MODEL_FOLDER_FILES):
            return f"it holds {entry.name!r}, which is not a file of a model"
    return None


def protect(output: Path, keep: Sequence[str | os.PathLike] = ()) -> None:
    """Refuse (OutputError) an output that would replace the current directory or one above it,
    or a path in `keep` (input model folders, the config file) or a folder holding one."""
    out = Path(output).absolute().resolve()
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise OutputError(f"output path {output} is the current directory or holds it; choose a new folder for the model")
    for p in keep:
        kept = Path(p).absolute().resolve()
        if out == kept or out in kept.parents:
            raise OutputError(f"output path {output} is or holds an input of this job ({p}); choose a new folder for the model")


class StagedOutput:
    """A staging folder that becomes the output directory in one rename."""

    def __init__(self, output: str | os.PathLike, *, overwrite: bool = False):
        self.output = Path(output).absolute()
        self.overwrite = overwrite
        self.staging = self.output.parent / f".{self.output.name}.raymerge-staging"

    def check_target(self) -> None:
        """Fail early, before any work, if the output cannot be written."""
        out = self.output
        if out.exists():
            if not out.is_dir():
                raise OutputError(f"output path {out} exists and is not a directory")
            if any(out.iterdir()) and not self.overwrite:
                if holds_model(out) and replaceable_model(out) is None:
                    raise OutputError(f"output path {out} already holds a model; pass --overwrite (overwrite=True) to replace it")
                raise OutputError(f"output path {out} exists and is not empty; choose a new folder for the model")
            if any(out.iterdir()) and self.overwrite:
                why = replaceable_model(out)
                if why is not None:
                    raise OutputError(f"output path {out} is not replaced by --overwrite: {why}; choose a new folder for the model")
        parent = out.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f"cannot create output folder {parent}: {err.strerror}") from None
        if not os.access(parent, os.W_OK):
            raise OutputError(f"output folder {parent} is not writable")

    def prepare(self, layout: OutputLayout, keep: Collection[str] = ()) -> None:
        """A fresh staging folder with every shard allocated; with `keep` (a resumed merge: the
        shards verified finished), the folder stays and only the other shards are allocated anew."""
        self.check_target()
        reset_staging(self.staging, layout, keep)

    def write_file(self, name: str, data: bytes | str) -> None:
        path = self.staging / name
        try:
            path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        except OSError as err:
            if err.filename is None:  # a failed write() names no file: say which one
                raise OSError(err.errno, err.strerror, str(path)) from None
            raise

    @property
    def journal(self) -> Path:
        """The publish journal beside the output: exists only while a publish is under way."""
        return self.output.parent / f".{self.output.name}.raymerge-publish"

    @property
    def manifest_aside(self) -> Path:
        """Where the resume manifest waits, out of the staging folder, during a publish. (Sibling
        names stay within `output_name.AFFIX`: `.raymerge-publish.tmp` is the longest.)"""
        return self.output.parent / f".{self.output.name}.raymerge-manifest"

    def publish(self) -> Path:
        """fsync the staged files and move them to the output path in one rename.

        Crash-safe order: (1) fsync every staged file; (2) write the journal (the name the old
        output will get, if any); (3) move the resume manifest out of the staging folder, so it
        never reaches the output but is not lost; (4) rename the old output aside; (5) rename the
        staging folder onto the output; (6) remove the old output, the manifest and the journal.
        A kill anywhere in (2)-(6) is repaired by the next run's `recover`."""
        for path in self.staging.iterdir():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        out = self.output
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.raymerge-old-{uuid.uuid4().hex[:8]}"
        _write_durably(self.journal, json.dumps({"old": None if old is None else old.name}) + "\n")
        if (self.staging / MANIFEST_NAME).exists():
            os.rename(self.staging / MANIFEST_NAME, self.manifest_aside)
            fsync_dir(out.parent)
        pause_point("publish-manifest-aside")
        if old is not None:
            os.rename(out, old)
            fsync_dir(out.parent)
        pause_point("publish-between-renames")
        os.rename(self.staging, out)
        fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        for path in (self.manifest_aside, self.journal):
            _unlink(path)
        return out

    def recover(self) -> Optional[str]:
        """Finish or roll back a publish that a crash interrupted (call with the output lock held);
        returns one line saying what was done, or None when there was nothing to do.

        The staging folder is gone: the new output was renamed into place, only the cleanup is
        left (the old output, the manifest set aside, the journal); were the output missing too,
        the old output is put back rather than removed. The staging folder is still
        there: the swap is rolled back — the old output renamed back onto the output path, the
        manifest back into the staging folder — so the next run resumes from the finished shards
        (or, as another job, discards them) and the old model is never stranded."""
        _unlink(self.journal.with_name(self.journal.name + ".tmp"))  # killed while writing it: nothing moved yet
        if not self.journal.exists():
            return None
        try:
            old_name = json.loads(self.journal.read_text()).get("old")
        except (OSError, ValueError, AttributeError):
            old_name = None
        old = self.output.parent / old_name if old_name else None
        if not self.staging.exists():
            if old is not None and old.exists():
                if self.output.exists():  # the new output is in place: the old one is done with
                    shutil.rmtree(old, ignore_errors=True)
                else:  # the staging folder was lost (removed by hand?): never strand the old output
                    os.rename(old, self.output)
                    fsync_dir(self.output.parent)
            for path in (self.manifest_aside, self.journal):
                _unlink(path)
            return f"raymerge: finished the interrupted publish of {self.output} (removed what it left behind)"
        restored = False
        if old is not None and old.exists() and not self.output.exists():
            os.rename(old, self.output)
            restored = True
        if self.manifest_aside.exists():
            os.rename(self.manifest_aside, self.staging / MANIFEST_NAME)
        fsync_dir(self.output.parent)
        _unlink(self.journal)
        back = "the previous model is back in place; " if restored else ""
        return (f"raymerge: rolled back the interrupted publish of {self.output}: {back}"
                f"its finished shards stay in {self.staging} for a resume")

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def reset_staging(folder: Path, layout: OutputLayout, keep: Collection[str] = ()) -> None:
    """Wipe and recreate `folder` with every shard of `layout` allocated; with `keep`, leave the
    folder and those shards as they are and allocate the others anew."""
    if not keep:
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    allocate_shards(folder, layout, skip=keep)


def allocate_shards(folder: Path, layout: OutputLayout, skip: Collection[str] = ()) -> None:
    """Create each shard of `layout` in `folder` (but those named in `skip`): its header, then
    its full size reserved."""
    for shard in layout.shards:
        if shard.filename in skip:
            continue
        with open(folder / shard.filename, "wb") as f:
            f.write(shard.header)
            f.truncate(shard.size)
            _reserve(f.fileno(), shard.size, folder / shard.filename)


NODE_JOB_MARKER = ".raymerge-node-job"


def ensure_node_shards(folder: str | os.PathLike, job: str, shards: Sequence[tuple[str, bytes, int]]) -> bool:
    """On a node whose disk the driver does not share (a private-disk worker node of an S3
    output), set up this job's copy of the staging folder: every shard ((name, header, size))
    allocated there, once per node and job (a marker file names the job; a folder of another job
    is wiped). A folder holding the resume manifest is the driver's own staging (this node shares
    the driver's disk): left alone. Workers of one node serialise on a lock file. Returns True
    when this call allocated the shards."""
    import fcntl

    from raymerge.checkpoints.manifest import MANIFEST_NAME

    folder = Path(folder)
    if (folder / MANIFEST_NAME).exists():
        return False
    folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if (folder / MANIFEST_NAME).exists():
            return False
        marker = folder / NODE_JOB_MARKER
        try:
            if marker.read_text() == job:
                return False
        except OSError:
            pass
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(mode=0o700)
        for name, header, size in shards:
            with open(folder / name, "wb") as f:
                f.write(header)
                f.truncate(size)
        marker.write_text(job)
        return True


def drop_node_shards(folder: str | os.PathLike, job: str) -> bool:
    """After `job` published: remove this node's copy of its staging folder (`ensure_node_shards`;
    its shards are in the bucket), so a worker node keeps no model-sized leftovers. Only a copy
    marked with this job is removed (never the driver's own staging, which holds the manifest,
    nor a later job's); workers of one node serialise on the same lock file. True when removed."""
    import fcntl

    from raymerge.checkpoints.manifest import MANIFEST_NAME

    folder = Path(folder)
    lock_path = folder.parent / f".{folder.name}.lock"
    if (folder / MANIFEST_NAME).exists() or not lock_path.exists():
        return False
    with open(lock_path, "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            if (folder / NODE_JOB_MARKER).read_text() != job or (folder / MANIFEST_NAME).exists():
                return False
        except OSError:
            return False
        shutil.rmtree(folder, ignore_errors=True)
        try:
            lock_path.unlink()
        except OSError:
            pass
    return True


def mark_node_shards(folder: str | os.PathLike, job: str) -> None:
    """Mark the driver's own staging folder (every shard allocated, no resume manifest: a prune)
    as `job`'s, so `ensure_node_shards` on a node sharing the driver's disk uses it as it is."""
    (Path(folder) / NODE_JOB_MARKER).write_text(job)


def read_range(folder: str | os.PathLike, filename: str, begin: int, end: int) -> bytes:
    """Bytes [begin, end) of a staged shard of this node (a piece to move to another node)."""
    fd = os.open(Path(folder) / filename, os.O_RDONLY)
    try:
        out = bytearray()
        while len(out) < end - begin:
            chunk = os.pread(fd, end - begin - len(out), begin + len(out))
            if not chunk:
                raise OSError(errno.EIO, f"short read of {filename} at {begin + len(out)}", str(Path(folder) / filename))
            out += chunk
        return bytes(out)
    finally:
        os.close(fd)


def write_range(folder: str | os.PathLike, filename: str, begin: int, data: bytes) -> int:
    """Write `data` at offset `begin` of an allocated shard of this node's staging folder (a
    piece another node wrote: `read_range`); returns the bytes written."""
    fd = os.open(Path(folder) / filename, os.O_WRONLY)
    try:
        return pwrite_all(fd, data, begin)
    finally:
        os.close(fd)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> int:
    """Write all of `data` at `offset` of `fd` (pwrite may write less than asked); its length."""
    view = memoryview(data)
    pos = 0
    while pos < len(view):
        pos += os.pwrite(fd, view[pos:], offset + pos)
    return pos


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Free bytes for an unprivileged writer on the filesystem of `path` (or of its nearest
    existing parent, for a folder not created yet)."""
    return shutil.disk_usage(_existing(path)).free


def block_size(path: Path) -> int:
    """The allocation unit of the filesystem of `path` (statvfs f_frsize, else f_bsize, else 4096)."""
    try:
        st = os.statvfs(_existing(path))
    except OSError:
        return 4096
    return st.f_frsize or st.f_bsize or 4096


def human_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def manifest_bytes(layout: OutputLayout) -> int:
    """A generous estimate of the resume manifest's size: its first line (job, layout, inputs)
    and one record per shard."""
    return 4096 + sum(len(s.filename) * 2 + 200 for s in layout.shards)


def space_needed(staging: Path, files: dict[str, int], block: Optional[int] = None) -> int:
    """Bytes still to allocate in `staging` for `files` (name -> size): each rounded up to whole
    filesystem blocks, less the blocks a file of that name already holds there."""
    staging = Path(staging)
    block = block or block_size(staging)
    needed = 0
    for name, size in files.items():
        try:
            held = (staging / name).stat().st_blocks * 512
        except OSError:
            held = 0
        needed += max(0, -(-size // block) * block - held)
    return needed


def output_files(layout: OutputLayout, small_files: Sequence[int] = (), extra_bytes: int = 0) -> dict[str, int]:
    """What a staging folder will hold, name -> size: the shards, the resume manifest, the small
    files (sizes only: named `<small i>`) and `extra_bytes` as one more small file."""
    files = {s.filename: s.size for s in layout.shards}
    files[MANIFEST_NAME] = manifest_bytes(layout)
    for i, size in enumerate(small_files):
        files[f"<small {i}>"] = size
    if extra_bytes:
        files["<small files>"] = extra_bytes
    return files


def check_disk_space(staging: Path, layout: OutputLayout, extra_bytes: int = 0, small_files: Sequence[int] = ()) -> None:
    """Fail before any work when the staging folder's filesystem cannot hold the output: its
    shards (headers included), the resume manifest and the small files (`small_files`, one size
    each; `extra_bytes`, a total counted as one file), each rounded up to filesystem blocks. Space
    already allocated to a shard of an existing staging folder counts as available. `_reserve`
    stays the second line of defence (another writer may take the space between this check and
    the allocation)."""
    staging = Path(staging)
    needed = space_needed(staging, output_files(layout, small_files, extra_bytes))
    free = free_bytes(staging)
    if needed > free:
        raise DiskSpaceError(
            f"not enough disk space for the output: its {len(layout.shards)} shard(s) and small files need "
            f"{human_bytes(needed)} in the staging folder {staging}, whose filesystem has {human_bytes(free)} free "
            f"({human_bytes(needed - free)} missing)",
            needed - free,
        )


def _reserve(fd: int, size: int, path: Path) -> None:
    """Allocate the shard's blocks now: a full disk fails here, before any work, and workers'
    writes then only fill blocks. Filesystems without fallocate (some network ones) skip it."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            free = free_bytes(path)
            missing = f", {human_bytes(size - free)} missing" if size > free else ""
            raise DiskSpaceError(f"not enough disk space for {path} ({size} bytes): {human_bytes(free)} free{missing}",
                                 max(size - free, 0)) from None
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


def _write_durably(path: Path, text: str) -> None:
    """Write `path` whole or not at all: a temporary file, fsynced, renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


class ShardFileWriter:
    """Writes tensors into pre-allocated shard files of a staging folder (one per worker).

    The shards already allocated are opened at once, so a worker of an interrupted merge that
    is still winding down keeps writing into those files: if the next merge discards the
    folder, into unlinked ones, never into the next merge's shards."""

    def __init__(self, staging: str | os.PathLike):
        self.staging = Path(staging)
        self._fds: dict[str, int] = {}
        for path in sorted(self.staging.glob("*.safetensors")):
            self._fds[path.name] = os.open(path, os.O_WRONLY)

    def write(self, filename: str, entry: TensorEntry, tensor: torch.Tensor, rows: Optional[tuple[int, int]] = None) -> int:
        """Write `tensor` as the tensor `entry` of `filename`, or as its rows [start, stop) when
        `rows` is given (a part of a row-split operator). Returns the bytes written."""
        data = tensor_bytes(tensor.cpu())
        expected, offset = entry.nbytes, entry.begin
        if rows is not None:
            start, stop = rows
            expected, offset = (stop - start) * entry.row_bytes, entry.begin + start * entry.row_bytes
        if len(data) != expected:
            part = "" if rows is None else f" rows {rows[0]}:{rows[1]}"
            raise ValueError(
                f"tensor {entry.name!r}{part}: {len(data)} bytes computed but the layout expects {expected} "
                f"(shape {list(tensor.shape)} {tensor.dtype} vs {list(entry.shape)} {entry.dtype})"
            )
        fd = self._fds.get(filename)
        if fd is None:
            fd = self._fds[filename] = os.open(self.staging / filename, os.O_WRONLY)
        return pwrite_all(fd, data, offset)

    def close(self) -> None:
        """Close the shard files. No fsync here: a shard is fsynced where it is finished (hashed
        for the resume manifest, or uploaded) and every staged file again when it is published."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
