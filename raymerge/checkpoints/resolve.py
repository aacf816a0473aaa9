"""Turning a model reference from a config into an open `CheckpointSource`.

A local directory is used in place. Anything else that looks like a Hugging Face Hub id
(`org/name`, optionally `@revision`) is fetched with `huggingface_hub.snapshot_download`
(weights, JSON and tokenizer files only) into the usual HF cache, and then used as a local
directory. `s3://bucket/prefix` opens an `s3.S3Source` (ranged GETs; `SourceSpec.s3_endpoint_url`
names an S3-compatible store).

A local directory written by DeepSpeed's `engine.save_checkpoint` (it holds a `latest` file, or
`global_step*` folders with `*model_states.pt` files, or is such a tag folder itself) opens as a
`deepspeed.DeepSpeedSource`, unless it also holds Hugging Face weights (`*.safetensors`,
`pytorch_model*.bin`): the Trainer's `checkpoint-N/` may carry both, and then the saved model is
used as before; point at its `global_stepN/` folder to read the ZeRO fp32 weights instead. Its
`config.json` and tokenizer come from the checkpoint or from `config_from` (`ModelRef.config_from`,
a local Hugging Face directory), which no other kind of source accepts.

Planning may go without weights: with `shape_only=True`, a directory holding a `config.json`
but no weight files (or a path to a `config.json` itself) opens as a `ShapeOnlySource`, which
lists the tensors the model would have and refuses to read them. It is opt-in (only
`raymerge plan` asks for it) so that a merge of a directory without weights still fails early
with the usual "no weights found" error. A directory that does have weights opens as a
`LocalSource` either way: real headers beat reconstructed ones.

The kinds of source form a registry of the same shape as the merge methods': one frozen
`SourceKind` per kind (`matches(path, options)`, `open(path, options)`), `register_source`,
`get_source_kind(name)` raising `CheckpointError` that lists the kinds, and
`available_source_kinds()`. `open_source` tries the kinds in registration order (deepspeed,
shape-only, local, s3, hub: the first that matches opens the path), so a new kind of storage is
one module that calls `register_source` (before="hub" puts it ahead of the Hub fallback).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from raymerge.checkpoints.deepspeed import DeepSpeedSource, is_deepspeed_checkpoint
from raymerge.checkpoints.local import LocalSource
from raymerge.checkpoints.shapes import CONFIG_FILE, ShapeOnlySource
from raymerge.checkpoints.source import CheckpointError, CheckpointSource
from raymerge.registries import Registry

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]


@dataclass(frozen=True)
class SourceSpec:
    """Everything a worker needs to open the same source the driver planned with (picklable)."""

    path: str
    revision: Optional[str] = None
    allow_pickle: bool = False
    shape_only: bool = False
    s3_endpoint_url: Optional[str] = None  # for s3:// paths (None: AWS, or AWS_ENDPOINT_URL); no credentials here
    config_from: Optional[str] = None  # DeepSpeed checkpoints: where config.json and the tokenizer are

    def open(self) -> CheckpointSource:
        return open_source(
            self.path, revision=self.revision, allow_pickle=self.allow_pickle, shape_only=self.shape_only,
            s3_endpoint_url=self.s3_endpoint_url, config_from=self.config_from,
        )


def _config_without_weights(directory: Path) -> bool:
    """A directory with a config.json and no weight files (*.safetensors, *.bin, an index)."""
    if not (directory / CONFIG_FILE).is_file():
        return False
    return not any(True for p in ("*.safetensors", "*.bin", "*.index.json") for _ in directory.glob(p))


def _is_deepspeed_folder(directory: Path) -> bool:
    """A DeepSpeed checkpoint (or tag) folder without Hugging Face weights next to it."""
    if any(True for p in ("*.safetensors", "pytorch_model*.bin") for _ in directory.glob(p)):
        return False
    return is_deepspeed_checkpoint(directory)


@dataclass(frozen=True)
class SourceOptions:
    """How to open a model reference (the fields of `SourceSpec` besides the path)."""

    revision: Optional[str] = None
    allow_pickle: bool = False
    shape_only: bool = False
    s3_endpoint_url: Optional[str] = None
    config_from: Optional[str] = None


@dataclass(frozen=True)
class SourceKind:
    """One kind of checkpoint source (see the module docstring). `config_from`: whether the kind
    takes its config.json and tokenizer from `SourceOptions.config_from`."""

    name: str
    matches: Callable[[str, SourceOptions], bool]
    open: Callable[[str, SourceOptions], CheckpointSource]
    config_from: bool = False
    doc: str = ""


SOURCE_KINDS: Registry[SourceKind] = Registry("checkpoint source kind", CheckpointError)


def register_source(kind: SourceKind, *, before: Optional[str] = None) -> SourceKind:
    """Add a kind, tried after the ones registered before it (or just before the kind `before`)."""
    return SOURCE_KINDS.register(kind, before=before)


def get_source_kind(name: str) -> SourceKind:
    return SOURCE_KINDS.get(name)


def available_source_kinds() -> list[str]:
    """The kinds in the order `open_source` tries them."""
    return [k.name for k in SOURCE_KINDS.in_order()]


def open_source(
    path: str, *, revision: Optional[str] = None, allow_pickle: bool = False, shape_only: bool = False,
    s3_endpoint_url: Optional[str] = None, config_from: Optional[str] = None,
) -> CheckpointSource:
    """Open a model reference with the first source kind that matches it; raise CheckpointError
    naming it when none does.

    `shape_only`: accept a config.json without weights (see the module docstring).
    `s3_endpoint_url`: the S3 endpoint for `s3://` paths (S3-compatible stores).
    `config_from`: for DeepSpeed checkpoints, a Hugging Face directory with config.json/tokenizer.
    """
    options = SourceOptions(revision, allow_pickle, shape_only, s3_endpoint_url, config_from)
    for kind in SOURCE_KINDS.in_order():
        if kind.matches(path, options):
            if config_from is not None and not kind.config_from:
                break
            return kind.open(path, options)
    if config_from is not None:
        raise CheckpointError(
            f"{path}: config_from applies only to DeepSpeed checkpoint folders (this is not one); remove it"
        )
    raise CheckpointError(f"model path not found: {path}")


def _open_local(path: str, o: SourceOptions) -> CheckpointSource:
    local = Path(path).expanduser()
    try:
        return LocalSource(local, allow_pickle=o.allow_pickle)
    except CheckpointError as err:
        if not _config_without_weights(local):
            raise
        raise CheckpointError(
            f"{err}; it holds only a {CONFIG_FILE}: use `raymerge plan` for shape-only planning"
        ) from None


def _shape_only(path: str, o: SourceOptions) -> bool:
    local = Path(path).expanduser()
    if not o.shape_only:
        return False
    return (local.is_dir() and _config_without_weights(local)) or (local.is_file() and local.name == CONFIG_FILE)


def _open_s3(path: str, o: SourceOptions) -> CheckpointSource:
    from raymerge.checkpoints.s3 import S3Source

    return S3Source(path, endpoint_url=o.s3_endpoint_url, allow_pickle=o.allow_pickle)


register_source(SourceKind(
    "deepspeed", lambda p, o: Path(p).expanduser().is_dir() and _is_deepspeed_folder(Path(p).expanduser()),
    lambda p, o: DeepSpeedSource(Path(p).expanduser(), allow_pickle=o.allow_pickle, config_from=o.config_from),
    config_from=True, doc="a DeepSpeed ZeRO checkpoint folder (engine.save_checkpoint)",
))
register_source(SourceKind(
    "shape-only", _shape_only, lambda p, o: ShapeOnlySource(Path(p).expanduser()),
    doc="a config.json without weights (planning only)",
))
register_source(SourceKind(
    "local", lambda p, o: Path(p).expanduser().is_dir(), _open_local,
    doc="a local Hugging Face folder (*.safetensors, or pytorch_model*.bin with allow_pickle)",
))
register_source(SourceKind("s3", lambda p, o: p.startswith("s3://"), _open_s3, doc="s3://bucket/prefix (ranged GETs)"))
register_source(SourceKind(
    "hub", lambda p, o: is_hub_reference(p),
    lambda p, o: LocalSource(_download_from_hub(p, o.revision, o.allow_pickle), allow_pickle=o.allow_pickle),
    doc="a Hugging Face Hub id org/name[@revision], downloaded into the HF cache",
))


def is_hub_reference(path: str) -> bool:
    """Whether a model reference is read from the Hugging Face Hub (the `hub` kind above): an
    `org/name` id that is not a local path."""
    return bool(_HUB_ID.match(path)) and not Path(path).expanduser().exists()


def _download_from_hub(repo_id: str, revision: Optional[str], allow_pickle: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download

        patterns = HUB_PATTERNS + (["*.bin"] if allow_pickle else [])
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as err:  # noqa: BLE001 - hub errors come in many types; we report them all
        raise CheckpointError(
            f"model path not found: {repo_id} is not a local directory, and fetching it from the "
            f"Hugging Face Hub failed: {type(err).__name__}: {err}"
        ) from None
