"""PassManager and its instruments.

The manager runs an ordered list of passes. Around each pass, instruments (TVM's
``PassInstrument`` shape: ``should_run`` / ``before`` / ``after`` / ``on_error``) verify the
graph, time the pass, compare numerics with the original model, and dump the IR on request.
Every pass yields one record (a dict in the report schema). A failing pass raises
``PassError`` naming it and the passes before it, chained to the original exception.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimgraph.errors import PassError, SlimgraphError, VerifyError
from slimgraph.ir.analysis import AnalysisManager
from slimgraph.numerics import compare_outputs
from slimgraph.passes.base import Pass, PassResult, Skip


class Instrument:
    """Hooks around each pass; override what you need."""

    def should_run(self, p: Pass, graph) -> bool:
        return True

    def before(self, p: Pass, graph, am: AnalysisManager) -> None:
        pass

    def after(self, p: Pass, before, result: PassResult, record: dict, am: AnalysisManager) -> None:
        pass

    def on_error(self, p: Pass, graph, err: BaseException) -> None:
        pass


class VerifyInstrument(Instrument):
    """Runs ``Graph.verify()`` on every pass's output."""

    def after(self, p, before, result, record, am):
        result.graph.verify()


class TimingInstrument(Instrument):
    """Records each pass's wall time in its record (``wall_time_s``)."""

    def before(self, p, graph, am):
        self._t0 = time.perf_counter()

    def after(self, p, before, result, record, am):
        record["wall_time_s"] = round(time.perf_counter() - self._t0, 6)


class NumericsInstrument(Instrument):
    """Compares each pass's output graph with the ORIGINAL model on fixed inputs.

    Inputs are the user's calibration batches when given (up to ``max_samples`` samples), else
    seeded random inputs with the example shapes. Exact passes whose outputs drift more than
    ``exact_tol`` (relative L2) fail loudly: an exact pass that changes numerics is a bug.
    """

    def __init__(self, reference_graph, inputs: Sequence[tuple[torch.Tensor, ...]],
                 exact_tol: float = 1e-5):
        self.inputs = list(inputs)
        self.reference = [reference_graph.run(*batch) for batch in self.inputs]
        self.exact_tol = exact_tol

    def _outputs(self, graph) -> list[np.ndarray]:
        outs = [graph.run(*batch) for batch in self.inputs]
        return [np.concatenate(parts) for parts in zip(*outs, strict=True)]

    def measure(self, graph) -> dict[str, Any]:
        ref = [np.concatenate(parts) for parts in zip(*self.reference, strict=True)]
        return compare_outputs(ref, self._outputs(graph))

    def after(self, p, before, result, record, am):
        got = self._outputs(result.graph)
        ref = [np.concatenate(parts) for parts in zip(*self.reference, strict=True)]
        record["numerics"] = compare_outputs(ref, got)
        if p.exact and result.changed:
            # an exact pass must reproduce ITS INPUT (earlier approximate passes may already
            # have moved the outputs away from the original model)
            drift = compare_outputs(self._outputs(before), got)["rel_l2"]
            if not drift <= self.exact_tol:
                raise VerifyError(f"exact pass {p.name!r} changed the outputs: rel-L2 "
                                  f"{drift:.3g} > {self.exact_tol:g}")


class MetricInstrument(Instrument):
    """Evaluates user metrics (e.g. test accuracy) on each pass's output graph.

    ``metrics`` maps a name to ``fn(graph) -> float``; values land in ``record["metrics"]``,
    so the report shows accuracy after compression and again after recovery.
    """

    def __init__(self, metrics: dict[str, Any]):
        self.metrics = dict(metrics)

    def after(self, p, before, result, record, am):
        record["metrics"] = {name: float(fn(result.graph)) for name, fn in self.metrics.items()}


