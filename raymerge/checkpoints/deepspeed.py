"""DeepSpeed ZeRO checkpoints (stage 1, 2 and 3) read in place as full-precision model tensors.

`DeepSpeedSource` owns reading a folder written by `engine.save_checkpoint(dir)`: it lists the
model's tensors under their Hugging Face names and rebuilds each one, on demand, from the fp32
master weights that ZeRO partitions over data-parallel ranks. No consolidated copy is written
(what `zero_to_fp32.py` would do first).

Layouts understood. `dir` holds `latest` (naming a tag folder such as `global_step10`); or `dir`
is the tag folder itself; or, with no `latest`, it holds exactly one `global_step*` folder. The
Hugging Face Trainer layout (`checkpoint-N/` with `config.json`, tokenizer files, `latest` and
`global_stepN/`) is the first case. In the tag folder:

- `mp_rank_00_model_states.pt` (stage 1/2) or one `zero_pp_rank_R_mp_rank_00_model_states.pt`
  per rank (stage 3): parameter names and shapes per optimizer group (`param_shapes`), tied
  aliases (`shared_params`), frozen parameters, buffers;
- one `zero_pp_rank_R_mp_rank_00_optim_states.pt` per rank: the fp32 master weights, flat per
  optimizer group. Stage 1/2 (`single_partition_of_fp32_groups`): rank R holds the R-th slice of
  each group's flat vector, parameters lie back to back in it in `param_shapes` order (plus
  `param_alignment_paddings` where recorded). Stage 3 (`fp32_flat_groups`): every parameter is
  split into `ceil(numel / ranks)` elements per rank (the last ones zero-padded), laid back to
  back in each rank's flat groups.

The stage is told apart by the file names (per-rank model states mean stage 3) and confirmed by
`zero_stage` in the optimizer states. This is the protocol of DeepSpeed's own
`deepspeed/utils/zero_to_fp32.py`, re-implemented here per tensor: its public entry points
consolidate the whole state dict, and its parsing helpers unpickle with `weights_only=False`.

Names: a `module.` prefix on every name (a model wrapped once more before `deepspeed.initialize`)
is dropped. Tied aliases (`shared_params`, e.g. `lm_head.weight` -> `model.embed_tokens.weight`)
are not listed, as `save_pretrained` does not store them, but `read` accepts them. Frozen
parameters and floating-point buffers are read as float32 too (they are stored in the model's
own dtype); other buffers keep their dtype.

Pickles: every `.pt` file is a torch pickle. As for `pytorch_model*.bin` (see `local.py`), they
are read only when the caller opts in (`allow_pickle=True`), and always with
`torch.load(weights_only=True, mmap=True)`. The optimizer states reference a few DeepSpeed
classes (`ZeroStageEnum`, `LossScaler`, `fragment_address`) that the weights-only unpickler
refuses; they are replaced by inert stand-ins that record their arguments and run no code, so no
code from the files runs and DeepSpeed need not be installed (this needs a torch with
`torch.serialization.get_unsafe_globals_in_checkpoint` and `(object, name)` safe globals, 2.6 or
newer).

Memory: opening loads rank 0's model and optimizer states, mapped (`mmap=True`): only the pickle
itself is parsed, no tensor data is read. The first `read` of a trainable parameter maps every
rank's optimizer states the same way and keeps them mapped until `close()`: the address space is
the size of the files, but only the pages of the tensors read are ever touched (the Adam moments,
two thirds of each file, never are), so resident memory is those pages, reclaimable page cache.
A read copies exactly its elements (or rows) out of the mapped partitions into a new tensor.

config.json and tokenizer files come from the checkpoint folder (and, for a tag folder, from the
folder holding its `latest`) when present there, else from `config_from`, a local Hugging Face
model directory; each file is taken from the first of these that has it. A checkpoint without
any config.json is refused when opened, naming the `config_from:` key.

Each folder is a boundary (as in `local.py`): the tag named by `latest`, every state file (even
found by a glob: it, or its tag folder, may be a symlink) and every side file must resolve, after
symlinks, inside the folder it was found in; anything else is refused with one line naming the
entry, before a byte of it is read.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch

from raymerge.checkpoints.local import inside
from raymerge.checkpoints.safetensors_format import dtype_code
from raymerge.checkpoints.source import CONFIG_FILE, CheckpointError, CheckpointSource, TensorInfo, row_span

LATEST = "latest"
MODEL_STATES = "*model_states.pt"
OPTIM_STATES = "*optim_states.pt"
WRAPPER_PREFIX = "module."
FP32_PARTITIONS_STAGE12 = "single_partition_of_fp32_groups"
FP32_PARTITIONS_STAGE3 = "fp32_flat_groups"

_MP_RANK = re.compile(r"mp_rank_(\d+)")
_DP_RANK = re.compile(r"zero_pp_rank_(\d+)_")
_STEP = re.compile(r"global_step(\d+)$")


# -- finding the files -------------------------------------------------------------------------
def _has_model_states(directory: Path) -> bool:
    return any(True for _ in directory.glob(MODEL_STATES))


def _step_folders(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("global_step*") if p.is_dir() and _has_model_states(p))


def is_deepspeed_checkpoint(directory: Path) -> bool:
    """A folder written by `engine.save_checkpoint`, or one of its tag folders."""
    if (directory / LATEST).is_file() or _has_model_states(directory):
        return True
    return bool(_step_folders(directory))


def find_tag_folder(root: Path) -> Path:
    """The tag folder (the one holding the `*_states.pt` files) of a checkpoint folder."""
    if _has_model_states(root):
        return root
    latest = root / LATEST
    if latest.is_file():
        tag = inside(root, LATEST, "tag file").read_text().strip()
        folder = inside(root, tag, f"tag named by {LATEST}") if tag else root / tag
        if not tag or not folder.is_dir():
            raise CheckpointError(f"{latest} names tag {tag!r}, but {folder} does not exist")
        if not _has_model_states(folder):
            raise CheckpointError(f"{folder} (named by {latest}) holds no {MODEL_STATES} file")
        return folder
    steps = _step_folders(root)
    if len(steps) == 1:
        return steps[0]
    if not steps:
        raise CheckpointError(f"{root}: not a DeepSpeed checkpoint (no {LATEST} file, no {MODEL_STATES})")
    names = ", ".join(p.name for p in steps)
    raise CheckpointError(f"{root}: no {LATEST} file and several tags ({names}); give the path of one of them")


def _rank_of(path: Path, pattern: re.Pattern) -> int:
    m = pattern.search(path.name)
    if m is None:
        raise CheckpointError(f"{path}: cannot tell the rank from the file name")
    return int(m.group(1))


def _per_rank(files: list[Path], what: str) -> list[Path]:
    """`files` sorted by data-parallel rank; ranks 0..n-1 each exactly once."""
    by_rank = {_rank_of(f, _DP_RANK): f for f in files}
    if sorted(by_rank) != list(range(len(files))):
        raise CheckpointError(
            f"{files[0].parent}: {what} files for ranks {sorted(by_rank)}, expected 0..{len(files) - 1}"
        )
    return [by_rank[r] for r in range(len(files))]


# -- loading pickles without running them -------------------------------------------------------
class _StandIn:
    """Takes the place of a class a checkpoint pickle names: keeps its arguments, runs nothing."""

    args: tuple
    state: Any

    def __new__(cls, *args: Any, **kwargs: Any) -> "_StandIn":
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state


_STAND_INS: dict[str, type] = {}
_LOAD_LOCK = threading.Lock()  # torch's safe-globals list is process-wide


def _stand_in(full_name: str) -> type:
    if full_name not in _STAND_INS:
        module, _, name = full_name.rpartition(".")
        _STAND_INS[full_name] = type(name, (_StandIn,), {"__module__": module})
    return _STAND_INS[full_name]


def load_pickle(path: Path) -> dict[str, Any]:
    """`torch.load(path, weights_only=True, mmap=True)`, classes outside torch replaced by stand-ins."""
    serialization = torch.serialization
    if not hasattr(serialization, "get_unsafe_globals_in_checkpoint") or not hasattr(serialization, "safe_globals"):
        raise CheckpointError(f"{path}: reading DeepSpeed checkpoints needs torch 2.6 or newer")
    with _LOAD_LOCK:  # both steps: torch's safe-globals state is process-wide (workers may be threads)
        try:
            names = serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as err:  # noqa: BLE001 - torch raises several types for unreadable files
            raise CheckpointError(f"{path}: cannot read ({err})") from None
        # torch's own globals keep their meaning; a torch name the unpickler refuses stays an error
        stand_ins = [(_stand_in(n), n) for n in names if not n.startswith("torch.")]
        try:
            with serialization.safe_globals(stand_ins):
                data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # noqa: BLE001 - as above
            raise CheckpointError(f"{path}: cannot load ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(data).__name__}")
    return data


def _as_int(value: Any) -> Any:
    """An int, or the value of a stood-in enum (`ZeroStageEnum.gradients` -> 2)."""
    if isinstance(value, _StandIn) and len(value.args) == 1:
        return value.args[0]
    return value


# -- where each tensor's elements are -----------------------------------------------------------
@dataclass(frozen=True)
class _Piece:
    """`length` consecutive elements of a tensor: flat group `group` of `rank`, from `start`."""

    rank: int
    group: int
    start: int
    length: int


@dataclass(frozen=True)
class _Entry:
    """One listed tensor: its stored (internal) name, shape, dtype and kind."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str  # "trainable" (fp32 partitions), "frozen" (model states), "buffer" (model states)
    file: str


