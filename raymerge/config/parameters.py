"""Resolving parameter settings for one tensor: precedence, filters and layer gradients.

Semantics follow mergekit 0.1.5:
- precedence, first value found wins: the input model's own parameters (in its slice source or
  `models:` entry), the output slice's `parameters`, the module's, the top level's, then the
  method's default;
- a filter list picks the first entry whose `filter` is a substring of the tensor name
  (`filter: null` or `"*"` matches everything, so a catch-all belongs last);
- a list of numbers is a gradient, interpolated piecewise-linearly at t = layer / (layers - 1)
  within the output slice (t = 1 for a one-layer slice; embeddings, final norm and lm_head use
  t = 0); a list of non-numbers steps instead of interpolating.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

from raymerge.config.merge_config import ConditionalParameter

_MISSING = object()


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """The value of one parameter setting for `tensor_name` at layer position `t` in [0, 1]."""
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, ConditionalParameter) for e in setting):
            for cond in setting:
                if cond.filter is None or cond.filter == "*" or cond.filter in tensor_name:
                    return evaluate_setting(cond.value, tensor_name, t)
            return None
        numeric = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting)
        if not numeric:
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    raise TypeError(f"unexpected parameter setting {setting!r}")


def resolve_parameter(
    name: str, scopes: Iterable[Optional[Mapping[str, Any]]], tensor_name: str, t: float
) -> Any:
    """The first non-None value of `name` over `scopes` (highest precedence first), or _MISSING."""
    for scope in scopes:
        if scope is not None and name in scope:
            value = evaluate_setting(scope[name], tensor_name, t)
            if value is not None:
                return value
    return _MISSING


def is_missing(value: Any) -> bool:
    return value is _MISSING
