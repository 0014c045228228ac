"""PassManager and its instruments.

The manager runs an ordered list of passes over a graph with one ``PassContext`` (run data
plus the analysis cache). Before each pass it prefetches the analyses the pass ``requires``;
after it, it carries over those the pass ``preserves`` (and, with ``ctx.check_preserved``,
recomputes them and fails when a claim was wrong). Instruments (TVM's ``PassInstrument``
shape: ``on_pipeline_start`` / ``should_run`` / ``before`` / ``after`` / ``on_error`` /
``on_pipeline_end``) verify the graph, time the pass, compare numerics with the original model,
and dump the IR on request (with the failing pass's input as a reproducer). Every pass yields
one record (a dict in the report schema). A failing pass raises ``PassError`` naming it and the
passes before it, chained to the original exception.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimgraph.errors import PassError, SlimgraphError, VerifyError
from slimgraph.ir.analysis import Cost
from slimgraph.numerics import compare_outputs
from slimgraph.passes.base import Pass, PassResult, Skip
from slimgraph.passes.context import PassContext
from slimgraph.schema import Fidelity, LayerChange, PassRecord, jsonable

_RECORD_FIELDS = {f.name for f in dataclasses.fields(PassRecord)}


class Instrument:
    """Hooks around the pipeline and each pass; override what you need."""

    def on_pipeline_start(self, graph, ctx: PassContext) -> None:
        pass

    def should_run(self, p: Pass, graph) -> bool:
        return True

    def before(self, p: Pass, graph, ctx: PassContext) -> None:
        pass

    def after(self, p: Pass, before, result: PassResult, record: PassRecord,
              ctx: PassContext) -> dict[str, Any] | None:
        """Check the pass's output; return record fields to set (e.g. ``{"wall_time_s": t}``)."""
        return None

    def on_error(self, p: Pass, graph, err: BaseException) -> None:
        pass

    def on_pipeline_end(self, graph, ctx: PassContext) -> None:
        pass


class VerifyInstrument(Instrument):
    """Runs ``Graph.verify()`` on every pass's output."""

    def after(self, p, before, result, record, ctx):
        result.graph.verify()


class TimingInstrument(Instrument):
    """Records each pass's wall time in its record (``wall_time_s``)."""

    def before(self, p, graph, ctx):
        self._t0 = time.perf_counter()

    def after(self, p, before, result, record, ctx):
        return {"wall_time_s": round(time.perf_counter() - self._t0, 6)}


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

    def measure(self, graph) -> Fidelity:
        ref = [np.concatenate(parts) for parts in zip(*self.reference, strict=True)]
        return Fidelity(**compare_outputs(ref, self._outputs(graph)))

    def after(self, p, before, result, record, ctx):
        got = self._outputs(result.graph)
        ref = [np.concatenate(parts) for parts in zip(*self.reference, strict=True)]
        numerics = Fidelity(**compare_outputs(ref, got))
        if p.exact and result.changed:
            # an exact pass must reproduce ITS INPUT (earlier approximate passes may already
            # have moved the outputs away from the original model)
            drift = compare_outputs(self._outputs(before), got)["rel_l2"]
            if not drift <= self.exact_tol:
                raise VerifyError(f"exact pass {p.name!r} changed the outputs: rel-L2 "
                                  f"{drift:.3g} > {self.exact_tol:g}")
        return {"numerics": numerics}


class MetricInstrument(Instrument):
    """Evaluates user metrics (e.g. test accuracy) on each pass's output graph.

    ``metrics`` maps a name to ``fn(graph) -> float``; values land in ``record.metrics``,
    so the report shows accuracy after compression and again after recovery.
    """

    def __init__(self, metrics: dict[str, Any]):
        self.metrics = dict(metrics)

    def after(self, p, before, result, record, ctx):
        return {"metrics": {name: float(fn(result.graph)) for name, fn in self.metrics.items()}}