class IRDumpInstrument(Instrument):
    """Writes the graph's code before the pipeline and after each pass into ``directory``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.index = 0

    def _dump(self, tag: str, graph) -> None:
        (self.directory / f"{self.index:02d}_{tag}.py").write_text(graph.gm.code)
        (self.directory / f"{self.index:02d}_{tag}.txt").write_text(str(graph.gm.graph))

    def before(self, p, graph, am):
        if self.index == 0:
            self._dump("input", graph)
        self.index += 1

    def after(self, p, before, result, record, am):
        self._dump(p.name, result.graph)


def _stats(am: AnalysisManager, before, after) -> dict[str, int | float]:
    cb, ca = am.get("cost", before), am.get("cost", after)
    return {"macs_before": cb.macs, "macs_after": ca.macs,
            "params_before": cb.params, "params_after": ca.params,
            "energy_pj_before": cb.energy_pj, "energy_pj_after": ca.energy_pj}


def layer_changes(am: AnalysisManager, before, after) -> list[dict[str, Any]]:
    """Per-node MACs/params for nodes a pass changed, removed or added (by node name)."""
    cb, ca = am.get("cost", before).nodes, am.get("cost", after).nodes
    rows = []
    for name in list(cb) + [n for n in ca if n not in cb]:
        b, a = cb.get(name), ca.get(name)
        mb, ma = (b.macs if b else 0), (a.macs if a else 0)
        pb, pa = (b.params if b else 0), (a.params if a else 0)
        if (mb, pb) != (ma, pa) and (mb or ma or pb or pa):
            rows.append({"name": name, "op": (a or b).op, "macs_before": mb, "macs_after": ma,
                         "params_before": pb, "params_after": pa})
    return rows


class PassManager:
    """Runs passes in order with instruments; returns the final graph and one record per pass."""

    def __init__(self, passes: Sequence[Pass], instruments: Sequence[Instrument] = ()):
        self.passes = list(passes)
        self.instruments = list(instruments)

    def run(self, graph, am: AnalysisManager | None = None) -> tuple[Any, list[dict[str, Any]]]:
        am = am or AnalysisManager()
        records: list[dict[str, Any]] = []
        done: list[str] = []
        for p in self.passes:
            if not all(inst.should_run(p, graph) for inst in self.instruments):
                records.append(self._record(p, changed=False, skipped_all="skipped by an instrument"))
                continue
            try:
                for inst in self.instruments:
                    inst.before(p, graph, am)
                result = p.run(graph, am)
                if not isinstance(result, PassResult):
                    raise TypeError(f"{type(p).__name__}.run returned {type(result).__name__}, not PassResult")
                if result.graph is graph and result.changed:
                    raise TypeError(f"pass {p.name!r} reported a change but returned its input graph")
                if result.changed:
                    preserved = p.preserves if result.preserved is None else result.preserved
                    am.transfer(graph, result.graph, preserved)
                record = self._record(p, changed=result.changed)
                record["skipped"] = [s.to_dict() for s in _declined(p, graph, result)]
                record["stats"] = {**_stats(am, graph, result.graph), **result.stats}
                record["layers"] = layer_changes(am, graph, result.graph) if result.changed else []
                record.update(result.extra)
                for inst in self.instruments:
                    inst.after(p, graph, result, record, am)
            except Exception as err:
                for inst in self.instruments:
                    inst.on_error(p, graph, err)
                after = f" (after: {', '.join(done)})" if done else " (first pass)"
                detail = str(err) if isinstance(err, SlimgraphError) else f"{type(err).__name__}: {err}"
                raise PassError(f"pass {p.name!r} failed{after}: {detail}") from err
            records.append(record)
            done.append(p.name)
            graph = result.graph
        return graph, records

    @staticmethod
    def _record(p: Pass, changed: bool, skipped_all: str | None = None) -> dict[str, Any]:
        return {"name": p.name, "spec": p.spec(), "options": _jsonable(p.options()),
                "changed": changed, "exact": p.exact, "stats": {}, "skipped": (
                    [{"node": "*", "reason": skipped_all}] if skipped_all else []),
                "wall_time_s": 0.0, "numerics": None, "layers": []}


def _declined(p: Pass, graph, result: PassResult) -> list[Skip]:
    """What the pass declined, plus what it could not see: ATen calls the export frontend kept
    without a canonical form, and, when it changed and declined nothing, why (never silence)."""
    skipped = list(result.skipped)
    untranslated = graph.untranslated() if hasattr(graph, "untranslated") else []
    skipped += [Skip(node, f"{op} came from torch.export without a canonical form; no pass "
                           "rewrites it") for node, op in untranslated]
    if not result.changed and not skipped:
        skipped.append(Skip("*", p.nothing_found))
    return skipped


def _jsonable(options: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in options.items():
        out[k] = list(v) if isinstance(v, tuple) else v if isinstance(v, str | int | float | bool | type(None)) else str(v)
    return out
