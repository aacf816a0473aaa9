"""Hugging Face Hub repositories as sources: headers over HTTP, shards fetched lazily, one commit.

A Hub model reference (`org/name`, optionally `@revision`) is read without snapshotting it:

- **Pinning.** The driver resolves the revision (a branch, a tag, or nothing: `main`) to a commit
  sha once (`pin_hub_reference`: `HfApi.model_info(...).sha`) and puts the sha and the Hub
  endpoint it used in the `SourceSpec` (`resolve.SourceSpec.pinned`). Every process of the job
  opens that commit, so a push to `main` in the middle of a merge changes nothing: the driver's
  checks and every worker's reads see the same files. The endpoint travels in the spec (as the
  S3 endpoint does) because workers on other nodes may not share the driver's environment; the
  token never does (each process uses its own `HF_TOKEN` / cached login).
- **Headers, not weights, on the driver.** Opening lists the repo's files (`model_info`), fetches
  the small files it needs with `hf_hub_download` (the index; `config.json` and tokenizer files
  when asked for) and, when `tensors()` is first called, reads every shard's safetensors header
  with `HfApi.parse_safetensors_file_metadata` (HTTP range requests: the first 100 KB, and the
  rest of the header only when it is longer). Those entries go through the same checks as a local
  header (`safetensors_format.parse_header`), so plans, shape checks and bad inputs are decided
  before any weights are downloaded. A shard already in this machine's HF cache at that commit is
  read from the cache instead.
- **Lazy shards on workers.** `read(name)` downloads the one shard file holding `name`
  (`hf_hub_download(repo, shard, revision=sha)`, into this process's HF cache: each node
  downloads a shard at most once, whatever the number of workers on it, since the cache is
  shared and locked by `huggingface_hub`) on the first read of a tensor in it, then maps the
  tensor's bytes from the cached file exactly as `LocalSource` does. A worker whose operators
  only touch some layers never fetches the other shards.
- **The model-folder boundary.** Every file used must resolve, after symlinks, inside this
  repository's cache folder (`models--org--name/`: `snapshots/<sha>/` and `blobs/`); shard names
  from the index must be plain relative names listed in the repo at that commit. Anything else
  is refused before it is requested, as for local folders (`local.inside`).

Pickled checkpoints (`pytorch_model*.bin`, with `allow_pickle`) cannot be listed from headers:
they are downloaded whole at the pinned commit (`snapshot_download`) and read as a local folder.
"""

from __future__ import annotations

import json
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Optional


from raymerge.checkpoints.local import (
    BIN_INDEX, BIN_SINGLE, SAFE_INDEX, SAFE_SINGLE, LocalSource, _map_range, check_relative_name, inside,
    parse_weight_map, read_safetensors_header,
)
from raymerge.checkpoints.safetensors_format import HeaderError, TensorEntry, parse_header, tensor_from_bytes
from raymerge.checkpoints.source import CheckpointError, CheckpointSource, TensorInfo, row_span

if TYPE_CHECKING:
    import torch

_SHA = re.compile(r"^[0-9a-f]{40}$")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
HEADER_THREADS = 8  # shard headers are read in parallel (a 70B model has ~30 shards)


def _failed(what: str, err: BaseException) -> CheckpointError:
    return CheckpointError(f"{what}: {type(err).__name__}: {err}")


