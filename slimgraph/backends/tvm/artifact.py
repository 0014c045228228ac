"""Build, run, save and load compiled models.

``build`` lowers a module to Relax, optionally tunes it (see ``tune.py``), and compiles it for a
target into a ``CompiledModel``. ``save`` writes ``model.so`` (the exported VM library) and
``manifest.json`` (target, inputs, outputs, versions, tuning summary, the library's sha256);
``load_compiled`` reads them back, refusing artifacts built for another machine kind. CUDA
builds also compile their kernels to a cubin with NVRTC when it is installed (``nvrtc.py``)
and save it as ``kernels.cubin``, which loading hands to TVM's runtime.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from slimgraph.errors import BackendError, ModelLoadError, ShapeError, TargetError
from slimgraph.schema import BuildInfo
from slimgraph.timing import time_callable

from . import nativelog
from .files import CUBIN, FORMAT, FORMAT_VERSION, LIBRARY, MANIFEST
from .lower import convert_conv_layout, lower
from .nvrtc import CudaBinary
from .targets import TargetSpec, _runs_here, get_target, host_arch
from .tune import TuneOptions, apply_and_build, coverage, prepare, tune, tuning_dir

if TYPE_CHECKING:
    import torch
    import tvm

    from .rpc import RPCDevice


InputSpec = tuple[str, tuple[int, ...], str]


class ArtifactLoadError(ModelLoadError, BackendError):
    """A compiled artifact is missing, corrupt, or cannot run on this machine.

    Both a ``ModelLoadError`` (a model file could not be loaded) and a ``BackendError`` (the TVM
    backend failed), so callers may catch either.
    """


def _slimgraph_version() -> str:
    try:
        return importlib.metadata.version("slimgraph")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


# ---------------------------------------------------------------- signatures

def signature(mod: tvm.IRModule) -> tuple[list[InputSpec], list[dict]]:
    """(inputs, outputs) of ``mod["main"]``; ``ShapeError`` for non-static shapes.

    TVM 0.27 types Relax values with ``.ty`` (``relax.type.TensorType``, ``ir.TupleType``);
    the older ``struct_info`` attributes are gone.
    """
    main = mod["main"]
    inputs = []
    for param in main.params:
        name = str(getattr(param, "name", None) or getattr(param, "name_hint", "input"))
        shape, dtype = _static(param.ty, f"input {name!r}")
        inputs.append((name, shape, dtype))
    ret = main.ret_ty
    fields = list(ret.fields) if hasattr(ret, "fields") else [ret]
    outputs = []
    for k, ty in enumerate(fields):
        shape, dtype = _static(ty, f"output {k}")
        outputs.append({"name": f"output_{k}", "shape": list(shape), "dtype": dtype})
    return inputs, outputs


def _static(ty, what: str) -> tuple[tuple[int, ...], str]:
    shape = getattr(ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        raise ShapeError(f"{what} is not a tensor of known shape ({ty})")
    try:
        dims = tuple(int(d) for d in shape.values)
    except (TypeError, ValueError) as err:
        raise ShapeError(f"{what} has a symbolic shape {shape}; build needs static "
                         "shapes") from err
    return dims, str(ty.dtype)


# ---------------------------------------------------------------- the compiled model

VM_BUILTINS = "(VM builtins: allocation, tuples)"


@dataclass(frozen=True)
class KernelTime:
    """One row of ``CompiledModel.profile``: a kernel, its calls per model run, its time per
    run (ms) and that time's share of the (instrumented) run."""

    name: str
    calls: int
    ms: float
    share: float

    def to_dict(self) -> dict:
        return {"kernel": self.name, "calls": self.calls, "ms": round(self.ms, 4),
                "share": round(self.share, 4)}


