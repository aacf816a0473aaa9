"""A whole prune, end to end: config -> calibration windows -> stage actors -> masks -> publish.

1. Everything that can be checked from the config, the headers and the calibration text is
   checked first, in the driver, before Ray starts: the modules to prune exist, an N:M pattern
   divides every pruned width, the sparsities are valid, the calibration text yields enough
   windows of a length the model allows, the output path is writable.
2. Stage workers start (one per GPU, else one per CPU slot, at most one per layer; `workers=`
   overrides). The decoder layers are cut into contiguous stages by the planner's pipeline
   problem (`planners.plan_pipeline`: layer compute and resident memory against each worker's
   memory), so the model never has to fit on one worker. Each worker loads only its layers; the
   first also the embeddings, the last the final norm and head.
3. Calibration micro-batches flow through the stages as Ray object references (the driver never
   holds activations). Sequential mode: the first stage prunes its layers one after another,
   then its pruned outputs feed the next stage, and so on (the papers' order; a stage waits for
   the ones before it). Parallel mode: one dense pass, pipelined over micro-batches, collects
   every layer's statistics; then all stages prune at once. OWL first makes a dense pass for
   the outlier ratios. Magnitude pruning needs no calibration pass at all. The passes (dense
   perplexity, calibration, pruning, pruned perplexity) are queued on the stages without the
   driver waiting in between (`blocks.pipeline`: overlap): a stage goes on to its part of the
   next pass while later stages finish the previous one, so k stages on k cores approach k
   times one stage's throughput in parallel mode (less the pipeline's fill and drain: one
   micro-batch per stage). The report gives each stage's utilisation: the time spent inside its
   calls (measured in the actor) over the driver's wall time from loading to finishing.
4. Each worker writes its layers' tensors into the staging shards as soon as a layer is pruned;
   the first stage copies the tensors outside the layers. Perplexity on the held-out windows is
   measured before and after; the report, config and tokenizer are written and the staging
   folder is published through the output path merges use (`runtime.output.JobOutput`): renamed
   onto a local folder, or, for `s3://bucket/prefix`, its shards uploaded by the stage workers and
   `config.json` last. Nothing is published unless everything succeeded. The shard layout is
   always the one-process layout (same files and bytes however the layers are staged), so when
   the stages of an S3 output run on several nodes, which may share no disk, each node stages on
   its own disk and a shard's pieces written on other nodes are gathered on its owner's node,
   which uploads it (`NodeStaging`). (A prune does not resume an interrupted run: it starts
   afresh.) A stage actor that dies mid-run is handled like a lost
   merge worker (`runtime.actor_pool`, the pools' one fault policy): all stages are replaced and the pass reruns from the
   start into a freshly reset staging folder, at most `MAX_WORKER_RESTARTS` times, then
   `WorkerLostError`.

`in_process=True` runs the same stage code in the driver as a single stage, without Ray: the
reference the distributed runs are tested against. There a stage call runs when it is made, so
each pass runs as it is queued, and gets a phase line of its own (`_Passes`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

import planners
from raymerge.calibration import CalibrationError, CalibrationWindows, load_calibration, resolve_seqlen
from raymerge.checkpoints import CheckpointError, CheckpointSource, SourceSpec, plan_shards
from raymerge.config.cluster import parse_size
from raymerge.checkpoints.model_files import load_tokenizer, tokenizer_files
from raymerge.checkpoints.s3 import resolve_endpoint_url
from raymerge.checkpoints.safetensors_format import dtype_code
from raymerge.checkpoints.writer import DEFAULT_SHARD_BYTES, OutputLayout
from raymerge.progress import phase
from raymerge.config.merge_config import ConfigError
from raymerge.config.prune_config import Owl, PruneConfig, load_prune_config
from raymerge.errors import RaymergeError
from raymerge.blocks.decoder import ModelShape, describe_model
from raymerge.pruning.methods import check_config_method
from raymerge.pruning.layerwise import explicit_sparsities, owl_sparsities, uniform_sparsities
from raymerge.pruning.report import REPORT_FILE, PruneReport, perplexity
from raymerge.blocks.pipeline import Pipeline
from raymerge.blocks.stage import DTYPES, PruneSettings
from raymerge.pruning.report import ModuleResult
from raymerge.pruning.statistics import statistic_bytes
from raymerge.runtime.actor_resources import check_actor_count, default_actor_count
from raymerge.runtime.executor import ensure_ray
from raymerge.runtime.output import JobOutput, upload_on
from raymerge.runtime.planning import topology_from_workers
from raymerge.runtime import actor_pool
from raymerge.runtime.actor_pool import ActorPool, StageJob

log = logging.getLogger("raymerge")


@dataclass
class PruneOptions:
    workers: Optional[int] = None  # stage workers; None: one per GPU, else per CPU slot
    in_process: bool = False  # one stage in the driver, no Ray
    address: Optional[str] = None
    overwrite: bool = False
    quiet: bool = False
    plot: Union[str, Path, None] = None
    s3_endpoint_url: Optional[str] = None  # S3-compatible store for an s3:// model and output
    allow_pickle: bool = False  # accept pytorch_model*.bin and DeepSpeed ZeRO folders (torch pickles)
    keep_workers: bool = False  # keep the stage actors for the next job of this process (as merge's)
    trust_remote_code: bool = False  # build the model and tokenizer from code it ships (`checkpoints.remote_code`)


@dataclass
class PruneResult:
    output: Union[Path, str]  # a local directory, or the s3:// URL of an S3 output
    report: PruneReport
    seconds: float
    stages: list[dict[str, Any]] = field(default_factory=list)
    peak_worker_rss_bytes: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        r = self.report
        where = "in process" if len(self.stages) <= 1 and self.stages and self.stages[0].get("worker") == "driver" else (
            f"{len(self.stages)} stage worker{'s' if len(self.stages) != 1 else ''}"
        )
        return (
            f"pruned {r.pruned_numel:,} weights ({r.method}, {r.pattern}, {r.mode}) to {r.achieved_sparsity:.2%} "
            f"zeros into {self.output} in {self.seconds:.1f} s {'in one process' if where == 'in process' else 'on ' + where}; "
            f"peak worker RSS {self.peak_worker_rss_bytes / 2**30:.2f} GiB"
        )


class PruneError(RaymergeError, ValueError):
    """A prune cannot run as configured (the message says why, naming the module or file)."""


# -- checks that need only the config, headers and text ------------------------------------------------
def _model_shape(cfg: PruneConfig, model_config: dict[str, Any], label: str, source: CheckpointSource,
                 trust_remote_code: bool) -> ModelShape:
    try:
        return describe_model(model_config, cfg.modules, source=source, trust_remote_code=trust_remote_code)
    except CheckpointError as err:
        raise ConfigError(f"{label}: {err}") from None


def _check_widths(cfg: PruneConfig, shape: ModelShape, label: str) -> None:
    nm = cfg.nm
    if nm is None:
        return
    for module, (_, width) in shape.module_shapes.items():
        if width % nm[1]:
            raise ConfigError(
                f"{label}: pattern {cfg.pattern} needs every pruned module's input width to be a multiple of "
                f"{nm[1]}, but {module} has {width} inputs; choose another pattern or leave it out with `modules:`"
            )


def _check_tensors(shape: ModelShape, tensors: dict, location: str) -> None:
    for i in range(shape.num_layers):
        for module, dims in shape.module_shapes.items():
            name = f"{shape.layers_path}.{i}.{module}.weight"
            info = tensors.get(name)
            if info is None:
                raise CheckpointError(f"{location}: tensor {name} not found (the config.json says it exists)")
            if tuple(info.shape) != tuple(dims):
                raise CheckpointError(f"{location}: tensor {name} has shape {list(info.shape)}, expected {list(dims)}")


def _fixed_sparsities(cfg: PruneConfig, n_layers: int, label: str) -> Optional[list[float]]:
    """Per-layer sparsities known before any pass (None for OWL, which needs the dense pass)."""
    if isinstance(cfg.layerwise, Owl):
        return None
    if isinstance(cfg.layerwise, list):
        if len(cfg.layerwise) != n_layers:
            raise ConfigError(
                f"{label}: layerwise: {len(cfg.layerwise)} sparsities given, the model has {n_layers} decoder layers"
            )
        return explicit_sparsities(cfg.layerwise, n_layers)
    return uniform_sparsities(n_layers, cfg.target_sparsity)


@dataclass(frozen=True)
class _StagePlan:
    worker: int
    first: int
    last: int


def _describe(pool: ActorPool) -> list[Any]:
    """What each stage actor reported about itself (node, host, pid, device, memory); None for
    the in-process stage."""
    return pool.infos() if pool.remote else [None] * len(pool)


def plan_stages(shape: ModelShape, infos: Sequence[Any], settings: PruneSettings, mode: str) -> list[_StagePlan]:
    """Contiguous layer blocks per worker from the planner's pipeline problem."""
    topology = topology_from_workers(infos, [1.0] * len(infos))
    element = DTYPES[settings.dtype].itemsize
    stat_bytes = 0
    kind = settings.statistic
    if kind is not None and mode == "parallel":
        stat_bytes = sum(
            statistic_bytes(kind, width) for _, width in shape.module_shapes.values()
        )
    layers = [
        planners.Layer(f"layer{i}", compute_s=float(shape.layer_params), memory_bytes=float(shape.layer_params * element + stat_bytes))
        for i in range(shape.num_layers)
    ]
    try:
        plan = planners.plan_pipeline(planners.PipelineProblem(tuple(layers), topology.workers))
    except planners.InfeasibleError as err:
        raise PruneError(f"the model's layers do not fit on the stage workers: {err}") from None
    index = {w.name: i for i, w in enumerate(topology.workers)}
    return [_StagePlan(index[s.worker], s.first, s.last) for s in plan.stages]


