"""The statistics pass of a guided merge (AIM, ACM, Sens-Merging), and what it does to the operators.

Before the tensors are merged, calibration windows flow through layer-stage workers
(`runtime.pool_actor.PoolActor`, the stage the pruning pipeline uses: each holds a block of
decoder layers of one model, so no worker ever holds a whole model) and the statistics come back
as small per-layer numbers or per-channel vectors:

- AIM: the base model's per-channel input statistic of every weighted module, one pass;
- ACM: the base model's activations are recorded in one pass, then each fine-tune's pass computes
  the mutual information with them; the workers reload the same layers from the next model;
- Sens: each fine-tune's backward passes on its own calibration text (stage by stage, hidden-state
  gradients flowing back), then each model's logits on every other model's text.

`guide_program` turns them into an `OperatorGuide` per operator (see `raymerge.methods.guided`
for the formulas and `raymerge.config.guidance_config` for the settings) and returns a
`GuidanceReport` that is printed and published with the model as `guidance.json`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch
from raymerge.progress import bar as tqdm  # tqdm with raymerge.progress.bar_kwargs

from raymerge.calibration import load_calibration
from raymerge.checkpoints import SourceSpec
from raymerge.config.guidance_config import PARAMETERS, GuidanceConfig, parse_guidance_config
from raymerge.config.merge_config import ConfigError, MergeConfig
from raymerge.methods.guided import (
    acm_coefficients,
    aim_importance,
    sens_layer_scores,
    sens_scales,
    sens_transferability,
)
from raymerge.blocks.decoder import describe_model
from raymerge.blocks.stage import PruneSettings
from raymerge.runtime.guidance_methods import get_guidance_method
from raymerge.runtime.operators import MergeOperator, MergeProgram, OperatorGuide
from raymerge.runtime.actor_pool import ActorPool, StageJob
from raymerge.runtime.pool_actor import ActorRef

log = logging.getLogger(__name__)


@dataclass
class GuidanceReport:
    """What the statistics pass found (published as guidance.json)."""

    method: str
    strength: float  # omega / theta / temperature
    models: list[str]
    coefficients: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> layer key -> scale
    channels: int = 0  # AIM: tensors relaxed
    extra: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True) + "\n"

    def table(self) -> str:
        spec = get_guidance_method(self.method)
        head = f"{spec.label or self.method.upper()} ({spec.parameter}={self.strength:g})"
        if not self.coefficients:
            return f"{head}: {self.channels} tensors relaxed towards the base"
        keys = sorted({k for c in self.coefficients.values() for k in c}, key=_key_order)
        lines = [f"{head} task-vector scales per layer:"]
        lines.append("  layer     " + "  ".join(f"{m[-24:]:>24}" for m in self.coefficients))
        for k in keys:
            lines.append(f"  {k:<9} " + "  ".join(f"{c.get(k, float('nan')):>24.4f}" for c in self.coefficients.values()))
        return "\n".join(lines)


def _key_order(k: str) -> tuple[int, int]:
    return (0, int(k)) if k.lstrip("-").isdigit() and int(k) >= 0 else (1, -int(k) if k.lstrip("-").isdigit() else 0)


_KEY_NAMES = {-1: "embed", -2: "norm", -3: "head"}


def guide_program(
    g: GuidanceConfig, cfg: MergeConfig, program: MergeProgram, specs: list[SourceSpec], pool: ActorPool,
    facts: BaseModelFacts, *, quiet: bool = False, trust_remote_code: bool = False,
) -> GuidanceReport:
    """Run the statistics pass and put an `OperatorGuide` on each affected operator of `program`
    (`g`: the settings as `check_guidance` returned them; `facts`: the base model's, as
    `check_guidance_memory` returned them). The pass runs on the merge's own
    `pool` (its first `g.stages` actors, at most all of them; in process, its one actor), which
    the merge then uses: no other actors are started, and a kept pool stays kept.
    `trust_remote_code`: the stages build the layers from the code the models ship (their
    `PruneSettings` carry it to the actors), and the tokenizer is loaded with it."""
    import time

    t0 = time.perf_counter()
    base = program.models.index(cfg.base_model)
    names = [str(m) for m in program.models]
    # An actor that dies ends the attempt; the whole pass reruns on fresh actors, a bounded
    # number of times (`runtime.actor_pool.StageJob`: the pools' one policy). The operators get their
    # guides only once every statistic is in, so a lost attempt leaves the program unchanged.
    job = StageJob("guidance statistics")
    job.watch(pool)

    def attempt() -> GuidanceReport:
        report = GuidanceReport(method=g.method, strength=strength(g), models=names)
        with _StagePass(g, specs, base, quiet, pool, facts, trust_remote_code) as sp:
            get_guidance_method(g.method).run(sp, g, program, base, names, report)
        return report

    report = job.run(attempt)
    report.seconds = time.perf_counter() - t0
    return report


def strength(g: GuidanceConfig) -> float:
    """The method's own strength parameter (AIM omega, ACM theta, Sens temperature) or its default."""
    spec = get_guidance_method(g.method)
    return g.strength_or(spec.parameter, spec.default)