class CompiledModel:
    """A model compiled for one target. Call it with numpy arrays or torch tensors."""

    def __init__(self, module, target: TargetSpec, input_specs: Sequence[InputSpec],
                 output_specs: Sequence[dict], info: BuildInfo, *, library_path: Path | None = None,
                 cc: str | None = None, cuda_binary: CudaBinary | None = None):
        self._module = module  # relax.VMExecutable (fresh build) or runtime.Module (loaded)
        self._cc = cc  # the C++ compiler that links the library (arm64: a cross compiler)
        self.cuda_binary = cuda_binary  # CUDA kernels compiled here (NVRTC), or None
        self._library_path = library_path
        self._vm = None
        self.target = target
        self.input_specs: list[InputSpec] = [(n, tuple(s), d) for n, s, d in input_specs]
        self.output_specs = list(output_specs)
        self.info = info  # schema.BuildInfo: how it was built (tuning summary, schedules, ...)

    def __repr__(self) -> str:
        ins = ", ".join(f"{n}{list(s)}:{d}" for n, s, d in self.input_specs)
        return (f"CompiledModel(target={self.target.name!r}, inputs=[{ins}], "
                f"tuned={self.info.tuned})")

    # -- running
    def _device(self):
        import tvm

        return tvm.cuda(0) if self.target.kind == "cuda" else tvm.cpu(0)

    def _ensure_runnable(self, what: str) -> None:
        if not self.target.is_host:
            raise BackendError(f"cannot {what} a model built for {self.target.name} "
                               f"({self.target.description}) on this machine")

    def _get_vm(self):
        if self._vm is None:
            self._ensure_runnable("run")
            self._vm = self._new_vm()
        return self._vm

    def _new_vm(self):
        """A fresh TVM VM on this model (``_get_vm`` keeps one; ``profile`` hooks its own)."""
        from tvm import relax

        module = self._vm_module()
        try:
            with nativelog.captured() as log:  # its "Scope Loaded" lines are not news
                return relax.VirtualMachine(module, self._device())
        except Exception as err:
            raise BackendError(f"could not start the TVM VM for {self.target.name}: {err} "
                               f"{nativelog.tail(log, 600)}".rstrip()) from err

    def _load_fresh_cuda_build(self):
        """A fresh CUDA build holds a codegen placeholder for its kernels that cannot launch
        (TVM's compiler is built without the CUDA runtime): export it and load the library
        through the CUDA runtime, as ``load_compiled`` does."""
        import tvm

        from .device import export_library, prepare_cuda_runtime

        prepare_cuda_runtime(self.target.tvm_target["arch"], self.cuda_binary)
        with tempfile.TemporaryDirectory(prefix="slimgraph-cuda-") as tmp:
            path = export_library(self._module, Path(tmp) / LIBRARY, self.target)
            return tvm.runtime.load_module(str(path))

    def _convert_inputs(self, inputs) -> list:
        import tvm

        if len(inputs) != len(self.input_specs):
            raise ShapeError(f"expected {len(self.input_specs)} input(s) "
                             f"{[(n, list(s)) for n, s, _ in self.input_specs]}, "
                             f"got {len(inputs)}")
        device = self._device()
        out = []
        for value, (name, shape, dtype) in zip(inputs, self.input_specs, strict=True):
            array = _to_numpy(value)
            if tuple(array.shape) != shape:
                raise ShapeError(f"input {name!r}: expected shape {list(shape)}, "
                                 f"got {list(array.shape)}")
            if str(array.dtype) != dtype:
                raise ShapeError(f"input {name!r}: expected dtype {dtype}, got {array.dtype}")
            out.append(tvm.runtime.tensor(np.ascontiguousarray(array), device))
        return out

    def __call__(self, *inputs) -> list[np.ndarray]:
        vm = self._get_vm()
        args = self._convert_inputs(inputs)
        try:
            result = vm["main"](*args)
        except Exception as err:
            raise BackendError(f"running the compiled model failed: {err}") from err
        return _flatten(result)

    def example_inputs(self, seed: int = 0) -> list[np.ndarray]:
        """Seeded random inputs matching ``input_specs``."""
        rng = np.random.default_rng(seed)
        out = []
        for _, shape, dtype in self.input_specs:
            if np.issubdtype(np.dtype(dtype), np.floating):
                out.append(rng.standard_normal(shape).astype(dtype))
            else:
                out.append(rng.integers(-8, 8, size=shape).astype(dtype))
        return out

    def bind(self, *inputs):
        """A zero-argument function that runs the model once on ``inputs``, converted and
        placed on the device now (for timing loops: no conversion inside the loop)."""
        vm = self._get_vm()
        args = self._convert_inputs(inputs)
        main, device = vm["main"], self._device()

        def run():
            out = main(*args)
            device.sync()
            return out

        return run

    def benchmark(self, repeat: int = 20, warmup: int = 3, inputs=None) -> dict:
        """Wall-clock latency of one call (inputs already on the device); host targets only."""
        if repeat < 1 or warmup < 0:
            raise BackendError(f"benchmark needs repeat >= 1 and warmup >= 0, "
                               f"got {repeat}, {warmup}")
        self._ensure_runnable("benchmark")
        run = self.bind(*(list(inputs) if inputs is not None else self.example_inputs()))
        return time_callable(run, repeat=repeat, warmup=warmup)

    def profile(self, repeat: int = 10, warmup: int = 2, inputs=None) -> list[KernelTime]:
        """Where a call's time goes: every kernel (PrimFunc) the VM calls, with its calls per
        model run and its mean time per run, slowest first; the VM's own builtins (tensor
        allocation, tuples) together as one row. Host targets only.

        Timed by TVM's VM instrumentation hook (a callback before and after each call), so
        each call's time includes a microsecond or two of the callback, and a run under the
        hook is a little slower than ``benchmark``'s; the shares are of the instrumented run.
        """
        if repeat < 1 or warmup < 0:
            raise BackendError(f"profile needs repeat >= 1 and warmup >= 0, got {repeat}, {warmup}")
        self._ensure_runnable("profile")
        args = self._convert_inputs(list(inputs) if inputs is not None else self.example_inputs())
        vm = self._new_vm()  # the hook's own VM
        for _ in range(warmup):
            vm["main"](*args)
        totals: dict[str, float] = {}
        calls: dict[str, int] = {}
        started: list[float] = []

        def hook(func, symbol, before, ret, *call_args):
            now = time.perf_counter()
            if before:
                started.append(now)
                return 0
            name = VM_BUILTINS if symbol.startswith("vm.builtin.") else symbol
            totals[name] = totals.get(name, 0.0) + now - started.pop()
            calls[name] = calls.get(name, 0) + 1
            return 0

        vm.set_instrument(hook)
        start = time.perf_counter()
        for _ in range(repeat):
            vm["main"](*args)
            self._device().sync()
        run_ms = (time.perf_counter() - start) * 1e3 / repeat
        rows = [KernelTime(name, calls[name] // repeat, totals[name] * 1e3 / repeat,
                           totals[name] * 1e3 / repeat / run_ms) for name in totals]
        return sorted(rows, key=lambda r: -r.ms)

    def _vm_module(self):
        if self.target.kind == "cuda" and self._library_path is None:
            return self._load_fresh_cuda_build()
        return self._module

    # -- saving
    def manifest(self, library_sha256: str | None = None) -> dict:
        import tvm

        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "library": LIBRARY,
            "library_sha256": library_sha256,
            "target": self.target.name,
            "target_kind": self.target.kind,
            "tvm_target": self.target.tvm_target,
            "host": self.target.host,
            "description": self.target.description,
            "pipeline": self.info.pipeline,  # what ran (None: built outside optimize)
            "default_pipeline": self.target.default_pipeline,
            "inputs": [{"name": n, "shape": list(s), "dtype": d} for n, s, d in self.input_specs],
            "outputs": self.output_specs,
            "tvm_version": tvm.__version__,
            "slimgraph_version": _slimgraph_version(),
            "built_on": {"machine": platform.machine(), "node": platform.node()},
            "tuning": {k: getattr(self.info, k) for k in (
                "conv_layout", "tuned", "trials", "trials_measured", "tune_time_s",
                "build_time_s", "tasks",
                "tasks_tuned", "stopped_by", "untuned_tasks", "database", "runner",
                "schedules")},
            **({"cuda_kernels": self.info.cuda_kernels} if self.info.cuda_kernels is not None
               else {}),
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``model.so`` (and ``kernels.cubin``) and ``manifest.json`` into ``directory``.

        The directory is replaced as a whole (``slimgraph.outputs``): a reader, or a kill at any
        moment, sees the old artifact or the new one; other files in it are kept.
        """
        from slimgraph.outputs import replace_outputs

        return replace_outputs(directory, self.write_files, (LIBRARY, CUBIN, MANIFEST), last=MANIFEST)

    def write_files(self, directory: Path) -> None:
        """The artifact's files into the (new, empty) ``directory``; the manifest, which records
        the library's sha256, last."""
        self._export(directory / LIBRARY)
        digest = _sha256(directory / LIBRARY)
        if self.cuda_binary is not None:
            (directory / CUBIN).write_bytes(self.cuda_binary.cubin)
        (directory / MANIFEST).write_text(json.dumps(self.manifest(digest), indent=2) + "\n")

    def _export(self, path: Path) -> None:
        if self._library_path is not None:  # loaded from disk: the library is already built
            shutil.copyfile(self._library_path, path)
            return
        from .device import export_library

        export_library(self._module, path, self.target, cc=self._cc)


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor
        return value.detach().cpu().numpy()
    if hasattr(value, "numpy") and not isinstance(value, np.ndarray):  # tvm tensor
        return value.numpy()
    return np.asarray(value)


