"""Passes: the base classes, the registry, the pass manager, and the built-in passes."""

from slimgraph.passes.base import (
    PASS_REGISTRY,
    Pass,
    PassResult,
    Skip,
    available_passes,
    create_pass,
    format_pipeline,
    parse_pipeline,
    register_pass,
)
from slimgraph.passes.manager import (
    Instrument,
    IRDumpInstrument,
    MetricInstrument,
    NumericsInstrument,
    PassManager,
    TimingInstrument,
    VerifyInstrument,
)

# Built-in passes register themselves on import.
from slimgraph.passes import cleanup, const_fold, fold_bn  # noqa: E402,F401  isort: skip
from slimgraph.passes import prune_channels  # noqa: E402,F401  isort: skip
from slimgraph.passes import lowrank  # noqa: E402,F401  isort: skip
from slimgraph.passes import finetune  # noqa: E402,F401  isort: skip
from slimgraph.passes import prune_weights  # noqa: E402,F401  isort: skip
from slimgraph.passes import quantize  # noqa: E402,F401  isort: skip

__all__ = [
    "PASS_REGISTRY", "Instrument", "IRDumpInstrument", "MetricInstrument", "NumericsInstrument", "Pass", "PassManager",
    "PassResult", "Skip", "TimingInstrument", "VerifyInstrument", "available_passes", "create_pass",
    "format_pipeline", "parse_pipeline", "register_pass",
]
