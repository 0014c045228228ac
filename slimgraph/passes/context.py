"""PassContext: the data of one pipeline run, beside the analysis cache.

What a data-driven pass reads besides its input graph: the user's calibration batches (and
labels), the reference model (the original, uncompressed graph: the teacher for distillation and
the baseline for sensitivity measurements; passes must not modify it), the seed, and the device
target when the pipeline runs for one. ``analyses`` is the typed analysis cache
(``ctx.analyses.get(Cost, graph)``); it is separate from the run data and shared by the passes
of one run. ``check_preserved`` (debugging) makes the pass manager recompute every analysis a
pass claims to preserve and fail when it changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from slimgraph.errors import CalibrationError
from slimgraph.ir.analysis import AnalysisManager


@dataclass
class PassContext:
    calibration: Sequence[tuple[torch.Tensor, ...]] | None = None
    labels: Sequence[torch.Tensor] | None = None
    reference: Any = None  # ir.Graph
    seed: int = 0
    target: Any = None  # backends.tvm.TargetSpec, when the pipeline compiles for a device
    check_preserved: bool = False
    analyses: AnalysisManager = field(default_factory=AnalysisManager)

    def __post_init__(self) -> None:
        self.calibration = list(self.calibration) if self.calibration else None
        self.labels = list(self.labels) if self.labels else None

    @property
    def calibration_source(self) -> str:
        return "user" if self.calibration else "random (seeded)"

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
            return rebatch(self.calibration, fixed) if fixed else list(self.calibration)
        if fixed:
            batch_size = fixed
        gen = torch.Generator().manual_seed(self.seed)
        return [tuple(torch.randn((batch_size, *x.shape[1:]), generator=gen).to(x.dtype)
                      if x.is_floating_point() else x.repeat((batch_size,) + (1,) * (x.dim() - 1))
                      for x in graph.example_inputs)
                for _ in range(n_batches)]


def rebatch(batches: Sequence[tuple[torch.Tensor, ...]], size: int) -> list[tuple[torch.Tensor, ...]]:
    """The same samples in batches of exactly ``size`` (a remainder that does not fill one is
    dropped): for graphs that only run at one batch size."""
    joined = [torch.cat([b[i] for b in batches]) for i in range(len(batches[0]))]
    n = (len(joined[0]) // size) * size
    if n == 0:
        raise CalibrationError(f"the model runs only at batch {size}; the calibration data has "
                               f"{len(joined[0])} sample(s)")
    return [tuple(x[i:i + size] for x in joined) for i in range(0, n, size)]
