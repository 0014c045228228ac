"""Fail on an import cycle between slimgraph's modules.

Reads every module under ``slimgraph/`` with ``ast`` (nothing is imported), takes every
``import``/``from ... import`` of a slimgraph module, at module level or inside a function (a
lazy import hides a cycle, it does not remove it), and looks for cycles with networkx. A package
``__init__`` that re-exports its own submodules is not a cycle of its own; an import of a
package counts as an import of its ``__init__``. Exit status 1 lists each cycle.

    python tools/check_imports.py            # run by `make test` (tests/test_architecture.py)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "slimgraph"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The slimgraph modules ``path`` imports (the deepest existing module of each name)."""
    name = module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, path.name == "__init__.py", node)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith(PACKAGE) and target != name:
                found.add(target)
    return found


def import_graph() -> nx.DiGraph:
    paths = sorted((ROOT / PACKAGE).rglob("*.py"))
    modules = {module_name(p) for p in paths}
    graph = nx.DiGraph()
    for path in paths:
        name = module_name(path)
        graph.add_node(name)
        for target in imports_of(path, modules):
            # a package's __init__ gathering its own submodules is how packages export
            if path.name == "__init__.py" and target.startswith(name + "."):
                continue
            graph.add_edge(name, target)
    return graph


def cycles(graph: nx.DiGraph) -> list[list[str]]:
    return [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]


def main() -> int:
    found = cycles(import_graph())
    for c in found:
        print("import cycle: " + " <-> ".join(c))
    if not found:
        print("no import cycle among slimgraph's modules")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