def _cut(rank: int, begin: int, length: int, group_starts: list[int]) -> list[_Piece]:
    """Pieces for elements [begin, begin + length) of one rank's concatenated flat groups."""
    pieces = []
    while length > 0:
        g = max(i for i, s in enumerate(group_starts[:-1]) if s <= begin)
        n = min(length, group_starts[g + 1] - begin)
        if n <= 0:
            raise ValueError(f"offset {begin} is past the end of the flat groups")
        pieces.append(_Piece(rank, g, begin - group_starts[g], n))
        begin, length = begin + n, length - n
    return pieces


def _layout_stage12(
    param_shapes: list[dict[str, tuple[int, ...]]],
    rank_lengths: list[list[int]],
    paddings: Optional[list[list[int]]],
) -> dict[str, list[_Piece]]:
    """Stage 1/2: group g's flat vector is the concatenation of every rank's slice g."""
    world = len(rank_lengths)
    out: dict[str, list[_Piece]] = {}
    for g, shapes in enumerate(param_shapes):
        starts = [0]
        for r in range(world):
            starts.append(starts[-1] + rank_lengths[r][g])
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            pieces = []
            for r in range(world):
                lo, hi = max(offset, starts[r]), min(offset + numel, starts[r + 1])
                if hi > lo:
                    pieces.append(_Piece(r, g, lo - starts[r], hi - lo))
            out[name] = pieces
            offset += numel + (paddings[g][i] if paddings is not None else 0)
        # as in zero_to_fp32: both ends are aligned to 2 * world_size before comparing
        align = 2 * world
        if math.ceil(offset / align) != math.ceil(starts[-1] / align):
            raise ValueError(f"group {g}: parameters take {offset} elements, the partitions hold {starts[-1]}")
    return out


