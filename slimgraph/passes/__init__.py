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
    NumericsInstrument,
    PassManager,
    TimingInstrument,
    VerifyInstrument,
)

# Built-in passes register themselves on import.
from slimgraph.passes import cleanup, const_fold, fold_bn  # noqa: E402,F401  isort: skip

__all__ = [
    "PASS_REGISTRY", "Instrument", "IRDumpInstrument", "NumericsInstrument", "Pass", "PassManager",
    "PassResult", "Skip", "TimingInstrument", "VerifyInstrument", "available_passes", "create_pass",
    "format_pipeline", "parse_pipeline", "register_pass",
]
