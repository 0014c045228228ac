"""Shared checks for pass tests: run a pass the way the pass manager does."""

import numpy as np
import torch

from slimgraph.ir import Graph
from slimgraph.passes import parse_pipeline
from slimgraph.passes.context import PassContext


def run_pass(spec: str, graph: Graph, am: PassContext | None = None):
    (p,) = parse_pipeline(spec)
    return p.run(graph, am or PassContext(reference=graph))


def max_rel_err(a: Graph, b: Graph, x: torch.Tensor) -> float:
    ra, rb = a.run(x)[0], b.run(x)[0]
    return float(np.abs(ra - rb).max() / (np.abs(ra).max() + 1e-12))


def module_types(graph: Graph) -> list[str]:
    return [type(graph.module(n)).__name__ for n in graph.nodes if n.op == "call_module"]