def default_endpoint() -> str:
    """The Hub endpoint of this process (`HF_ENDPOINT`, read by huggingface_hub at import)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def pin_hub_reference(repo_id: str, revision: Optional[str], endpoint: Optional[str] = None,
                      what: str = "model path") -> tuple[str, str]:
    """(commit sha, endpoint) of `repo_id` at `revision` (None: `main`), resolved once on the driver.
    A full sha is returned as given (no request); CheckpointError naming the repo (as `what`: a
    model path, a LoRA adapter) when the Hub cannot be asked or has no such repo/revision."""
    endpoint = endpoint or default_endpoint()
    if revision is not None and _SHA.match(revision):
        return revision, endpoint
    try:
        from huggingface_hub import HfApi

        sha = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision).sha
    except Exception as err:  # noqa: BLE001 - hub errors come in many types; we report them all
        raise _failed(
            f"{what} not found: {repo_id} is not a local directory, and resolving it on the "
            f"Hugging Face Hub ({endpoint}) failed", err) from None
    if not isinstance(sha, str) or not _SHA.match(sha):
        raise CheckpointError(f"{repo_id}@{revision or 'main'}: the Hub returned no commit sha ({sha!r})")
    return sha, endpoint


def open_hub(repo_id: str, revision: Optional[str], *, endpoint: Optional[str] = None,
             allow_pickle: bool = False) -> CheckpointSource:
    """The source of a Hub repo: a `HubSource` (safetensors), or, for pickled weights with
    `allow_pickle`, a `LocalSource` over a snapshot of the pinned commit."""
    source = HubSource(repo_id, revision, endpoint=endpoint)
    if source.has_safetensors:
        return source
    source.close()
    if not source.has_pickles:
        raise CheckpointError(f"{source.location}: no weights found (expected {SAFE_SINGLE} or {SAFE_INDEX})")
    if not allow_pickle:
        raise CheckpointError(
            f"{source.location}: only pytorch_model*.bin weights found; pickled checkpoints can "
            "run code when loaded, so they are read only with --allow-pickle "
            "(loaded with torch.load(weights_only=True))"
        )
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, revision=source.commit, endpoint=source.endpoint,
                                   allow_patterns=HUB_PATTERNS + ["*.bin"])
    except Exception as err:  # noqa: BLE001
        raise _failed(f"{source.location}: downloading the pickled checkpoint failed", err) from None
    return LocalSource(folder, allow_pickle=True)


class _Shard:
    """One downloaded shard: its open file and its (local, authoritative) header."""

    def __init__(self, path: Path, fd: int, entries: dict[str, TensorEntry]):
        self.path, self.fd, self.entries = path, fd, entries


class HubSource(CheckpointSource):
    """A safetensors model repo on the Hub at one commit (see the module docstring)."""

    def __init__(self, repo_id: str, revision: Optional[str] = None, *, endpoint: Optional[str] = None,
                 cache_dir: Optional[str] = None):
        from huggingface_hub import HfApi

        self.repo_id = repo_id
        self.endpoint = endpoint or default_endpoint()
        self.cache_dir = cache_dir
        self._api = HfApi(endpoint=self.endpoint)
        try:
            info = self._api.model_info(repo_id, revision=revision)
        except Exception as err:  # noqa: BLE001
            raise _failed(
                f"model path not found: {repo_id} is not a local directory, and reading it from the "
                f"Hugging Face Hub ({self.endpoint}) failed", err) from None
        if not isinstance(info.sha, str) or not _SHA.match(info.sha):
            raise CheckpointError(f"{repo_id}@{revision or 'main'}: the Hub returned no commit sha ({info.sha!r})")
        if revision is not None and _SHA.match(revision) and info.sha != revision:
            raise CheckpointError(f"{repo_id}@{revision}: the Hub answered for commit {info.sha} instead; refused")
        self.commit: str = info.sha
        self.location = f"{repo_id}@{self.commit}"
        self.files = frozenset(s.rfilename for s in (info.siblings or []))
        self._lock = threading.Lock()
        self._shards: dict[str, _Shard] = {}
        self._listing: Optional[dict[str, TensorInfo]] = None
        self._bytes_read = 0
        self.has_pickles = BIN_INDEX in self.files or BIN_SINGLE in self.files
        self.weight_map: Optional[dict[str, str]] = None
        if SAFE_INDEX in self.files:
            where = self.file_label(SAFE_INDEX)
            self.weight_map = parse_weight_map(self._fetch(SAFE_INDEX, "index").read_bytes(), where)
            for shard in sorted(set(self.weight_map.values())):
                check_relative_name(shard, where, f"shard listed in {SAFE_INDEX}")
                if shard not in self.files:
                    raise CheckpointError(f"{self.file_label(shard)}: shard listed in {SAFE_INDEX} is missing")
            self.shard_files = sorted(set(self.weight_map.values()))
        elif SAFE_SINGLE in self.files:
            self.shard_files = [SAFE_SINGLE]
        else:
            self.shard_files = []
        self.has_safetensors = bool(self.shard_files)

    # -- files -----------------------------------------------------------------------------------
    def _fetch(self, filename: str, what: str) -> Path:
        """The cached path of `filename` at the pinned commit (downloaded when not cached yet),
        refused unless it resolves inside this repository's cache folder."""
        from huggingface_hub import hf_hub_download

        check_relative_name(filename, self.location, what)
        try:
            got = Path(hf_hub_download(self.repo_id, filename, revision=self.commit, endpoint=self.endpoint,
                                       cache_dir=self.cache_dir))
        except Exception as err:  # noqa: BLE001
            raise _failed(f"{self.file_label(filename)}: download failed", err) from None
        return self._checked(got, filename, what)

    def _checked(self, got: Path, filename: str, what: str) -> Path:
        root = got.parents[len(PurePosixPath(filename).parts) - 1]  # .../snapshots/<sha>
        if root.name != self.commit or root.parent.name != "snapshots":
            raise CheckpointError(f"{self.location}: {what} {filename!r} was not cached under snapshots/{self.commit}; refused")
        return inside(root, filename, what)

    def _cached(self, filename: str) -> Optional[Path]:
        """The cached path of `filename` at the pinned commit, or None (nothing is requested)."""
        from huggingface_hub import try_to_load_from_cache

        got = try_to_load_from_cache(self.repo_id, filename, cache_dir=self.cache_dir, revision=self.commit)
        if not isinstance(got, str):
            return None
        return self._checked(Path(got), filename, "weights file")

    # -- headers -----------------------------------------------------------------------------------
    def _header(self, shard: str) -> dict[str, TensorEntry]:
        """The entries of one shard's header: from the cache when the shard is there, else from
        ranged GETs. Offsets are only meaningful for a cached file (they are not used otherwise)."""
        where = self.file_label(shard)
        cached = self._cached(shard)
        if cached is not None:
            return read_safetensors_header(cached)
        try:
            meta = self._api.parse_safetensors_file_metadata(self.repo_id, shard, revision=self.commit)
        except Exception as err:  # noqa: BLE001
            raise _failed(f"{where}: cannot read the safetensors header", err) from None
        raw: dict[str, Any] = {name: {"dtype": t.dtype, "shape": t.shape, "data_offsets": list(t.data_offsets)}
                               for name, t in meta.tensors.items()}
        if meta.metadata:
            raw["__metadata__"] = meta.metadata
        try:  # the same checks as a local header (dtypes, shapes, offsets, overlaps)
            entries, _ = parse_header(json.dumps(raw).encode(), where)
        except HeaderError as err:
            raise CheckpointError(str(err)) from None
        return entries

    def tensors(self) -> dict[str, TensorInfo]:
        if self._listing is None:
            with ThreadPoolExecutor(max_workers=min(HEADER_THREADS, len(self.shard_files))) as pool:
                headers = list(pool.map(self._header, self.shard_files))
            listing: dict[str, TensorInfo] = {}
            for shard, entries in zip(self.shard_files, headers):
                for name, e in entries.items():
                    if self.weight_map is not None and self.weight_map.get(name) != shard:
                        continue  # the index is authoritative about which shard holds a tensor
                    listing[name] = TensorInfo(name, e.shape, e.dtype, shard, e.nbytes)
            if self.weight_map is not None:
                missing = [n for n in self.weight_map if n not in listing]
                if missing:
                    raise CheckpointError(
                        f"{self.file_label(SAFE_INDEX)}: tensor {missing[0]!r} is listed in shard "
                        f"{self.weight_map[missing[0]]} but that shard does not contain it"
                    )
            self._listing = listing
        return dict(self._listing)

    # -- reading -----------------------------------------------------------------------------------
    def _shard_of(self, name: str) -> str:
        shard = self.weight_map.get(name) if self.weight_map is not None else SAFE_SINGLE
        if shard is None or (self._listing is not None and name not in self._listing):
            raise CheckpointError(f"{self.location}: no tensor {name!r}")
        return shard

    def _open_shard(self, shard: str) -> _Shard:
        with self._lock:
            if shard not in self._shards:
                path = self._fetch(shard, f"shard listed in {SAFE_INDEX}" if self.weight_map is not None else "weights file")
                entries = read_safetensors_header(path)  # the downloaded file's own header decides offsets
                fd = os.open(path, os.O_RDONLY)
                self._shards[shard] = _Shard(path, fd, entries)
            return self._shards[shard]

    def read(self, name: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        shard = self._shard_of(name)
        opened = self._open_shard(shard)
        entry = opened.entries.get(name)
        listed = self._listing.get(name) if self._listing is not None else None
        if entry is None or (listed is not None and (listed.shape, listed.code) != (entry.shape, entry.dtype)):
            raise CheckpointError(f"{self.file_label(shard)}: tensor {name!r} is not in the downloaded file as its header listed it")
        begin, end, shape = entry.begin, entry.end, entry.shape
        if rows is not None:
            first, past, shape = row_span(shape, rows, entry.row_bytes, self.file_label(shard), name)
            begin, end = entry.begin + first, entry.begin + past
        if end > begin and os.fstat(opened.fd).st_size < end:  # a mapping past the end would SIGBUS
            raise CheckpointError(f"{opened.path}: truncated while reading tensor {name!r}")
        self._bytes_read += end - begin
        return tensor_from_bytes(_map_range(opened.fd, begin, end), entry.dtype, shape)

    def read_bytes(self, filename: str) -> Optional[bytes]:
        check_relative_name(filename, self.location, "file")
        if filename not in self.files:
            return None
        return self._fetch(filename, "file").read_bytes()

    def downloaded_shards(self) -> list[str]:
        """The shard files this source has fetched (or found cached) so far, for accounting."""
        with self._lock:
            return sorted(self._shards)

    def bytes_read(self) -> int:
        return self._bytes_read

    def close(self) -> None:
        with self._lock:
            for shard in self._shards.values():
                os.close(shard.fd)
            self._shards.clear()