def _per_stage(plans: list[_StagePlan], values: list[float]) -> list[dict[int, float]]:
    return [{i: values[i] for i in range(p.first, p.last + 1)} for p in plans]


def run_prune(config: Union[str, Path, dict[str, Any], PruneConfig], output: Union[str, Path], options: PruneOptions) -> PruneResult:
    """Run one prune; see `raymerge.prune` for the user-facing description."""
    t0 = time.perf_counter()
    check_actor_count(options.workers, "stages")  # `--stages` (its old spelling: `--workers`)
    cfg, label = load_prune_config(config)
    check_config_method(cfg.method, cfg.calibration is not None, label)
    try:
        shard_bytes = parse_size(cfg.out_shard_size or DEFAULT_SHARD_BYTES)
    except ValueError as err:
        raise ConfigError(f"{label}: out_shard_size: {err}") from None
    # Local folder or s3:// URL, checked now (`runtime.output`: the output path merge uses too).
    inputs = [cfg.model.path] if cfg.model is not None else []
    if cfg.merge is not None:
        from raymerge.config import parse_config

        inputs = [m.path for m in parse_config(cfg.merge, label).referenced_models()]
    from raymerge.checkpoints.output_name import check_output_name

    check_output_name(output)  # a dangling symlink or an over-long name: refused before any work
    from raymerge.runtime.job_env import check_output_outside_job_dir
    check_output_outside_job_dir(output)  # not into a Ray job's working dir, which Ray may delete (runtime.job_env)
    dest = JobOutput(output, overwrite=options.overwrite, s3_endpoint_url=options.s3_endpoint_url, keep=[label, *inputs])
    # The driver resolves the S3 endpoint so workers get it in the spec (not their environment).
    endpoint = resolve_endpoint_url(options.s3_endpoint_url)
    if cfg.merge is not None:  # prune the merged tensors; the merged model is never written
        from raymerge.runtime.merged_source import merged_spec

        spec: Any = merged_spec(cfg.merge, label, allow_pickle=options.allow_pickle, s3_endpoint_url=endpoint)
    else:
        assert cfg.model is not None
        spec = SourceSpec(cfg.model.path, cfg.model.revision, allow_pickle=options.allow_pickle,
                          s3_endpoint_url=endpoint, config_from=cfg.model.config_from).pinned()  # Hub: one commit
    source = spec.open()
    try:
        model_config = source.config()
        tensors = source.tensors()
        shape = _model_shape(cfg, model_config, label, source, options.trust_remote_code)
        _check_tensors(shape, tensors, source.location)
        _check_widths(cfg, shape, label)
        fixed = _fixed_sparsities(cfg, shape.num_layers, label)
        windows = None
        if cfg.calibration is not None:
            try:
                resolve_seqlen(cfg.calibration.seqlen, shape.max_positions)
                tokenizer = load_tokenizer(source, trust_remote_code=options.trust_remote_code)
                if cfg.calibration.curate is None:
                    windows = load_calibration(cfg.calibration, tokenizer, shape.max_positions)
            except CalibrationError as err:
                raise ConfigError(f"{label}: calibration: {err}") from None
        extra_files = _published_files(cfg, source)
    finally:
        source.close()
    layout = plan_shards([(name, dtype_code(info.dtype), info.shape) for name, info in tensors.items()], shard_bytes)
    dest.reserve(layout, list(extra_files.values()))  # the disk-space check, before Ray starts
    settings = PruneSettings(
        method=cfg.method, modules=shape.modules, nm=cfg.nm, blocksize=cfg.sparsegpt.blocksize,
        dampening=cfg.sparsegpt.dampening, dtype=cfg.dtype, weight_exponent=cfg.wanda.weight_exponent,
        norm_exponent=cfg.wanda.norm_exponent, trust_remote_code=options.trust_remote_code,
    )
    t_checked = time.perf_counter()

    # A stage actor that dies ends the attempt: fresh actors, a fresh staging folder, the whole
    # pass again, a bounded number of times (`runtime.actor_pool.StageJob`, the pools' one policy).
    job = StageJob("prune")
    driver: Optional[ActorPool] = None
    plans: list[_StagePlan] = []

    def attempt() -> tuple:
        nonlocal driver, plans, spread, staged_on_nodes
        if driver is not None:
            infos = _describe(driver)  # a rerun: the fresh actors
        elif options.in_process:
            driver = ActorPool.in_process("in-process stage")
            plans, infos = [_StagePlan(0, 0, shape.num_layers - 1)], _describe(driver)
        else:
            with phase("starting the prune stage workers", options.quiet):  # Ray too, when none runs yet
                ensure_ray(options.address)
                n = options.workers if options.workers is not None else default_actor_count()
                driver = actor_pool.acquire(max(1, min(n, shape.num_layers)), what="prune stage workers")
            every = _describe(driver)
            plans = plan_stages(shape, every, settings, cfg.mode)
            driver.keep([p.worker for p in plans])  # the unused actors end
            driver.labels = [f"stage {k} (layers {p.first}-{p.last})" for k, p in enumerate(plans)]
            infos = [every[p.worker] for p in plans]
        job.watch(driver)
        stages = driver.workers
        dest.open(layout)  # afresh on every attempt: nothing a lost attempt wrote is kept
        # An S3 output from stages on several nodes: each node stages on its own disk (`NodeStaging`).
        nodes = [info.node_id for info in infos] if driver.remote and dest.remote else []
        spread = upload_on(driver.actors) if driver.remote else None
        staged_on_nodes = None  # (a retry's new job wipes this attempt's node copies: `ensure_node_shards`)
        if len(set(nodes)) > 1:
            staged_on_nodes = NodeStaging.plan(layout, _writers(shape, tensors, plans), nodes)
            staged_on_nodes.begin(driver, str(dest.staging))
            spread = upload_on(driver.actors, staged_on_nodes.owner)
        last = len(plans) - 1
        t_start = time.perf_counter()  # the stages' wall time (utilisation) starts with their loading
        with phase(f"loading {shape.num_layers} layers on {len(plans)} stage(s)", options.quiet):
            loaded = [
                w.load(model_config, spec, p.first, p.last, settings, k == 0, k == last, str(dest.staging), layout)
                for k, (w, p) in enumerate(zip(stages, plans))
            ]
            stage_bytes = driver.get(loaded)
        pipe = Pipeline(driver, stages, cfg.batch_size, options.quiet)
        wins = windows
        if cfg.calibration is not None and wins is None:  # curation: pick windows by activations
            wins = _curated_windows(cfg, tokenizer, shape, pipe, label)
        t_loaded = time.perf_counter()

        # Every pass is queued without waiting (`blocks.pipeline`: overlap), so the stages overlap
        # across passes as well as across micro-batches; the driver waits once, below. Only OWL's
        # ratios, which the driver needs to set the sparsities, are waited for on the way. In
        # process each pass runs as it is queued, in a phase line of its own (`_Passes`).
        evaluates = _evaluates(cfg, wins)
        passes = _Passes(driver, options.quiet)
        if evaluates:
            passes.add("dense perplexity", lambda: pipe.nll_parts(wins.heldout),
                       f"perplexity before pruning ({wins.heldout.shape[0]} held-out windows)")
        kind = settings.statistic
        if fixed is None:  # OWL
            assert isinstance(cfg.layerwise, Owl) and wins is not None
            collect = ("norms",) if cfg.mode == "sequential" or kind is None else tuple(dict.fromkeys(("norms", kind)))
            with phase("OWL dense pass (outlier counts per layer)", options.quiet):
                pipe.dense_pass(wins.calibration, collect, "OWL dense pass", wait=False)
                ratios: dict[int, float] = {}
                for part in driver.get([s.outlier_ratios(cfg.layerwise.owl.m) for s in stages]):
                    ratios.update(part)
            layer_sparsities = owl_sparsities([ratios[i] for i in range(shape.num_layers)], cfg.target_sparsity, cfg.layerwise.owl.lam)
            if cfg.mode == "sequential":
                passes.add("clear statistics", lambda: [s.clear_statistics() for s in stages])
        else:
            layer_sparsities = fixed
            if kind is not None and cfg.mode == "parallel":
                passes.add("calibration pass", lambda: pipe.dense_pass(wins.calibration, (kind,), wait=False),
                           f"calibration pass ({wins.calibration.shape[0]} windows, {kind} statistics)")
        per_stage = _per_stage(plans, layer_sparsities)
        pruning = f"pruning ({cfg.method}, {cfg.mode})"
        if kind is not None and cfg.mode == "sequential":
            passes.add("pruning", lambda: pipe.prune_sequential(wins.calibration, per_stage, wait=False), pruning)
        else:
            passes.add("pruning", lambda: pipe.prune_collected(per_stage, wait=False), pruning)
        if evaluates:
            passes.add("pruned perplexity", lambda: pipe.nll_parts(wins.heldout),
                       f"perplexity after pruning ({wins.heldout.shape[0]} held-out windows)")
        done = passes.wait(f"{cfg.method}, {cfg.mode}")
        nll_before = pipe.nll_total(done["dense perplexity"]) if evaluates else None
        nll_after = pipe.nll_total(done["pruned perplexity"]) if evaluates else None
        t_pruned = time.perf_counter()

        copies = _copy_lists(shape, tensors, plans)
        copied = [s.copy(names) for s, names in zip(stages, copies)]
        # (Each actor runs its calls in order: its copies, its pieces read, the pieces written, finish.)
        moved = staged_on_nodes.gather(stages, str(dest.staging)) if staged_on_nodes is not None else []
        finished = driver.get(copied + moved + [s.finish() for s in stages])[len(copied) + len(moved):]
        wall = time.perf_counter() - t_start
        finished = [(*f, wall) for f in finished]  # + the driver's wall time over the stages' lifetime
        return infos, stage_bytes, wins, nll_before, nll_after, finished, t_loaded, t_pruned, staged_on_nodes

    spread = None  # how an S3 output's shards are uploaded (set by each attempt)
    staged_on_nodes: Optional[NodeStaging] = None  # the last attempt's node copies, if any
    try:
        infos, stage_bytes, windows, nll_before, nll_after, finished, t_loaded, t_pruned, staged_on_nodes = job.run(attempt)
        assert driver is not None
        results: list[ModuleResult] = [r for part in finished for r in part[0]]
        report = PruneReport.build(
            results, method=cfg.method, pattern=cfg.pattern, mode=cfg.mode, target=cfg.target_sparsity,
            model_parameters=sum(info.numel for info in tensors.values()),
            stages=[
                {"worker": "driver" if info is None else f"{info.host}:{info.pid}", "device": "cpu" if info is None else info.device,
                 "layers": [p.first, p.last], "resident_bytes": b, **_utilisation(f[2], f[3])}
                for p, info, b, f in zip(plans, infos, stage_bytes, finished)
            ],
        )
        if nll_before is not None and nll_after is not None:
            report.perplexity_before = perplexity(*nll_before)
            report.perplexity_after = perplexity(*nll_after)
            report.eval_tokens = nll_after[1]
        if windows is not None:
            report.calibration = {"nsamples": windows.nsamples, "seqlen": windows.seqlen, "eval_windows": int(windows.heldout.shape[0])}
        # An S3 output's shards are uploaded by the stage workers (the driver, in process); each
        # by the stage whose node holds it whole when the stages stage on their nodes' own disks.
        out = dest.publish(layout, {**extra_files, REPORT_FILE: report.to_json()}, spread=spread)
        if staged_on_nodes is not None:  # published: the nodes' staging copies go
            driver.get([w.drop_node_shards(str(dest.staging), staged_on_nodes.job) for w in driver.workers])
    except BaseException as err:
        if driver is not None:
            driver.kill()  # before removing the staging folder the workers write into
        if staged_on_nodes is not None:  # no node keeps a copy of a prune that failed
            staged_on_nodes.drop(str(dest.staging))
        dest.fail(err)
        raise
    finally:
        if driver is not None:
            actor_pool.release(driver, keep=options.keep_workers)  # (a killed pool is not kept)
    if options.plot is not None:
        report.plot(options.plot)
    t_end = time.perf_counter()
    return PruneResult(
        output=out, report=report, seconds=t_end - t0, stages=report.stages,
        peak_worker_rss_bytes=max(f[1] for f in finished),
        timings={"checks": t_checked - t0, "load": t_loaded - t_checked, "prune": t_pruned - t_loaded, "write": t_end - t_pruned},
    )


