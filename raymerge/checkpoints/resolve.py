"""Turning a model reference from a config into an open `CheckpointSource`.

A local directory is used in place. Anything else that looks like a Hugging Face Hub id
(`org/name`, optionally `@revision`) opens as a `hub.HubSource`: headers over HTTP range
requests, each shard downloaded into the HF cache on the first read of a tensor in it, all at
one commit: `SourceSpec.pinned()` (called by the driver before it hands specs to workers)
resolves the revision to a sha once and fixes the Hub endpoint (`SourceSpec.hub_endpoint`), see
`checkpoints/hub.py`. `s3://bucket/prefix` opens an `s3.S3Source` (ranged GETs; `SourceSpec.s3_endpoint_url`
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
`SourceKind` per kind (`matches(path, options)`, `open(path, options)`, and optionally
`pin(path, options)`: the spec fields that make every process open exactly what the driver
opened, e.g. the Hub's commit sha), `register_source`,
`get_source_kind(name)` raising `CheckpointError` that lists the kinds, and
`available_source_kinds()`. `open_source` tries the kinds in registration order (deepspeed,
shape-only, local, s3, hub: the first that matches opens the path), so a new kind of storage is
one module that calls `register_source` (before="hub" puts it ahead of the Hub fallback).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

from raymerge.checkpoints.hub_id import is_hub_reference
from raymerge.checkpoints.local import LocalSource
from raymerge.checkpoints.source import CONFIG_FILE, CheckpointError, CheckpointSource
from raymerge.registries import Registry



@dataclass(frozen=True)
class SourceSpec:
    """Everything a worker needs to open the same source the driver planned with (picklable)."""

    path: str
    revision: Optional[str] = None
    allow_pickle: bool = False
    shape_only: bool = False
    s3_endpoint_url: Optional[str] = None  # for s3:// paths (None: AWS, or AWS_ENDPOINT_URL); no credentials here
    config_from: Optional[str] = None  # DeepSpeed checkpoints: where config.json and the tokenizer are
    lora: Optional[str] = None  # a PEFT LoRA adapter applied as tensors are read (`checkpoints.lora`)
    lora_revision: Optional[str] = None
    lora_dtype: Optional[str] = None  # --lora-merge-dtype: the dtype the adapted model is read in
    hub_endpoint: Optional[str] = None  # Hub inputs (model, adapter): the endpoint the driver pinned them on (None: HF_ENDPOINT)

    def options(self) -> "SourceOptions":
        return SourceOptions(self.revision, self.allow_pickle, self.shape_only, self.s3_endpoint_url,
                             self.config_from, self.hub_endpoint)

    def pinned(self) -> "SourceSpec":
        """This spec with what its kind pins filled in (a Hub reference: the commit sha its
        revision points to now, and the endpoint), and a Hub LoRA adapter's commit too, so that
        every process that opens it reads the same files; the spec itself when nothing needs
        pinning. Called once, by the driver."""
        spec = self
        kind = source_kind_of(self.path, self.options())
        if kind is not None and kind.pin is not None:
            spec = replace(spec, **kind.pin(self.path, self.options()))
        if spec.lora is not None:
            from raymerge.checkpoints.lora import pin_adapter

            revision, endpoint = pin_adapter(spec.lora, spec.lora_revision, spec.hub_endpoint)
            spec = replace(spec, lora_revision=revision, hub_endpoint=endpoint)
        return spec

    def open(self) -> CheckpointSource:
        source = open_source(
            self.path, revision=self.revision, allow_pickle=self.allow_pickle, shape_only=self.shape_only,
            s3_endpoint_url=self.s3_endpoint_url, config_from=self.config_from, hub_endpoint=self.hub_endpoint,
        )
        if self.lora is None:
            return source
        from raymerge.checkpoints.lora import LoraSource, adapter_folder

        try:
            label = self.lora if self.lora_revision is None else f"{self.lora}@{self.lora_revision}"
            folder = adapter_folder(self.lora, self.lora_revision, self.hub_endpoint)
            return LoraSource(source, folder, label=label, dtype=self.lora_dtype)
        except BaseException:
            source.close()
            raise


def _config_without_weights(directory: Path) -> bool:
    """A directory with a config.json and no weight files (*.safetensors, *.bin, an index)."""
    if not (directory / CONFIG_FILE).is_file():
        return False
    return not any(True for p in ("*.safetensors", "*.bin", "*.index.json") for _ in directory.glob(p))


def _is_deepspeed_folder(directory: Path) -> bool:
    """A DeepSpeed checkpoint (or tag) folder without Hugging Face weights next to it."""
    if any(True for p in ("*.safetensors", "pytorch_model*.bin") for _ in directory.glob(p)):
        return False
    from raymerge.checkpoints.deepspeed import is_deepspeed_checkpoint  # torch: only for such folders

    return is_deepspeed_checkpoint(directory)


@dataclass(frozen=True)
class SourceOptions:
    """How to open a model reference (the fields of `SourceSpec` besides the path)."""

    revision: Optional[str] = None
    allow_pickle: bool = False
    shape_only: bool = False
    s3_endpoint_url: Optional[str] = None
    config_from: Optional[str] = None
    hub_endpoint: Optional[str] = None


@dataclass(frozen=True)
class SourceKind:
    """One kind of checkpoint source (see the module docstring). `config_from`: whether the kind
    takes its config.json and tokenizer from `SourceOptions.config_from`. `pin`: the `SourceSpec`
    fields (by name) that fix what the path means now (see `SourceSpec.pinned`)."""

    name: str
    matches: Callable[[str, SourceOptions], bool]
    open: Callable[[str, SourceOptions], CheckpointSource]
    config_from: bool = False
    doc: str = ""
    pin: Optional[Callable[[str, SourceOptions], dict[str, Any]]] = None


SOURCE_KINDS: Registry[SourceKind] = Registry("checkpoint source kind", CheckpointError)


def register_source(kind: SourceKind, *, before: Optional[str] = None) -> SourceKind:
    """Add a kind, tried after the ones registered before it (or just before the kind `before`)."""
    return SOURCE_KINDS.register(kind, before=before)


def get_source_kind(name: str) -> SourceKind:
    return SOURCE_KINDS.get(name)


def available_source_kinds() -> list[str]:
    """The kinds in the order `open_source` tries them."""
    return [k.name for k in SOURCE_KINDS.in_order()]


def source_kind_of(path: str, options: SourceOptions) -> Optional[SourceKind]:
    """The kind `open_source` would open `path` with, or None."""
    for kind in SOURCE_KINDS.in_order():
        if kind.matches(path, options):
            return kind
    return None


def open_source(
    path: str, *, revision: Optional[str] = None, allow_pickle: bool = False, shape_only: bool = False,
    s3_endpoint_url: Optional[str] = None, config_from: Optional[str] = None, hub_endpoint: Optional[str] = None,
) -> CheckpointSource:
    """Open a model reference with the first source kind that matches it; raise CheckpointError
    naming it when none does.

    `shape_only`: accept a config.json without weights (see the module docstring).
    `s3_endpoint_url`: the S3 endpoint for `s3://` paths (S3-compatible stores).
    `config_from`: for DeepSpeed checkpoints, a Hugging Face directory with config.json/tokenizer.
    `hub_endpoint`: the Hub endpoint for Hub ids (None: this process's `HF_ENDPOINT`).
    """
    options = SourceOptions(revision, allow_pickle, shape_only, s3_endpoint_url, config_from, hub_endpoint)
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


def _open_deepspeed(path: str, o: SourceOptions) -> CheckpointSource:
    from raymerge.checkpoints.deepspeed import DeepSpeedSource

    return DeepSpeedSource(Path(path).expanduser(), allow_pickle=o.allow_pickle, config_from=o.config_from)


def _open_shape_only(path: str, o: SourceOptions) -> CheckpointSource:
    from raymerge.checkpoints.shapes import ShapeOnlySource  # builds the model on torch's meta device

    return ShapeOnlySource(Path(path).expanduser())


def _open_s3(path: str, o: SourceOptions) -> CheckpointSource:
    from raymerge.checkpoints.s3 import S3Source

    return S3Source(path, endpoint_url=o.s3_endpoint_url, allow_pickle=o.allow_pickle)


register_source(SourceKind(
    "deepspeed", lambda p, o: Path(p).expanduser().is_dir() and _is_deepspeed_folder(Path(p).expanduser()),
    _open_deepspeed,
    config_from=True, doc="a DeepSpeed ZeRO checkpoint folder (engine.save_checkpoint)",
))
register_source(SourceKind(
    "shape-only", _shape_only, _open_shape_only,
    doc="a config.json without weights (planning only)",
))
register_source(SourceKind(
    "local", lambda p, o: Path(p).expanduser().is_dir(), _open_local,
    doc="a local Hugging Face folder (*.safetensors, or pytorch_model*.bin with allow_pickle)",
))
register_source(SourceKind("s3", lambda p, o: p.startswith("s3://"), _open_s3, doc="s3://bucket/prefix (ranged GETs)"))


def _open_hub(path: str, o: SourceOptions) -> CheckpointSource:
    from raymerge.checkpoints.hub import open_hub

    return open_hub(path, o.revision, endpoint=o.hub_endpoint, allow_pickle=o.allow_pickle)


def _pin_hub(path: str, o: SourceOptions) -> dict[str, Any]:
    from raymerge.checkpoints.hub import pin_hub_reference

    sha, endpoint = pin_hub_reference(path, o.revision, o.hub_endpoint)
    return {"revision": sha, "hub_endpoint": endpoint}


register_source(SourceKind(
    "hub", lambda p, o: is_hub_reference(p), _open_hub, pin=_pin_hub,
    doc="a Hugging Face Hub id org/name[@revision]: headers over HTTP, shards fetched on first read, one commit",
))


