"""Resuming a merge: job identity, reusing a staging folder, recording finished shards.

Job identity. `job_identity` hashes everything that decides the output bytes: the raymerge
version, the config as normalised YAML, every operator as resolved (inputs, method, parameters,
seeds, dtypes, shapes), the output layout (each shard's name, header and size: so the shard
size and output dtypes), and each input's fingerprint (`input_fingerprint`: its tensor headers,
and per weight file its size, mtime_ns, ctime_ns and the sha256 of its header bytes — or the
ETag of an S3 object). The manifest also records the fingerprints per input file, so a resume
that finds an input changed names it: a finished shard is reused only if every input file it
may have come from is unchanged (one rule for all shards: any change invalidates the manifest).

Before a merge starts anything (`find_resumable`), the staging folder beside the output is looked
at, and then set up (`prepare_staging`):

- its manifest (`checkpoints.manifest`) names the same job: the merge resumes. Each shard the
  manifest records as finished is hashed again; those whose bytes still match are kept as they
  are, the others (a corrupt or partial shard) are allocated anew and redone;
- no staging folder, no readable manifest, or another job: the folder is wiped and the merge
  starts afresh (a warning says so when something was there).

`resume=None` (the default: CLI without a flag) does exactly that, automatically. `resume=True`
(`--resume`) is stricter: a staging folder from another job is an error instead of being
wiped. `resume=False` (`--no-resume`) always starts afresh.

While the merge runs, `ShardTracker` counts the parts still to run per shard; when the last
one reports done, a background thread fsyncs the shard, hashes it and appends its record to
the manifest. Workers fill shards one after another (`executor.work_items`), so records come
in steadily rather than all at the end. The shards the very last batch finished are not recorded at
all (the publish follows at once and fsyncs every file), and a local output is published
without waiting for shards still queued for hashing (a crash in those last seconds costs only
them);
an S3 output waits for every record first, as its upload takes a while. Only operators of
unfinished shards are planned and run; their bytes are written at the same offsets as in any
run, so a resumed output is byte-identical to an uninterrupted one. A merge that fails with a deterministic error (a bad parameter found by a worker) still
removes its staging folder; an interruption (Ctrl-C, a killed driver, workers that keep dying:
`keeps_staging`) leaves it for the next run. Nothing is at the output path until the staging
folder is published; the manifest is moved aside just before, and back if the publish is
interrupted (`checkpoints.writer.StagedOutput.recover`, run under the output lock).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import shutil
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from raymerge.checkpoints import CheckpointSource, OutputError, OutputLayout
from raymerge.checkpoints.writer import DiskSpaceError
from raymerge.checkpoints.manifest import MANIFEST_NAME, Manifest, ManifestState, ShardRecord, file_sha256, load_manifest

log = logging.getLogger("raymerge")
HASH_THREADS = 4  # shards hashed at once on the driver (hashlib and file reads release the GIL)


def input_fingerprint(src: CheckpointSource) -> dict[str, Any]:
    """What identifies an input's weights: its tensor headers and, per weight file, its size,
    mtime_ns, ctime_ns and the sha256 of its safetensors header bytes (local files), or its ETag
    (S3 objects, as seen when the headers were read). Rewriting a tensor in place and then
    restoring the mtime (`os.utime`) still changes the ctime, which only the kernel sets; a header
    rewritten to the same size and times changes the hash. Tensor bytes are not hashed (a full
    read of every input): a change that keeps size, header, mtime and ctime goes unseen."""
    parts = getattr(src, "fingerprint_sources", None)
    if parts is not None:  # a model read through a LoRA adapter: the base's files and the adapter's
        (base,) = parts()
        inner = input_fingerprint(base)
        files = {f"model/{f}": v for f, v in inner["files"].items()}
        files.update({f"adapter/{p.name}": _file_fingerprint(p) for p in src.adapter_files()})
        return {"location": src.location, "headers": inner.get("headers"), "files": files}
    infos = src.tensors()
    headers = hashlib.sha256()
    for name in sorted(infos):
        t = infos[name]
        headers.update(f"{name}|{list(t.shape)}|{t.dtype}|{t.file}|{t.nbytes}\n".encode())
    etags = getattr(src, "_etags", None) or {}
    files: dict[str, Any] = {}
    for f in sorted({t.file for t in infos.values()}):
        try:
            path = Path(src.location) / f
            st = path.stat()
            files[f] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, _header_sha256(path)]
        except (OSError, ValueError):
            files[f] = etags.get(f)
    return {"location": src.location, "headers": headers.hexdigest(), "files": files}


def _file_fingerprint(path: Path) -> Any:
    try:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, _header_sha256(path)]
    except (OSError, ValueError):
        return None


def _header_sha256(path: Path) -> Optional[str]:
    """The sha256 of a .safetensors file's header (its 8-byte length and the JSON); None for others."""
    if path.suffix != ".safetensors":
        return None
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        return hashlib.sha256(head + f.read(min(n, 100 * 1024 * 1024))).hexdigest()