class _Passes:
    """The prune's passes after loading (dense perplexity, the calibration pass, pruning, pruned
    perplexity), each a list of handles under its name.

    On Ray a pass is queued without waiting (`blocks.pipeline`: overlap) and `wait` waits for
    every pass at once, in one phase line with a progress bar over the steps. In process a call
    runs when it is made, so a pass runs while it is queued: `add` runs it inside a phase line of
    its own (`title`; none for bookkeeping calls), so the user sees each pass start and end
    while it works instead of one line after all the work is done."""

    def __init__(self, pool: ActorPool, quiet: bool) -> None:
        self.pool, self.quiet = pool, quiet
        self.queued: dict[str, list[Any]] = {}

    def add(self, name: str, queue: Callable[[], Optional[list[Any]]], title: Optional[str] = None) -> None:
        """Queue a pass (`queue()` makes its calls and returns their handles)."""
        if self.pool.remote or title is None:
            self.queued[name] = queue() or []
            return
        with phase(title, self.quiet):
            self.queued[name] = queue() or []

    def wait(self, what: str) -> dict[str, list[Any]]:
        """Every pass's values, by name; on Ray under one phase line, 'pruning (`what`; the
        passes, pipelined over N stage(s))'."""
        handles = [h for hs in self.queued.values() for h in hs]
        if self.pool.remote:
            with phase(f"pruning ({what}; {', '.join(self.queued)}, pipelined over {len(self.pool)} stage(s))", self.quiet):
                handles = self.pool.get(handles, "pruning pipeline", self.quiet)
        values = iter(handles)
        return {name: [next(values) for _ in hs] for name, hs in self.queued.items()}