def check_against_registry(g: GuidanceConfig, label: str) -> GuidanceSpec:
    """The method's spec; ConfigError naming `label` for an unknown method, a strength parameter
    of another method, or task_calibration for a method that takes none."""
    where = f"invalid merge config {label}: raymerge.guidance"
    try:
        spec = get_guidance_method(g.method)
    except ConfigError as err:
        raise ConfigError(f"{where}.method: {err}") from None
    for name in PARAMETERS:
        if name != spec.parameter and getattr(g, name) is not None:
            raise ConfigError(f"{where}.{name}: not a parameter of {g.method} (it has {spec.parameter!r})")
    if g.task_calibration and not spec.task_calibration:
        raise ConfigError(f"{where}.task_calibration: not used by method: {g.method} (only by methods that take "
                          "each fine-tune's own text, such as sens)")
    return spec


def check_guidance(cfg: MergeConfig, label: str, program: MergeProgram) -> GuidanceConfig:
    """The guidance settings, after the checks that need no statistics (ConfigError naming `label`)."""
    from raymerge.methods import get_method
    from raymerge.runtime.global_trim import uses_model_trim

    g = parse_guidance_config(cfg.raymerge.guidance if cfg.raymerge else None, label)
    check_against_registry(g, label)
    if cfg.base_model is None or cfg.base_model not in program.models:
        raise ConfigError(f"{label}: raymerge.guidance ({g.method}) needs a base_model")
    if get_method(cfg.merge_method).base == "none":
        raise ConfigError(f"{label}: raymerge.guidance works on task vectors; merge_method {cfg.merge_method} has no base model "
                          "(use task_arithmetic, ties, dare_ties, ...)")
    if cfg.slices or cfg.modules:
        raise ConfigError(f"{label}: raymerge.guidance works with a `models:` list, not slices or modules")
    if get_guidance_method(g.method).scales_task_vectors and uses_model_trim(program.operators):
        raise ConfigError(f"{label}: raymerge.guidance {g.method} scales task vectors per layer; "
                          "it cannot be combined with a model-wide trim (choose a per-tensor method)")
    tasks = [str(m) for m in program.models if m != cfg.base_model]
    unknown = sorted(set(g.task_calibration) - set(tasks))
    if unknown:
        raise ConfigError(f"{label}: raymerge.guidance.task_calibration: {', '.join(unknown)} is not one of the fine-tuned models "
                          f"({', '.join(tasks)})")
    if g.method == "sens" and len(tasks) < 2:
        log.warning("raymerge: Sens-Merging with one fine-tuned model scales its task vector by 1 everywhere")
    return g


@dataclass(frozen=True)
class BaseModelFacts:
    """What the statistics pass needs of the base model's config, read once before any actor
    starts (`check_guidance_memory`) and handed to the pass."""

    config: dict[str, Any]
    shape: Any  # blocks.decoder.ModelShape


