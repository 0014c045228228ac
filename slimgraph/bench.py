"""``slimgraph bench``: PyTorch, ONNX Runtime and slimgraph latency on one model, in one run.

Timings on a shared machine are noisy, so every number comes from the same process, back to
back, with the same timing loop (median of ``repeat`` runs after warm-up), and the table
states ratios rather than absolute claims.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimgraph.backends.reference import OrtModel, torch_latency
from slimgraph.ir.loading import load_model
from slimgraph.numerics import compare_outputs
from slimgraph.schema import BuildInfo, Fidelity


@dataclass
class BenchResult:
    model: str
    target: str
    input_shapes: dict[str, list[int]]
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    build: BuildInfo = field(default_factory=BuildInfo)
    numerics: Fidelity | None = None
    threads: int = 1
    kernels: list[dict] = field(default_factory=list)  # the slowest kernels (``profile``)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "target": self.target, "input_shapes": self.input_shapes,
                "latency_ms": self.latency_ms, "build": self.build.to_dict(),
                "numerics": self.numerics.to_dict() if self.numerics else None,
                "threads": self.threads, "ratios": self.ratios(), "kernels": self.kernels}

    def ratios(self) -> dict[str, float]:
        lat = self.latency_ms
        ours = lat.get("slimgraph")
        out = {}
        for ref in ("pytorch", "onnxruntime", "tvm_untuned"):
            if ours and lat.get(ref):
                out[f"{ref}/slimgraph"] = lat[ref] / ours
        return out

    def table(self) -> str:
        lines = [f"{self.model} on {self.target} ({self.threads} threads), inputs "
                 + ", ".join(f"{k}={v}" for k, v in self.input_shapes.items()),
                 f"{'runtime':<22}{'median ms':>12}{'vs slimgraph':>14}"]
        ours = self.latency_ms.get("slimgraph")
        for name, ms in self.latency_ms.items():
            ratio = f"{ms / ours:>13.2f}x" if ms and ours else f"{'-':>14}"
            lines.append(f"{name:<22}{ms:>12.2f}{ratio}" if ms else f"{name:<22}{'n/a':>12}{'-':>14}")
        b = self.build
        lines.append(f"tuning: {b.trials_measured} trials measured of {b.trials} "
                     f"requested, {b.tune_time_s:.0f} s; build {b.build_time_s:.0f} s")
        if self.numerics:
            lines.append(f"slimgraph vs PyTorch: max abs {self.numerics.max_abs:.2e}, "
                         f"rel-L2 {self.numerics.rel_l2:.2e}")
        if self.kernels:
            lines.append(f"slimgraph's {len(self.kernels)} slowest kernels (one instrumented "
                         "run; share of its time):")
            lines.append(f"{'share':>7}{'ms/run':>9}{'calls':>7}  kernel")
            lines += [f"{k['share']:>7.1%}{k['ms']:>9.3f}{k['calls']:>7}  {k['kernel']}"
                      for k in self.kernels]
        return "\n".join(lines)


def bench(model: Any, target: str = "x86", *, input_shapes: Mapping[str, Sequence[int]] | None = None,
          example_inputs=None, pipeline: str | None = None, tune_trials: int = 256,
          workdir: str | os.PathLike | None = None, compare_untuned: bool = False,
          repeat: int = 20, tune_time_s: float | None = None, kernels: int = 0) -> BenchResult:
    """Compile ``model`` for ``target`` (a CPU this machine runs) and time PyTorch, ONNX
    Runtime and the compiled model back to back. ``kernels`` > 0 also lists the compiled
    model's slowest kernels (``CompiledModel.profile``)."""
    import slimgraph
    from slimgraph.backends.tvm import build, get_target

    spec = get_target(target)
    if not spec.is_host:
        from slimgraph.errors import TargetError

        raise TargetError(f"bench measures on this machine, which cannot run {spec.name} code "
                          f"({spec.description}); build with `slimgraph optimize --target "
                          f"{spec.name}` and time it on the device")
    graph = load_model(model, example_inputs, input_shapes)
    inputs = graph.example_inputs
    result = BenchResult(str(model) if isinstance(model, str | os.PathLike) else graph.name, spec.name,
                         {s.name: list(s.shape) for s in graph.input_specs()},
                         threads=len(os.sched_getaffinity(0)))
    opt = slimgraph.optimize(graph, spec.name, pipeline=pipeline, tune_trials=tune_trials,
                             workdir=workdir, benchmark=False, tune_time_s=tune_time_s)
    result.build = dataclasses.replace(opt.compiled.info, extra=dict(opt.compiled.info.extra))
    reference = graph.run(*inputs)
    result.numerics = Fidelity(**compare_outputs(reference, opt.compiled(*inputs)))
    # Time everything back to back in this process.
    result.latency_ms["pytorch"] = torch_latency(graph.to_torch(), inputs, repeat=repeat)["median_ms"]
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(model) if isinstance(model, str | os.PathLike) and str(model).endswith(".onnx") \
            else graph.to_onnx(Path(tmp) / "model.onnx")
        result.latency_ms["onnxruntime"] = OrtModel(onnx_path).latency(inputs, repeat=repeat)["median_ms"]
    result.latency_ms["slimgraph"] = opt.compiled.benchmark(repeat=repeat)["median_ms"]
    if kernels > 0:
        profile = opt.compiled.profile(repeat=max(3, repeat // 2), inputs=inputs)
        result.kernels = [k.to_dict() for k in profile[:kernels]]
    if compare_untuned:
        t0 = time.perf_counter()
        untuned = build(opt.graph.to_torch(), inputs, spec, tune_trials=0, progress=False)
        result.build.extra["untuned_build_time_s"] = time.perf_counter() - t0
        result.latency_ms["tvm_untuned"] = untuned.benchmark(repeat=max(3, repeat // 4), warmup=1)["median_ms"]
    return result
