"""Parsing the small JSON files of a checkpoint with bounded nesting.

Safetensors headers, `model.safetensors.index.json` and `config.json` come from whoever made the
model. `json.loads` recurses once per nesting level, so `[[[[...]]]]` ten thousand deep raises
`RecursionError` (not a `ValueError`) from deep inside the decoder. `loads_bounded` measures the
nesting first — brackets outside strings, one C-speed regex pass to drop strings, then a loop over
the brackets alone — and refuses anything deeper than `MAX_DEPTH` with one line naming the file;
real files are 3 (a header) to about 6 (a multimodal config.json) levels deep.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Union

#: the deepest nesting of objects and arrays accepted in a header, index or config.json
MAX_DEPTH = 64

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")


def json_depth(data: bytes, stop: int = MAX_DEPTH) -> int:
    """The deepest nesting of objects/arrays in `data` (JSON bytes; strings ignored), counted
    up to the first level past `stop`."""
    brackets = _NOT_BRACKET.sub(b"", _STRING.sub(b"", data))
    depth = deepest = 0
    for b in brackets:
        if b == 91 or b == 123:  # [ {
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > stop:
                    break
        else:
            depth -= 1
    return deepest


def loads_bounded(data: Union[bytes, str], where: str, error: Callable[[str], Exception]) -> Any:
    """`json.loads(data)` for a file named `where`; `error(message)` (raised) when it is not
    UTF-8, not JSON, or nested more than MAX_DEPTH levels."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if json_depth(raw) > MAX_DEPTH:
        raise error(f"{where}: JSON nested more than {MAX_DEPTH} levels deep; refused")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise error(f"{where}: not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise error(f"{where}: invalid JSON ({err})") from None
    except RecursionError:  # a backstop: MAX_DEPTH is far below the recursion limit
        raise error(f"{where}: JSON nested too deeply; refused") from None