def check_guidance_memory(g: GuidanceConfig, base: SourceSpec, trust_remote_code: bool = False) -> BaseModelFacts:
    """Before any actor starts: the base model's config and shape, after refusing a statistics
    pass whose kept activations or logits would not fit in host memory (ConfigError naming the
    calibration keys), from the config and the calibration settings alone."""
    from raymerge.calibration.windows import resolve_seqlen

    src = base.open()
    try:
        model_config = src.config()
        shape = describe_model(model_config, source=src, trust_remote_code=trust_remote_code)
    finally:
        src.close()
    cals = [g.calibration, *g.task_calibration.values()]
    tokens = max(c.nsamples * resolve_seqlen(c.seqlen, shape.max_positions) for c in cals)
    _check_memory(g, shape, int(model_config.get("vocab_size") or 0), tokens)
    return BaseModelFacts(model_config, shape)


def _check_memory(g: GuidanceConfig, shape: Any, vocab: int, tokens: int) -> None:
    """Refuse a statistics pass whose kept activations or logits would not fit in host memory
    (`tokens`: the largest calibration set's windows x seqlen)."""
    from raymerge.runtime.actor_resources import host_memory_bytes

    kept = get_guidance_method(g.method).kept_bytes
    if kept is None:
        return
    need, what = kept(shape, vocab, tokens)
    have = host_memory_bytes()
    if need > have // 2:
        raise ConfigError(
            f"raymerge.guidance.calibration: {g.method} would keep {need / 2**30:.1f} GiB of {what} "
            f"({tokens} calibration tokens) on the stage workers, more than half of this machine's "
            f"{have / 2**30:.1f} GiB; lower calibration.nsamples or calibration.seqlen"
        )


# -- the built-in methods (the registry: `raymerge.runtime.guidance_methods`) ----------------------------
def _run_aim(sp: "_StagePass", g: GuidanceConfig, program: MergeProgram, base: int, names: list[str], report: GuidanceReport) -> None:
    importance = sp.aim()
    _attach(program, lambda op: OperatorGuide(importance=importance[op.name].float(), omega=strength(g))
            if op.name in importance else None)
    report.channels = sum(1 for op in program.operators if op.guide is not None)


def _layer_scales(scaling: Callable[["_StagePass", GuidanceConfig, list[str], GuidanceReport], dict[int, dict[int, float]]]):
    """A method that scales each model's task vector per layer by `scaling(...)[model][layer key]`."""

    def run(sp: "_StagePass", g: GuidanceConfig, program: MergeProgram, base: int, names: list[str], report: GuidanceReport) -> None:
        keys = sp.layer_keys()
        scales = scaling(sp, g, names, report)
        report.coefficients = {names[i]: {_label(k): v for k, v in sorted(s.items())} for i, s in scales.items()}

        def guide(op: MergeOperator) -> Optional[OperatorGuide]:
            key = keys.get(op.name)
            if key is None:
                return None
            per_input = []
            for t in op.inputs:
                per_input.append(1.0 if t.model == base else scales.get(t.model, {}).get(key, 1.0))
            return OperatorGuide(input_scales=tuple(per_input)) if any(s != 1.0 for s in per_input) else None

        _attach(program, guide)

    return run


def _acm_scales(sp: "_StagePass", g: GuidanceConfig, names: list[str], report: GuidanceReport) -> dict[int, dict[int, float]]:
    scales, nmi = sp.acm(strength(g))
    report.extra["nmi"] = {names[i]: {_label(k): v for k, v in sorted(m.items())} for i, m in nmi.items()}
    return scales


def _sens_scales(sp: "_StagePass", g: GuidanceConfig, names: list[str], report: GuidanceReport) -> dict[int, dict[int, float]]:
    scales, extra = sp.sens(g, names)
    report.extra.update(extra)
    return scales


# The statistics passes of the built-in methods, named by their specs (`runtime.guidance_methods`).
run_aim = _run_aim
run_acm = _layer_scales(_acm_scales)
run_sens = _layer_scales(_sens_scales)


def _label(key: int) -> str:
    return _KEY_NAMES.get(key, str(key))


def _attach(program: MergeProgram, guide: Callable[[MergeOperator], Optional[OperatorGuide]]) -> None:
    program.operators = [replace(op, guide=guide(op)) for op in program.operators]


