"""The graph IR: ``Graph`` over torch.fx, its frontends, and its analyses."""

from slimgraph.ir.graph import Graph, TensorSpec

__all__ = ["Graph", "TensorSpec"]
