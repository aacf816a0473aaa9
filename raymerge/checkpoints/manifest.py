"""The resume manifest: which shards of a staging folder are finished, with their checksums.

A merge's staging folder (`writer.StagedOutput.staging`) holds one file besides the shards,
`.raymerge-manifest.jsonl`, one JSON object per line:

    {"raymerge_manifest": 1, "job": "<sha256 hex>", "shards": {"model-00001-of-00002.safetensors": 1234, ...},
     "inputs": {"/models/a/model.safetensors": [size, mtime_ns, ctime_ns, "<header sha256>"], ...}}
    {"shard": "model-00001-of-00002.safetensors", "size": 1234, "sha256": "<hex>"}
    ...

The first line names the job (`runtime.recovery.job_identity`: a hash of everything that decides
the output bytes), the shard layout (file name -> size) and each input file's fingerprint
(`runtime.recovery.input_fingerprint`; the job hash covers them too, this copy only lets a
resume name the input that changed). It is written once, to a temporary
file that is fsynced and renamed into place, so a manifest either has it or does not exist.
Each further line records a shard whose every tensor is written: its size and the sha256 of
its bytes, appended with one `write` and fsynced (after the shard itself was fsynced). A line
torn by a crash mid-append does not parse and is ignored, as is a record for a shard the
layout does not have; the last record of a shard wins. Records are claims, not proof: a resumed
run re-hashes each recorded shard and trusts only those whose bytes still match.

The manifest is moved out of the staging folder just before it is published
(`writer.StagedOutput.publish`), so it never reaches the output, and back if that publish is
interrupted (`writer.StagedOutput.recover`), so an interrupted publish loses no finished shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

MANIFEST_NAME = ".raymerge-manifest.jsonl"
FORMAT = 1
_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class ShardRecord:
    filename: str
    size: int
    sha256: str

    def line(self) -> str:
        return json.dumps({"shard": self.filename, "size": self.size, "sha256": self.sha256}) + "\n"


@dataclass
class ManifestState:
    """What a manifest file says: its job, its layout and the shards recorded as finished."""

    job: str
    shards: dict[str, int]  # the layout: file name -> size in bytes
    finished: dict[str, ShardRecord] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)  # input file -> fingerprint (may be empty)


def file_sha256(path: str | os.PathLike, *, fsync: bool = False) -> str:
    """The sha256 of a file's bytes; `fsync` first makes them durable (written by other processes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if fsync:
            os.fsync(f.fileno())
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            digest.update(view[:n])
    return digest.hexdigest()


def fsync_dir(folder: Path) -> None:
    """fsync a folder (so a rename or new file in it survives a crash); a no-op where impossible."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def load_manifest(staging: str | os.PathLike) -> Optional[ManifestState]:
    """The manifest of a staging folder, or None when there is none or its first line is unreadable."""
    path = Path(staging) / MANIFEST_NAME
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    try:
        head = json.loads(lines[0])
        if head.get("raymerge_manifest") != FORMAT:
            return None
        state = ManifestState(str(head["job"]), {str(k): int(v) for k, v in head["shards"].items()},
                              inputs=dict(head.get("inputs") or {}))
    except (IndexError, ValueError, KeyError, TypeError, AttributeError):
        return None
    for text in lines[1:]:
        try:
            rec = json.loads(text)
            record = ShardRecord(str(rec["shard"]), int(rec["size"]), str(rec["sha256"]))
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by a crash
        if state.shards.get(record.filename) == record.size:
            state.finished[record.filename] = record
    return state


class Manifest:
    """An open manifest that finished shards are appended to (thread-safe)."""

    def __init__(self, staging: str | os.PathLike):
        self.path = Path(staging) / MANIFEST_NAME
        self._lock = threading.Lock()

    @classmethod
    def create(cls, staging: str | os.PathLike, job: str, shards: dict[str, int], records: Iterable[ShardRecord] = (),
               inputs: Optional[Mapping[str, Any]] = None) -> "Manifest":
        """Write a new manifest (replacing any) for `job`, its layout and its input files'
        fingerprints, with `records` already in it."""
        manifest = cls(staging)
        head = {"raymerge_manifest": FORMAT, "job": job, "shards": shards, "inputs": dict(inputs or {})}
        text = json.dumps(head) + "\n"
        text += "".join(r.line() for r in records)
        tmp = manifest.path.with_name(MANIFEST_NAME + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, manifest.path)
        fsync_dir(manifest.path.parent)
        return manifest

    def record(self, record: ShardRecord) -> None:
        """Append one finished shard (one write, then fsync)."""
        data = record.line().encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)

    def discard(self) -> None:
        """Remove the manifest (before the staging folder is published)."""
        with self._lock:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