class _StagePass:
    """Stages over one model's layers at a time (the first actors of the merge's pool), and the
    passes the methods need."""

    def __init__(self, g: GuidanceConfig, specs: list[SourceSpec], base: int, quiet: bool, pool: ActorPool,
                 facts: BaseModelFacts, trust_remote_code: bool = False) -> None:
        self.g, self.specs, self.base, self.quiet, self.pool = g, specs, base, quiet, pool
        self.model_config, self.shape = facts.config, facts.shape
        self.trust_remote_code = trust_remote_code

    def __enter__(self) -> "_StagePass":
        from raymerge.blocks.pipeline import Pipeline, even_stages
        from raymerge.checkpoints.model_files import load_tokenizer

        self._windows: dict[str, torch.Tensor] = {}
        src = self.specs[self.base].open()
        try:
            self.tokenizer = load_tokenizer(src, trust_remote_code=self.trust_remote_code)
        finally:
            src.close()
        if self.g.stages > len(self.pool) and self.pool.remote:
            log.warning("raymerge: guidance.stages is %d but the merge has %d worker(s): the statistics pass "
                        "runs on %d stage(s)", self.g.stages, len(self.pool), len(self.pool))
        self.bounds = even_stages(self.shape.num_layers, min(self.g.stages, len(self.pool)))
        self.workers = self.pool.workers[:len(self.bounds)]
        self.d = self.pool
        self._labels = list(self.pool.labels)
        for k, (a, b) in enumerate(self.bounds):
            self.pool.labels[k] = f"guidance stage {k} (layers {a}-{b})"
        n = len(self.bounds)
        self.pipe = Pipeline(self.pool, self.workers, self.g.batch_size, self.quiet)
        try:
            settings = PruneSettings(method="wanda", modules=self.shape.modules, dtype=self.g.dtype,
                                     trust_remote_code=self.trust_remote_code)
            last = n - 1
            self.pool.get([w.load(self.model_config, self.specs[self.base], a, b, settings, k == 0, k == last)
                           for k, (w, (a, b)) in enumerate(zip(self.workers, self.bounds))])
        except BaseException:
            self._release()
            raise
        self.loaded = self.base
        return self

    def __exit__(self, *exc: Any) -> None:
        self._release()

    def _release(self) -> None:
        """Free the stages' layers and statistics (the actors stay, for the merge); a dead actor
        is left to the fault policy."""
        self.pool.labels[:len(self._labels)] = self._labels
        try:
            self.pool.get([w.close() for w in self.pool.workers[:len(self.bounds)]])
        except Exception:  # noqa: BLE001 - an actor lost mid-pass: StageJob renews the pool
            pass

    # -- plumbing ---------------------------------------------------------------------------
    def windows(self, key: Optional[str] = None) -> torch.Tensor:
        cal = self.g.task_calibration.get(key, self.g.calibration) if key is not None else self.g.calibration
        label = key or "calibration"
        if label not in self._windows:
            self._windows[label] = load_calibration(cal, self.tokenizer, self.shape.max_positions).calibration
        return self._windows[label]

    def load(self, model: int) -> None:
        if model != self.loaded:
            self.d.get([w.reload(self.specs[model]) for w in self.workers])
            self.loaded = model

    def each(self, call: Callable[..., Any], *args: Any) -> list[Any]:
        """`call(stage, *args)` on every stage, e.g. `each(ActorRef.aim_end)`; their results."""
        return self.d.get([call(w, *args) for w in self.workers])

    def run(self, windows: torch.Tensor, desc: str) -> None:
        """Every window through the layers and the last stage's final norm and head (collectors see all)."""
        last = self.workers[-1]
        self.d.map(lambda ids: last.head(self.pipe.forward(ids)), self.pipe.batches(windows), desc, self.quiet)

    def layer_keys(self) -> dict[str, Optional[int]]:
        keys: dict[str, Optional[int]] = {}
        for part in self.each(ActorRef.layer_keys):
            keys.update(part)
        return keys

    # -- the methods ------------------------------------------------------------------------
    def aim(self) -> dict[str, torch.Tensor]:
        self.each(ActorRef.aim_begin)
        self.run(self.windows(), "AIM statistics (base)")
        sums: dict[str, torch.Tensor] = {}
        for part in self.each(ActorRef.aim_end):
            for name, s in part.items():
                sums[name] = sums[name] + s if name in sums else s
        return {name: aim_importance(s) for name, s in sums.items()}

    def acm(self, theta: float) -> tuple[dict[int, dict[int, float]], dict[int, dict[int, float]]]:
        windows = self.windows()
        self.load(self.base)
        self.each(ActorRef.acm_begin, "record")
        self.run(windows, "ACM activations (base)")
        self.each(ActorRef.acm_end)
        scales, nmis = {}, {}
        for i, spec in enumerate(self.specs):
            if i == self.base:
                continue
            self.load(i)
            self.each(ActorRef.acm_begin, "compare")
            self.run(windows, f"ACM activations ({spec.path})")
            nmi: dict[int, float] = {}
            for part in self.each(ActorRef.acm_end):
                nmi.update(part)
            nmis[i], scales[i] = nmi, acm_coefficients(nmi, theta)
        return scales, nmis

    def sens(self, g: GuidanceConfig, names: list[str]) -> tuple[dict[int, dict[int, float]], dict[str, Any]]:
        tasks = [i for i in range(len(self.specs)) if i != self.base]
        data = {i: self.windows(names[i] if names[i] in g.task_calibration else None) for i in tasks}
        sensitivity: dict[int, dict[int, float]] = {}
        distances = [[0.0] * len(tasks) for _ in tasks]
        for b, j in enumerate(tasks):  # model j: its sensitivity, then its own text's logits as the reference
            self.load(j)
            sensitivity[j] = self._sensitivity(data[j], names[j])
            self.pipe.keep_reference(data[j], desc=f"Sens reference logits ({names[j]})")
            for a, i in enumerate(tasks):
                if i != j:
                    self.load(i)
                    distances[a][b] = self._distance(data[j], f"Sens logit distances ({names[i]} on {names[j]}'s text)")
            self.each(ActorRef.drop_references)
        layers = sorted({k for s in sensitivity.values() for k in s})
        alpha = [sens_layer_scores([sensitivity[i].get(k, 0.0) for k in layers]) for i in tasks]
        tau = sens_transferability(distances)
        scales = sens_scales(alpha, tau, strength(g))
        out = {i: {k: scales[a][n] for n, k in enumerate(layers)} for a, i in enumerate(tasks)}
        extra = {
            "sensitivity": {names[i]: {str(k): v for k, v in sorted(sensitivity[i].items())} for i in tasks},
            "logit_distance": {names[i]: {names[j]: distances[a][b] for b, j in enumerate(tasks) if j != i} for a, i in enumerate(tasks)},
            "transferability": {names[i]: tau[a] for a, i in enumerate(tasks)},
        }
        return out, extra

    def _sensitivity(self, windows: torch.Tensor, name: str) -> dict[int, float]:
        self.each(ActorRef.grad_begin)
        ws = self.workers
        for ids in tqdm(windows.split(1), desc=f"Sens gradients ({name})", unit="window", disable=self.quiet, leave=False):
            h = ws[0].embed(ids)
            for w in ws[:-1]:
                h = w.grad_forward(h)
            grad = ws[-1].grad_loss_backward(h, ids)
            for w in reversed(ws[:-1]):
                grad = w.grad_backward(grad)
            self.d.get(grad)
        out: dict[int, float] = {}
        for part in self.each(ActorRef.grad_end):
            out.update(part)
        return out

    def _distance(self, windows: torch.Tensor, desc: str) -> float:
        last = self.workers[-1]
        parts = self.d.map(lambda item: last.logit_distance(self.pipe.forward(item[1]), item[0]),
                           list(enumerate(self.pipe.batches(windows))), desc, self.quiet)
        return sum(p[0] for p in parts) / max(1, sum(p[1] for p in parts))
