"""Optuna studies over merge coefficients and sparsity ratios, evaluated in memory on Ray.

The driver owns the study (ask/tell) and never holds weights. Each of `concurrency` pipelines
is a set of resident stage actors (`runtime.pool_actor.PoolActor`) that together hold the model once,
split into contiguous blocks of layers; a pipeline evaluates one trial at a time:

- merge searches: the trial's values are put into the config (`SearchSpace.fill`), the merge
  is compiled from headers (cheap; `runtime.compile`, the very step `raymerge merge` uses, so a
  trial's operators and their random seeds are those `raymerge merge best.yaml` runs), and each
  stage recomputes its own layers' operators from the input tensors it holds, then the held-out
  windows flow through the stages;
- prune searches: one dense calibration pass per pipeline collects every module's input norms;
  a trial sends per-layer sparsities (and metric exponents) and each stage re-masks its layers.

Mistakes in the search config (a bad range, a bad merge parameter at the ranges' middle
values) are `ConfigError`s naming its file, before anything starts. Nothing is written to disk
per trial. A trial whose config is invalid or whose evaluation
raises is recorded as failed with its error (user attribute `error`) and the study goes on; a
pipeline whose actor died is rebuilt. The study lives in a journal file in the output folder by
default (or an RDB URL), so rerunning the same command continues it: trials already finished
count towards `n_trials`, trials left running by a killed driver are marked failed.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
import yaml
from raymerge.progress import bar as tqdm  # tqdm with raymerge.progress.bar_kwargs
from raymerge.progress import phase, verbose

from raymerge.calibration import CalibrationError, CalibrationWindows, load_calibration
from raymerge.checkpoints import CheckpointSource, OutputError, SourceSpec
from raymerge.config.merge_config import ConfigError, ModelRef, parse_config
from raymerge.config.prune_config import PruneConfig, parse_prune_config
from raymerge.pruning.methods import check_config_method
from raymerge.config.search_config import Objective, SearchConfig, load_search_config
from raymerge.blocks.decoder import ModelShape, describe_model
from raymerge.pruning.layerwise import owl_sparsities
from raymerge.pruning.methods import get_prune_method
from raymerge.blocks.stage import PruneSettings
from raymerge.runtime.actor_resources import actor_resources, check_actor_count
from raymerge.runtime.compile import CompiledMerge, CompileOptions, MergeCompiler
from raymerge.runtime.operators import MergeOperator
from raymerge.blocks.pipeline import Pipeline, even_stages
from raymerge.checkpoints.model_files import load_tokenizer
from raymerge.search.lm_eval_objective import donor_files
from raymerge.search.objectives import REFERENCE_KEYS, ObjectiveContext, check_objectives, direction_of, get_objective
from raymerge.search.space import SearchSpace, SearchSpaceError
from raymerge.runtime import actor_pool
from raymerge.runtime.actor_pool import ActorPool, Restarts, actor_lost

STUDY_FILE = "study.journal"


@dataclass
class SearchOptions:
    stages: int = 1  # stage workers per pipeline (the model is split over them)
    in_process: bool = False  # one pipeline in the driver, no Ray (trials run one after another)
    address: Optional[str] = None
    quiet: bool = False
    # Write the best model: True -> OUT/best-model (replaced on every run); a folder or an
    # s3://bucket/prefix -> there, through the output path merges use (`runtime.output`).
    materialize: Union[bool, str, Path] = False
    overwrite: bool = False  # replace what a given `materialize` target holds
    # How the merge's inputs are opened and checked, as `raymerge merge` takes them (the merge's
    # random seed is the merge config's `raymerge: random_seed`, so best.yaml carries it).
    allow_pickle: bool = False
    allow_mixed_architectures: bool = False
    s3_endpoint_url: Optional[str] = None
    # build the stages' layers and the tokenizer from code the model ships (its auto_map), as
    # transformers' trust_remote_code; also given to the compile step and to --materialize
    trust_remote_code: bool = False


@dataclass
class TrialTimes:
    """Where the trials' time went, summed over the trials run now (seconds of wall clock).

    Each trial's window runs from its `ask` to its `tell` (and the progress bar's best-value read
    after it); the window is cut into disjoint parts, so they are non-negative and add up to
    `total` exactly:

    - `remerge`: the stage actors recomputing the trial's weights (`apply_merge`; for prune
      searches `apply_prune` and OWL's outlier ratios) — the union of those calls' intervals;
    - `forward`: the evaluation — the actors' embed/forward/loss/logits calls (the union of their
      intervals, less re-merge time), and a driver-side objective's `value` (lm_eval, user functions);
    - `optuna`: ask, suggest, tell, user attributes and the best-value read (sampler and storage);
    - `compile`: building the trial's merge program from headers (`runtime.compile`);
    - `other`: the rest — dispatching calls and moving parameters and results between the driver
      and the actors (transfer), waiting, the driver's own work.

    Stage actors report their intervals with the trial (`PoolActor.trial_times`, queued after the
    trial's last call on each stage); intervals are clipped to the trial's window. With several
    pipelines (`concurrency`), trials overlap, so `total` can exceed the study's wall time.
    """

    trials: int = 0
    total: float = 0.0
    remerge: float = 0.0
    forward: float = 0.0
    optuna: float = 0.0
    compile: float = 0.0
    other: float = 0.0

    PARTS = ("remerge", "forward", "optuna", "compile", "other")

    def per_trial(self) -> dict[str, float]:
        n = max(1, self.trials)
        return {k: getattr(self, k) / n for k in ("total", *self.PARTS)}

    @property
    def overhead(self) -> float:
        """The fraction of the trials' time beyond re-merge + forward (0 when nothing ran)."""
        return (self.optuna + self.compile + self.other) / self.total if self.total > 0 else 0.0

    def summary(self) -> str:
        if not self.trials:
            return "per trial: no trial run"
        t = self.per_trial()
        return (f"per trial ({t['total']:.3f} s): re-merge {t['remerge']:.3f} s, forward {t['forward']:.3f} s, "
                f"Optuna {t['optuna']:.3f} s, compile {t['compile']:.3f} s, transfer/other {t['other']:.3f} s "
                f"(beyond re-merge + forward: {100 * self.overhead:.1f}%)")


class _TrialClock:
    """One trial's window and the intervals seen in it (see `TrialTimes`)."""

    def __init__(self) -> None:
        self.start = time.time()
        self.spans: dict[str, list[tuple[float, float]]] = {k: [] for k in TrialTimes.PARTS}

    @contextlib.contextmanager
    def part(self, kind: str) -> Iterator[None]:
        """Time the block as `kind` (its interval, even when it raises)."""
        t0 = time.time()
        try:
            yield
        finally:
            self.spans[kind].append((t0, time.time()))

    def actors(self, intervals: list[list[tuple[str, float, float]]]) -> None:
        for per_actor in intervals:
            for kind, a, b in per_actor:
                self.spans[kind].append((a, b))

    def add_to(self, times: TrialTimes) -> None:
        end = time.time()
        taken: list[tuple[float, float]] = []
        parts = {}
        for kind in ("remerge", "forward", "optuna", "compile"):
            spans = _union([(max(a, self.start), min(b, end)) for a, b in self.spans[kind] if min(b, end) > max(a, self.start)])
            parts[kind] = _length(spans) - _overlap(spans, taken)
            taken = _union(taken + spans)
        total = end - self.start
        times.trials += 1
        times.total += total
        for kind, seconds in parts.items():
            setattr(times, kind, getattr(times, kind) + max(0.0, seconds))
        times.other += max(0.0, total - _length(taken))


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _length(spans: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in spans)


def _overlap(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> float:
    """Length of the intersection of two unions of disjoint intervals."""
    return sum(max(0.0, min(b, d) - max(a, c)) for a, b in xs for c, d in ys)


@dataclass
class SearchResult:
    output: Path
    study: Any  # optuna.Study
    best_configs: list[Path]
    plots: list[Path]
    completed: int
    failed: int
    seconds: float
    trials_run: int = 0
    materialized: Union[Path, str, None] = None  # a local folder, or the s3:// URL
    best_values: list[list[float]] = field(default_factory=list)
    timings: TrialTimes = field(default_factory=TrialTimes)  # where the trials' time went

    @property
    def trials_per_hour(self) -> float:
        return 3600.0 * self.trials_run / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        best = "; ".join(", ".join(f"{v:.6g}" for v in vals) for vals in self.best_values) or "none"
        return (
            f"{self.completed} trials complete, {self.failed} failed ({self.trials_run} run now in {self.seconds:.1f} s, "
            f"{self.trials_per_hour:.0f} trials/hour); best: {best}; best config(s): "
            + ", ".join(str(p) for p in self.best_configs)
            + (f"; {self.timings.summary()}" if self.timings.trials else "")
        )


class TrialError(RuntimeError):
    """A trial could not be built or evaluated (recorded on the trial, the study goes on)."""


# -- what a search evaluates ------------------------------------------------------------------------------
class _MergeTask:
    """A merge search: the space, the opened inputs, and the operators of a trial per stage.
    Every trial is compiled by `runtime.compile` with the search's options, as `raymerge merge`
    compiles the exported best.yaml."""

    def __init__(self, cfg: SearchConfig, label: str, options: CompileOptions = CompileOptions()) -> None:
        self.label = label
        try:
            self.space = SearchSpace(cfg.merge, "merge")
        except SearchSpaceError as err:
            raise ConfigError(f"{label}: {err}") from None
        self.compiler = MergeCompiler(options)
        try:
            # The ranges' middle values: a mistake here is the search config's, named by its file.
            first = self.compile(self.space.fill({d.name: _middle(d) for d in self.space.dimensions}), f"{label}: merge")
        except BaseException:
            self.compiler.close()
            raise
        self.models: list[ModelRef] = list(first.program.models)
        self.specs = first.specs
        if first.program.changes_layers:
            self.compiler.close()
            raise ConfigError(f"{label}: merge: slices that change the layer stack cannot be searched in memory yet")
        self.donor = first.program.donor
        self.first_ops = first.operators
        # A tokenizer choice: the merged tokenizer and its row count, as the merge publishes them
        # (the choice is not searched, so every trial has the same; `MergeCompiler` builds it once).
        self.vocabulary = first.program.vocabulary

    def compile(self, config: dict[str, Any], where: str) -> CompiledMerge:
        """The merge program of a filled-in merge config (errors name `where`)."""
        return self.compiler.compile(parse_config(config, where), where)

    def operators(self, values: dict[str, Any]) -> list[MergeOperator]:
        try:
            program = self.compile(self.space.fill(values), f"{self.label}: merge (trial values)").program
            index = {m: i for i, m in enumerate(self.models)}
            remap = [index[m] for m in program.models]
        except Exception as err:  # noqa: BLE001 - a trial's parameters can be invalid in many ways
            raise TrialError(f"{type(err).__name__}: {err}") from None
        return [replace(op, inputs=tuple(replace(i, model=remap[i.model]) for i in op.inputs)) for op in program.operators]

    def reference_operators(self, ref: ModelRef) -> list[MergeOperator]:
        if ref not in self.models:
            raise ConfigError(f"{self.label}: objective reference {ref} must be one of the merge's models")
        cfg = {"merge_method": "linear", "models": [{"model": str(ref), "parameters": {"weight": 1.0}}]}
        dtype = self.space.template.get("dtype")
        if dtype:
            cfg["dtype"] = dtype
        program = self.compile(cfg, f"{self.label}: objective reference {ref}").program
        i = self.models.index(ref)
        return [replace(op, inputs=tuple(replace(t, model=i) for t in op.inputs)) for op in program.operators]

    def donor_source(self) -> CheckpointSource:
        return self.compiler.sources([self.models[self.donor]])[self.models[self.donor]]

    def close(self) -> None:
        self.compiler.close()


class _PruneTask:
    """A prune search: per-block sparsity offsets, OWL's lambda and m, metric exponents."""

    def __init__(self, cfg: SearchConfig, label: str) -> None:
        self.prune: PruneConfig = parse_prune_config(cfg.prune, f"{label}: prune")
        check_config_method(self.prune.method, self.prune.calibration is not None, f"{label}: prune")
        exponents = get_prune_method(self.prune.method).search_exponents
        if exponents is None or self.prune.nm is not None or self.prune.calibration is None:
            raise ConfigError(f"{label}: prune: searches support unstructured magnitude/wanda-family metrics with calibration text")
        self.space_cfg = cfg.space
        self.target = self.prune.target_sparsity
        dev = cfg.space.max_deviation
        if cfg.space.blocks and not (self.target - 2 * dev >= 0 and self.target + 2 * dev <= 0.99):
            raise ConfigError(
                f"{label}: space.max_deviation: offsets re-centred on the mean move a layer by up to 2 x {dev}; "
                f"with target {self.target} that leaves [0, 0.99]: use max_deviation <= {min(self.target, 0.99 - self.target) / 2:.4f}"
            )
        m = self.prune.model
        if m is None:
            raise ConfigError(f"{label}: prune: searching the pruning of a merged model (`merge:`) is not supported; merge first")
        self.specs = [SourceSpec(m.path, m.revision, config_from=m.config_from).pinned()]  # Hub: one commit
        self.source = self.specs[0].open()
        # Trials mask rows with |W|^a * ||X||^b; the method's spec gives its (a, b) (magnitude: b = 0,
        # compared per row, as Wanda does).
        self.default_exponents = exponents(self.prune)

    def suggest(self, trial: Any, n_layers: int) -> dict[str, Any]:
        sp, out = self.space_cfg, {}
        if sp.blocks:
            out["blocks"] = [trial.suggest_float(f"block{b}", -sp.max_deviation, sp.max_deviation) for b in range(min(sp.blocks, n_layers))]
        if sp.owl:
            out["owl_lambda"] = trial.suggest_float("owl_lambda", 0.0, 2 * sp.max_deviation)
            out["owl_m"] = trial.suggest_float("owl_m", 2.0, 10.0)
        if sp.exponents:
            out["weight_exponent"] = trial.suggest_float("weight_exponent", 0.0, 2.0)
            out["norm_exponent"] = trial.suggest_float("norm_exponent", 0.0, 2.0)
        return out

    def sparsities(self, values: dict[str, Any], n_layers: int, ratios: Optional[list[float]] = None) -> list[float]:
        """Per-layer sparsities with mean equal to the target (before clipping into [0, 0.99])."""
        if "blocks" in values:
            offsets = values["blocks"]
            per_layer = [offsets[i * len(offsets) // n_layers] for i in range(n_layers)]
            mean = sum(per_layer) / n_layers
            return [min(0.99, max(0.0, self.target + o - mean)) for o in per_layer]
        if "owl_lambda" in values and ratios is not None:
            return owl_sparsities(ratios, self.target, values["owl_lambda"])
        return [self.target] * n_layers

    def close(self) -> None:
        self.source.close()


def _middle(d) -> Any:
    return d.choices[0] if d.choices is not None else (d.low + d.high) / 2


# -- pipelines -------------------------------------------------------------------------------------------
class _SearchPipeline:
    """One set of resident stage actors (an `ActorPool`), loaded for the search. An actor that
    dies is handled by the pools' one fault policy (`runtime.actor_pool`): the study's
    `Restarts` counts it (`WorkerLostError` past the limit) and the pipeline's actors are renewed
    and loaded again; the trial it was running is recorded as failed."""

    def __init__(self, pool: ActorPool, plans: list[Any], setup: Callable[["_SearchPipeline"], None],
                 restarts: Restarts) -> None:
        self.driver, self.plans, self.setup, self.restarts = pool, plans, setup, restarts
        self.start()

    def start(self) -> None:
        try:
            self.setup(self)
        except BaseException:
            self.driver.kill()
            raise

    def lost(self, err: BaseException) -> bool:
        """When `err` is an actor's death: count it, renew and reload this pipeline (True)."""
        dead = actor_lost(err)
        if dead is None:
            return False
        self.restarts.lost(self.driver.label_of(dead), dead, "starting fresh actors for its pipeline")
        self.driver.renew()
        self.start()
        return True


def run_search(config: Union[str, Path, dict[str, Any], SearchConfig], output: Union[str, Path], options: SearchOptions) -> SearchResult:
    """Run (or continue) a study; see `raymerge.optimize` for the user-facing description."""
    import optuna

    t0 = time.perf_counter()
    check_actor_count(options.stages, "stages")
    cfg, label = load_search_config(config)
    check_objectives(cfg.objectives, label)
    if cfg.merge is not None:
        from raymerge.checkpoints.s3 import resolve_endpoint_url

        # The driver resolves the endpoint (as a merge does): stage workers get it in the specs.
        options = replace(options, s3_endpoint_url=resolve_endpoint_url(options.s3_endpoint_url))
    if str(output).startswith("s3:/"):
        raise OutputError(f"search output {output}: the study folder (journal, best.yaml, plots) must be local; "
                          "publish the best model to S3 with --materialize s3://bucket/prefix (materialize=...)")
    out = Path(output)
    from raymerge.search.output_check import check_search_output

    check_search_output(out, STUDY_FILE)  # a file at OUT, or a corrupt journal: one line, before any work
    target = _materialize_target(out, options)
    from raymerge.runtime.job_env import check_output_outside_job_dir
    check_output_outside_job_dir(out, target)  # not into a Ray job's working dir, which Ray may delete (runtime.job_env)
    if target is not None and options.materialize is not True:
        from raymerge.runtime.output import JobOutput

        # Checked now, not after the study: refused if it holds a model (without overwrite), unwritable, no bucket.
        JobOutput(target, overwrite=options.overwrite, s3_endpoint_url=options.s3_endpoint_url)
    out.mkdir(parents=True, exist_ok=True)
    task: Union[_MergeTask, _PruneTask] = _MergeTask(cfg, label, CompileOptions(
        allow_pickle=options.allow_pickle, allow_mixed_architectures=options.allow_mixed_architectures,
        s3_endpoint_url=options.s3_endpoint_url, trust_remote_code=options.trust_remote_code,
    )) if cfg.merge is not None else _PruneTask(cfg, label)
    level = optuna.logging.get_verbosity()
    if not verbose():  # Optuna's INFO lines ("A new study created", one per trial) repeat our progress bar
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return _run(cfg, label, out, task, options, t0, optuna)
    finally:
        optuna.logging.set_verbosity(level)
        task.close()


def _storage(cfg: SearchConfig, out: Path):
    if cfg.study.storage:
        return cfg.study.storage
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(out / STUDY_FILE)))


def _sampler(cfg: SearchConfig, grid: Optional[Callable[[], dict]], optuna):
    s, seed = cfg.study.sampler, cfg.study.seed
    if s == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if s == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    if s == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if s == "nsga3":
        return optuna.samplers.NSGAIIISampler(seed=seed)
    if grid is None:
        raise ConfigError("study.sampler: grid needs a merge search whose ranges all have `step` or `choices`")
    return optuna.samplers.GridSampler(grid(), seed=seed)


def _windows(cfg: SearchConfig, task, tokenizer, shape: ModelShape, objective: Objective) -> CalibrationWindows:
    base = cfg.evaluation if cfg.evaluation is not None else task.prune.calibration
    calib = base.model_copy(update={"dataset": objective.dataset or base.dataset, "curate": None})
    if isinstance(task, _MergeTask) or cfg.evaluation is not None:
        calib = calib.model_copy(update={"nsamples": 1})
    if calib.eval_samples < 1:
        raise ConfigError("evaluation.eval_samples must be at least 1 to score trials")
    try:
        return load_calibration(calib, tokenizer, shape.max_positions)
    except CalibrationError as err:
        raise ConfigError(f"evaluation: {err}") from None


def _run(cfg: SearchConfig, label: str, out: Path, task, options: SearchOptions, t0: float, optuna) -> SearchResult:
    donor = task.donor_source() if isinstance(task, _MergeTask) else task.source
    model_config = donor.config()
    trust = options.trust_remote_code
    shape = describe_model(model_config, None if isinstance(task, _MergeTask) else task.prune.modules,
                           source=donor, trust_remote_code=trust)
    # A merge that chooses a tokenizer: the windows are tokenized by the merged tokenizer, and
    # the stages, loaded from the donor, get the merged vocabulary's rows (`setup`).
    vocabulary = task.vocabulary if isinstance(task, _MergeTask) else None
    tokenizer = vocabulary.tokenizer if vocabulary is not None else load_tokenizer(donor, trust_remote_code=trust)
    objectives = cfg.objectives
    files = donor_files(donor) if any(get_objective(o.kind).model_files for o in objectives) else None
    windows = [_windows(cfg, task, tokenizer, shape, o) for o in objectives]
    prune_windows = None
    if isinstance(task, _PruneTask):
        calib = task.prune.calibration.model_copy(update={"curate": None})
        prune_windows = load_calibration(calib, tokenizer, shape.max_positions).calibration
    refs = [
        (o.reference or (task.models[task.donor] if isinstance(task, _MergeTask) else None)) if get_objective(o.kind).reference else None
        for o in objectives
    ]
    settings = PruneSettings(method="wanda", modules=shape.modules, dtype=cfg.dtype, trust_remote_code=trust)
    bounds = even_stages(shape.num_layers, options.stages)
    n_stages = len(bounds)

    def build() -> tuple[ActorPool, list[Any]]:
        if options.in_process:
            return ActorPool.in_process("in-process stage"), [(0, shape.num_layers - 1)]
        from raymerge.runtime.executor import ensure_ray

        ensure_ray(options.address)
        actor_pool.shutdown_kept()  # a merge pool kept by this process would hold the slots
        # Every pipeline's stages share the cluster: one rule for all stages x concurrency actors.
        what = f"search stage workers (stages {n_stages} x concurrency {cfg.study.concurrency})"
        rule = actor_resources(n_stages * cfg.study.concurrency, what=what)
        pool = ActorPool(n_stages, what="search stage workers", rule=rule)
        pool.labels = [f"search stage {k} (layers {a}-{b})" for k, (a, b) in enumerate(bounds)]
        return pool, bounds

    def setup(p: _SearchPipeline) -> None:
        d = p.driver
        last = len(p.plans) - 1
        d.get([w.load(model_config, task.specs[task.donor] if isinstance(task, _MergeTask) else task.specs[0],
                      first, end, settings, k == 0, k == last)
               for k, (w, (first, end)) in enumerate(zip(d.workers, p.plans))])
        p.pipe = Pipeline(d, d.workers, cfg.batch_size, True)
        if vocabulary is not None:
            d.get([w.resize_vocabulary(vocabulary.rows) for w in d.workers])
        if isinstance(task, _MergeTask):
            held = d.get([w.held_parameters() for w in d.workers])
            p.owned = _owned(task.first_ops, held)
            needed = [[sorted({i.name for op in ops for i in op.inputs if i.model == m}) for m in range(len(task.models))] for ops in p.owned]
            d.get([w.hold_inputs(task.specs, need) for w, need in zip(d.workers, needed)])
            for k, ref in enumerate(refs):
                if ref is not None:
                    d.get(_apply_merge(p, task.reference_operators(ref)))
                    _keep_reference(p, windows[k], k)
        else:
            p.pipe.dense_pass(prune_windows, ("norms",))
            d.get([w.keep_dense() for w in d.workers])
            for k, ref in enumerate(refs):
                if get_objective(objectives[k].kind).reference:
                    _keep_reference(p, windows[k], k)  # the dense model is the reference
        d.get([w.trial_times() for w in d.workers])  # from now on the stages time their trial calls

    storage = _storage(cfg, out)
    directions = [direction_of(o) for o in objectives]
    grid = (lambda: task.space.grid()) if isinstance(task, _MergeTask) else None
    study = optuna.create_study(study_name=cfg.study.study_name, storage=storage, sampler=_sampler(cfg, grid, optuna),
                                directions=directions, load_if_exists=True)
    _fail_stale(study, optuna)
    finished = [t for t in study.trials if t.state.is_finished()]
    remaining = max(0, cfg.study.n_trials - len(finished))
    if cfg.study.sampler == "grid":
        points = math.prod(len(v) for v in grid().values())
        remaining = min(remaining, max(0, points - len(finished)))
    n_pipes = 1 if options.in_process else cfg.study.concurrency
    if remaining == 0 and not options.quiet:  # said at once, before any stage is loaded
        print(f"raymerge: study '{cfg.study.study_name}' in {out} already has {len(finished)} finished trial(s) "
              f"(study.n_trials: {cfg.study.n_trials}{', or every grid point' if cfg.study.sampler == 'grid' else ''}): "
              "no trial to run; raise study.n_trials to continue it", file=sys.stderr, flush=True)
    pipes: list[_SearchPipeline] = []
    run = 0
    times = TrialTimes()
    t_start = time.perf_counter()
    try:
        restarts = Restarts("search")
        if remaining:
            what = (f"loading the model's {shape.num_layers} layers on {min(n_pipes, remaining)} pipeline(s) of "
                    f"{n_stages} stage(s){' in process' if options.in_process else ''}")
            with phase(what, quiet=options.quiet):
                for _ in range(min(n_pipes, remaining)):
                    pipes.append(_SearchPipeline(*build(), setup, restarts))
        t_start = time.perf_counter()
        with tqdm(total=remaining, desc="trials", unit="trial", disable=options.quiet or not remaining) as bar:
            free = list(pipes)
            running: dict[int, tuple[Any, _SearchPipeline, list[Any], _TrialClock]] = {}
            asked = 0
            while asked < remaining or running:
                while free and asked < remaining:
                    pipe = free.pop()
                    clock = _TrialClock()
                    with clock.part("optuna"):
                        trial = study.ask()
                    asked += 1
                    try:
                        handles = _submit(trial, pipe, task, objectives, windows, shape, clock)
                        running[trial.number] = (trial, pipe, handles, clock)
                    except Exception as err:  # noqa: BLE001 - recorded on the trial; the study goes on
                        with clock.part("optuna"):
                            _tell_failed(study, trial, str(err) if isinstance(err, TrialError) else f"{type(err).__name__}: {err}", optuna)
                        pipe.lost(err)
                        bar.update(1)
                        run += 1
                        free.append(pipe)
                        clock.add_to(times)
                for number in _ready(running, options.in_process):
                    trial, pipe, handles, clock = running.pop(number)
                    try:
                        values = _values(pipe, handles, objectives, windows, files, out, clock)
                        with clock.part("optuna"):
                            _tell(study, trial, values if len(values) > 1 else values[0])
                    except Exception as err:  # noqa: BLE001 - recorded on the trial; the study goes on
                        with clock.part("optuna"):
                            _tell_failed(study, trial, f"{type(err).__name__}: {err}", optuna)
                        pipe.lost(err)
                    run += 1
                    bar.update(1)
                    free.append(pipe)
                    with clock.part("optuna"):
                        bar.set_postfix_str(_best_text(study), refresh=False)  # shown at the bar's next line
                    clock.add_to(times)
    finally:
        for p in pipes:
            p.driver.kill()
    seconds = time.perf_counter() - t_start
    best = _best_trials(study)
    configs = [_export(cfg, task, t, shape, out, i) for i, t in enumerate(best)]
    plots = _plots(study, out, [objective_label(o) for o in objectives])
    result = SearchResult(
        output=out, study=study, best_configs=configs, plots=plots,
        completed=sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials),
        failed=sum(t.state == optuna.trial.TrialState.FAIL for t in study.trials),
        seconds=seconds, trials_run=run, best_values=[list(t.values) for t in best], timings=times,
    )
    if options.materialize and configs:
        result.materialized = _materialize(cfg, configs[0], out, options)
    return result


def _owned(ops: list[MergeOperator], held: list[list[str]]) -> list[list[MergeOperator]]:
    """Operators per stage: each to every stage holding that parameter (a layer's tensors to its
    stage; embeddings to the first, norm and head to the last, a tied embedding to both)."""
    owned: list[list[MergeOperator]] = [[] for _ in held]
    holders = [set(h) for h in held]
    for op in ops:
        stages = [k for k, names in enumerate(holders) if op.name in names]
        if not stages:
            raise ConfigError(f"merge output tensor {op.name} is not a parameter of the model being searched")
        for k in stages:
            owned[k].append(op)
    return owned


def _apply_merge(p: _SearchPipeline, ops: list[MergeOperator]) -> list[Any]:
    by_name = {op.name: op for op in ops}
    return [w.apply_merge([by_name[o.name] for o in own if o.name in by_name])
            for w, own in zip(p.driver.workers, p.owned)]


def _keep_reference(p: _SearchPipeline, windows: CalibrationWindows, k: int) -> None:
    p.pipe.keep_reference(windows.heldout, k * REFERENCE_KEYS)


def _submit(trial, p: _SearchPipeline, task, objectives: list[Objective], windows: list[CalibrationWindows], shape: ModelShape,
            clock: _TrialClock) -> list[Any]:
    """Send the trial's weights to the stages and queue its evaluation; return the handles: the
    re-merge's, each objective's, and last the stages' `trial_times` (timed parts into `clock`)."""
    d = p.driver
    if isinstance(task, _MergeTask):
        with clock.part("optuna"):
            values = task.space.suggest(trial)
        with clock.part("compile"):
            ops = task.operators(values)
        applied = _apply_merge(p, ops)
    else:
        with clock.part("optuna"):
            values = task.suggest(trial, shape.num_layers)
        ratios = None
        if "owl_m" in values:
            parts = d.get([w.outlier_ratios(values["owl_m"]) for w in d.workers])
            merged = {k: v for part in parts for k, v in part.items()}
            ratios = [merged[i] for i in range(shape.num_layers)]
        sparsities = task.sparsities(values, shape.num_layers, ratios)
        with clock.part("optuna"):
            trial.set_user_attr("layer_sparsities", sparsities)
        applied = [w.apply_prune({i: sparsities[i] for i in range(a, b + 1)},
                                 values.get("weight_exponent", task.default_exponents[0]),
                                 values.get("norm_exponent", task.default_exponents[1]))
                   for w, (a, b) in zip(d.workers, p.plans)]
    handles = [applied]  # waited for first: a failure while applying fails the trial
    for k, (obj, win) in enumerate(zip(objectives, windows)):  # each objective's spec queues its work
        handles.append(get_objective(obj.kind).submit(_objective_context(p, obj, k, win)))
    handles.append([w.trial_times() for w in d.workers])  # queued last: after the trial's calls on each stage
    return handles


def _values(p: _SearchPipeline, handles: list[Any], objectives: list[Objective], windows: list[CalibrationWindows],
            files: Optional[dict], out: Path, clock: _TrialClock) -> list[float]:
    p.driver.get(handles[0])
    values = []
    for k, (obj, win, pending) in enumerate(zip(objectives, windows, handles[1:1 + len(objectives)])):
        spec = get_objective(obj.kind)
        ctx = _objective_context(p, obj, k, win, files, out)
        if pending is None:  # the objective evaluates in the driver (lm_eval, a user function): forward time
            with clock.part("forward"):
                values.append(float(spec.value(ctx, pending)))
        else:
            values.append(float(spec.value(ctx, pending)))
    clock.actors(p.driver.get(handles[-1]))
    return values


def _objective_context(p: _SearchPipeline, obj: Objective, k: int, win: CalibrationWindows,
                       files: Optional[dict] = None, out: Optional[Path] = None) -> ObjectiveContext:
    d = p.driver
    return ObjectiveContext(
        objective=obj, index=k, windows=win, batch_size=p.pipe.batch_size,
        forward=p.pipe.forward, last_stage=d.workers[-1],
        get=d.get, logits=lambda ids: _logits(p, ids), state_dict=lambda names: _gather(p, names), files=files, out=out,
    )


def _gather(p: _SearchPipeline, names: list[str]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for part in p.driver.get([w.state_dict(names) for w in p.driver.workers]):
        state.update(part)
    return state


def _logits(p: _SearchPipeline, ids: torch.Tensor) -> torch.Tensor:
    return p.driver.get(p.driver.workers[-1].logits(p.pipe.forward(ids)))


def _ready(running: dict, in_process: bool) -> list[int]:
    """Trials whose evaluation is done. The last call queued for a trial (on the last stage) ends
    after all of its others, so one handle per trial is waited for."""
    if in_process or not running:
        return list(running)
    import ray

    finals = {}
    for number, (_, _, handles, _) in running.items():
        flat = [r for group in handles if isinstance(group, list) for r in group]
        if not flat:
            return [number]
        finals[flat[-1]] = number
    done, _ = ray.wait(list(finals), num_returns=1)
    done, _ = ray.wait(list(finals), num_returns=len(finals), timeout=0)
    return [finals[r] for r in done]


def _tell(study, trial, values: Any = None, state: Any = None) -> None:
    """`study.tell`; the grid sampler calls `study.stop()` once its grid is done, which Optuna
    refuses outside `optimize` after the trial was recorded: that is not an error here."""
    try:
        study.tell(trial, values, state=state)
    except RuntimeError as err:
        if "Study.stop" not in str(err):
            raise


def _tell_failed(study, trial, message: str, optuna) -> None:
    trial.set_user_attr("error", message[:2000])
    _tell(study, trial, state=optuna.trial.TrialState.FAIL)


def _fail_stale(study, optuna) -> None:
    """Trials left RUNNING by a killed driver are marked failed, so they are not waited for.
    (With a shared RDB study, run one driver at a time: another driver's running trials would
    be marked failed too.)"""
    for t in study.trials:
        if t.state == optuna.trial.TrialState.RUNNING:
            _tell(study, t.number, state=optuna.trial.TrialState.FAIL)


def _best_trials(study) -> list[Any]:
    try:
        return list(study.best_trials)
    except ValueError:
        return []


def _best_text(study) -> str:
    best = _best_trials(study)
    if not best:
        return "best: none yet"
    return "best: " + ", ".join(f"{v:.4g}" for v in best[0].values)


def _export(cfg: SearchConfig, task, trial, shape: ModelShape, out: Path, i: int) -> Path:
    """The trial as a ready-to-run merge or prune YAML."""
    path = out / (f"best-{i}.yaml" if i else "best.yaml")
    if isinstance(task, _MergeTask):
        data = task.space.fill(trial.params)
    else:
        data = task.prune.model_dump(mode="json", by_alias=True, exclude_none=True)
        data["layerwise"] = [round(s, 6) for s in trial.user_attrs.get("layer_sparsities", [task.target] * shape.num_layers)]
        data.pop("sparsity", None)
        data.get("calibration", {}).pop("curate", None)  # trials used uncurated windows
        data["method"] = "wanda"
        data["mode"] = "parallel"  # trials were scored with statistics from the dense model
        a, b = task.default_exponents
        data["wanda"] = {"weight_exponent": trial.params.get("weight_exponent", a), "norm_exponent": trial.params.get("norm_exponent", b)}
    header = f"# trial {trial.number} of study {cfg.study.study_name}: values {list(trial.values)}\n"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False))
    return path


