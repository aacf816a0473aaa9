"""Search spaces: which numbers of a merge config Optuna chooses, and putting its choices back.

Any number of a mergekit config may be replaced by a range; the rest of the file stays as is:

```yaml
models:
  - model: ./ft1
    parameters:
      weight: {low: 0.0, high: 1.0}              # one dimension
      density: {low: 0.1, high: 0.9, knots: 3}   # three, interpolated across layers
  - model: ./ft2
    parameters:
      weight: {low: 0.0, high: 1.0, step: 0.25}  # a grid-able dimension
      density: [{filter: mlp, value: {low: 0.2, high: 1.0}}, {value: 0.5}]
```

A range is a mapping with `low` and `high` (optionally `log: true`, `step`, `knots`), or with
`choices: [...]`. With `knots: k`, the value becomes a k-point gradient list, which mergekit
interpolates across the layers like any gradient. Dimension names are the dotted path to the
value (`models.0.parameters.density.k1`), so the exported best config is readable.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from raymerge.errors import RaymergeError

RANGE_KEYS = {"low", "high", "log", "step", "knots"}


class SearchSpaceError(RaymergeError, ValueError):
    """A search range is malformed; the message names its path."""


@dataclass(frozen=True)
class Dimension:
    name: str
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: Optional[tuple[Any, ...]] = None

    def suggest(self, trial: Any) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)

    def grid(self) -> list[Any]:
        """The values a grid sampler tries (needs `choices` or `step`)."""
        if self.choices is not None:
            return list(self.choices)
        if self.step is None:
            raise SearchSpaceError(f"{self.name}: the grid sampler needs `step` or `choices` on every range")
        n = int(math.floor((self.high - self.low) / self.step + 1e-9))
        return [round(self.low + i * self.step, 12) for i in range(n + 1)]


@dataclass(frozen=True)
class _Slot:
    path: tuple[Any, ...]
    dims: tuple[Dimension, ...]
    gradient: bool


def _is_range(value: Any) -> bool:
    return isinstance(value, dict) and (("low" in value and "high" in value) or "choices" in value)


def _dimension(name: str, spec: dict[str, Any]) -> Dimension:
    extra = set(spec) - RANGE_KEYS - {"choices"}
    if extra:
        raise SearchSpaceError(f"{name}: unknown keys {sorted(extra)} in a search range (use low, high, log, step, knots or choices)")
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise SearchSpaceError(f"{name}: choices must be a non-empty list")
        return Dimension(name, choices=tuple(choices))
    low, high = spec["low"], spec["high"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low < high:
        raise SearchSpaceError(f"{name}: need numbers low < high, got low={low!r} high={high!r}")
    log = bool(spec.get("log", False))
    if log and low <= 0:
        raise SearchSpaceError(f"{name}: a log range needs low > 0")
    step = spec.get("step")
    if step is not None and (log or not step > 0):
        raise SearchSpaceError(f"{name}: step must be positive and cannot be combined with log")
    return Dimension(name, float(low), float(high), log, None if step is None else float(step))


class SearchSpace:
    """The ranges found in a config tree, and how to fill them in."""

    def __init__(self, template: Any, prefix: str = "") -> None:
        self.template = copy.deepcopy(template)
        self.slots: list[_Slot] = []
        self._collect(self.template, (), prefix)
        if not self.slots:
            raise SearchSpaceError("the config has no search range ({low: ..., high: ...} or {choices: [...]}) to search over")

    def _collect(self, node: Any, path: tuple[Any, ...], prefix: str) -> None:
        name = ".".join(str(p) for p in (prefix, *path) if p != "")
        if _is_range(node):
            knots = node.get("knots")
            spec = {k: v for k, v in node.items() if k != "knots"}
            if knots is None:
                self.slots.append(_Slot(path, (_dimension(name, spec),), False))
                return
            if not isinstance(knots, int) or knots < 2:
                raise SearchSpaceError(f"{name}: knots must be an integer >= 2")
            dims = tuple(_dimension(f"{name}.k{i}", spec) for i in range(knots))
            self.slots.append(_Slot(path, dims, True))
            return
        if isinstance(node, dict):
            for key, value in node.items():
                self._collect(value, (*path, key), prefix)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                self._collect(value, (*path, i), prefix)

    @property
    def dimensions(self) -> list[Dimension]:
        return [d for s in self.slots for d in s.dims]

    def suggest(self, trial: Any) -> dict[str, Any]:
        return {d.name: d.suggest(trial) for d in self.dimensions}

    def fill(self, values: dict[str, Any]) -> Any:
        """The config with every range replaced by its value from `values` (by dimension name)."""
        out = copy.deepcopy(self.template)
        for slot in self.slots:
            picked = [values[d.name] for d in slot.dims]
            _set(out, slot.path, picked if slot.gradient else picked[0])
        return out

    def grid(self) -> dict[str, list[Any]]:
        return {d.name: d.grid() for d in self.dimensions}


def _set(tree: Any, path: Sequence[Any], value: Any) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value