def _utilisation(busy: float, wall: float) -> dict[str, float]:
    """A stage's busy time (inside its calls, measured by the actor), the driver's wall time over
    the stage's lifetime (from submitting `load` to `finish` returning) and their ratio. The calls
    run one at a time within that span, so the ratio is at most 1 (min() only absorbs clock
    rounding); it is above 0, loading being a call."""
    return {"busy_seconds": round(busy, 3), "wall_seconds": round(wall, 3),
            "utilisation": round(min(1.0, busy / wall), 4) if wall > 0 else 1.0}


def _evaluates(cfg: PruneConfig, windows: Optional[CalibrationWindows]) -> bool:
    return cfg.evaluate and windows is not None and windows.heldout.shape[0] > 0


def _curated_windows(cfg: PruneConfig, tokenizer, shape: ModelShape, pipe: Pipeline, label: str) -> CalibrationWindows:
    try:
        return load_calibration(cfg.calibration, tokenizer, shape.max_positions, features=pipe.features)
    except CalibrationError as err:
        raise ConfigError(f"{label}: calibration: {err}") from None


def _writers(shape: ModelShape, tensors: dict, plans: list[_StagePlan]) -> dict[str, int]:
    """The stage that writes each output tensor: a layer's tensors (pruned or copied) its
    layer's stage; everything outside the decoder layers the first stage (`_copy_lists`)."""
    root = shape.layers_path + "."
    out: dict[str, int] = {}
    for name in tensors:
        k = 0
        if name.startswith(root):
            layer = int(name[len(root):].split(".", 1)[0])
            k = next((j for j, p in enumerate(plans) if p.first <= layer <= p.last), 0)
        out[name] = k
    return out


