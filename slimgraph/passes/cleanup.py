"""cleanup: remove dropout, identities and dead nodes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx, nn

from slimgraph.passes._fx import describe, finalize
from slimgraph.passes.base import Pass, PassResult, Skip, register_pass

_IDENTITY_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                     nn.FeatureAlphaDropout, nn.Identity)
_IDENTITY_FUNCTIONS = {torch.nn.functional.dropout, torch.nn.functional.dropout1d,
                       torch.nn.functional.dropout2d, torch.nn.functional.dropout3d,
                       torch.nn.functional.alpha_dropout, torch.dropout}
# ``.contiguous()`` is not among them: a ``view`` after a ``transpose`` needs it (channel shuffle).
_IDENTITY_METHODS: set[str] = set()


def _is_identity(gm: fx.GraphModule, node: fx.Node) -> bool:
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _IDENTITY_MODULES)
    if node.op == "call_function":
        return node.target in _IDENTITY_FUNCTIONS
    return node.op == "call_method" and node.target in _IDENTITY_METHODS


@register_pass
@dataclass(frozen=True)
class Cleanup(Pass):
    """Remove inference no-ops (dropout, identity) and dead nodes.

    Standard compiler hygiene (dead-code elimination); dropout is the identity at inference
    (Srivastava et al. 2014), so the graph is for inference from here on.
    Requires: nothing. Preserves: nothing (node set changes).
    Declines (reported): dead nodes with side effects (impure calls), which are kept.
    Exact: yes.
    """

    name: ClassVar[str] = "cleanup"
    exact: ClassVar[bool] = True
    nothing_found: ClassVar[str] = "no dropout, identity or dead node in the graph"

    def run(self, graph, ctx) -> PassResult:
        out = graph.copy()
        gm = out.gm
        removed = 0
        for node in list(gm.graph.nodes):
            if _is_identity(gm, node):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                removed += 1
        n_before = len(gm.graph.nodes)
        finalize(gm)
        removed += n_before - len(gm.graph.nodes)
        skipped = [Skip(n.name, f"dead but has side effects: {describe(gm, n)}")
                   for n in gm.graph.nodes
                   if n.op not in ("placeholder", "output") and not n.users and n.is_impure()]
        if not removed:
            return PassResult(graph, changed=False, skipped=skipped)
        return PassResult(out, changed=True, skipped=skipped, stats={"nodes_removed": removed})
