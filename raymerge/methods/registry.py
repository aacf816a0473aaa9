"""The merge-method registry: one `MethodSpec` per method name, each declaring its parameters.

A method is a pure torch function (no I/O, no Ray) with the signature::

    fn(inputs: list[Tensor], *, base_index: int | None,
       model_params: list[dict[str, Any]], params: dict[str, Any],
       generator: torch.Generator | None) -> Tensor

- `inputs` are the input tensors for one output tensor, in config order, on one device and
  already cast to the merge's working dtype.
- `base_index` is the position of the base model's tensor in `inputs` (None without a base).
- `model_params[i]` holds the resolved per-model parameters of `inputs[i]` (a parameter the
  user did not set is absent, never None); `params` holds the resolved global parameters.
  Defaults are applied by `MethodSpec.resolve`, so the function may index them directly.
- `generator` is a CPU generator (whatever the inputs' device) seeded from (random_seed, tensor name) for methods
  with `random=True`, so results never depend on which worker ran the tensor.

The runtime resolves parameters per tensor (gradients, filters) and calls `spec.fn`.

What the runtime needs to know about a method lives on its spec, not in tables keyed by method
name elsewhere. The built-in specs are `raymerge.methods.catalog`'s, each naming its function as
a `LazyFunction` (module and name, imported on the first call): this module and the catalog
import no torch, so a config is checked against the specs, and `raymerge methods` lists them,
before torch is imported. Adding a method is its function plus its catalog entry (plus its
tests); a plugin may `register` a spec whose `fn` is any callable. A spec says:
`cost_ns` (the planner's compute estimate: nanoseconds per input element on the reference core,
see `raymerge.runtime.costs`; None: a conservative default until measured), `extra_copies` (its
peak memory: full-size working copies it holds besides its inputs and output, given the number
of inputs; None: a task-vector method's), and `model_trim_key` (the per-model parameter through
which it receives the whole-model magnitude threshold of `trim_scope: model`, see
`raymerge.runtime.global_trim`; None: the method has no model-wide trim). Every method computes
in the one working dtype `raymerge.runtime.operators.resolve_work_dtype` gives (the config's
`dtype`, else the promotion of the inputs' dtypes); the planner times it in that dtype too.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from raymerge.errors import RaymergeError
from raymerge.registries import Registry

MethodFn = Callable[..., Any]  # returns a torch.Tensor (see the contract above)


@dataclass(frozen=True)
class LazyFunction:
    """A method's function named by its module and attribute, imported when first called (the
    module imports torch; the spec need not). Picklable, and equal to another naming the same."""

    module: str
    name: str

    def resolve(self) -> Callable[..., Any]:
        return getattr(importlib.import_module(self.module), self.name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)


class MethodError(RaymergeError, ValueError):
    """A merge method was misconfigured (unknown name, missing or bad parameter)."""


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a method.

    `per_model` parameters are set per input model (mergekit's `tensor_parameters`), the others
    globally. `required` parameters have no default. `check` validates one value and returns an
    error message, or None when the value is fine.
    """

    name: str
    default: Any = None
    per_model: bool = False
    required: bool = False
    check: Callable[[Any], str | None] | None = None
    doc: str = ""
    # Per-model parameters are resolved for the base model too only when input_scope is True
    # (mergekit's ParameterScope.INPUT, e.g. linear's `weight`); otherwise the base gets none.
    input_scope: bool = False


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: MethodFn
    params: tuple[ParamSpec, ...] = ()
    base: str = "optional"  # "required", "optional" or "none" (a base model is an ordinary input)
    random: bool = False
    min_models: int = 1
    max_models: int | None = None
    non_base_models: tuple[int, int | None] | None = None  # (min, max) inputs besides the base
    elementwise: bool = False  # True when output rows depend only on the same input rows
    doc: str = ""
    cost_ns: float | None = None  # ns per input element on the reference core (runtime.costs)
    extra_copies: Callable[[int], float] | None = None  # working copies for n inputs (runtime.costs)
    model_trim_key: str | None = None  # per-model parameter carrying a `trim_scope: model` threshold
    extra: dict[str, Any] = field(default_factory=dict)

    def param(self, name: str) -> ParamSpec | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    def resolve(
        self, model_params: list[dict[str, Any]], params: dict[str, Any], base_index: int | None
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Apply defaults and checks; raise MethodError naming the parameter on a bad value."""
        out_models: list[dict[str, Any]] = []
        for i, mp in enumerate(model_params):
            resolved: dict[str, Any] = {}
            for p in self.params:
                if not p.per_model or (i == base_index and not p.input_scope):
                    continue
                if p.name in mp and mp[p.name] is not None:
                    resolved[p.name] = mp[p.name]
                elif p.required:
                    raise MethodError(f"{self.name}: missing required per-model parameter {p.name!r}")
                elif p.default is not None:
                    resolved[p.name] = p.default
                if p.name in resolved and p.check is not None:
                    msg = p.check(resolved[p.name])
                    if msg:
                        raise MethodError(f"{self.name}: bad value for {p.name!r}: {msg}")
            out_models.append(resolved)
        out_params: dict[str, Any] = {}
        for p in self.params:
            if p.per_model:
                continue
            if p.name in params and params[p.name] is not None:
                out_params[p.name] = params[p.name]
            elif p.required:
                raise MethodError(f"{self.name}: missing required parameter {p.name!r}")
            else:
                out_params[p.name] = p.default
            if out_params[p.name] is not None and p.check is not None:
                msg = p.check(out_params[p.name])
                if msg:
                    raise MethodError(f"{self.name}: bad value for {p.name!r}: {msg}")
        return out_models, out_params

    def known_params(self) -> set[str]:
        return {p.name for p in self.params}


def _load_builtins() -> None:
    from raymerge.methods import catalog as _load  # noqa: F401  (importing the catalog registers the built-ins)


REGISTRY: Registry[MethodSpec] = Registry("merge_method", MethodError, _load_builtins)


def register(spec: MethodSpec) -> MethodSpec:
    return REGISTRY.register(spec)


def get_method(name: str) -> MethodSpec:
    return REGISTRY.get(name)


def available_methods() -> list[str]:
    return REGISTRY.names()