def objective_label(objective: Any) -> str:
    """An objective as a plot axis says it, with what it measures and its direction: 'perplexity
    (lower is better)', 'logit MSE vs base (lower is better)' (reconstruction: the mean squared
    error of the logits against its reference), 'lm_eval acc on arc_easy (higher is better)'."""
    name = objective.kind
    if objective.kind == "reconstruction":
        reference = getattr(objective, "reference", None)
        name = f"logit MSE vs {Path(str(reference.path)).name if reference is not None else 'the reference'}"
    if objective.kind == "lm_eval" and getattr(objective, "lm_eval", None) is not None:
        name = f"lm_eval {objective.lm_eval.metric.split(',')[0]} on {'+'.join(objective.lm_eval.tasks)}"
    better = "lower" if direction_of(objective) == "minimize" else "higher"
    return f"{name} ({better} is better)"


def plot_figures(study, labels: list[str]) -> list[tuple[str, Any]]:
    """(file name, matplotlib Figure) of each plot that can be drawn: the optimisation history and
    parameter importances, or the Pareto front for several objectives; the axes name the objective
    and its direction (`objective_label`), not Optuna's "Objective Value"."""
    import optuna.visualization.matplotlib as vis
    import warnings

    def history():
        ax = vis.plot_optimization_history(study, target_name=labels[0])
        ax.set_ylabel(labels[0])
        ax.set_title(f"optimisation history: {labels[0]}")
        return ax

    def importances():
        return vis.plot_param_importances(study, target_name=labels[0])  # legend: the objective's label

    jobs = [("pareto_front.png", lambda: vis.plot_pareto_front(study, target_names=labels))] if len(labels) > 1 else [
        ("history.png", history), ("importances.png", importances),
    ]
    figures = []
    for name, draw in jobs:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # experimental-API and empty-legend warnings
                ax = draw()
            figures.append((name, ax.figure if hasattr(ax, "figure") else ax[0].figure))
        except Exception:  # noqa: BLE001 - e.g. importances need two completed trials; skip that plot
            pass
    return figures