def _flatten(result) -> list[np.ndarray]:
    if hasattr(result, "numpy"):
        return [result.numpy()]
    out: list[np.ndarray] = []
    for item in result:
        out.extend(_flatten(item))
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- build

def build(module: torch.nn.Module | tvm.IRModule, example_inputs: tuple = (),
          target: str | TargetSpec = "x86", *, tune_trials: int = 0,
          workdir: str | Path | None = None, database: str | Path | None = None,
          time_budget_s: float | None = None, progress: bool = True,
          custom_convert_map: dict | None = None,
          tune_options: TuneOptions | None = None, rpc: str | RPCDevice | None = None,
          cc: str | None = None, conv_layout: str | None = None) -> CompiledModel:
    """Compile ``module`` for ``target``.

    ``tune_trials == 0``: TVM's default pipeline (untuned; on CPU that is slow), unless a
    ``database`` is given, whose schedules are then applied without tuning. ``info.tuned``
    says whether at least one kernel got a tuned schedule; ``info.untuned_tasks`` lists
    the kernels that kept the default one. ``> 0``: MetaSchedule
    with that many trials in total (trials already in the database count), within
    ``time_budget_s`` of search if given, into ``database`` or ``workdir/tuning/<target>`` or
    ``~/.cache/slimgraph/tuning/<target>``. ``module`` may be a torch module or a Relax IRModule.

    ``rpc`` ("HOST:PORT" or an ``RPCDevice``): measure tuning candidates on the device behind
    that TVM RPC server (the way to tune arm64 from an x86 build machine); records are appended
    as they are measured, so an interrupted run resumes. ``cc``: the C++ compiler that links
    the library (default: aarch64-linux-gnu-g++ for arm64, the host compiler otherwise; an
    Android NDK ``aarch64-linux-android24-clang++`` for phones). ``conv_layout``: the data
    layout convolutions are compiled in (default: the target's, NHWC on CPUs, NCHW on CUDA);
    the model's inputs and outputs keep theirs.
    """

    spec = get_target(target)
    if tune_trials < 0:
        raise BackendError(f"tune_trials must be >= 0, got {tune_trials}")
    from .device import cross_compiler_path

    cross_compiler_path(spec, cc)  # a missing compiler fails before minutes of lowering
    start = time.perf_counter()
    layout = conv_layout or spec.conv_layout
    mod, integer = _lowered(module, example_inputs, spec, custom_convert_map, layout)
    inputs, outputs = signature(mod)
    plan = _Schedules(tune_trials, workdir, database, time_budget_s, progress,
                      tune_options or TuneOptions(), rpc, cc, integer)
    info = BuildInfo(spec.name, spec.tvm_target, layout, trials=tune_trials)
    try:
        executable = _compile(mod, spec, plan, info)
    except (BackendError, TargetError, ShapeError):
        raise
    except Exception as err:
        raise BackendError(f"TVM build for {spec.name} failed: {type(err).__name__}: "
                           f"{err}") from err
    cuda_binary = None
    if spec.kind == "cuda":
        cuda_binary, info.cuda_kernels = _compile_cuda_kernels(executable, spec)
    info.build_time_s = time.perf_counter() - start - info.tune_time_s
    info.schedules = _schedules_note(info, spec)
    return CompiledModel(executable, spec, inputs, outputs, info, cc=cc,
                         cuda_binary=cuda_binary)


