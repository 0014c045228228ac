"""const-fold: evaluate subgraphs that depend only on stored constants."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from slimgraph.passes._fx import describe, finalize, fresh_attr_name
from slimgraph.passes.base import Pass, PassResult, Skip, register_pass

# Ops whose result is not a function of their inputs: never folded.
_NONDETERMINISTIC = {"rand", "randn", "rand_like", "randn_like", "randint", "bernoulli",
                     "dropout", "normal", "multinomial", "empty", "empty_like"}


def _nondeterministic(node: fx.Node) -> bool:
    name = getattr(node.target, "__name__", str(node.target))
    return any(tok in name for tok in _NONDETERMINISTIC)


@register_pass
@dataclass(frozen=True)
class ConstFold(Pass):
    """Fold nodes whose inputs are all stored constants into one stored tensor.

    Classic constant propagation (Wegman and Zadeck 1991) on the dataflow graph: weight
    transposes, reshapes of initializers, arithmetic on buffers, shape computations on
    constants. Requires: nothing. Preserves: nothing.
    Declines (reported): random or allocation ops (rand, dropout, empty) on constants.
    Non-tensor results (Python ints from ``.shape``) are left for the tracer.
    Exact: yes (the same ops, evaluated once ahead of time).
    """

    name: ClassVar[str] = "const-fold"
    exact: ClassVar[bool] = True
    nothing_found: ClassVar[str] = "no constant subgraph to fold"

    def run(self, graph, ctx) -> PassResult:
        out = graph.copy()
        gm = out.gm
        const: dict[fx.Node, bool] = {}
        skipped: list[Skip] = []
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                const[node] = True
            elif node.op in ("call_function", "call_method", "call_module"):
                inputs = node.all_input_nodes
                ok = bool(inputs) and all(const.get(i, False) for i in inputs)
                if ok and _nondeterministic(node):
                    skipped.append(Skip(node.name, f"not folded: {describe(gm, node)} is random or allocates"))
                    ok = False
                const[node] = ok
            else:
                const[node] = False
        frontier = [n for n in gm.graph.nodes if const[n] and n.op != "get_attr"
                    and any(not const.get(u, False) for u in n.users)]
        if not frontier:
            return PassResult(graph, changed=False, skipped=skipped)
        values = _evaluate(gm, [n for n in gm.graph.nodes if const[n]])
        folded = 0
        for node in frontier:
            value = values[node]
            if not isinstance(value, torch.Tensor):
                continue
            attr = fresh_attr_name(gm, f"_folded_{node.name}")
            gm.register_buffer(attr, value.detach().clone())
            with gm.graph.inserting_before(node):
                new = gm.graph.get_attr(attr)
            node.replace_all_uses_with(new)
            folded += 1
        if not folded:
            return PassResult(graph, changed=False, skipped=skipped)
        finalize(gm)
        return PassResult(out, changed=True, skipped=skipped, stats={"nodes_folded": folded})


def _evaluate(gm: fx.GraphModule, nodes: list[fx.Node]) -> dict[fx.Node, object]:
    env: dict[fx.Node, object] = {}
    with torch.no_grad():
        for node in nodes:
            if node.op == "get_attr":
                obj = gm
                for part in node.target.split("."):
                    obj = getattr(obj, part)
                env[node] = obj
                continue
            args = fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
            if node.op == "call_function":
                env[node] = node.target(*args, **kwargs)
            elif node.op == "call_method":
                env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                env[node] = gm.get_submodule(node.target)(*args, **kwargs)
    return env
