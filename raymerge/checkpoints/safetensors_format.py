"""The safetensors container format: dtype codes, parsing a header, building one.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`, offsets relative
to the end of the header), then the raw tensor bytes.

We parse headers ourselves (rather than through `safetensors.safe_open`) because the same code
must read them from a local file, from an S3 ranged GET, or from bytes in memory, and must turn
a corrupt file into an error that names the file. We *build* headers ourselves for one reason:
the driver lays out every output shard from shapes and dtypes alone, so that any worker can
write any tensor at its precomputed offset, in parallel, and the bytes do not depend on which
worker wrote what. Files written this way are read back by `safetensors` itself in the tests.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

from raymerge.checkpoints.json_limits import loads_bounded
from raymerge.errors import RaymergeError

if TYPE_CHECKING:
    import torch

# The dtypes safetensors stores, by code: torch's name for each, and its element size. Planning
# works on codes alone (no torch import); `torch_dtype` gives the tensor code its torch dtype.
CODE_NAMES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
ELEMENT_SIZES: dict[str, int] = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
NAME_CODES: dict[str, str] = {name: code for code, name in CODE_NAMES.items()}  # "bfloat16" -> "BF16"
MAX_HEADER_BYTES = 100 * 1024 * 1024


class HeaderError(RaymergeError, ValueError):
    """A safetensors header is unreadable or inconsistent."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: where its bytes are, relative to the file start."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def torch_dtype(self) -> "torch.dtype":
        return torch_dtype(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def row_bytes(self) -> int:
        """Bytes in one index of dimension 0 (the unit of a row-range read)."""
        if not self.shape or self.shape[0] == 0:
            return self.nbytes
        return self.nbytes // self.shape[0]


def torch_dtype(code: str) -> "torch.dtype":
    """torch's dtype of a safetensors code ("BF16") or of a dtype name ("bfloat16")."""
    import torch

    name = CODE_NAMES.get(code, code)
    if name not in NAME_CODES:
        raise HeaderError(f"unknown dtype {code!r}")
    return getattr(torch, name)


def dtype_code(dtype: "torch.dtype") -> str:
    """The safetensors code of a torch dtype (HeaderError for one safetensors cannot store)."""
    name = str(dtype).removeprefix("torch.")
    try:
        return NAME_CODES[name]
    except KeyError:
        raise HeaderError(f"dtype {dtype} cannot be stored in safetensors") from None


def element_size(code: str) -> int:
    return ELEMENT_SIZES[code]


def promote_codes(codes: Iterable[str]) -> str:
    """The dtype torch's type promotion gives tensors of these codes (`torch.promote_types`):
    for floating-point codes, the widest, with float16 and bfloat16 together giving float32."""
    unique = list(dict.fromkeys(codes))
    if len(unique) == 1:
        return unique[0]
    if all(c in FLOAT_CODES for c in unique):
        for wide in ("F64", "F32"):
            if wide in unique:
                return wide
        return "F32"  # F16 with BF16
    import torch  # integer or mixed codes: torch's own table (compile refuses such mixes anyway)

    out = torch_dtype(unique[0])
    for c in unique[1:]:
        out = torch.promote_types(out, torch_dtype(c))
    return dtype_code(out)


def header_length(prefix: bytes, where: str, file_size: int | None = None) -> int:
    """Read the JSON header length from the first 8 bytes of a file."""
    if len(prefix) < 8:
        raise HeaderError(f"{where}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n == 0 or n > MAX_HEADER_BYTES or (file_size is not None and 8 + n > file_size):
        raise HeaderError(f"{where}: corrupt safetensors header (declared header length {n} bytes)")
    return n


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _entry(name: str, info: Any, where: str, data_start: int) -> TensorEntry:
    """One header entry, every field of the JSON type safetensors requires (the `safetensors`
    library refuses the same files): dtype a known string, shape a list of non-negative
    integers, data_offsets two integers 0 <= begin <= end spanning exactly shape x dtype."""
    if not isinstance(info, dict):
        raise HeaderError(f"{where}: corrupt safetensors header entry for tensor {name!r} (not a JSON object)")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise HeaderError(f"{where}: corrupt safetensors header entry for tensor {name!r} (no {missing[0]!r})")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(code, str):
        raise HeaderError(f"{where}: tensor {name!r} has dtype {code!r}, not a string")
    if code not in CODE_NAMES:
        raise HeaderError(f"{where}: tensor {name!r} has unsupported dtype {code!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise HeaderError(f"{where}: tensor {name!r} has shape {shape!r}, not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise HeaderError(f"{where}: tensor {name!r} has data_offsets {offsets!r}, not two integers 0 <= begin <= end")
    begin, end = offsets
    numel = 1
    for d in shape:
        numel *= d
    if end - begin != numel * element_size(code):
        raise HeaderError(
            f"{where}: tensor {name!r} has offsets {begin}..{end} that do not match "
            f"shape {list(shape)} and dtype {code}"
        )
    return TensorEntry(name, code, tuple(shape), data_start + begin, data_start + end)


def _check_overlaps(entries: dict[str, TensorEntry], where: str) -> None:
    """Two tensors sharing bytes would alias each other: refused (as `safetensors` does)."""
    spans = sorted((e.begin, e.end, e.name) for e in entries.values() if e.end > e.begin)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise HeaderError(f"{where}: tensor {n1!r} (bytes {b1}..{e1}) overlaps tensor {n0!r} (bytes {b0}..{e0})")


def parse_header(
    header_json: bytes, where: str, file_size: int | None = None
) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse a header's JSON; return entries (offsets absolute in the file) and metadata.
    Every malformation is a HeaderError naming `where` and, for an entry, the tensor."""
    def corrupt(message: str) -> HeaderError:
        detail = message.removeprefix(f"{where}: ")
        return HeaderError(f"{where}: corrupt safetensors header ({detail})")

    raw = loads_bounded(header_json, where, corrupt)
    if not isinstance(raw, dict):
        raise HeaderError(f"{where}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + len(header_json)
    metadata = raw.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderError(f"{where}: corrupt safetensors header (__metadata__ must be a JSON object of strings, "
                          f"got {type(metadata).__name__})")
    entries = {name: _entry(name, info, where, data_start) for name, info in raw.items()}
    _check_overlaps(entries, where)
    if file_size is not None:
        # Checked against the file's size when it is opened, so a truncated download fails up
        # front; the tensor named is the first one (by offset) whose bytes are not all there.
        cut = [e for e in entries.values() if e.end > file_size]
        if cut:
            first = min(cut, key=lambda e: (e.begin, e.name))
            raise HeaderError(
                f"{where}: truncated file: tensor {first.name!r} ends at byte {first.end} "
                f"but the file has {file_size} bytes ({len(cut)} tensor(s) past the end)"
            )
    return entries, dict(metadata)


def build_header(
    tensors: Iterable[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, dict[str, TensorEntry]]:
    """Lay out tensors (name, dtype code, shape) in the given order.

    Returns the full header (length prefix + JSON padded with spaces to 8-byte alignment) and
    the entries with absolute file offsets.
    """
    body: dict[str, Any] = {}
    if metadata:
        body["__metadata__"] = metadata
    relative: list[tuple[str, str, tuple[int, ...], int, int]] = []
    offset = 0
    for name, code, shape in tensors:
        numel = 1
        for d in shape:
            numel *= d
        size = numel * element_size(code)
        body[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        relative.append((name, code, shape, offset, offset + size))
        offset += size
    text = json.dumps(body, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)
    header = struct.pack("<Q", len(text)) + text
    start = len(header)
    entries = {n: TensorEntry(n, c, s, start + b, start + e) for n, c, s, b, e in relative}
    return header, entries


def tensor_from_bytes(buf: bytes | bytearray | memoryview, code: str, shape: tuple[int, ...]) -> "torch.Tensor":
    """A tensor viewing `buf` (little-endian, as safetensors stores it)."""
    import torch

    dtype = torch_dtype(code)
    if len(buf) == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def tensor_bytes(tensor: "torch.Tensor") -> memoryview:
    """The raw bytes of a CPU tensor, contiguous, without copying when possible."""
    import torch

    t = tensor.detach().contiguous()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())
