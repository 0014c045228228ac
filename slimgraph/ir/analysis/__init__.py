"""Analyses over an ``ir.Graph``: computed on demand, cached per graph, named in a registry.

``AnalysisManager.get("shapes", graph)`` computes (once) and returns an analysis. Passes declare
which analyses they preserve; everything else is recomputed for the graph they return.
"""

from slimgraph.ir.analysis.manager import ANALYSES, AnalysisManager, register_analysis

# Importing the modules registers their analyses.
from slimgraph.ir.analysis import shapes as _shapes  # noqa: E402,F401  isort: skip
from slimgraph.ir.analysis import cost as _cost  # noqa: E402,F401  isort: skip
from slimgraph.ir.analysis import channels as _channels  # noqa: E402,F401  isort: skip

__all__ = ["ANALYSES", "AnalysisManager", "register_analysis"]
