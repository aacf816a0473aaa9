"""Value checks for method parameters: each returns an error message, or None when fine."""

from __future__ import annotations

import math
from typing import Any, Callable

Check = Callable[[Any], "str | None"]


def is_finite_number(value: Any) -> bool:
    """An int or float (not a bool) that is finite as a float: an integer too large for a float
    (YAML reads any run of digits as one) is not."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def number(value: Any) -> str | None:
    return None if is_finite_number(value) else f"expected a finite number, got {value!r}"


def in_range(lo: float, hi: float, *, hi_open: bool = False) -> Check:
    right = ")" if hi_open else "]"

    def check(value: Any) -> str | None:
        if not is_finite_number(value):
            return f"expected a number in [{lo}, {hi}{right}, got {value!r}"
        if value < lo or value > hi or (hi_open and value == hi):
            return f"must be in [{lo}, {hi}{right}, got {value!r}"
        return None

    return check


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"expected true or false, got {value!r}"


def choice(*options: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in options else f"expected one of {', '.join(options)}, got {value!r}"

    return check