def _copy_lists(shape: ModelShape, tensors: dict, plans: list[_StagePlan]) -> list[list[str]]:
    """Per stage, the tensors it copies unchanged: its layers' unpruned tensors; the first stage
    also everything outside the decoder layers."""
    pruned = {f"{shape.layers_path}.{i}.{m}.weight" for i in range(shape.num_layers) for m in shape.modules}
    out: list[list[str]] = [[] for _ in plans]
    for name, k in _writers(shape, tensors, plans).items():
        if name not in pruned:
            out[k].append(name)
    return out


MOVE_BYTES = 256 * 2**20  # a shard piece moves between nodes in chunks of at most this many bytes


@dataclass(frozen=True)
class NodeStaging:
    """An S3 output written by stages on nodes that share no disk (step 4 of the module docstring).

    The shard layout stays the one a single process writes (same files, same bytes), so a shard
    can hold tensors of two stages on two nodes. Each shard gets an owner: the stage that writes
    most of its bytes (ties: the earlier stage). Each node allocates its own copy of the shards
    its stages write (`checkpoints.writer.ensure_node_shards`, at the driver's staging path; a
    node sharing the driver's disk uses the driver's folder). Once the stages have written
    everything, the byte ranges of a shard written on another node than its owner's are read
    there and written into the owner's copy (`MOVE_BYTES` chunks, actor to actor through Ray's
    object store: the driver holds only references), so every shard is whole on its owner's
    node; the owner uploads it (`runtime.output.upload_on` with owners), and after the publish
    each node removes its copy. When the prune fails, its stage actors are killed and a small
    task on each node removes that node's copy (`drop`)."""

    job: str  # names this attempt's node copies (a rerun is a new job: its copies start afresh)
    owner: dict[str, int]  # shard file -> the stage that uploads it
    shards: tuple[tuple[tuple[str, bytes, int], ...], ...]  # per stage: what its node allocates
    moves: tuple[tuple[int, int, str, int, int], ...]  # (from stage, to stage, shard file, begin, end)
    nodes: tuple[str, ...]  # each stage's node

    def drop(self, staging: str, timeout: float = 60.0) -> None:
        """After a failure, the stage actors gone: remove this job's copy on every node, by a
        task pinned to each (`checkpoints.writer.drop_node_shards`). Best effort: a node lost or
        not answering within `timeout` keeps its copy, until the next prune to this output (a
        new job) wipes it; a warning says so."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from raymerge.checkpoints.writer import drop_node_shards

        task = ray.remote(num_cpus=0, max_retries=0)(drop_node_shards)
        nodes = sorted(set(self.nodes))
        refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(staging, self.job)
                for node in nodes]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        failed = len(refs) - len(ready)
        for ref in ready:
            try:
                ray.get(ref)
            except Exception:  # noqa: BLE001 - a lost node: counted and reported below
                failed += 1
        if failed:
            log.warning("raymerge: %d node(s) kept their copy of the failed prune's shards under %s; the next "
                        "prune to this output removes them", failed, staging)

    @classmethod
    def plan(cls, layout: OutputLayout, writers: dict[str, int], nodes: Sequence[str]) -> "NodeStaging":
        """`writers`: the stage writing each tensor (`_writers`); `nodes`: each stage's node."""
        import uuid

        written: list[dict[int, int]] = [{} for _ in layout.shards]
        for name, k in writers.items():
            i = layout.shard_of[name]
            written[i][k] = written[i].get(k, 0) + layout.shards[i].entries[name].nbytes
        owner = {s.filename: max(sorted(written[i]), key=lambda k: written[i][k]) if written[i] else 0
                 for i, s in enumerate(layout.shards)}
        ranges: dict[tuple[int, str], list[list[int]]] = {}
        needs: dict[str, set[int]] = {node: set() for node in nodes}
        for i, shard in enumerate(layout.shards):
            o = owner[shard.filename]
            needs[nodes[o]].add(i)
            for name, entry in sorted(shard.entries.items(), key=lambda kv: kv[1].begin):
                k = writers[name]
                needs[nodes[k]].add(i)
                if nodes[k] == nodes[o] or entry.nbytes == 0:
                    continue
                spans = ranges.setdefault((k, shard.filename), [])
                if spans and spans[-1][1] == entry.begin:
                    spans[-1][1] = entry.end
                else:
                    spans.append([entry.begin, entry.end])
        moves = []
        for (k, filename), spans in ranges.items():
            for begin, end in spans:
                for at in range(begin, end, MOVE_BYTES):
                    moves.append((k, owner[filename], filename, at, min(end, at + MOVE_BYTES)))
        allocate = {node: tuple((layout.shards[i].filename, layout.shards[i].header, layout.shards[i].size)
                                for i in sorted(held)) for node, held in needs.items()}
        return cls(uuid.uuid4().hex, owner, tuple(allocate[node] for node in nodes), tuple(moves), tuple(nodes))

    def begin(self, pool: ActorPool, staging: str) -> None:
        """Before the stages load: the driver's folder is marked as this job's (a stage on the
        driver's disk writes into it), each other node allocates its copy."""
        from raymerge.checkpoints.writer import mark_node_shards

        mark_node_shards(staging, self.job)
        pool.get([w.ensure_node_shards(staging, self.job, list(shards)) for w, shards in zip(pool.workers, self.shards)])

    def gather(self, stages: Sequence[Any], staging: str) -> list[Any]:
        """Queue the moves (all reads, then all writes, so no actor waits on one that waits on it);
        the writes' handles."""
        reads = [stages[src].read_staged(staging, name, begin, end) for src, _, name, begin, end in self.moves]
        return [stages[dst].write_staged(staging, name, begin, data)
                for data, (_, dst, name, begin, _) in zip(reads, self.moves)]


def _published_files(cfg: PruneConfig, source: CheckpointSource) -> dict[str, Union[str, bytes]]:
    files: dict[str, Union[str, bytes]] = {"config.json": json.dumps(source.config(), indent=2) + "\n"}
    files.update(tokenizer_files(source))
    files["raymerge_prune.yml"] = cfg.to_yaml()
    return files
