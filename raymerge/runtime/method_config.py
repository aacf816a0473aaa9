"""The checks of a merge config against its method's spec that need neither headers nor torch.

`check_method_config` finds the config's `merge_method` (a `ConfigError` listing the methods when
there is none of that name), refuses a parameter name that no method knows (one another method
knows is ignored, as mergekit does), and a method that needs a `base_model` in a config that
names none (neither at the top nor on a slice). Compiling a config (`runtime.operators`) makes
these checks first; the command line makes them before torch is imported (`raymerge.cli`), so a
typo is reported at once, with the job's own message. Specs come from the torch-free registry
(`raymerge.methods.catalog`).
"""

from __future__ import annotations

from typing import Optional

from raymerge.config import MergeConfig
from raymerge.config.merge_config import ConfigError, Parameters
from raymerge.methods import MethodError, MethodSpec, available_methods, get_method


def check_method_config(config: MergeConfig, label: str) -> MethodSpec:
    """The spec of `config`'s merge_method, after the checks above; errors name `label` (the file)."""
    try:
        spec = get_method(config.merge_method)
    except MethodError as err:
        raise ConfigError(f"{label}: merge_method: {err}") from None
    _check_parameter_names(config, spec, label)
    slice_bases = [s.base_model for s in config._slice_list() or []]
    if spec.base == "required" and config.base_model is None and not any(slice_bases):
        # (a slice without one, when others have theirs, is refused per tensor by the compiler)
        raise ConfigError(f"{label}: merge_method {spec.name!r} needs a base_model")
    return spec


def _scopes(config: MergeConfig) -> list[tuple[str, Optional[Parameters]]]:
    """Every place parameters are set, with the name an error gives it."""
    scopes: list[tuple[str, Optional[Parameters]]] = [("parameters", config.parameters),
                                                      ("modules.parameters", config.module_parameters())]
    for i, m in enumerate(config._model_list() or []):
        scopes.append((f"models[{i}].parameters", m.parameters))
    for i, s in enumerate(config._slice_list() or []):
        scopes.append((f"slices[{i}].parameters", s.parameters))
        for j, src in enumerate(s.sources):
            scopes.append((f"slices[{i}].sources[{j}].parameters", src.parameters))
    return scopes


def _all_param_names() -> set[str]:
    names: set[str] = set()
    for m in available_methods():
        names |= get_method(m).known_params()
    return names


def _check_parameter_names(config: MergeConfig, spec: MethodSpec, label: str) -> None:
    known = spec.known_params()
    everywhere = None
    for where, scope in _scopes(config):
        for name in scope or {}:
            if name in known:
                continue
            everywhere = everywhere or _all_param_names()
            if name not in everywhere:
                raise ConfigError(
                    f"{label}: {where}.{name}: unknown parameter for merge_method "
                    f"{spec.name!r} (known: {', '.join(sorted(known)) or 'none'})"
                )
            # A parameter of another method: mergekit ignores it, and so do we.
