"""The analysis registry and its per-graph cache."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from slimgraph.errors import CalibrationError, SlimgraphError


def rebatch(batches: Sequence[tuple[torch.Tensor, ...]], size: int) -> list[tuple[torch.Tensor, ...]]:
    """The same samples in batches of exactly ``size`` (a remainder that does not fill one is
    dropped): for graphs that only run at one batch size."""
    joined = [torch.cat([b[i] for b in batches]) for i in range(len(batches[0]))]
    n = (len(joined[0]) // size) * size
    if n == 0:
        raise CalibrationError(f"the model runs only at batch {size}; the calibration data has "
                               f"{len(joined[0])} sample(s)")
    return [tuple(x[i:i + size] for x in joined) for i in range(0, n, size)]


AnalysisFn = Callable[["Graph", "AnalysisManager"], Any]  # noqa: F821
ANALYSES: dict[str, AnalysisFn] = {}


def register_analysis(name: str) -> Callable[[AnalysisFn], AnalysisFn]:
    def deco(fn: AnalysisFn) -> AnalysisFn:
        ANALYSES[name] = fn
        return fn
    return deco


class AnalysisManager:
    """Caches analyses per graph object, and holds the data that data-driven passes use.

    ``calibration`` is a list of input tuples (batches). Passes that need data call
    ``calibration_batches(graph)``; without user data they get seeded random batches of the
    graph's example shapes, and the report says so (``calibration_source``).
    """

    def __init__(self, calibration: Sequence[tuple[torch.Tensor, ...]] | None = None, *,
                 labels: Sequence[torch.Tensor] | None = None, reference: Any = None,
                 seed: int = 0):
        self._cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.calibration = list(calibration) if calibration else None
        self.labels = list(labels) if labels else None
        # The original, uncompressed graph: the teacher for distillation and the baseline for
        # sensitivity measurements. ``optimize`` sets it; passes must not modify it.
        self.reference = reference
        self.seed = seed

    @property
    def calibration_source(self) -> str:
        return "user" if self.calibration else "random (seeded)"

    def get(self, name: str, graph: Any) -> Any:
        if name not in ANALYSES:
            raise SlimgraphError(f"unknown analysis {name!r}; known: {', '.join(sorted(ANALYSES))}")
        per_graph = self._cache.setdefault(graph, {})
        if name not in per_graph:
            per_graph[name] = ANALYSES[name](graph, self)
        return per_graph[name]

    def cached(self, graph: Any) -> set[str]:
        return set(self._cache.get(graph, {}))

    def invalidate(self, graph: Any, keep: Iterable[str] = ()) -> None:
        keep = set(keep)
        per_graph = self._cache.get(graph, {})
        for key in list(per_graph):
            if key not in keep:
                del per_graph[key]

    def transfer(self, old: Any, new: Any, preserved: Iterable[str]) -> None:
        """Carry the analyses a pass says it preserves from its input graph to its output."""
        if old is new:
            return
        old_cache = self._cache.get(old, {})
        new_cache = self._cache.setdefault(new, {})
        for key in preserved:
            if key in old_cache:
                new_cache[key] = old_cache[key]

    def calibration_batches(self, graph: Any, n_batches: int = 4, batch_size: int = 8
                            ) -> list[tuple[torch.Tensor, ...]]:
        """The user's calibration batches, or seeded random ones of the example shapes; sliced
        to the graph's batch size when it only runs at one (``Graph.fixed_batch``)."""
        fixed = getattr(graph, "fixed_batch", None)
        if self.calibration:
            for batch in self.calibration:
                if len(batch) != len(graph.example_inputs):
                    raise CalibrationError(
                        f"calibration batches have {len(batch)} input(s), the model takes "
                        f"{len(graph.example_inputs)}")
            return rebatch(self.calibration, fixed) if fixed else self.calibration
        if fixed:
            batch_size = fixed
        gen = torch.Generator().manual_seed(self.seed)
        batches = []
        for _ in range(n_batches):
            batches.append(tuple(
                torch.randn((batch_size, *x.shape[1:]), generator=gen).to(x.dtype)
                if x.is_floating_point() else x.repeat((batch_size,) + (1,) * (x.dim() - 1))
                for x in graph.example_inputs))
        return batches
