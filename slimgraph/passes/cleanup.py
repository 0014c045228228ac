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


def _permutation(node: fx.Node) -> tuple[int, ...] | None:
    """The dims of a permute node (function or method form), else None."""
    is_fn = node.op == "call_function" and node.target is torch.permute
    is_method = node.op == "call_method" and node.target == "permute"
    if not (is_fn or is_method) or not node.args:
        return None
    dims = node.args[1:] if is_method and len(node.args) > 2 else node.args[1] if len(node.args) > 1 else None
    if dims is None and "dims" in node.kwargs:
        dims = node.kwargs["dims"]
    if not isinstance(dims, tuple | list) or not all(isinstance(d, int) and d >= 0 for d in dims):
        return None
    return tuple(dims)


def _cancels(node: fx.Node) -> fx.Node | None:
    """The input of a permute pair that composes to the identity (ConvNeXt's NCHW->NHWC->NCHW
    around nothing), when the first permute has no other reader."""
    second = _permutation(node)
    first_node = node.args[0] if node.args else None
    if second is None or not isinstance(first_node, fx.Node) or len(first_node.users) != 1:
        return None
    first = _permutation(first_node)
    if first is None or len(first) != len(second):
        return None
    return first_node.args[0] if tuple(first[d] for d in second) == tuple(range(len(first))) else None


@register_pass
@dataclass(frozen=True)
class Cleanup(Pass):
    """Remove inference no-ops (dropout, identity, permute pairs that cancel) and dead nodes.

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
            elif (source := _cancels(node)) is not None:  # the pair goes; finalize drops the first
                node.replace_all_uses_with(source)
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
