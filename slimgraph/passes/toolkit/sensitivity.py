"""Per-layer sensitivity: how the network's outputs move when one layer alone is changed.

``FidelityProbe`` scores a working graph against the reference outputs on the calibration
batches (cosine, top-1 agreement, or -rel-L2: higher is better in every metric). ``measure``
applies each candidate setting of each layer alone (a context manager the pass provides: swap
in a factorized module, zero some weights, quantize a layer), scores the network, and returns a
``Sensitivity``: per layer, the ``Option``s (setting, cost, fidelity) the budget allocator
chooses from, and the curves the report draws.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from slimgraph.errors import PassConfigError
from slimgraph.ir.graph import flatten_outputs
from slimgraph.numerics import compare_outputs
from slimgraph.schema import SensitivityCurves

METRICS = ("cosine", "top1", "rel_l2")


class FidelityProbe:
    """Scores a working graph against the reference outputs on the calibration batches."""

    METRICS = METRICS

    def __init__(self, graph, ctx, metric: str = "cosine"):
        if metric not in METRICS:
            raise PassConfigError(f"fidelity metric {metric!r}: expected one of {METRICS}")
        self.metric = metric
        self.batches = ctx.calibration_batches(graph)
        reference = ctx.reference if ctx.reference is not None else graph
        self.reference = self.outputs(reference.gm)

    def outputs(self, gm: nn.Module) -> list[np.ndarray]:
        """The flat outputs of ``gm`` on the batches, each concatenated over batches."""
        outs = []
        with torch.no_grad():
            for batch in self.batches:
                outs.append([o.detach().numpy() for o in flatten_outputs(gm(*batch))])
        return [np.concatenate(parts) for parts in zip(*outs, strict=True)]

    def score(self, gm: nn.Module) -> float:
        m = compare_outputs(self.reference, self.outputs(gm))
        if self.metric == "top1":
            value = m["top1_agreement"] if m["top1_agreement"] is not None else m["cosine"]
        elif self.metric == "rel_l2":
            value = -m["rel_l2"]
        else:
            value = m["cosine"]
        return float(value) if np.isfinite(value) else -math.inf

    @staticmethod
    @contextlib.contextmanager
    def swapped(gm: fx.GraphModule, target: str, module: nn.Module) -> Iterator[None]:
        """Temporarily replace submodule ``target`` of ``gm`` with ``module``."""
        parent_name, _, leaf = target.rpartition(".")
        parent = gm.get_submodule(parent_name) if parent_name else gm
        old = getattr(parent, leaf)
        setattr(parent, leaf, module)
        try:
            yield
        finally:
            setattr(parent, leaf, old)


@dataclass(frozen=True)
class Option:
    """One candidate for one layer: what to apply, what it costs, how faithful the network
    stays with only this layer changed (higher is better)."""

    setting: Any
    cost: float
    fidelity: float
    x: float = 0.0  # where the report draws it (a rank fraction, a sparsity, bits, ...)


@dataclass
class Sensitivity:
    """Per layer, its options; plus the axes the report labels the curves with."""

    options: dict[str, list[Option]] = field(default_factory=dict)
    x_label: str = ""
    y_label: str = ""
    baseline: float | None = None  # the unchanged network's score, drawn at ``baseline_x``
    baseline_x: float | None = None

    def curves(self) -> dict[str, list[list[float]]]:
        out = {}
        for layer, opts in self.options.items():
            points = [[float(o.x), float(o.fidelity)] for o in opts]
            if self.baseline is not None and self.baseline_x is not None:
                points.append([float(self.baseline_x), float(self.baseline)])
            out[layer] = points
        return out

    def report(self) -> SensitivityCurves:
        """What the pass record carries (``PassResult.sensitivity``) and the report draws."""
        return SensitivityCurves(self.curves(), self.x_label, self.y_label)


# A candidate: (setting, cost, x, apply) where apply() is a context manager that puts the
# setting in place in the working graph for the duration of one score; ``cost`` may be a
# callable evaluated while the setting is in place (when only the changed graph knows it).
Candidate = tuple[Any, float | Callable[[], float], float,
                  Callable[[], contextlib.AbstractContextManager]]


def measure(candidates: Mapping[str, Iterable[Candidate]], score: Callable[[], float], *,
            x_label: str, y_label: str, baseline_x: float | None = None) -> Sensitivity:
    """Score every candidate of every layer alone; layers without a candidate are left out."""
    from slimgraph.passes.toolkit.progress import Progress

    result = Sensitivity(x_label=x_label, y_label=y_label, baseline_x=baseline_x)
    if baseline_x is not None:
        result.baseline = score()
    progress = Progress("sensitivity: layer", len(candidates))
    for layer, cands in candidates.items():
        opts = []
        for setting, cost, x, apply in cands:
            with apply():
                opts.append(Option(setting, cost() if callable(cost) else cost, score(), x))
        if opts:
            result.options[layer] = opts
        progress.step(layer)
    progress.close()
    return result

