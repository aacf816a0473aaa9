"""Compile a merge config into a program: the one step every job that merges goes through.

`compile_merge` (one config) and `MergeCompiler` (several configs over the same inputs, whose
headers are read once: a search compiles one program per trial) turn a merge config into a
`CompiledMerge`:

- the operators, one per output tensor, each random method's operator carrying its per-tensor
  seed (`operators.tensor_seed` of the run's seed and the tensor name);
- the `SourceSpec` of each input model with its options (allow_pickle, the S3 endpoint,
  shape-only), which is what workers open; a Hub input's spec is pinned to the commit sha its
  revision points to when it is compiled (`SourceSpec.pinned`), so every worker reads that commit;
- every check that needs headers alone (architectures, parameter names, missing tensors, shapes,
  dtypes), each error naming the config's label (its file).

The run's seed is `CompileOptions.random_seed` (the CLI's `--random-seed`) when given, else the
config's `raymerge: random_seed`, else 0 — one rule for every caller.

Callers: `raymerge merge` and `raymerge.merge` (`runtime.merge._prepare`), `raymerge plan` and
`merge --plan-only` (the same, shape-only), merge-then-prune (`runtime.merged_source.merged_spec`),
search trials (`search.study._MergeTask`), and the guidance statistics, which work on the program
the merge compiled. So a search trial runs exactly the operators, with the same seeds, that
`raymerge merge best.yaml` runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from raymerge.checkpoints import CheckpointSource, SourceSpec
from raymerge.checkpoints.source import TOKENIZER_FILES
from raymerge.config import MergeConfig, ModelRef, load_config
from raymerge.runtime.operators import MergeOperator, MergeProgram, build_program, check_sources_compatible


@dataclass(frozen=True)
class CompileOptions:
    """What, besides the config, decides the program and how its inputs are opened."""

    random_seed: Optional[int] = None  # overrides the config's raymerge.random_seed (default 0)
    allow_pickle: bool = False  # accept pytorch_model*.bin inputs
    allow_mixed_architectures: bool = False  # skip the architecture check
    s3_endpoint_url: Optional[str] = None  # for s3:// inputs (already resolved by the driver)
    shape_only: bool = False  # models given as config.json alone (planning only)
    lora_merge_dtype: Optional[str] = None  # dtype of models read with a LoRA adapter (`model+lora`)
    trust_remote_code: bool = False  # run code a model ships (auto_map): tokenizers, guided statistics


@dataclass
class CompiledMerge:
    """A compiled merge: the program, the specs of its models (in `program.models` order), the seed."""

    config: MergeConfig
    label: str
    program: MergeProgram
    specs: list[SourceSpec]
    random_seed: int

    @property
    def operators(self) -> list[MergeOperator]:
        return self.program.operators


def resolve_seed(config: MergeConfig, options: CompileOptions) -> int:
    """The run's seed: the option, else the config's `raymerge: random_seed`, else 0."""
    if options.random_seed is not None:
        return options.random_seed
    settings = config.raymerge
    return settings.random_seed if settings is not None and settings.random_seed is not None else 0


def source_spec(ref: ModelRef, options: CompileOptions) -> SourceSpec:
    """How a worker opens `ref` under `options`."""
    return SourceSpec(ref.path, ref.revision, options.allow_pickle, shape_only=options.shape_only,
                      s3_endpoint_url=options.s3_endpoint_url, config_from=ref.config_from,
                      lora=ref.lora, lora_revision=ref.lora_revision,
                      lora_dtype=options.lora_merge_dtype if ref.lora is not None else None)


def open_sources(
    refs: list[ModelRef], allow_pickle: bool, shape_only: bool = False, s3_endpoint_url: Optional[str] = None,
) -> dict[ModelRef, tuple[SourceSpec, CheckpointSource]]:
    """Open `refs` (all or none: a failure closes the ones already opened)."""
    options = CompileOptions(allow_pickle=allow_pickle, shape_only=shape_only, s3_endpoint_url=s3_endpoint_url)
    compiler = MergeCompiler(options)
    try:
        compiler.sources(refs)
    except BaseException:
        compiler.close()
        raise
    return dict(compiler.opened)


class MergeCompiler:
    """Compiles merge configs over input sources opened once (closed by `close` / `with`)."""

    def __init__(self, options: CompileOptions = CompileOptions()) -> None:
        self.options = options
        self.opened: dict[ModelRef, tuple[SourceSpec, CheckpointSource]] = {}
        # Merged vocabularies by what they depend on (the tokenizer settings, the models, the
        # base): a search compiles every trial's config, and only its numbers change.
        self._vocabularies: dict[tuple, Any] = {}

    def sources(self, refs: Iterable[ModelRef]) -> dict[ModelRef, CheckpointSource]:
        """The opened sources of `refs` (opening the ones not open yet), keyed by reference."""
        out: dict[ModelRef, CheckpointSource] = {}
        for ref in refs:
            if ref not in self.opened:
                spec = source_spec(ref, self.options).pinned()  # a Hub id: its commit sha, once, here
                self.opened[ref] = (spec, spec.open())
            out[ref] = self.opened[ref][1]
        return out

    def compile(self, config: MergeConfig, label: str) -> CompiledMerge:
        """The program of `config`; ConfigError / MergePlanError / CheckpointError naming `label`."""
        sources = self.sources(config.referenced_models())
        check_sources_compatible(sources, allow_mixed=self.options.allow_mixed_architectures)
        seed = resolve_seed(config, self.options)
        vocabulary = self._vocabulary(config, sources, label)
        program = build_program(config, sources, source_label=label, random_seed=seed, vocabulary=vocabulary)
        return CompiledMerge(config=config, label=label, program=program,
                             specs=[self.opened[m][0] for m in program.models], random_seed=seed)

    def _vocabulary(self, config: MergeConfig, sources: dict[ModelRef, CheckpointSource], label: str) -> Any:
        """The merged vocabulary when the config chooses a tokenizer (`runtime.vocabulary`), built
        from tokenizer files alone; None otherwise, and when planning from config.json alone."""
        choice = config.tokenizer_choice()
        if choice is None:
            return None
        models = tuple(config.referenced_models())
        key = (repr(config.tokenizer_source),
               config.tokenizer.model_dump_json() if config.tokenizer is not None else None,
               models, config.base_model if config.base_model is not None else models[0])
        if key not in self._vocabularies:
            self._vocabularies[key] = self._build_vocabulary(config, sources, label)
        return self._vocabularies[key]

    def _build_vocabulary(self, config: MergeConfig, sources: dict[ModelRef, CheckpointSource], label: str) -> Any:
        from raymerge.checkpoints.local import inside
        from raymerge.checkpoints.remote_code import tokenizer_code_files
        from raymerge.runtime.vocabulary import build_vocabulary

        trust = self.options.trust_remote_code

        def files(ref: ModelRef) -> dict[str, bytes]:
            names = (*TOKENIZER_FILES, "config.json")
            local = Path(ref.path).expanduser()
            if ref not in sources and ref.revision is None and local.is_dir():  # a tokenizer-only folder is enough
                def read(n: str) -> Optional[bytes]:
                    path = inside(local, n, "tokenizer file")  # within the folder, after symlinks
                    return path.read_bytes() if path.is_file() else None
            else:
                read = (sources[ref] if ref in sources else self.sources([ref])[ref]).read_bytes
            found = {n: data for n in names if (data := read(n)) is not None}
            if trust:  # the tokenizer's own code, when its auto_map names some
                found.update(tokenizer_code_files(found, read, str(ref)))
            return found

        if self.options.shape_only:
            try:
                return build_vocabulary(config, sources, label, files, trust_remote_code=trust)
            except Exception:  # noqa: BLE001 - planning from config.json alone: keep the stored rows
                return None
        return build_vocabulary(config, sources, label, files, trust_remote_code=trust)

    def close(self) -> None:
        opened, self.opened = self.opened, {}
        for _, src in opened.values():
            src.close()

    def __enter__(self) -> "MergeCompiler":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def compile_merge(
    config: Union[str, Path, dict[str, Any], MergeConfig], options: CompileOptions = CompileOptions(), *,
    label: Optional[str] = None,
) -> CompiledMerge:
    """Compile one merge config (a YAML path, a dict or a MergeConfig; see the module docstring).
    `label` names the config in errors (default: its file)."""
    cfg, default_label = load_config(config)
    with MergeCompiler(options) as compiler:
        return compiler.compile(cfg, label or default_label)
