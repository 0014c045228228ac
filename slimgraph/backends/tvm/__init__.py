"""The TVM backend: lower to Relax, tune with MetaSchedule, compile, run, save and load.

    from slimgraph.backends.tvm import build, load_compiled
    compiled = build(model, (x,), "x86", tune_trials=800)   # tune_trials=0: untuned build
    compiled.save("out/resnet18-x86");  outputs = load_compiled("out/resnet18-x86")(x)

Importing this package sets ``TVM_NUM_THREADS`` to the usable core count (unless already set)
before TVM's thread pool starts; see ``targets.configure_runtime_threads``.
"""

from .targets import configure_runtime_threads

configure_runtime_threads()

from . import int8  # noqa: E402,F401 - registers the quantized ops' lowerings and design space
from .artifact import ArtifactLoadError, CompiledModel, KernelTime, build, load_compiled  # noqa: E402
from .lower import (  # noqa: E402
    custom_op_lowerings,
    lower,
    register_custom_op_lowering,
    unregister_custom_op_lowering,
)
from .targets import TargetSpec, get_target, host_mcpu, host_num_cores, list_targets  # noqa: E402
from .tune import TuneOptions, TuneResult, plan_budget, tune, tuning_dir  # noqa: E402

__all__ = [
    "ArtifactLoadError",
    "CompiledModel",
    "KernelTime",
    "TargetSpec",
    "TuneOptions",
    "TuneResult",
    "build",
    "configure_runtime_threads",
    "custom_op_lowerings",
    "get_target",
    "host_mcpu",
    "host_num_cores",
    "list_targets",
    "load_compiled",
    "lower",
    "plan_budget",
    "register_custom_op_lowering",
    "tune",
    "tuning_dir",
    "unregister_custom_op_lowering",
]
