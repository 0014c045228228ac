"""Shape analysis: every node's output shape and dtype on the graph's example inputs.

Runs torch.fx's ``ShapeProp`` on a copy of the graph (so the analysed graph's ``node.meta`` is
left alone) and returns ``{node_name: NodeShape}``; nodes that produce no tensor map to ``None``.
The analysis key is ``Shapes`` (``am.get(Shapes, graph)``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.fx.passes.shape_prop import ShapeProp

from slimgraph.errors import VerifyError
from slimgraph.ir.analysis.manager import Analysis


@dataclass(frozen=True)
class NodeShape:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _to_shape(meta) -> NodeShape | None:
    if meta is None or not hasattr(meta, "shape"):
        return None
    return NodeShape(tuple(int(d) for d in meta.shape), meta.dtype)


ShapeMap = dict[str, NodeShape | tuple | None]


class Shapes(Analysis[ShapeMap]):
    """``{node name: NodeShape}`` on the graph's example inputs."""

    name = "shapes"

    @staticmethod
    def compute(graph, am=None) -> ShapeMap:
        return shapes(graph)


def shapes(graph) -> ShapeMap:
    gm = copy.deepcopy(graph.gm)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*graph.example_inputs)
    except Exception as err:
        raise VerifyError(f"shape propagation failed on {graph.name}: {err}") from err
    result: dict[str, NodeShape | tuple | None] = {}
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if isinstance(meta, tuple | list) and not hasattr(meta, "shape"):
            result[node.name] = tuple(_to_shape(m) if hasattr(m, "shape") else None for m in meta)
        else:
            result[node.name] = _to_shape(meta)
    return result
