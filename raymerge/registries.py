"""One shape for every extension point: merge methods, prune methods, guidance methods, search
objectives and checkpoint sources each keep their specs in a `Registry`.

A registry maps names to frozen spec objects (each spec has a `name`), in registration order. It
owns the three things every extension point needs and which used to be written five times: refusing
a name registered twice, a user error listing the known names for an unknown one (of the package's
error type for that layer, so the CLI reports it in one line), and loading the built-ins on first
use (`load`: importing the modules that register them). Adding a method is one module that calls
`register`. Pure Python: every layer may import it.
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, Optional, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Specs by name. `what` names an entry in messages ("merge method"); `error` is raised for an
    unknown name; `load` (optional) registers the built-ins, called before the first lookup."""

    def __init__(self, what: str, error: type[Exception], load: Optional[Callable[[], None]] = None) -> None:
        self.what = what
        self._error = error
        self._load = load
        self._loaded = load is None
        self._specs: dict[str, T] = {}

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self._loaded = True
            assert self._load is not None
            self._load()

    def register(self, spec: T, *, before: Optional[str] = None) -> T:
        """Add `spec` (after the others, or just before the entry named `before`). The built-ins
        are loaded first, so a plugin's spec named like one is refused here, not at a later lookup."""
        self._ensure_loaded()
        name = getattr(spec, "name")
        if name in self._specs:
            raise ValueError(f"{self.what} {name!r} registered twice")
        if before is None:
            self._specs[name] = spec
        else:
            self.get(before)
            items = list(self._specs.items())
            at = [k for k, _ in items].index(before)
            self._specs = dict(items[:at] + [(name, spec)] + items[at:])
        return spec

    def unregister(self, name: str) -> None:
        """Remove an entry (tests that register one of their own)."""
        self._specs.pop(name, None)

    def get(self, name: str) -> T:
        self._ensure_loaded()
        try:
            return self._specs[name]
        except KeyError:
            raise self._error(f"unknown {self.what} {name!r}; available: {', '.join(self.names())}") from None

    def __contains__(self, name: object) -> bool:
        self._ensure_loaded()
        return name in self._specs

    def names(self) -> list[str]:
        """The registered names, sorted."""
        self._ensure_loaded()
        return sorted(self._specs)

    def in_order(self) -> Iterator[T]:
        """The specs in registration order (the order sources are tried in)."""
        self._ensure_loaded()
        return iter(list(self._specs.values()))