class IRDumpInstrument(Instrument):
    """Writes the graph's code at the start of the pipeline and after each pass into
    ``directory``; when a pass fails, its input as a runnable reproducer: the package
    ``NN_before_<pass>/`` (``GraphModule.to_folder``: code and weights), its example inputs
    and the error."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.index = 0

    def _dump(self, tag: str, graph) -> None:
        (self.directory / f"{self.index:02d}_{tag}.py").write_text(graph.gm.code)
        (self.directory / f"{self.index:02d}_{tag}.txt").write_text(str(graph.gm.graph))

    def on_pipeline_start(self, graph, ctx):
        self._dump("input", graph)

    def before(self, p, graph, ctx):
        self.index += 1

    def after(self, p, before, result, record, ctx):
        self._dump(p.name, result.graph)

    def on_error(self, p, graph, err):
        folder = self.directory / f"{self.index:02d}_before_{p.name}"
        gm = copy.deepcopy(graph.gm)
        for node in gm.graph.nodes:
            node.type = None  # to_folder cannot write torch type annotations back
        gm.recompile()
        gm.to_folder(folder, module_name="Reproducer")
        torch.save(graph.example_inputs, folder / "example_inputs.pt")
        (folder / "PASS.txt").write_text(
            f"pass {p.spec()} failed with {type(err).__name__}: {err}\n"
            "reproduce: import this folder as a package; Reproducer().eval()(*torch.load("
            "'example_inputs.pt')), then run the pass on it\n")


def _stats(ctx: PassContext, before, after) -> dict[str, int | float]:
    cb, ca = ctx.analyses.get(Cost, before), ctx.analyses.get(Cost, after)
    return {"macs_before": cb.macs, "macs_after": ca.macs,
            "params_before": cb.params, "params_after": ca.params,
            "energy_pj_before": cb.energy_pj, "energy_pj_after": ca.energy_pj}


def layer_changes(ctx: PassContext, before, after) -> list[LayerChange]:
    """Per-node MACs/params for nodes a pass changed, removed or added (by node name)."""
    cb, ca = ctx.analyses.get(Cost, before).nodes, ctx.analyses.get(Cost, after).nodes
    rows = []
    for name in list(cb) + [n for n in ca if n not in cb]:
        b, a = cb.get(name), ca.get(name)
        mb, ma = (b.macs if b else 0), (a.macs if a else 0)
        pb, pa = (b.params if b else 0), (a.params if a else 0)
        if (mb, pb) != (ma, pa) and (mb or ma or pb or pa):
            rows.append(LayerChange(name, (a or b).op, mb, ma, pb, pa))
    return rows


class PassManager:
    """Runs passes in order with instruments; returns the final graph and one record per pass."""

    def __init__(self, passes: Sequence[Pass], instruments: Sequence[Instrument] = ()):
        self.passes = list(passes)
        self.instruments = list(instruments)

    def run(self, graph, ctx: PassContext | None = None) -> tuple[Any, list[PassRecord]]:
        ctx = ctx or PassContext(reference=graph)
        for inst in self.instruments:
            inst.on_pipeline_start(graph, ctx)
        records: list[PassRecord] = []
        done: list[str] = []
        for p in self.passes:
            if not all(inst.should_run(p, graph) for inst in self.instruments):
                records.append(self._record(p, changed=False, skipped_all="skipped by an instrument"))
                continue
            try:
                result, record = self._run_one(p, graph, ctx)
            except Exception as err:
                for inst in self.instruments:
                    inst.on_error(p, graph, err)
                after = f" (after: {', '.join(done)})" if done else " (first pass)"
                detail = str(err) if isinstance(err, SlimgraphError) else f"{type(err).__name__}: {err}"
                raise PassError(f"pass {p.name!r} failed{after}: {detail}") from err
            records.append(record)
            done.append(p.name)
            graph = result.graph
        for inst in self.instruments:
            inst.on_pipeline_end(graph, ctx)
        return graph, records

    def _run_one(self, p: Pass, graph, ctx: PassContext) -> tuple[PassResult, PassRecord]:
        """One pass with its instruments: prefetch, run, check, carry analyses, record."""
        for inst in self.instruments:
            inst.before(p, graph, ctx)
        ctx.analyses.prefetch(p.requires, graph)
        if ctx.check_preserved:  # so that every preservation claim has something to check
            ctx.analyses.prefetch(p.preserves, graph)
        result = p.run(graph, ctx)
        if not isinstance(result, PassResult):
            raise TypeError(f"{type(p).__name__}.run returned {type(result).__name__}, not PassResult")
        if result.graph is graph and result.changed:
            raise TypeError(f"pass {p.name!r} reported a change but returned its input graph")
        if result.changed:
            preserved = p.preserves if result.preserved is None else result.preserved
            ctx.analyses.transfer(graph, result.graph, preserved)
            if ctx.check_preserved:
                ctx.analyses.verify_preserved(result.graph, preserved, f"pass {p.name!r}")
        record = self._record(p, changed=result.changed)
        record.skipped = _declined(p, graph, result)
        record.stats = {**_stats(ctx, graph, result.graph), **result.stats}
        record.layers = layer_changes(ctx, graph, result.graph) if result.changed else []
        record.extra, record.sensitivity = dict(result.extra), result.sensitivity
        for inst in self.instruments:
            for key, value in (inst.after(p, graph, result, record, ctx) or {}).items():
                if key not in _RECORD_FIELDS:
                    raise TypeError(f"{type(inst).__name__} returned {key!r}, not a PassRecord field")
                setattr(record, key, value)
        return result, record

    @staticmethod
    def _record(p: Pass, changed: bool, skipped_all: str | None = None) -> PassRecord:
        return PassRecord(p.name, p.spec(), jsonable(p.options(), f"{p.name} options"), changed,
                          p.exact, skipped=[Skip("*", skipped_all)] if skipped_all else [])


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
