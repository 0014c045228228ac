"""Analyses over an ``ir.Graph``: typed keys, computed on demand, cached per graph.

``AnalysisManager().get(Cost, graph)`` computes (once) and returns an analysis. Passes declare
which analyses they require (prefetched) and preserve; everything else is recomputed for the
graph they return.
"""

from slimgraph.ir.analysis.channels import ChannelGroups, Channels
from slimgraph.ir.analysis.cost import Cost, GraphCost
from slimgraph.ir.analysis.manager import Analysis, AnalysisManager
from slimgraph.ir.analysis.shapes import Shapes

__all__ = ["Analysis", "AnalysisManager", "ChannelGroups", "Channels", "Cost", "GraphCost", "Shapes"]