def _lowered(module, example_inputs, spec: TargetSpec, custom_convert_map, layout: str):
    """(the Relax module in ``layout``, whether it has slimgraph's integer ops); quantized
    models get the integer lowerings for the target (ARM's sdot takes s8 activations)."""
    import tvm

    integer = _has_integer_ops(module)
    if integer:
        from . import int8

        custom_convert_map = {**int8.convert_map(spec), **(custom_convert_map or {})}
    mod = module if isinstance(module, tvm.IRModule) else lower(
        module, tuple(example_inputs), custom_convert_map=custom_convert_map)
    return convert_conv_layout(mod, layout), integer


@dataclass(frozen=True)
class _Schedules:
    """Where ``build`` gets its schedules: TVM's defaults, a database, or tuning now."""

    trials: int
    workdir: str | Path | None
    database: str | Path | None
    time_budget_s: float | None
    progress: bool
    options: TuneOptions
    rpc: str | RPCDevice | None
    cc: str | None
    integer: bool = False  # the model has slimgraph's integer ops

    def device(self) -> RPCDevice | None:
        if self.rpc is None:
            return None
        from .rpc import RPCDevice

        return self.rpc if isinstance(self.rpc, RPCDevice) else RPCDevice.parse(str(self.rpc))


def _compile(mod: tvm.IRModule, spec: TargetSpec, plan: _Schedules, info: BuildInfo):
    """The executable, with TVM's default schedules, a database's, or freshly tuned ones;
    ``info`` gets the tuning summary."""
    import tvm

    if plan.trials == 0 and plan.database is None:
        if plan.integer:
            return _sketched_build(mod, spec, plan, info)
        return tvm.compile(mod, target=spec.to_tvm())
    db_dir = tuning_dir(spec, plan.workdir, plan.database)
    if plan.trials == 0 and not (db_dir / "database_tuning_record.json").is_file():
        raise BackendError(f"no tuning database at {db_dir} (database_tuning_record.json"
                           " is missing); pass tune_trials > 0 to create one")
    prepared = prepare(mod, spec, prepack_weights=plan.options.prepack_weights)
    if plan.trials > 0:
        result = tune(prepared, spec, plan.trials, db_dir, time_budget_s=plan.time_budget_s,
                      progress=plan.progress, options=plan.options, device=plan.device(),
                      cc=plan.cc)
        info.trials_measured, info.tune_time_s = result.trials_measured, result.tune_time_s
        info.tasks, info.tasks_tuned, info.stopped_by = result.tasks, result.tasks_tuned, result.stopped_by
        info.untuned_tasks, info.task_table = list(result.untuned_tasks), list(result.task_table)
        info.runner = result.runner
    else:
        infos = coverage(prepared, spec, db_dir)
        info.tasks, info.stopped_by = len(infos), "cached"
        info.untuned_tasks = [i.name for i in infos if not i.tuned]
    executable = apply_and_build(prepared, spec, db_dir, prepack_weights=plan.options.prepack_weights)
    # tuned: at least one kernel runs a tuned schedule (the rest keep the default one)
    info.database, info.tuned = str(db_dir), len(info.untuned_tasks) < (info.tasks or 0)
    return executable


