"""Shared checks for pass tests: run a pass the way the pass manager does."""

import numpy as np
import torch
from torch import nn

from slimgraph.ir import Graph
from slimgraph.passes import parse_pipeline
from slimgraph.passes.context import PassContext


def run_pass(spec: str, graph: Graph, am: PassContext | None = None):
    (p,) = parse_pipeline(spec)
    return p.run(graph, am or PassContext(reference=graph))


def rel_l2(a: Graph, b: Graph, x: torch.Tensor) -> float:
    """||a(x) - b(x)|| / ||a(x)|| on the first output."""
    ra, rb = a.run(x)[0], b.run(x)[0]
    return float(np.linalg.norm(ra - rb) / np.linalg.norm(ra))


def conv_graph(x: torch.Tensor, cout: int, k: int = 3, stride=1, padding=1, dilation=1,
               bias: bool = True, groups: int = 1) -> Graph:
    """One seeded Conv2d (input channels from ``x``) as a graph with ``x[:1]`` as example."""
    torch.manual_seed(0)
    conv = nn.Conv2d(x.shape[1], cout, k, stride, padding, dilation, groups=groups, bias=bias)
    return Graph.from_torch(nn.Sequential(conv), (x[:1],))


def max_rel_err(a: Graph, b: Graph, x: torch.Tensor) -> float:
    ra, rb = a.run(x)[0], b.run(x)[0]
    return float(np.abs(ra - rb).max() / (np.abs(ra).max() + 1e-12))


def module_types(graph: Graph) -> list[str]:
    return [type(graph.module(n)).__name__ for n in graph.nodes if n.op == "call_module"]