def input_files(inputs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Fingerprints (`input_fingerprint`) flattened to one entry per input file: 'location/file' -> fingerprint."""
    flat: dict[str, Any] = {}
    for fp in inputs:
        for f, value in (fp.get("files") or {}).items():
            flat[f"{str(fp.get('location', '')).rstrip('/')}/{f}"] = value
    return flat


def changed_input(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> Optional[str]:
    """The first input file whose fingerprint differs between a manifest and this run (or that
    only one of them has), or None."""
    for name in sorted(set(recorded) | set(current)):
        if json.dumps(recorded.get(name)) != json.dumps(current.get(name)):
            return name
    return None


def _canonical(value: Any) -> Any:
    """`value` as JSON-able data that is the same in every process (sets sorted, tensors hashed)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_canonical(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, float):
        return repr(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous().reshape(-1)
        return [str(t.dtype), list(t.shape), hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()]
    return repr(value)


def job_identity(config_yaml: str, operators: Sequence[Any], layout: OutputLayout, inputs: Sequence[Any], version: str) -> str:
    """The hash naming a merge job (module docstring)."""
    ops = hashlib.sha256()
    for op in operators:
        ops.update(json.dumps(_canonical(op), sort_keys=True).encode() + b"\n")
    shards = [[s.filename, hashlib.sha256(s.header).hexdigest(), s.size] for s in layout.shards]
    data = {"raymerge": version, "config": config_yaml, "operators": ops.hexdigest(), "shards": shards, "inputs": list(inputs)}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class ResumeState:
    """What `prepare_staging` found and kept."""

    manifest: Manifest
    finished: dict[str, ShardRecord] = field(default_factory=dict)  # shards kept from an earlier run
    redone: list[str] = field(default_factory=list)  # recorded as finished, but failed the checksum
    resumed: bool = False  # the staging folder was from this job

    def reused_tensors(self, layout: OutputLayout) -> int:
        return sum(len(s.entries) for s in layout.shards if s.filename in self.finished)

    def summary(self, layout: OutputLayout) -> str:
        """One line for the merge summary ('' for a fresh start)."""
        if not self.resumed:
            return ""
        line = (f"resumed: reused {len(self.finished)} of {len(layout.shards)} shard(s) "
                f"({self.reused_tensors(layout)} tensors) from an interrupted run")
        if self.redone:
            line += f"; {len(self.redone)} recorded shard(s) failed the checksum and were redone ({', '.join(self.redone)})"
        return line


def find_resumable(staged, layout: OutputLayout, job: str, resume: Optional[bool],
                   inputs: Optional[Mapping[str, Any]] = None) -> Optional[ManifestState]:
    """The manifest of `staged`'s staging folder when the merge can resume from it (same job),
    else None; says why when a folder there will be wiped (naming the input file that changed,
    when the manifest and `inputs` (`input_files`) tell), and with `resume=True` refuses to wipe
    one from another job (OutputError). An S3 output with no manifest here resumes from the
    shards an interrupted run of the same job uploaded (`S3StagedOutput.finished_in_bucket`: a
    rerun from another driver node), and refuses another job's (OutputError). Changes nothing
    on disk."""
    staging = Path(staged.staging)
    sizes = {s.filename: s.size for s in layout.shards}
    in_bucket = getattr(staged, "finished_in_bucket", None)  # an S3 output: shards an interrupted run uploaded
    uploaded = in_bucket(job, sizes) if in_bucket is not None else []  # (refuses another job's)
    if resume is False:
        return None
    found = load_manifest(staging) if staging.is_dir() else None
    if found is None and uploaded:
        # No staging folder of that run here (a rerun from another driver node): the bucket has
        # its finished shards, each with the job and sha256 in its metadata.
        log.warning("raymerge: resuming from the %d shard(s) an interrupted run of this merge uploaded to %s",
                    len(uploaded), staged.output)
        return ManifestState(job, sizes, {name: ShardRecord(name, size, sha) for name, size, sha in uploaded})
    if not staging.exists():
        if resume:
            log.warning("raymerge: nothing to resume at %s; starting afresh", staging)
        return None
    if found is not None and found.job == job and found.shards == sizes:
        return found
    changed = changed_input(found.inputs, inputs) if found is not None and found.inputs and inputs else None
    if changed is not None:
        reason = f"was made from other input bytes ({changed} changed since: size, times or header)"
    else:
        reason = "was made by a different merge (config, inputs, raymerge version or shard size changed)"
    if found is not None and resume:
        raise OutputError(
            f"cannot resume: the staging folder {staging} {reason}; rerun with --no-resume (resume=False) to discard it"
        )
    why = reason if found is not None else "has no readable manifest"
    log.warning("raymerge: staging folder %s %s; discarding it and starting afresh", staging, why)
    return None


def prepare_staging(staged, layout: OutputLayout, job: str, found: Optional[ManifestState],
                    inputs: Optional[Mapping[str, Any]] = None) -> ResumeState:
    """Set up the staging folder of `staged`: resumed from `found` (`find_resumable`) — only the
    recorded shards whose bytes still match are kept — or afresh; returns what was kept, with
    the manifest (recording `inputs`, `input_files`) open for recording."""
    staging = Path(staged.staging)
    shards = {s.filename: s.size for s in layout.shards}
    if found is None:
        staged.prepare(layout)
        return ResumeState(Manifest.create(staging, job, shards, inputs=inputs))
    staging.mkdir(parents=True, exist_ok=True)  # resumed from the bucket: this node had no folder
    finished: dict[str, ShardRecord] = {}
    redone: list[str] = []
    verify_uploaded = getattr(staged, "verify_finished", None)  # an S3 output: finished shards are in the bucket
    for name, record in sorted(found.finished.items()):
        path = staging / name
        try:
            if verify_uploaded is not None:
                ok = verify_uploaded(name, record.size, record.sha256)
            else:
                ok = path.stat().st_size == record.size and file_sha256(path) == record.sha256
        except OSError:
            ok = False
        if ok:
            finished[name] = record
        else:
            redone.append(name)
    for path in staging.iterdir():  # anything else an interrupted run left (e.g. config.json) goes
        if path.name not in finished and path.name != MANIFEST_NAME:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if finished:
        staged.prepare(layout, keep=set(finished))
    else:
        staged.prepare(layout)
    return ResumeState(Manifest.create(staging, job, shards, finished.values(), inputs=inputs), finished, redone, resumed=True)


def remaining_operators(operators: Sequence[Any], layout: OutputLayout, finished) -> list[Any]:
    """The operators whose output tensor lies in a shard not finished yet."""
    return [op for op in operators if layout.shards[layout.shard_of[op.name]].filename not in finished]


class ShardTracker:
    """Records each shard in the manifest once all its parts are done (hashing in a thread)."""

    def __init__(self, manifest: Manifest, staging: Path, layout: OutputLayout, queues: Sequence[Sequence[Any]],
                 seal: Optional[Any] = None):
        """`seal(name) -> sha256`, when given, finishes a shard where it was written (an S3
        output: a worker on the shard's node hashes and uploads it, `checkpoints.s3.seal_shard`)
        instead of hashing the driver's copy: nothing assumes the driver sees the workers' disks."""
        self.seal = seal
        self.manifest = manifest
        self.staging = Path(staging)
        self.sizes = {s.filename: s.size for s in layout.shards}
        self.left = Counter(item.target.filename for q in queues for item in q)
        self._threads = ThreadPoolExecutor(max_workers=HASH_THREADS, thread_name_prefix="raymerge-checksum")
        self._futures: list[Future] = []

    def done(self, batch: Sequence[Any]) -> None:
        """Parts of `batch` are written; shards with no part left get hashed and recorded. Not
        the local shards finished by the very last batch: the output is published next, and the
        publish fsyncs them (a record would only delay it by an fsync and a hash)."""
        finished = []
        for item in batch:
            name = item.target.filename
            self.left[name] -= 1
            if self.left[name] == 0:
                finished.append(name)
        if self.seal is None and not any(self.left.values()):
            return
        for name in finished:
            self._futures.append(self._threads.submit(self._record, name))

    def _record(self, name: str) -> None:
        digest = self.seal(name) if self.seal is not None else file_sha256(self.staging / name, fsync=True)
        self.manifest.record(ShardRecord(name, self.sizes[name], digest))

    def close(self, wait: bool = True) -> None:
        """`wait`: record every finished shard (errors raise); else only the ones being hashed."""
        self._threads.shutdown(wait=True, cancel_futures=not wait)
        if wait:
            for f in self._futures:
                f.result()


def is_disk_full(err: BaseException) -> bool:
    """`err` (or the error a Ray task error wraps) is a full disk: ENOSPC or EDQUOT, or our `DiskSpaceError`."""
    err = getattr(err, "cause", None) or err
    return isinstance(err, DiskSpaceError) or (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT))


def keeps_staging(err: BaseException) -> bool:
    """Whether a merge ended by `err` leaves its staging folder for a resume: interruptions,
    lost workers, a full disk and a closed output pipe do, errors that a rerun would meet again
    do not."""
    from raymerge.runtime.executor import WorkerLostError

    if isinstance(err, (KeyboardInterrupt, SystemExit, WorkerLostError, BrokenPipeError)) or is_disk_full(err):
        return True
    try:
        from ray.exceptions import RayActorError
    except ImportError:  # pragma: no cover - Ray is a dependency
        return False
    return isinstance(err, RayActorError)
