"""Local Hugging Face model directories: sharded or single safetensors, and opt-in .bin files.

Layout understood: `model.safetensors`, or shards listed in `model.safetensors.index.json`
(`weight_map`), plus `config.json` and tokenizer files. Headers are parsed on open (a few KB per
shard); a read maps exactly the pages of that tensor (or row range) copy-on-write, and the
mapping goes away with the tensor, so resident memory stays bounded by what a worker holds, not
by file sizes, and reading from the page cache costs no copy (about 3x faster than `pread` into
a buffer). Callers may modify the tensor: writes stay private to the process.

`pytorch_model*.bin` checkpoints are pickles; they are read only when the caller opts in
(`allow_pickle=True`), always with `torch.load(weights_only=True, mmap=True)`.
"""

from __future__ import annotations

import json
import mmap
import os
import threading
from pathlib import Path
from typing import Optional

import torch

from raymerge.checkpoints.safetensors_format import HeaderError, TensorEntry, header_length, parse_header, tensor_from_bytes
from raymerge.checkpoints.source import CheckpointError, CheckpointSource, TensorInfo, row_span

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Parse the header of one local safetensors file; raise CheckpointError naming the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = header_length(f.read(8), str(path), size)
            entries, _ = parse_header(f.read(n), str(path), size)
    except HeaderError as err:
        raise CheckpointError(str(err)) from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror})") from None
    return entries


def _load_weight_map(index_path: Path) -> dict[str, str]:
    try:
        data = index_path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{index_path}: unreadable index ({err})") from None
    return parse_weight_map(data, str(index_path))


def parse_weight_map(data: bytes, where: str) -> dict[str, str]:
    """Tensor name -> shard file, from the bytes of a `model.safetensors.index.json`."""
    try:
        weight_map = json.loads(data)["weight_map"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{where}: unreadable index ({err})") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{where}: 'weight_map' is not a mapping")
    return {str(k): str(v) for k, v in weight_map.items()}


def _map_range(fd: int, begin: int, end: int) -> memoryview:
    """Bytes [begin, end) of an open file, mapped copy-on-write (empty view for an empty range)."""
    if end <= begin:
        return memoryview(b"")
    start = begin - begin % mmap.ALLOCATIONGRANULARITY
    mapped = mmap.mmap(fd, end - start, offset=start, access=mmap.ACCESS_COPY)
    return memoryview(mapped)[begin - start : end - start]


class LocalSource(CheckpointSource):
    """A Hugging Face model directory on a local (or shared) filesystem."""

    def __init__(self, path: str | os.PathLike, *, allow_pickle: bool = False):
        self.root = Path(path)
        self.location = str(self.root)
        if not self.root.is_dir():
            raise CheckpointError(f"model path not found: {self.root}")
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._bytes_read = 0
        self._pickle_cache: dict[str, dict[str, torch.Tensor]] = {}
        self._entries: dict[str, tuple[str, TensorEntry]] = {}
        self._pickled: dict[str, str] = {}
        if (self.root / SAFE_INDEX).is_file():
            weight_map = _load_weight_map(self.root / SAFE_INDEX)
            self._load_safetensors(sorted(set(weight_map.values())), weight_map)
        elif (self.root / SAFE_SINGLE).is_file():
            self._load_safetensors([SAFE_SINGLE], None)
        elif (self.root / BIN_INDEX).is_file() or (self.root / BIN_SINGLE).is_file():
            if not allow_pickle:
                raise CheckpointError(
                    f"{self.root}: only pytorch_model*.bin weights found; pickled checkpoints can "
                    "run code when loaded, so they are read only with --allow-pickle "
                    "(loaded with torch.load(weights_only=True))"
                )
            self._load_pickles()
        else:
            raise CheckpointError(
                f"{self.root}: no weights found (expected {SAFE_SINGLE} or {SAFE_INDEX})"
            )

    # -- opening -----------------------------------------------------------------------------
    def _load_safetensors(self, files: list[str], weight_map: Optional[dict[str, str]]) -> None:
        for fname in files:
            fpath = self.root / fname
            if not fpath.is_file():
                raise CheckpointError(f"{fpath}: shard listed in {SAFE_INDEX} is missing")
            for name, entry in read_safetensors_header(fpath).items():
                if weight_map is not None and weight_map.get(name) != fname:
                    continue  # the index is authoritative about which shard holds a tensor
                self._entries[name] = (fname, entry)
        if weight_map is not None:
            missing = [n for n in weight_map if n not in self._entries]
            if missing:
                raise CheckpointError(
                    f"{self.root / SAFE_INDEX}: tensor {missing[0]!r} is listed in shard "
                    f"{weight_map[missing[0]]} but that shard does not contain it"
                )

    def _load_pickles(self) -> None:
        if (self.root / BIN_INDEX).is_file():
            weight_map = _load_weight_map(self.root / BIN_INDEX)
        else:
            weight_map = {n: BIN_SINGLE for n in self._load_pickle(BIN_SINGLE)}
        self._pickled = weight_map

    def _load_pickle(self, fname: str) -> dict[str, torch.Tensor]:
        if fname not in self._pickle_cache:
            path = self.root / fname
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # noqa: BLE001 - torch raises many types for bad pickles
                raise CheckpointError(f"{path}: cannot load ({err})") from None
            self._pickle_cache[fname] = sd
        return self._pickle_cache[fname]

    # -- CheckpointSource ----------------------------------------------------------------------
    def tensors(self) -> dict[str, TensorInfo]:
        if self._pickled:
            out = {}
            for name, fname in self._pickled.items():
                t = self._load_pickle(fname)[name]
                out[name] = TensorInfo(name, tuple(t.shape), t.dtype, fname, t.numel() * t.element_size())
            return out
        return {
            name: TensorInfo(name, e.shape, e.torch_dtype, fname, e.nbytes)
            for name, (fname, e) in self._entries.items()
        }

    def read(self, name: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        if self._pickled:
            if name not in self._pickled:
                raise CheckpointError(f"{self.root}: no tensor {name!r}")
            t = self._load_pickle(self._pickled[name])[name]
            t = t if rows is None else t[rows[0] : rows[1]]
            self._bytes_read += t.numel() * t.element_size()
            return t.clone()
        try:
            fname, entry = self._entries[name]
        except KeyError:
            raise CheckpointError(f"{self.root}: no tensor {name!r}") from None
        begin, end, shape = entry.begin, entry.end, entry.shape
        if rows is not None:
            first, past, shape = row_span(shape, rows, entry.row_bytes, str(self.root / fname), name)
            begin, end = entry.begin + first, entry.begin + past
        fd = self._fd(fname)
        if end > begin and os.fstat(fd).st_size < end:  # a mapping past the end would SIGBUS
            raise CheckpointError(f"{self.root / fname}: truncated while reading tensor {name!r}")
        self._bytes_read += end - begin
        return tensor_from_bytes(_map_range(fd, begin, end), entry.dtype, shape)

    def _fd(self, fname: str) -> int:
        with self._lock:
            if fname not in self._fds:
                self._fds[fname] = os.open(self.root / fname, os.O_RDONLY)
            return self._fds[fname]

    def read_bytes(self, filename: str) -> Optional[bytes]:
        path = self.root / filename
        return path.read_bytes() if path.is_file() else None

    def bytes_read(self) -> int:
        return self._bytes_read

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        self._pickle_cache.clear()
