"""Loading YAML config files with bounded work: the one YAML reader of every config loader.

`yaml.safe_load` builds aliases as shared objects, so a "billion laughs" file (ten aliases of
ten aliases of ...) loads in microseconds into a graph that expands to billions of nodes; the
first code that walks it (validation, a search space, `yaml.safe_dump`) then runs for hours.
Here the composed node graph is measured before anything is constructed: its size *with every
alias expanded* (memoised per node, so measuring is linear in the file) must stay under
`MAX_NODES`, its nesting under `MAX_DEPTH`, and it must not be recursive (an alias inside its
own anchor). Violations, invalid YAML and non-UTF-8 bytes are one-line `ConfigError`s naming the
file and, where known, the line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import yaml

from raymerge.errors import ConfigError

#: the most nodes (scalars, lists, mappings) a config may expand to, aliases counted each time used
MAX_NODES = 100_000
#: the deepest nesting of lists and mappings a config may have
MAX_DEPTH = 64


def _where(node: yaml.Node) -> str:
    mark = node.start_mark
    return f"line {mark.line + 1}" if mark is not None else "?"


def _check_expansion(root: yaml.Node, where: str) -> None:
    """Refuse a node graph that is recursive, too deep or too large once aliases are expanded."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        key = id(node)
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        if done:
            active.discard(key)
            size = 1 + sum(sizes[id(c)] for c in children)
            if size > MAX_NODES:
                raise ConfigError(
                    f"{where}: YAML expands to more than {MAX_NODES} values (aliases counted each time they are "
                    f"used, near {_where(node)}); a config is small: refused as an alias bomb"
                )
            sizes[key] = size
            continue
        if key in sizes:
            continue
        if key in active:
            raise ConfigError(f"{where}: recursive YAML alias near {_where(node)}; refused")
        if depth > MAX_DEPTH:
            raise ConfigError(f"{where}: YAML nested more than {MAX_DEPTH} levels deep near {_where(node)}; refused")
        active.add(key)
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in children if id(c) not in sizes)


def _problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong, and where."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{at}"


def load_yaml_text(text: str, where: str) -> Any:
    """The YAML document `text` (from `where`), checked for bounded size before it is built."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid YAML in {where}: {_problem(err)}") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply; refused") from None
    finally:
        loader.dispose()


def load_yaml_file(path: Union[str, Path]) -> Any:
    """The YAML file at `path` (UTF-8), bounded as `load_yaml_text`; ConfigError naming it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start} is 0x{data[err.start]:02x}); save it as UTF-8") from None
    return load_yaml_text(text, str(path))
