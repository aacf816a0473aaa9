"""Local Hugging Face model directories: sharded or single safetensors, and opt-in .bin files.

Layout understood: `model.safetensors`, or shards listed in `model.safetensors.index.json`
(`weight_map`), plus `config.json` and tokenizer files. Headers are parsed on open (a few KB per
shard); a read maps exactly the pages of that tensor (or row range) copy-on-write, and the
mapping goes away with the tensor, so resident memory stays bounded by what a worker holds, not
by file sizes, and reading from the page cache costs no copy (about 3x faster than `pread` into
a buffer). Callers may modify the tensor: writes stay private to the process.

`pytorch_model*.bin` checkpoints are pickles; they are read only when the caller opts in
(`allow_pickle=True`), always with `torch.load(weights_only=True, mmap=True)`.

The model folder is a boundary: every file opened here (index, shards named by an index,
config and tokenizer files) must resolve, after symlinks, inside the folder — or, for a Hugging
Face cache snapshot (`models--org--name/snapshots/<rev>/`, whose files are symlinks into
`../../blobs/`), inside that repository's cache folder. Anything else (`../`, an absolute path,
a symlink that leaves the folder) is refused before a byte of it is read, with a message naming
the entry and never the target's content.
"""

from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from raymerge.checkpoints.json_limits import loads_bounded
from raymerge.checkpoints.safetensors_format import HeaderError, TensorEntry, dtype_code, header_length, parse_header, tensor_from_bytes
from raymerge.checkpoints.source import CheckpointError, CheckpointSource, TensorInfo, row_span

if TYPE_CHECKING:
    import torch

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
    index = loads_bounded(data, where, CheckpointError)
    if not isinstance(index, dict) or "weight_map" not in index:
        raise CheckpointError(f"{where}: unreadable index (no 'weight_map' object at the top level)")
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{where}: 'weight_map' is not a mapping")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{where}: weight_map entry for tensor {name!r} is {shard!r}, not a file name")
    return dict(weight_map)


def boundary(root: Path) -> Path:
    """The folder every file of the model at `root` must resolve inside (module docstring)."""
    real = root.resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent  # the Hub cache's repository folder: snapshots/ and blobs/
    return real


def check_relative_name(name: object, where: str, what: str) -> str:
    """`name` if it is a relative file name that stays below its folder (no absolute path, no `..`
    component); else CheckpointError naming `where`, `what` and `name`. For S3 keys as for paths."""
    if (not isinstance(name, str) or not name or "\x00" in name or os.path.isabs(name) or name.startswith("/")
            or ".." in name.replace("\\", "/").split("/")):
        raise CheckpointError(f"{where}: {what} {name!r} is not a file name inside the model folder; refused")
    return name


def inside(root: Path, name: str, what: str) -> Path:
    """`root / name`, refused (CheckpointError naming `what` and `name`) unless it resolves inside
    the model's boundary."""
    limit = boundary(root)
    if not isinstance(name, str) or not name or os.path.isabs(name) or "\x00" in name:
        check_relative_name(name, str(root), what)
    path = root / name
    try:
        real = path.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        raise CheckpointError(f"{root}: {what} {name!r} cannot be resolved; refused") from None
    if real != limit and limit not in real.parents:
        raise CheckpointError(f"{root}: {what} {name!r} points outside the model folder; refused")
    return path


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
            weight_map = _load_weight_map(inside(self.root, SAFE_INDEX, "index"))
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
            fpath = inside(self.root, fname, f"shard listed in {SAFE_INDEX}" if weight_map is not None else "weights file")
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
            weight_map = _load_weight_map(inside(self.root, BIN_INDEX, "index"))
            for fname in sorted(set(weight_map.values())):
                inside(self.root, fname, f"shard listed in {BIN_INDEX}")
        else:
            weight_map = {n: BIN_SINGLE for n in self._load_pickle(BIN_SINGLE)}
        self._pickled = weight_map

    def _load_pickle(self, fname: str) -> dict[str, torch.Tensor]:
        if fname not in self._pickle_cache:
            import torch  # pickles only: safetensors inputs are listed and read without it here

            path = inside(self.root, fname, "weights file")
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
                out[name] = TensorInfo(name, tuple(t.shape), dtype_code(t.dtype), fname, t.numel() * t.element_size())
            return out
        return {
            name: TensorInfo(name, e.shape, e.dtype, fname, e.nbytes)
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
                self._fds[fname] = os.open(inside(self.root, fname, "weights file"), os.O_RDONLY)
            return self._fds[fname]

    def read_bytes(self, filename: str) -> Optional[bytes]:
        path = self.root / filename
        if not path.is_file() and not path.is_symlink():
            return None
        return inside(self.root, filename, "file").read_bytes() if path.is_file() else None

    def bytes_read(self) -> int:
        return self._bytes_read

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        self._pickle_cache.clear()