def _plots(study, out: Path, labels: list[str]) -> list[Path]:
    """Optimisation history, parameter importances and (multi-objective) Pareto front as PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import optuna.visualization.matplotlib  # noqa: F401
    except ImportError:
        return []
    made = []
    for name, fig in plot_figures(study, labels):
        try:
            fig.savefig(out / name, dpi=90, bbox_inches="tight")
            made.append(out / name)
        finally:
            plt.close(fig)
    return made


def _materialize_target(out: Path, options: SearchOptions) -> Union[Path, str, None]:
    """Where `materialize` puts the best model (None: nowhere)."""
    m = options.materialize
    if m is True:
        return out / "best-model"
    if m is False or m is None or str(m) == "":
        return None
    return str(m) if str(m).startswith("s3:/") else Path(m)


def _materialize(cfg: SearchConfig, best: Path, out: Path, options: SearchOptions) -> Union[Path, str]:
    """Run the best config as `raymerge merge`/`prune` would, into the materialize target: a
    local folder or an s3:// prefix, through the same staged output (`runtime.output`). Calls the
    runtime directly, not the public API in `raymerge/__init__` (which imports this package)."""
    from raymerge.runtime.merge import MergeOptions, run_merge
    from raymerge.runtime.prune import PruneOptions, run_prune

    target = _materialize_target(out, options)
    assert target is not None
    # OUT/best-model is the search's own folder, replaced on every run; a given target is the user's.
    overwrite = True if options.materialize is True else options.overwrite
    kwargs = dict(overwrite=overwrite, quiet=options.quiet, address=options.address, s3_endpoint_url=options.s3_endpoint_url,
                  trust_remote_code=options.trust_remote_code)
    if cfg.merge is not None:
        if options.in_process:  # an in-process search materializes in process too: no Ray
            kwargs.update(in_process=True, address=None)
        result = run_merge(best, target, MergeOptions(allow_pickle=options.allow_pickle,
                                                      allow_mixed_architectures=options.allow_mixed_architectures, **kwargs))
    else:
        result = run_prune(best, target, PruneOptions(in_process=options.in_process, allow_pickle=options.allow_pickle, **kwargs))
    return result.output
