"""Analyses as typed keys, and the per-graph cache that computes them on demand.

An analysis is a subclass of ``Analysis[T]`` with a ``compute(graph, am) -> T`` static method;
the class itself is the key: ``am.get(Cost, graph)`` returns a ``GraphCost``. Results are
cached per graph object (weakly: a graph that is gone takes its analyses with it). A pass lists
what it reads in ``requires`` (the pass manager prefetches those) and what stays valid on its
output in ``preserves`` (carried over instead of recomputed); ``verify_preserved`` recomputes a
carried analysis and compares, for debugging a pass that claims too much.

Run data (calibration batches, labels, the reference model, the seed, the device target) is not
here: it is the ``PassContext`` of one pipeline run (``slimgraph.passes.context``).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any, ClassVar, Generic, TypeVar

from slimgraph.errors import VerifyError

T = TypeVar("T")


class Analysis(Generic[T]):
    """A typed analysis key. Subclasses set ``name`` and implement ``compute``."""

    name: ClassVar[str] = ""

    @staticmethod
    def compute(graph: Any, am: AnalysisManager) -> T:  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def same(a: T, b: T) -> bool:
        """Whether two results agree (``verify_preserved``); equality unless overridden."""
        return a == b


class AnalysisManager:
    """Caches analyses per graph object; computes each on first use."""

    def __init__(self) -> None:
        self._cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, key: type[Analysis[T]], graph: Any) -> T:
        if not (isinstance(key, type) and issubclass(key, Analysis)):
            raise TypeError(f"analysis keys are Analysis subclasses (Shapes, Cost, ...), got {key!r}")
        per_graph = self._cache.setdefault(graph, {})
        if key not in per_graph:
            per_graph[key] = key.compute(graph, self)
        return per_graph[key]

    def prefetch(self, keys: Iterable[type[Analysis]], graph: Any) -> None:
        for key in keys:
            self.get(key, graph)

    def cached(self, graph: Any) -> set[type[Analysis]]:
        return set(self._cache.get(graph, {}))

    def invalidate(self, graph: Any, keep: Iterable[type[Analysis]] = ()) -> None:
        keep = set(keep)
        per_graph = self._cache.get(graph, {})
        for key in list(per_graph):
            if key not in keep:
                del per_graph[key]

    def transfer(self, old: Any, new: Any, preserved: Iterable[type[Analysis]]) -> None:
        """Carry the analyses a pass says it preserves from its input graph to its output."""
        if old is new:
            return
        old_cache = self._cache.get(old, {})
        new_cache = self._cache.setdefault(new, {})
        for key in preserved:
            if key in old_cache:
                new_cache[key] = old_cache[key]

    def verify_preserved(self, graph: Any, preserved: Iterable[type[Analysis]], who: str) -> None:
        """Recompute each carried analysis of ``graph`` and fail if it differs (debugging)."""
        per_graph = self._cache.get(graph, {})
        for key in preserved:
            if key in per_graph and not key.same(per_graph[key], key.compute(graph, self)):
                raise VerifyError(f"{who} claims to preserve the {key.name} analysis, but it "
                                  "changed")