def _sketched_build(mod, spec: TargetSpec, plan: _Schedules, info: BuildInfo):
    """An untuned build of a quantized model: each integer kernel gets one unmeasured schedule
    that uses the target's dot-product intrinsic (``int8.sketch_database``), the other kernels
    TVM's defaults. Tuning (``--tune-trials`` here, ``--rpc`` for a device) makes them fast."""
    from . import int8
    from .tune import open_database

    prepared = prepare(mod, spec, prepack_weights=plan.options.prepack_weights)
    with tempfile.TemporaryDirectory(prefix="slimgraph-sketch-") as tmp:
        with nativelog.captured():  # MetaSchedule's rule-list warnings (pool_max, ...)
            _, done, _ = int8.sketch_database(prepared, spec, open_database(Path(tmp)))
        executable = apply_and_build(prepared, spec, Path(tmp),
                                     prepack_weights=plan.options.prepack_weights)
    info.extra["int8_sketched"] = len(done)
    return executable


def _has_integer_ops(module) -> bool:
    graph = getattr(module, "graph", None)
    return graph is not None and any(str(getattr(n, "target", "")).startswith("slimgraph.q")
                                     for n in getattr(graph, "nodes", ()))


def _compile_cuda_kernels(executable, spec: TargetSpec) -> tuple[CudaBinary | None, dict]:
    """The CUDA kernels of a fresh build compiled for the target's arch with NVRTC (None when
    NVRTC is not installed: the library's source is then compiled where it is loaded), and
    what the manifest says about them. A kernel NVRTC rejects fails the build here."""
    from . import nvrtc

    sources = nvrtc.cuda_sources(executable.mod)
    kernels = sum(nvrtc.kernel_count(src) for src in sources)
    reason = nvrtc.unavailable()
    if len(sources) != 1 or reason is not None:
        why = reason or f"{len(sources)} CUDA modules in the library (expected one)"
        return None, {"binary": None, "kernels": kernels,
                      "note": f"kernels not precompiled ({why}); the loading process compiles "
                              "them (nvcc or NVRTC there)"}
    binary = nvrtc.compile_source(sources[0], spec.tvm_target["arch"])
    return binary, binary.manifest(CUBIN)


