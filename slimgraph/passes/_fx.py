"""Small torch.fx rewrite helpers shared by passes."""

from __future__ import annotations

import re
from collections import Counter

from torch import fx, nn


def finalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Dead-code elimination, unused-submodule removal, lint and recompile after a rewrite."""
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm


def module_call_counts(gm: fx.GraphModule) -> Counter:
    """How many nodes call each submodule (a module called twice shares its weights)."""
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_module")


def fresh_attr_name(gm: nn.Module, base: str) -> str:
    base = re.sub(r"\W", "_", base) or "attr"
    if not hasattr(gm, base):
        return base
    i = 1
    while hasattr(gm, f"{base}_{i}"):
        i += 1
    return f"{base}_{i}"


def describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """A short human label for a node: its op and, for modules, the module type."""
    if node.op == "call_module":
        return f"{type(gm.get_submodule(node.target)).__name__} ({node.target})"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {node.target}"
