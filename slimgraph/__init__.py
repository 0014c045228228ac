"""slimgraph: compiler-style compression and compilation of trained CNNs.

    import slimgraph
    result = slimgraph.optimize(model, "x86", example_inputs=(x,), pipeline="fold-bn")
    result.compiled(x); result.report.save_html("report.html"); result.save("out/")
"""

__version__ = "0.1.0"
# Enough MetaSchedule trials to make CPU code ~20-50x faster than untuned builds on small CNNs
# while staying within minutes on 2 cores; the tuning database makes re-compiles free.
DEFAULT_TUNE_TRIALS = 256

import warnings as _warnings  # noqa: E402

# torch 2.13's own pytree code trips its LeafSpec deprecation on every torch.export; it is
# torch's to fix and says nothing to a slimgraph user.
_warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)",
                         category=FutureWarning)

from slimgraph.errors import (  # noqa: E402
    BackendError,
    CalibrationError,
    ModelLoadError,
    PassConfigError,
    PassError,
    ShapeError,
    SlimgraphError,
    TargetError,
    UnsupportedOpError,
    VerifyError,
)

__all__ = [
    "BackendError", "CalibrationError", "Graph", "ModelLoadError", "PassConfigError", "PassError",
    "Result", "ShapeError", "SlimgraphError", "TargetError", "UnsupportedOpError", "VerifyError",
    "__version__", "load", "optimize",
]

_LAZY = {"Graph": "slimgraph.ir", "Result": "slimgraph.api", "load": "slimgraph.api",
         "optimize": "slimgraph.api"}


def __getattr__(name: str):
    """The heavy half of the API (torch, TVM) is imported on first use, so ``slimgraph
    --help`` and argument errors answer at once."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'slimgraph' has no attribute {name!r}")