def _schedules_note(info: BuildInfo, spec: TargetSpec) -> str:
    """Where the kernels' schedules came from, in words (the report and manifest say it)."""
    if info.database is None:
        sketched = info.extra.get("int8_sketched")
        if sketched:
            return (f"untuned: {sketched} integer kernels on one unmeasured schedule with the "
                    f"target's dot-product instruction, the rest TVM's default schedules")
        return (f"TVM default schedules (untuned){'' if spec.kind != 'cuda' else ', GPU rules'}")
    untuned = len(info.untuned_tasks or [])
    total = info.tasks or 0
    how = {"cached": "from the tuning database"}.get(info.stopped_by, "tuned now")
    runner = info.runner or "this machine"
    return (f"{total - untuned}/{total} kernels {how} ({info.database}, measured on "
            f"{runner}); {untuned} on default schedules")


# ---------------------------------------------------------------- load

def load_compiled(directory: str | Path) -> CompiledModel:
    """Load an artifact written by ``CompiledModel.save``."""
    import tvm

    directory = Path(directory)
    manifest_path, lib_path = directory / MANIFEST, directory / LIBRARY
    if not directory.is_dir():
        raise ArtifactLoadError(f"no compiled model at {directory}: directory does not exist")
    if not manifest_path.is_file():
        raise ArtifactLoadError(f"{directory} is not a compiled model: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ArtifactLoadError(f"{manifest_path} is unreadable or corrupt: {err}") from err
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactLoadError(f"{manifest_path}: not a {FORMAT} v{FORMAT_VERSION} manifest")
    cuda_binary = _read_cuda_binary(manifest, directory)
    spec = _spec_from_manifest(manifest, directory, cuda_binary)
    if not lib_path.is_file():
        raise ArtifactLoadError(f"{directory}: {LIBRARY} is missing")
    if manifest.get("library_sha256") and _sha256(lib_path) != manifest["library_sha256"]:
        raise ArtifactLoadError(f"{lib_path} does not match its manifest (sha256 differs): "
                                "the artifact is corrupt or was partly overwritten")
    try:
        with nativelog.captured():
            module = tvm.runtime.load_module(str(lib_path))
    except Exception as err:
        hint = ""
        if manifest.get("tvm_version") != tvm.__version__:
            hint = f" (built with TVM {manifest.get('tvm_version')}, this is {tvm.__version__})"
        raise ArtifactLoadError(f"could not load {lib_path}{hint}: {err}") from err
    inputs = [(i["name"], tuple(i["shape"]), i["dtype"]) for i in manifest["inputs"]]
    info = BuildInfo.from_dict({"target": spec.name, "tvm_target": spec.tvm_target,
                                **manifest.get("tuning", {}), "loaded_from": str(directory),
                                "pipeline": manifest.get("pipeline"),
                                "cuda_kernels": manifest.get("cuda_kernels")})
    return CompiledModel(module, spec, inputs, manifest.get("outputs", []), info,
                         library_path=lib_path, cuda_binary=cuda_binary)


def _read_cuda_binary(manifest: dict, directory: Path) -> CudaBinary | None:
    """The artifact's precompiled CUDA kernels (None if it has none), checked against the
    manifest's sha256."""
    meta = manifest.get("cuda_kernels") or {}
    if manifest.get("target_kind") != "cuda" or not meta.get("binary"):
        return None
    path = directory / meta["binary"]
    if not path.is_file():
        raise ArtifactLoadError(f"{directory}: {meta['binary']} (the compiled CUDA kernels) is "
                                "missing")
    cubin = path.read_bytes()
    if hashlib.sha256(cubin).hexdigest() != meta.get("binary_sha256"):
        raise ArtifactLoadError(f"{path} does not match its manifest (sha256 differs)")
    return CudaBinary(arch=meta["arch"], cubin=cubin, source_sha256=meta["source_sha256"],
                      kernels=int(meta.get("kernels", 0)), compiler=meta.get("compiler", ""))


def _spec_from_manifest(manifest: dict, directory: Path,
                        cuda_binary: CudaBinary | None = None) -> TargetSpec:
    kind = manifest.get("target_kind")
    here = host_arch()
    if kind in ("x86", "arm64") and kind != here:
        raise ArtifactLoadError(f"{directory} was built for {manifest.get('target')} ({kind}); "
                                f"this machine is {here} and cannot load it")
    if kind == "cuda":
        from .device import prepare_cuda_runtime
        from .targets import _cuda

        arch = (manifest.get("tvm_target") or {}).get("arch", "sm_90")
        try:
            prepare_cuda_runtime(arch, cuda_binary)  # TVM's CUDA loader + compile callback
        except TargetError as err:
            raise ArtifactLoadError(f"{directory} was built for {manifest.get('target')}: "
                                    f"{err}") from err
        return _cuda(arch)
    if kind not in ("x86", "arm64"):
        raise ArtifactLoadError(f"{directory}: unknown target kind {kind!r}")
    tvm_target = manifest.get("tvm_target") or {}
    mcpu = tvm_target.get("mcpu")
    is_host = True if kind != "x86" or not mcpu else _runs_here(mcpu)
    return TargetSpec(name=manifest.get("target", kind), kind=kind, tvm_target=tvm_target,
                      host=manifest.get("host"), is_host=is_host,
                      default_pipeline=manifest.get("default_pipeline", ""),
                      description=manifest.get("description", ""))