def _layout_stage3(param_shapes: dict[str, tuple[int, ...]], group_lengths: list[int], world: int) -> dict[str, list[_Piece]]:
    """Stage 3: each parameter is cut into `world` equal parts, part r in rank r's flat groups."""
    group_starts = [0]
    for n in group_lengths:
        group_starts.append(group_starts[-1] + n)
    out: dict[str, list[_Piece]] = {}
    offset = 0
    for name, shape in param_shapes.items():
        numel = math.prod(shape)
        part = math.ceil(numel / world)
        pieces = []
        for r in range(world):
            n = max(0, min(part, numel - r * part))
            pieces += _cut(r, offset, n, group_starts)
        out[name] = pieces
        offset += part
    if offset != group_starts[-1]:
        raise ValueError(f"parameters take {offset} elements per rank, the flat groups hold {group_starts[-1]}")
    return out


def _select(pieces: list[_Piece], begin: int, end: int) -> list[_Piece]:
    """The parts of `pieces` (a tensor's elements in order) covering elements [begin, end)."""
    out, pos = [], 0
    for p in pieces:
        lo, hi = max(begin, pos), min(end, pos + p.length)
        if hi > lo:
            out.append(_Piece(p.rank, p.group, p.start + lo - pos, hi - lo))
        pos += p.length
    return out


