"""A whole merge, end to end: config -> headers -> operators -> workers -> atomic publish.

Everything that can fail from metadata alone (config errors, missing models or tensors, shape
mismatches, an output path that already holds a model) fails here, in the driver, before Ray
starts a worker or a byte is written. Any later failure removes the staging folder, so nothing
is ever published half-written.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from raymerge.checkpoints import CheckpointSource, SourceSpec, StagedOutput, parse_size, plan_shards
from raymerge.checkpoints.model_files import merged_model_config, model_card, tokenizer_files
from raymerge.checkpoints.source import CheckpointError
from raymerge.checkpoints.writer import DEFAULT_SHARD_BYTES
from raymerge.config import ConfigError, MergeConfig, ModelRef, load_config
from raymerge.runtime.global_trim import apply_model_trim, uses_model_trim
from raymerge.runtime.executor import ExecutionStats, ensure_ray, run_operators
from raymerge.runtime.operators import MergeProgram, build_program, check_sources_compatible

GB = 1e9


@dataclass
class MergeResult:
    """What a merge produced and how long it took (all sizes in bytes, times in seconds)."""

    output: Path
    tensors: int
    bytes_read: int
    bytes_written: int
    workers: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    peak_worker_rss_bytes: int = 0
    peak_device_bytes: int = 0
    files: list[str] = field(default_factory=list)

    @property
    def read_gbps(self) -> float:
        merge_s = self.timings.get("merge", self.seconds)
        return self.bytes_read / GB / merge_s if merge_s > 0 else 0.0

    def summary(self) -> str:
        t = self.timings
        line = (
            f"merged {self.tensors} tensors into {self.output} in {self.seconds:.1f} s "
            f"(plan {t.get('plan', 0):.1f} s, Ray start {t.get('ray', 0):.1f} s, merge {t.get('merge', 0):.1f} s, "
            f"publish {t.get('publish', 0):.1f} s): read {human_bytes(self.bytes_read)} at "
            f"{self.read_gbps:.2f} GB/s, wrote {human_bytes(self.bytes_written)}; {self.workers} worker(s), "
            f"peak worker memory {human_bytes(self.peak_worker_rss_bytes)} RSS"
        )
        if self.peak_device_bytes:
            line += f", {human_bytes(self.peak_device_bytes)} GPU"
        return line


def human_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class MergeOptions:
    workers: Optional[int] = None
    overwrite: bool = False
    random_seed: Optional[int] = None
    quiet: bool = False
    address: Optional[str] = None
    out_shard_size: Union[int, str, None] = None
    allow_pickle: bool = False
    allow_mixed_architectures: bool = False


def open_sources(refs: list[ModelRef], allow_pickle: bool) -> dict[ModelRef, tuple[SourceSpec, CheckpointSource]]:
    opened: dict[ModelRef, tuple[SourceSpec, CheckpointSource]] = {}
    try:
        for ref in refs:
            spec = SourceSpec(ref.path, ref.revision, allow_pickle)
            opened[ref] = (spec, spec.open())
    except Exception:
        for _, src in opened.values():
            src.close()
        raise
    return opened


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("raymerge")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "dev"


def _tokenizer_donor(config: MergeConfig, label: str, program: MergeProgram) -> Optional[ModelRef]:
    """Which model's tokenizer files to copy (None: the donor's)."""
    if config.tokenizer is not None:
        raise ConfigError(f"{label}: tokenizer: building a merged vocabulary is not supported yet; use tokenizer_source: base or a model path")
    src = config.tokenizer_source
    if src is None:
        return None
    if src == "union":
        raise ConfigError(f"{label}: tokenizer_source: 'union' (a merged vocabulary) is not supported yet; use 'base' or a model path")
    if src == "base":
        if config.base_model is None:
            raise ConfigError(f"{label}: tokenizer_source: 'base' needs a base_model")
        return config.base_model
    return src


def _chat_template_file(config: MergeConfig, label: str) -> Optional[str]:
    tmpl = config.chat_template
    if tmpl is None:
        return None
    if "{{" in tmpl or "{%" in tmpl:
        return tmpl
    raise ConfigError(
        f"{label}: chat_template: named templates ({tmpl!r}) are not supported yet; give the Jinja template itself"
    )


def _published_files(
    config: MergeConfig, label: str, program: MergeProgram, specs: dict[ModelRef, tuple[SourceSpec, CheckpointSource]],
    allow_pickle: bool,
) -> dict[str, bytes | str]:
    """config.json, tokenizer files, chat template, model card and config copy, by file name."""
    donor_ref = program.models[program.donor]
    donor_src = specs[donor_ref][1]
    donor_cfg = donor_src.read_json("config.json")
    if donor_cfg is None:
        raise CheckpointError(f"{donor_src.location}: config.json not found (needed for the output's config)")
    layer_sources = None
    if program.changes_layers:
        cfgs = [specs[m][1].read_json("config.json") or {} for m in program.models]
        layer_sources = [(cfgs[m], layer) for m, layer in program.layer_sources]
    files: dict[str, bytes | str] = {}
    dtype = config.out_dtype or config.dtype
    files["config.json"] = json.dumps(merged_model_config(donor_cfg, dtype=dtype, layer_sources=layer_sources), indent=2) + "\n"
    tok_ref = _tokenizer_donor(config, label, program)
    if tok_ref is None:
        files.update(tokenizer_files(donor_src))
    elif tok_ref in specs:
        files.update(tokenizer_files(specs[tok_ref][1]))
    else:
        src = SourceSpec(tok_ref.path, tok_ref.revision, allow_pickle).open()
        try:
            files.update(tokenizer_files(src))
        finally:
            src.close()
    tmpl = _chat_template_file(config, label)
    if tmpl is not None:
        files["chat_template.jinja"] = tmpl
    yaml_text = config.to_yaml()
    files["mergekit_config.yml"] = yaml_text
    base = str(config.base_model) if config.base_model else None
    files["README.md"] = model_card(
        method=config.merge_method, models=[str(m) for m in program.models], base=base, config_yaml=yaml_text, version=_version()
    )
    return files


def run_merge(config: Union[str, Path, dict[str, Any], MergeConfig], output: Union[str, Path], options: MergeOptions) -> MergeResult:
    """Run one merge; see `raymerge.merge` for the user-facing description."""
    t0 = time.perf_counter()
    cfg, label = load_config(config)
    settings = cfg.raymerge
    seed = options.random_seed if options.random_seed is not None else (settings.random_seed if settings and settings.random_seed is not None else 0)
    shard_size = options.out_shard_size or (settings.out_shard_size if settings else None) or DEFAULT_SHARD_BYTES
    try:
        shard_bytes = parse_size(shard_size)
    except ValueError as err:
        raise ConfigError(f"out_shard_size: {err}") from None
    staged = StagedOutput(output, overwrite=options.overwrite)
    staged.check_target()
    opened = open_sources(cfg.referenced_models(), options.allow_pickle)
    try:
        sources = {ref: src for ref, (_, src) in opened.items()}
        check_sources_compatible(sources, allow_mixed=options.allow_mixed_architectures)
        program = build_program(cfg, sources, source_label=label, random_seed=seed)
        extra_files = _published_files(cfg, label, program, opened, options.allow_pickle)
    finally:
        for _, src in opened.values():
            src.close()
    layout = plan_shards([(op.name, op.out_dtype, op.shape) for op in program.operators], shard_bytes)
    specs = [opened[m][0] for m in program.models]
    t_plan = time.perf_counter()

    ensure_ray(options.address)
    t_ray = time.perf_counter()
    if uses_model_trim(program.operators):
        program.operators, _ = apply_model_trim(program.operators, specs, [str(m) for m in program.models], label)
    stats: ExecutionStats
    try:
        staged.prepare(layout)
        stats = run_operators(program.operators, specs, layout, str(staged.staging), workers=options.workers, quiet=options.quiet)
        t_merge = time.perf_counter()
        index = layout.index_json()
        if index is not None:
            staged.write_file("model.safetensors.index.json", index)
        for name, data in extra_files.items():
            staged.write_file(name, data)
        out = staged.publish()
    except BaseException:
        staged.abort()
        raise
    t_end = time.perf_counter()
    return MergeResult(
        output=out,
        tensors=len(program.operators),
        bytes_read=stats.bytes_read,
        bytes_written=stats.bytes_written,
        workers=stats.workers,
        seconds=t_end - t0,
        timings={"plan": t_plan - t0, "ray": t_ray - t_plan, "merge": t_merge - t_ray, "publish": t_end - t_merge},
        peak_worker_rss_bytes=stats.peak_worker_rss_bytes,
        peak_device_bytes=stats.peak_device_bytes,
        files=sorted(p.name for p in out.iterdir()),
    )
