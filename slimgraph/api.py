"""The public API: ``optimize()``, ``Result`` and ``load()``."""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimgraph import DEFAULT_TUNE_TRIALS
from slimgraph.errors import BackendError, SlimgraphError
from slimgraph.ir.graph import Graph
from slimgraph.ir.loading import load_calibration, load_model
from slimgraph.passes import (
    Instrument,
    IRDumpInstrument,
    MetricInstrument,
    NumericsInstrument,
    PassManager,
    TimingInstrument,
    VerifyInstrument,
    format_pipeline,
    parse_pipeline,
)
from slimgraph.passes.context import PassContext
from slimgraph.report import accuracy_section, assemble_report
from slimgraph.schema import BuildInfo, Fidelity

log = logging.getLogger("slimgraph")

NUMERICS_SAMPLES = 64


# What Result.save writes (a later save removes the ones it does not write again).
SAVED_FILES = ("model.so", "kernels.cubin", "manifest.json", "report.json", "report.html",
               "model.onnx", "model.onnx.txt")


@dataclass
class Result:
    """What ``optimize`` returns: the optimized graph, the compiled model and the report."""

    graph: Graph
    compiled: Any  # backends.tvm.CompiledModel, or None when compile=False
    report: Any  # slimgraph.report.Report

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the compiled artifact, ``report.json``, ``report.html`` and ``model.onnx``.

        The directory is replaced as a whole (``slimgraph.outputs.replace_outputs``): everything
        is written into a temporary sibling, then swapped in at once, so a failed or killed save
        leaves the old outputs or the new ones, never a mix; outputs of an earlier save that
        this one does not produce are gone, and anything else in ``directory`` is kept.
        """
        from slimgraph.outputs import replace_outputs

        return replace_outputs(directory, self._write_files, SAVED_FILES, last="manifest.json")

    def _write_files(self, directory: Path) -> None:
        if self.compiled is not None:
            self.compiled.write_files(directory)
        self.report.save_json(directory / "report.json")
        self.report.save_html(directory / "report.html")
        try:
            self.graph.to_onnx(directory / "model.onnx")
        except SlimgraphError as err:  # custom ops may have no ONNX form; the report says so
            (directory / "model.onnx.txt").write_text(f"ONNX export skipped: {err}\n")


def load(directory: str | os.PathLike):
    """The compiled model saved by ``Result.save`` (callable on numpy arrays or tensors)."""
    from slimgraph.backends.tvm import load_compiled

    return load_compiled(directory)


def optimize(
    model: Any,
    target: str = "x86",
    *,
    pipeline: str | None = None,
    example_inputs: Sequence[Any] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    calibration: Any = None,
    tune_trials: int = DEFAULT_TUNE_TRIALS,
    workdir: str | os.PathLike | None = None,
    compile: bool = True,
    benchmark: bool = True,
    dump_ir: str | os.PathLike | None = None,
    progress: bool = True,
    metrics: Mapping[str, Any] | None = None,
    rpc: str | None = None,
    cc: str | None = None,
    tune_time_s: float | None = None,
    database: str | os.PathLike | None = None,
    emulate: bool = False,
    conv_layout: str | None = None,
) -> Result:
    """Import ``model``, run the pass pipeline, and compile the result for ``target``.

    ``model``: an nn.Module (with ``example_inputs``), an ``ir.Graph``, or a path to an
    ``.onnx``/``.pt2`` file or ``file.py:factory``. ``pipeline=None`` uses the target's default
    pipeline. ``calibration``: samples (N, ...) as an array/tensor, an iterable of batches, or an
    ``.npy``/``.npz`` path; used by data-driven passes and for the numeric check of each pass.
    ``tune_trials=0`` builds without tuning. ``benchmark`` measures latency against PyTorch and
    ONNX Runtime when the target is this machine. ``metrics`` maps names to
    ``fn(graph) -> float`` (e.g. test accuracy), evaluated on the input and after every pass.

    Device targets: ``rpc="HOST:PORT"`` tunes by measuring on the device behind a TVM RPC
    server; without it a target that is not this machine (arm64 from x86, CUDA without a GPU)
    gets the schedules in ``database`` (or in the workdir's database for that target, if any)
    and TVM's default schedules for the rest, and the report says which. ``cc`` links the
    library (e.g. an Android NDK clang++). ``tune_time_s`` bounds the tuning time.
    ``emulate=True`` checks an arm64 artifact's numerics here by running it with the C++
    runner under qemu-aarch64 (built on first use; see tools/build_runner.sh).
    ``conv_layout`` ("NHWC"/"NCHW"): the layout convolutions are compiled in (default: the
    target's; NHWC on CPUs).
    """
    if pipeline is not None:
        parse_pipeline(pipeline)  # fail fast on a bad pipeline, before any heavy import
    from slimgraph.backends.tvm import get_target

    spec = get_target(target)
    graph = _import(model, example_inputs, input_shapes)
    passes = parse_pipeline(spec.default_pipeline if pipeline is None else pipeline)
    calib, labels = load_calibration(calibration, graph)
    ctx = PassContext(calib, labels=labels, reference=graph, target=spec)
    optimized, records, baseline = _compress(graph, passes, ctx, dump_ir, metrics)
    compiled, backend = None, None
    if compile:
        options = BuildOptions(tune_trials, Path(workdir) if workdir else None, tune_time_s,
                               database, rpc, cc, conv_layout, emulate, benchmark, progress)
        compiled, backend = _compile(graph, optimized, spec, options, format_pipeline(passes))
    report = assemble_report(graph, optimized, records, ctx, spec.name, format_pipeline(passes),
                             backend, accuracy=accuracy_section(baseline, records))
    return Result(optimized, compiled, report)


def _import(model, example_inputs, input_shapes) -> Graph:
    log.info("importing %s", model if isinstance(model, str | os.PathLike) else type(model).__name__)
    graph = load_model(model, example_inputs, input_shapes)
    log.info("imported %s (%s): %s", graph.name, graph.source,
             ", ".join(f"{s.name} {list(s.shape)}" for s in graph.input_specs()))
    for note in graph.notes:
        log.info("  %s", note)
    return graph


class PhaseInstrument(Instrument):
    """One line per pass on the ``slimgraph`` logger (INFO): what runs, then what it did."""

    def __init__(self, total: int):
        self.total, self.index = total, 0

    def before(self, p, graph, ctx):
        self.index += 1
        log.info("pass %d/%d: %s", self.index, self.total, p.spec())
        self._t0 = time.perf_counter()

    def after(self, p, before, result, record, ctx):
        st = record.stats
        what = (f"MACs {st['macs_before']:,} -> {st['macs_after']:,}" if result.changed
                else f"changed nothing ({len(record.skipped)} declined)")
        log.info("  %s: %s, %.1f s", p.name, what, time.perf_counter() - self._t0)


@dataclass(frozen=True)
class BuildOptions:
    """How ``optimize`` compiles: tuning budget and database, device access, layout, checks."""

    tune_trials: int = DEFAULT_TUNE_TRIALS
    workdir: Path | None = None
    tune_time_s: float | None = None
    database: str | os.PathLike | None = None
    rpc: str | None = None
    cc: str | None = None
    conv_layout: str | None = None
    emulate: bool = False
    benchmark: bool = True
    progress: bool = True


def _compress(graph: Graph, passes, ctx: PassContext, dump_ir, metrics):
    """Run the pipeline with the standard instruments: (graph, records, baseline metrics)."""
    instruments = [PhaseInstrument(len(passes)), TimingInstrument(), VerifyInstrument(),
                   NumericsInstrument(graph, _numerics_inputs(graph, ctx.calibration))]
    if dump_ir:
        instruments.append(IRDumpInstrument(dump_ir))
    baseline = None
    if metrics:
        instruments.append(MetricInstrument(metrics))
        baseline = {name: float(fn(graph)) for name, fn in metrics.items()}
    optimized, records = PassManager(passes, instruments).run(graph, ctx)
    return optimized, records, baseline


def _compile(original: Graph, optimized: Graph, spec, opts: BuildOptions, pipeline: str):
    """Build ``optimized`` for ``spec`` and check/measure it: (compiled model, report section)."""
    from slimgraph.backends.tvm import build

    trials, database, note = _tuning_plan(spec, opts.tune_trials, opts.rpc, opts.workdir, opts.database)
    log.info("compiling for %s (%s)", spec.name, f"{trials} tuning trials" if trials else
             "no tuning" + (f": {note}" if note else ""))
    compiled = build(optimized.to_torch(), optimized.example_inputs, spec, tune_trials=trials,
                     workdir=opts.workdir, progress=opts.progress, rpc=opts.rpc, cc=opts.cc,
                     time_budget_s=opts.tune_time_s, database=database,
                     conv_layout=opts.conv_layout)
    compiled.info.pipeline = pipeline
    log.info("built in %.1f s%s", compiled.info.build_time_s + compiled.info.tune_time_s,
             f" ({compiled.info.trials_measured} trials measured)" if compiled.info.trials_measured else "")
    backend = _backend_section(compiled, original, optimized, spec, opts.benchmark, opts.emulate)
    if note:
        backend.note = f"{note}. {backend.note}".strip()
    return compiled, backend


def _tuning_plan(spec, trials: int, rpc, workdir, database):
    """(trials, database, note): what tuning a build can do for ``spec`` here.

    MetaSchedule measures every candidate, so a target that is not this machine is tuned only
    through an RPC device; without one it builds from an existing database (given, or the
    workdir's for this target) or untuned, and the note says so.
    """
    from slimgraph.backends.tvm import tuning_dir

    if trials == 0 or spec.is_host or rpc is not None:
        return trials, database, ""
    db_dir = tuning_dir(spec, workdir, database)
    if database is not None or (db_dir / "database_tuning_record.json").is_file():
        # build() applies it (and names a given database that does not exist)
        return 0, db_dir, (f"not tuned: {spec.name} is not this machine and no --rpc device was "
                           f"given; schedules from the database {db_dir}")
    return 0, None, (f"not tuned: {spec.name} is not this machine and no --rpc device was "
                     "given; TVM's default schedules (correct, slower)")


def _numerics_inputs(graph: Graph, calib) -> list[tuple[torch.Tensor, ...]]:
    if calib:
        out, n = [], 0
        for batch in calib:
            out.append(batch)
            n += len(batch[0])
            if n >= NUMERICS_SAMPLES:
                break
        return out
    gen = torch.Generator().manual_seed(1234)
    return [tuple(torch.randn((16, *x.shape[1:]), generator=gen).to(x.dtype) if x.is_floating_point()
                  else x for x in graph.example_inputs)]


def _emulated_outputs(compiled, inputs) -> tuple[list, str]:
    """Run an arm64 artifact with the C++ runner under qemu-aarch64: (outputs, how)."""
    from slimgraph.backends.tvm import device

    with tempfile.TemporaryDirectory(prefix="slimgraph-emulate-") as tmp:
        art = compiled.save(Path(tmp) / "artifact")
        outputs, lat = device.run_with_runner(art, list(inputs), repeat=1, warmup=0)
    return outputs, (f"C++ runner under qemu-aarch64 on this machine ({lat['median_ms']:.0f} ms "
                     "emulated: not a device time)")


def _backend_section(compiled, original: Graph, optimized: Graph, spec, benchmark: bool,
                     emulate: bool = False) -> BuildInfo:
    """The build's ``BuildInfo`` with how its numerics were checked and, on this machine, its
    latency beside PyTorch's and ONNX Runtime's."""
    from slimgraph.backends.reference import OrtModel, torch_latency
    from slimgraph.numerics import compare_outputs

    section = dataclasses.replace(compiled.info, extra=dict(compiled.info.extra))
    inputs = optimized.example_inputs
    try:
        if emulate and spec.kind == "arm64" and not spec.is_host:
            outputs, section.numerics_how = _emulated_outputs(compiled, inputs)
        else:
            outputs = compiled(*inputs)
            section.numerics_how = "TVM runtime in this process"
        section.numerics_vs_graph = Fidelity(**compare_outputs(optimized.run(*inputs), outputs))
    except SlimgraphError as err:
        hint = "" if spec.kind != "arm64" or emulate else " (emulate=True / --emulate checks it under qemu)"
        section.note = f"compiled model could not run here{hint}: {err}"
        return section
    if not (benchmark and spec.is_host):
        section.note = "latency not measured (target is not this machine)" if not spec.is_host else ""
        return section
    log.info("timing slimgraph, PyTorch and ONNX Runtime on this machine")
    stats = {"slimgraph": compiled.benchmark(),
             "pytorch": torch_latency(original.to_torch(), original.example_inputs)}
    if optimized is not original:  # the compressed model in the references too: what
        stats["pytorch_compressed"] = torch_latency(optimized.to_torch(), optimized.example_inputs)
    for key, graph in (("onnxruntime", original), ("onnxruntime_compressed", optimized)):
        if key == "onnxruntime_compressed" and optimized is original:  # compression bought vs
            continue                                                   # what the compiler did
        try:
            with tempfile.TemporaryDirectory() as tmp:
                stats[key] = OrtModel.from_graph(graph, tmp).latency(graph.example_inputs)
        except (SlimgraphError, BackendError) as err:
            section.note = f"ONNX Runtime reference ({key}) unavailable: {err}"
    latency = {k: v["median_ms"] for k, v in stats.items()}
    section.extra["latency_spread"] = {k: round(v["p90_ms"] / v["p10_ms"], 3) for k, v in stats.items()}
    section.extra["latency_runs"] = {k: v["repeat"] for k, v in stats.items()}
    section.latency_ms = latency
    section.latency_method = ("median of 20 runs after 3 warm-up runs and a 0.5 s pause, each engine "
                              "in turn in one process; *_compressed: the compressed model in "
                              "PyTorch / ONNX Runtime, the others run the original")
    return section
