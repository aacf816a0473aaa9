"""The search-objective registry: one `ObjectiveSpec` per `objective: kind` of a search config.

Same shape as the merge-method registry (`raymerge.methods.registry`): a frozen spec,
`register`, `get_objective(kind)` raising the package's user error (`ConfigError`) that lists
the known kinds, and `available_objectives()`. Built-ins: perplexity, reconstruction, lm_eval;
a kind of the form `package.module:function` is a user function (called with a callable from
token ids to logits and the held-out token windows) and needs no registration. Adding an
objective is one module that calls `register` (plus its tests).

An objective scores one trial in two steps, so that trials on different pipelines overlap:

- `submit(ctx)` queues the trial's evaluation on the stage workers right after its weights were
  sent, and returns what it queued (a list of handles that `ctx.get` resolves, or None when
  everything happens in `value`);
- `value(ctx, pending) -> float` turns that into the trial's value, in the driver.

`ctx` is an `ObjectiveContext`: the objective's config entry, its position, its held-out
windows and the calls a trial may make on the stage pipeline (see the class). `direction` is
the default of the config's `direction:`; `reference` objectives get the reference model's
logits of their windows kept on the last stage before the first trial (under
`ctx.reference_key(j)` for batch j); `model_files` objectives get the donor's config and
tokenizer files (`ctx.files`) to write a trial's model.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from raymerge.errors import ConfigError
from raymerge.registries import Registry

REFERENCE_KEYS = 100000  # objective k's reference logits are kept under keys k * REFERENCE_KEYS + batch


@dataclass
class ObjectiveContext:
    """One objective of one trial, and the calls it may make on the trial's stage pipeline."""

    objective: Any  # the config's `Objective` entry
    index: int  # its position in the config's objectives
    windows: Any  # `CalibrationWindows`; `.heldout` are the token windows scored
    batch_size: int
    forward: Callable[[Any], Any]  # token ids -> handle of the hidden states leaving the last layer
    last_stage: Any  # the last stage (`runtime.pool_actor.ActorRef`): `last_stage.loss(forward(ids), ids)` queues work
    get: Callable[[Any], Any]  # resolve handles
    logits: Callable[[Any], Any]  # token ids -> logits of the trial's model (blocking)
    state_dict: Callable[[list[str]], dict]  # parameter names -> the trial's tensors
    files: Optional[dict] = None  # the donor's config and tokenizer files (`model_files` objectives)
    out: Optional[Path] = None  # the search's output folder

    def batches(self) -> list[Any]:
        return list(self.windows.heldout.split(self.batch_size))

    def reference_key(self, batch: int) -> int:
        return self.index * REFERENCE_KEYS + batch


@dataclass(frozen=True)
class ObjectiveSpec:
    name: str
    submit: Callable[[ObjectiveContext], Any]
    value: Callable[[ObjectiveContext, Any], float]
    direction: str = "minimize"
    reference: bool = False
    model_files: bool = False
    doc: str = ""


REGISTRY: Registry[ObjectiveSpec] = Registry("objective", ConfigError)


def register(spec: ObjectiveSpec) -> ObjectiveSpec:
    if ":" in spec.name:
        raise ValueError(f"search objective {spec.name!r}: ':' is reserved for package.module:function objectives")
    if spec.direction not in ("minimize", "maximize"):
        raise ValueError(f"search objective {spec.name!r}: direction must be minimize or maximize")
    return REGISTRY.register(spec)


def is_user_function(kind: str) -> bool:
    return ":" in kind and all(kind.split(":", 1))


def get_objective(kind: str) -> ObjectiveSpec:
    if kind not in REGISTRY and is_user_function(kind):
        return ObjectiveSpec(kind, _no_submit, _user_value, doc="a user function package.module:function")
    if kind not in REGISTRY:
        raise ConfigError(
            f"unknown objective {kind!r}: must be one of {', '.join(REGISTRY.names())} or 'package.module:function'"
        )
    return REGISTRY.get(kind)


def available_objectives() -> list[str]:
    return REGISTRY.names()


def check_objectives(objectives: Any, label: str) -> None:
    """Every objective's kind is registered (or a package.module:function): else ConfigError
    naming the search config `label` (run when a search starts, before any work)."""
    for o in objectives:
        try:
            get_objective(o.kind)
        except ConfigError as err:
            raise ConfigError(f"invalid search config {label}: objective.kind: {err}") from None


def direction_of(objective: Any) -> str:
    """The objective's `direction`, else its spec's default (lm_eval: maximize)."""
    return objective.direction or get_objective(objective.kind).direction


# -- built-ins ------------------------------------------------------------------------------------------
def _no_submit(ctx: ObjectiveContext) -> None:
    return None


def _sums(ctx: ObjectiveContext, pending: Any) -> tuple[float, int]:
    parts = ctx.get(pending)
    return sum(x[0] for x in parts), sum(x[1] for x in parts)


def _perplexity_submit(ctx: ObjectiveContext) -> list[Any]:
    return [ctx.last_stage.loss(ctx.forward(ids), ids) for ids in ctx.batches()]


def _perplexity_value(ctx: ObjectiveContext, pending: Any) -> float:
    from raymerge.pruning.report import perplexity

    return perplexity(*_sums(ctx, pending))


def _reconstruction_submit(ctx: ObjectiveContext) -> list[Any]:
    return [ctx.last_stage.reconstruction(ctx.forward(ids), ctx.reference_key(j)) for j, ids in enumerate(ctx.batches())]


def _reconstruction_value(ctx: ObjectiveContext, pending: Any) -> float:
    total, count = _sums(ctx, pending)
    return total / count


def _lm_eval_value(ctx: ObjectiveContext, pending: Any) -> float:
    from raymerge.search.lm_eval_objective import lm_eval_value

    return lm_eval_value(ctx.objective.lm_eval, ctx.state_dict, ctx.files, ctx.out)


def _user_value(ctx: ObjectiveContext, pending: Any) -> float:
    spec = ctx.objective.kind
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"objective {spec!r}: cannot import it: {err}") from None
    return float(fn(ctx.logits, ctx.windows.heldout))


register(ObjectiveSpec("perplexity", _perplexity_submit, _perplexity_value,
                       doc="perplexity of the held-out windows"))
register(ObjectiveSpec("reconstruction", _reconstruction_submit, _reconstruction_value, reference=True,
                       doc="mean squared error of the logits against the reference model's"))
register(ObjectiveSpec("lm_eval", _no_submit, _lm_eval_value, direction="maximize", model_files=True,
                       doc="lm-evaluation-harness tasks on the trial's model, written once per trial"))