# -- the source ---------------------------------------------------------------------------------
class DeepSpeedSource(CheckpointSource):
    """A DeepSpeed ZeRO (stage 1, 2 or 3) checkpoint folder, read as fp32 model tensors."""

    def __init__(
        self,
        path: Union[str, Path],
        *,
        allow_pickle: bool = False,
        config_from: Optional[Union[str, Path]] = None,
    ):
        self.root = Path(path).expanduser()
        self.location = str(self.root)
        if not self.root.is_dir():
            raise CheckpointError(f"model path not found: {self.root}")
        if not allow_pickle:
            raise CheckpointError(
                f"{self.root}: a DeepSpeed checkpoint is made of torch pickles; pickled checkpoints can run "
                "code when loaded, so they are read only with --allow-pickle (allow_pickle=True); they are "
                "then loaded with torch.load(weights_only=True), DeepSpeed's classes replaced by inert stand-ins"
            )
        self.tag_folder = find_tag_folder(self.root)
        self._config_dirs = self._find_config_dirs(config_from)
        self._lock = threading.Lock()
        self._bytes_read = 0
        self._model_files, self._optim_files, self.zero_stage = self._find_files()
        self.world_size = len(self._optim_files)
        self._model_states: dict[int, dict[str, Any]] = {0: load_pickle(self._model_files[0])}
        self._optim: dict[int, dict[str, Any]] = {0: self._load_optim(0)}
        self._check_world_size()
        self._entries, self._aliases = self._list_entries()
        self._pieces: Optional[dict[str, list[_Piece]]] = None

    # -- opening -------------------------------------------------------------------------------
    def _find_config_dirs(self, config_from: Optional[Union[str, Path]]) -> list[Path]:
        dirs = [self.root]
        parent = self.tag_folder.parent
        if self.tag_folder == self.root and (parent / LATEST).is_file():
            dirs.append(parent)  # a tag folder given directly: its checkpoint folder
        if config_from is not None:
            extra = Path(config_from).expanduser()
            if not extra.is_dir():
                raise CheckpointError(f"{self.root}: config_from {str(config_from)!r} is not a local directory")
            if not (extra / CONFIG_FILE).is_file():
                raise CheckpointError(f"{self.root}: config_from {extra} holds no {CONFIG_FILE}")
            dirs.append(extra)
        if not any((d / CONFIG_FILE).is_file() for d in dirs):
            raise CheckpointError(
                f"{self.root}: DeepSpeed checkpoint without a {CONFIG_FILE}; name the Hugging Face model "
                f"directory to take it (and the tokenizer) from with `config_from:`, e.g. "
                f"`model: {{path: {self.root}, config_from: ./base-model}}`"
            )
        return dirs

    def _state_files(self, pattern: str) -> list[Path]:
        """The tag folder's files matching `pattern`, each refused unless it resolves inside the
        model folder (a state file, or the tag folder itself, may be a symlink to elsewhere)."""
        files = sorted(self.tag_folder.glob(pattern))
        for f in files:
            inside(self.root, str(f.relative_to(self.root)), "state file")
        return files

    def _find_files(self) -> tuple[list[Path], list[Path], int]:
        folder = self.tag_folder
        model_files = self._state_files(MODEL_STATES)
        optim_files = self._state_files(OPTIM_STATES)
        if any(f.name.startswith("layer_") for f in model_files):
            raise CheckpointError(f"{folder}: pipeline-parallel checkpoints (layer_*-model_states.pt) are not supported")
        mp_ranks = {_rank_of(f, _MP_RANK) for f in model_files + optim_files}
        if mp_ranks != {0}:
            raise CheckpointError(
                f"{folder}: tensor-parallel checkpoints (mp_rank {sorted(mp_ranks)}) are not supported"
            )
        if not optim_files:
            raise CheckpointError(
                f"{folder}: no {OPTIM_STATES} files; ZeRO keeps the fp32 weights in the optimizer "
                "states, so a checkpoint saved without them cannot be read"
            )
        per_rank_model = [f for f in model_files if _DP_RANK.search(f.name)]
        if per_rank_model:  # stage 3 saves model states per rank
            return _per_rank(per_rank_model, "model states"), _per_rank(optim_files, "optimizer states"), 3
        return model_files, _per_rank(optim_files, "optimizer states"), 2  # 1 or 2: told by the optimizer states

    def _load_optim(self, rank: int) -> dict[str, Any]:
        path = self._optim_files[rank]
        osd = load_pickle(path).get("optimizer_state_dict")
        if not isinstance(osd, dict) or "zero_stage" not in osd:
            raise CheckpointError(f"{path}: not a ZeRO optimizer state (no optimizer_state_dict.zero_stage)")
        stage = _as_int(osd["zero_stage"])
        key = FP32_PARTITIONS_STAGE3 if self.zero_stage == 3 else FP32_PARTITIONS_STAGE12
        if stage not in (1, 2, 3) or (stage == 3) != (self.zero_stage == 3):
            raise CheckpointError(f"{path}: zero_stage {stage!r} does not match the model states files")
        groups = osd.get(key)
        if not isinstance(groups, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in groups):
            raise CheckpointError(f"{path}: no fp32 weights ({key})")
        if rank == 0:
            self.zero_stage = stage
        return {"groups": [t.reshape(-1) for t in groups], "paddings": osd.get("param_alignment_paddings"),
                "partition_count": osd.get("partition_count")}

    def _check_world_size(self) -> None:
        count = self._optim[0]["partition_count"]
        if isinstance(count, (list, tuple)):  # stage 1/2: per group (expert groups may differ)
            count = max(count)
        if isinstance(count, int) and count != self.world_size:
            raise CheckpointError(
                f"{self.tag_folder}: the optimizer states are partitioned over {count} ranks but "
                f"{self.world_size} {OPTIM_STATES} files were found (a partial or overwritten checkpoint?)"
            )
        dp = self._model_states[0].get("dp_world_size")
        if isinstance(dp, int) and dp != self.world_size:
            raise CheckpointError(
                f"{self._model_files[0]}: saved by {dp} data-parallel ranks, but {self.world_size} "
                f"{OPTIM_STATES} files were found"
            )

    def _param_shapes(self) -> list[dict[str, tuple[int, ...]]]:
        shapes = self._model_rank(0).get("param_shapes")
        if isinstance(shapes, dict):
            shapes = [shapes]
        if not isinstance(shapes, (list, tuple)) or not all(isinstance(s, dict) for s in shapes):
            raise CheckpointError(f"{self._model_files[0]}: no param_shapes (not a ZeRO checkpoint?)")
        return [{str(k): tuple(int(d) for d in v) for k, v in s.items()} for s in shapes]

    def _list_entries(self) -> tuple[dict[str, _Entry], dict[str, str]]:
        """Listed tensors by public name, and tied aliases (public name -> public name)."""
        states, model_file = self._model_states[0], self._model_files[0]
        flat_dtype = self._optim[0]["groups"][0].dtype if self._optim[0]["groups"] else torch.float32
        first_optim = str(self._optim_files[0].relative_to(self.root))
        rel_model = str(model_file.relative_to(self.root))
        entries: dict[str, _Entry] = {}
        for shapes in self._param_shapes():
            for key, shape in shapes.items():
                entries[key] = _Entry(key, shape, flat_dtype, "trainable", first_optim)
        for key, shape in (states.get("frozen_param_shapes") or {}).items():
            entries[key] = _Entry(key, tuple(int(d) for d in shape), torch.float32, "frozen", rel_model)
        module = states.get("module") or {}
        for key in states.get("buffer_names") or ():
            t = module.get(key)
            if isinstance(t, torch.Tensor):
                dtype = torch.float32 if t.is_floating_point() else t.dtype
                entries[key] = _Entry(key, tuple(t.shape), dtype, "buffer", rel_model)
        shared = {str(k): str(v) for k, v in (states.get("shared_params") or {}).items()}
        keys = list(entries) + list(shared) + list(shared.values())
        strip = bool(keys) and all(k.startswith(WRAPPER_PREFIX) for k in keys)

        def public(key: str) -> str:
            return key[len(WRAPPER_PREFIX) :] if strip else key

        aliases = {public(a): public(s) for a, s in shared.items() if s in entries and a not in entries}
        return {public(k): e for k, e in entries.items()}, aliases

    # -- reading -------------------------------------------------------------------------------
    def _optim_rank(self, rank: int) -> dict[str, Any]:
        with self._lock:
            if rank not in self._optim:
                self._optim[rank] = self._load_optim(rank)
            return self._optim[rank]

    def _model_rank(self, rank: int) -> dict[str, Any]:
        with self._lock:
            if rank not in self._model_states:
                self._model_states[rank] = load_pickle(self._model_files[rank])
            return self._model_states[rank]

    def _layout(self) -> dict[str, list[_Piece]]:
        """Where every trainable parameter's elements are (maps every rank's optimizer states once)."""
        if self._pieces is not None:
            return self._pieces
        ranks = [self._optim_rank(r) for r in range(self.world_size)]
        lengths = [[t.numel() for t in r["groups"]] for r in ranks]
        shapes = self._param_shapes()
        try:
            if self.zero_stage == 3:
                if any(ln != lengths[0] for ln in lengths):
                    raise ValueError(f"ranks hold flat groups of different sizes: {lengths}")
                merged = {k: v for s in shapes for k, v in s.items()}
                pieces = _layout_stage3(merged, lengths[0], self.world_size)
            else:
                if any(len(ln) != len(shapes) for ln in lengths):
                    raise ValueError(f"{len(shapes)} parameter groups but {len(lengths[0])} flat groups")
                paddings = ranks[0]["paddings"]
                if paddings is not None and [len(p) for p in paddings] != [len(s) for s in shapes]:
                    raise ValueError("param_alignment_paddings do not match param_shapes")
                pieces = _layout_stage12(shapes, lengths, paddings)
        except ValueError as err:
            raise CheckpointError(f"{self.tag_folder}: inconsistent ZeRO stage {self.zero_stage} checkpoint: {err}") from None
        with self._lock:
            self._pieces = pieces
        return pieces

    def _read_trainable(self, entry: _Entry, begin: int, end: int) -> torch.Tensor:
        chunks = []
        for p in _select(self._layout()[entry.key], begin, end):
            flat = self._optim_rank(p.rank)["groups"][p.group]
            chunks.append(flat[p.start : p.start + p.length])
        if not chunks:
            return torch.empty(0, dtype=entry.dtype)
        return torch.cat(chunks)

    def _read_stored(self, entry: _Entry) -> torch.Tensor:
        """A frozen parameter or buffer, whole, flat (stored in the model states)."""
        states = self._model_rank(0)
        if entry.kind == "buffer":
            t = states["module"][entry.key]
        elif self.zero_stage == 3:  # each rank holds its part, the last ones zero-padded
            parts = [self._model_rank(r)["frozen_param_fragments"][entry.key].reshape(-1) for r in range(self.world_size)]
            t = torch.cat(parts)[: math.prod(entry.shape)]
        else:
            t = states["frozen_param_fragments"][entry.key]
        return t.reshape(-1).to(entry.dtype)

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(self._aliases.get(name, name))
        if entry is None:
            raise CheckpointError(f"{self.tag_folder}: no tensor {name!r}")
        return entry

    def tensors(self) -> dict[str, TensorInfo]:
        return {
            name: TensorInfo(name, e.shape, dtype_code(e.dtype), e.file, math.prod(e.shape) * e.dtype.itemsize)
            for name, e in self._entries.items()
        }

    def read(self, name: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        entry = self._entry(name)
        shape, numel = entry.shape, math.prod(entry.shape)
        begin, end = 0, numel
        if rows is not None:
            row = numel // shape[0] if shape and shape[0] else 0
            begin, end, shape = row_span(shape, rows, row, str(self.tag_folder), name)
        try:
            if entry.kind == "trainable":
                flat = self._read_trainable(entry, begin, end)
            else:
                flat = self._read_stored(entry)[begin:end].clone()
        except (KeyError, RuntimeError) as err:
            raise CheckpointError(f"{self.tag_folder}: cannot rebuild tensor {name!r} ({type(err).__name__}: {err})") from None
        if flat.numel() != end - begin:
            raise CheckpointError(f"{self.tag_folder}: tensor {name!r}: found {flat.numel()} elements, expected {end - begin}")
        with self._lock:
            self._bytes_read += flat.numel() * flat.element_size()
        return flat.view(shape)

    # -- side files ----------------------------------------------------------------------------
    def _side_file(self, filename: str) -> Optional[Path]:
        """`filename` in the first config folder that has it, refused (CheckpointError naming it)
        unless it resolves inside that folder; None when no folder has it."""
        for d in self._config_dirs:
            path = d / filename
            if path.is_symlink() or path.is_file():
                inside(d, filename, "file")
            if path.is_file():
                return path
        return None

    def file_label(self, filename: str) -> str:
        return str(self._side_file(filename) or self.root / filename)

    def read_bytes(self, filename: str) -> Optional[bytes]:
        path = self._side_file(filename)
        return None if path is None else path.read_bytes()

    def bytes_read(self) -> int:
        return self._bytes_read

    def close(self) -> None:
        with self._lock:
            self._optim.clear()
            self._model_states.clear()
            self._pieces = None
