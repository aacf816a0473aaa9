"""The layers of ARCHITECTURE.md, checked statically on the source (nothing is imported).

An import graph is built from the AST of every module of `raymerge/` and `planners/`: module-level
and function-level imports alike (a lazy import still runs on some path), `if TYPE_CHECKING:`
blocks excluded (they never run), relative imports resolved. `from pkg import name` is an edge
to `pkg.name` when that is a module, else to `pkg`. The implicit import of parent packages
(`import a.b.c` runs `a/__init__` and `a/b/__init__`) is not an edge: every module would
otherwise depend on the public API in `raymerge/__init__`, which is not what the layering is about
(and importing `raymerge` does not import Ray: the runtime imports it inside functions).

Rules:
- `raymerge/checkpoints/` imports no Ray, directly or through any raymerge module it imports;
- `planners/` imports neither torch nor Ray (nor raymerge: it is standalone);
- `raymerge/methods/` imports no Ray and nothing of raymerge's I/O (checkpoints, runtime);
- no cycle between packages (`raymerge.X` subpackages, top-level modules each their own node)
  and no cycle between the modules of `raymerge/checkpoints/`.
The checker is tested on a planted fake package, so these tests can fail.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterable, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("raymerge", "planners")


# -- the checker ---------------------------------------------------------------------------------


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, set[str]]:
    """module -> the dotted names it imports (raymerge modules resolved to modules; others as written)."""
    files: dict[str, Path] = {}
    is_package: dict[str, bool] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            name = _module_name(path, root)
            files[name] = path
            is_package[name] = path.name == "__init__.py"
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        here = name if is_package[name] else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            base = node.module or ""
            if node.level:
                anchor = here.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                targets.add(sub if sub in files else base)
        targets.discard(name)
        graph[name] = targets
    return graph


def _top(name: str) -> str:
    return name.split(".")[0]


def reaches(graph: dict[str, set[str]], start: str, forbidden: tuple[str, ...]) -> Optional[list[str]]:
    """An import chain from `start` to a module in (or under) `forbidden`, through modules of the
    graph; None if there is none."""
    seen = {start}
    paths = [[start]]
    while paths:
        path = paths.pop(0)
        for target in sorted(graph.get(path[-1], ())):
            if any(target == f or target.startswith(f + ".") for f in forbidden):
                return path + [target]
            if target in graph and target not in seen:
                seen.add(target)
                paths.append(path + [target])
    return None


def package_of(module: str, root_package: str = "raymerge") -> str:
    """`raymerge.X` for modules of the subpackage or top-level module X; the package itself for its __init__."""
    parts = module.split(".")
    if parts[0] != root_package:
        return parts[0]
    return ".".join(parts[:2])


def package_graph(graph: dict[str, set[str]], root_package: str = "raymerge") -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        if _top(module) != root_package:
            continue
        source = package_of(module, root_package)
        edges = packages.setdefault(source, set())
        for target in targets:
            if target in graph and _top(target) == root_package:
                dest = package_of(target, root_package)
                if dest != source:
                    edges.add(dest)
    return packages


def find_cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    """One cycle of the graph as a path [a, b, ..., a], or None (iterative DFS, deterministic)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                continue
            if child not in graph:
                continue
            if state.get(child) == 1:
                path = [n for n, _ in stack]
                return path[path.index(child):] + [child]
            if child not in state:
                state[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
    return None


def violations(root: Path, root_package: str = "raymerge", planners: str = "planners") -> list[str]:
    graph = import_graph(root, (root_package, planners))
    found: list[str] = []

    def chain(path: list[str]) -> str:
        return " -> ".join(path)

    for module in sorted(graph):
        if module.startswith(f"{root_package}.checkpoints"):
            path = reaches(graph, module, ("ray",))
            if path:
                found.append(f"{module} imports Ray: {chain(path)}")
        if _top(module) == planners:
            path = reaches(graph, module, ("torch", "ray", root_package))
            if path:
                found.append(f"{module} must be standalone (no torch, Ray or {root_package}): {chain(path)}")
        if module.startswith(f"{root_package}.methods"):
            io = (f"{root_package}.checkpoints", f"{root_package}.runtime")
            path = reaches(graph, module, ("ray", *io))
            if path:
                found.append(f"{module} imports Ray or I/O: {chain(path)}")
        if module.startswith((f"{root_package}.blocks", f"{root_package}.pruning")):
            path = reaches(graph, module, ("ray",))
            if path:
                found.append(f"{module} imports Ray: {chain(path)}")
        if module.startswith(f"{root_package}.config"):
            allowed = (f"{root_package}.config", f"{root_package}.errors")
            ours = sorted(t for t in graph[module] if _top(t) == root_package and t != root_package
                          and not any(t == a or t.startswith(a + ".") for a in allowed))
            if ours:
                found.append(f"{module} imports {', '.join(ours)}: config imports nothing of ours but config and errors")
    cycle = find_cycle(package_graph(graph, root_package))
    if cycle:
        found.append(f"package import cycle: {chain(cycle)}")
    checkpoints = {m: {t for t in ts if t.startswith(f"{root_package}.checkpoints.")}
                   for m, ts in graph.items() if m.startswith(f"{root_package}.checkpoints.")}
    cycle = find_cycle(checkpoints)
    if cycle:
        found.append(f"module import cycle in {root_package}/checkpoints: {chain(cycle)}")
    return found


# -- the tests -----------------------------------------------------------------------------------


def test_layers_hold():
    found = violations(ROOT)
    assert not found, "layer violations (see ARCHITECTURE.md):\n" + "\n".join(found)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_catches_planted_violations(tmp_path):
    _write(tmp_path, {
        "fake/__init__.py": "",
        "fake/checkpoints/__init__.py": "from .writer import Writer\n",
        "fake/checkpoints/writer.py": "def upload():\n    from fake.runtime.pool import run\n",
        "fake/checkpoints/s3.py": "from fake.checkpoints import writer\n",
        "fake/runtime/__init__.py": "",
        "fake/runtime/pool.py": "import ray\nfrom ..search import study\n",
        "fake/search/__init__.py": "",
        "fake/search/study.py": "def f():\n    from fake.runtime import pool\n",
        "fake/methods/__init__.py": "from fake.checkpoints.s3 import x\n",
        "fake/errors.py": "",
        "fake/config/__init__.py": "from fake.errors import E\n",
        "fake/config/prune.py": "from fake.config import x\ndef f():\n    from fake.pruning.methods import get\n",
        "fake/pruning/__init__.py": "",
        "fake/pruning/methods.py": "",
        "fake/blocks/__init__.py": "def f():\n    import ray\n",
        "fakeplan/__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ray\nimport torch.nn\n",
    })
    found = violations(tmp_path, "fake", "fakeplan")
    text = "\n".join(found)
    # transitive, through a function-level import
    assert "fake.checkpoints.writer imports Ray: fake.checkpoints.writer -> fake.runtime.pool -> ray" in text
    assert "fakeplan must be standalone (no torch, Ray or fake): fakeplan -> torch.nn" in text
    assert "fake.methods imports Ray or I/O: fake.methods -> fake.checkpoints.s3" in text
    assert "package import cycle: fake.runtime -> fake.search -> fake.runtime" in text
    assert "fake.config.prune imports fake.pruning.methods: config imports nothing of ours" in text
    assert "fake.config imports" not in text  # config and errors are allowed
    assert "fake.blocks imports Ray: fake.blocks -> ray" in text
    assert "fake.checkpoints.s3 imports Ray: fake.checkpoints.s3 -> fake.checkpoints.writer -> fake.runtime.pool -> ray" in text
    # TYPE_CHECKING imports are not edges
    assert "fakeplan -> ray" not in text


def test_checker_finds_module_cycle_and_resolves_relative_imports(tmp_path):
    _write(tmp_path, {
        "fake/__init__.py": "",
        "fake/checkpoints/__init__.py": "",
        "fake/checkpoints/writer.py": "def open_output():\n    from .s3 import S3\n",
        "fake/checkpoints/s3.py": "from . import writer\n",
        "fakeplan/__init__.py": "",
    })
    graph = import_graph(tmp_path, ("fake", "fakeplan"))
    assert graph["fake.checkpoints.s3"] == {"fake.checkpoints.writer"}
    assert graph["fake.checkpoints.writer"] == {"fake.checkpoints.s3"}
    found = violations(tmp_path, "fake", "fakeplan")
    assert found == ["module import cycle in fake/checkpoints: fake.checkpoints.s3 -> fake.checkpoints.writer -> fake.checkpoints.s3"]


def test_clean_fake_package_passes(tmp_path):
    _write(tmp_path, {
        "fake/__init__.py": "from fake.runtime import pool\n",
        "fake/checkpoints/__init__.py": "import torch\n",
        "fake/runtime/__init__.py": "",
        "fake/runtime/pool.py": "import ray\nfrom fake.checkpoints import x\n",
        "fakeplan/__init__.py": "import pulp\n",
    })
    assert violations(tmp_path, "fake", "fakeplan") == []


@pytest.mark.parametrize("package", PACKAGES)
def test_graph_sees_function_level_imports(package):
    graph = import_graph(ROOT)
    assert any(m.startswith(package) for m in graph)
    # raymerge/__init__ imports run_merge inside merge(): still an edge
    assert "raymerge.runtime.merge" in graph["raymerge"]
    assert "ray" in graph["raymerge.runtime.actor_pool"]  # only imported inside functions there
