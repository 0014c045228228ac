"""Device toolchains: cross-compiling artifacts, and running them where TVM's Python cannot.

  export_library()       writes a compiled executable as a shared library for its target:
                         arm64 through ``aarch64-linux-gnu-g++`` (or a user ``cc``, e.g. an
                         Android NDK ``aarch64-linux-android24-clang++``), x86/CUDA host code
                         through TVM's default compiler.
  check_cross_compiler() / check_qemu()
                         one ``TargetError`` each when a tool is missing, naming the fix.
  run_with_runner()      runs a saved artifact with the C++ runner (tools/runner/runner.cc):
                         under ``qemu-aarch64 -L /usr/aarch64-linux-gnu`` for arm64 on an x86
                         machine, natively for x86. Inputs go in as raw .bin files, outputs come
                         back as numpy arrays, with the runner's latency figures.
  prepare_cuda_runtime() loads TVM's CUDA runtime and registers ``tvm_callback_cuda_compile``,
                         which loading a CUDA artifact needs (the library holds CUDA source,
                         compiled when it is loaded): it answers with the cubin the build
                         shipped (``kernels.cubin``), else compiles with nvcc or NVRTC.

The runner is built on first use by ``tools/build_runner.sh`` into ``.slimgraph-cache/runner/``
(``$SLIMGRAPH_RUNNER_CACHE``) against the TVM runtime of the installed version (for arm64, from
the aarch64 wheels on PyPI). Latencies measured under qemu are emulation times, not device
times; numerics are exact.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from slimgraph.errors import BackendError, ShapeError, TargetError

from . import nativelog, nvrtc
from .files import LIBRARY, MANIFEST
from .nvrtc import CudaBinary
from .targets import TargetSpec, host_arch

REPO_ROOT = Path(__file__).resolve().parents[3]
BUILD_SCRIPT = REPO_ROOT / "tools" / "build_runner.sh"
RUNNER_SOURCE = REPO_ROOT / "tools" / "runner" / "runner.cc"
RUNNER_CACHE_ENV = "SLIMGRAPH_RUNNER_CACHE"

ARM64_CC = "aarch64-linux-gnu-g++"
ARM64_SYSROOT = Path("/usr/aarch64-linux-gnu")
QEMU_ARM64 = "qemu-aarch64"
SETUP_HINT = "tools/setup_toolchains.sh"

# build_runner.sh exit codes -> what went wrong
_BUILD_FAILURES = {3: "a compiler is missing", 4: "the aarch64 TVM wheels could not be "
                   "downloaded from PyPI", 5: "compiling the runner failed"}


# ---------------------------------------------------------------- toolchains

def check_cross_compiler(cc: str | None = None) -> str:
    """The arm64 C++ compiler to link with (``cc`` or aarch64-linux-gnu-g++); ``TargetError``
    naming the fix when it is not on PATH."""
    compiler = cc or ARM64_CC
    if shutil.which(compiler.split()[0]) is None:
        if cc is None:
            raise TargetError(f"arm64 needs the cross compiler {ARM64_CC}, which is not "
                              f"installed: install g++-aarch64-linux-gnu ({SETUP_HINT}), "
                              "or pass cc= an aarch64 compiler (e.g. Android NDK clang++)")
        raise TargetError(f"the C++ compiler {compiler!r} given for arm64 is not on PATH")
    return compiler


def check_qemu() -> list[str]:
    """The command prefix that runs aarch64 binaries here; ``TargetError`` naming the fix."""
    if host_arch() == "arm64":
        return []
    if shutil.which(QEMU_ARM64) is None:
        raise TargetError(f"running arm64 code on this {host_arch()} machine needs "
                          f"{QEMU_ARM64}, which is not installed: install qemu-user "
                          f"({SETUP_HINT})")
    if not (ARM64_SYSROOT / "lib").is_dir():
        raise TargetError(f"{QEMU_ARM64} needs the aarch64 C library in {ARM64_SYSROOT}: "
                          f"install g++-aarch64-linux-gnu ({SETUP_HINT})")
    return [QEMU_ARM64, "-L", str(ARM64_SYSROOT)]


def cross_compiler_path(spec: TargetSpec, cc: str | None = None) -> str | None:
    """The compiler that links libraries for ``spec``: ``cc`` if given, the arm64 cross
    compiler for arm64 on a non-arm64 host, None (TVM's default host compiler) otherwise."""
    if cc or (spec.kind == "arm64" and host_arch() != "arm64"):
        return check_cross_compiler(cc)
    return None


def fcompile_for(spec: TargetSpec, cc: str | None = None) -> Callable | None:
    """The ``fcompile`` for ``export_library`` (see ``cross_compiler_path``)."""
    from tvm.support import cc as tvm_cc

    compiler = cross_compiler_path(spec, cc)
    return None if compiler is None else tvm_cc.cross_compiler(compiler)


def export_library(module, path: str | Path, spec: TargetSpec, *, cc: str | None = None) -> Path:
    """Export a built module (``relax.VMExecutable`` or runtime module) to ``path`` for ``spec``."""
    fcompile = fcompile_for(spec, cc)
    kwargs = {"fcompile": fcompile} if fcompile is not None else {}
    with nativelog.captured() as log:
        try:
            module.export_library(str(path), **kwargs)
        except Exception as err:
            raise BackendError(f"exporting the {spec.name} library failed: {err}\n"
                               f"{nativelog.tail(log)}") from err
    return Path(path)


# ---------------------------------------------------------------- the C++ runner

def runner_cache_dir() -> Path:
    return Path(os.environ.get(RUNNER_CACHE_ENV) or REPO_ROOT / ".slimgraph-cache")


def _installed_versions() -> str:
    import importlib.metadata as md

    return f"{md.version('apache-tvm')} {md.version('apache-tvm-ffi')}"


def runner_path(arch: str, *, build: bool = True) -> Path:
    """The runner binary for ``arch`` ("arm64" | "x86"), built by tools/build_runner.sh when it
    is missing, older than runner.cc, or built against another TVM version."""
    if arch not in ("arm64", "x86"):
        raise TargetError(f"the C++ runner runs CPU artifacts (arm64, x86), not {arch!r}; "
                          "CUDA artifacts run with tools/cuda_check.py or slimgraph.load")
    out = runner_cache_dir() / "runner" / arch
    binary = out / "runner"
    if not build or _runner_fresh(out):
        return binary
    if not BUILD_SCRIPT.is_file():
        raise TargetError(f"the {arch} runner is not built and {BUILD_SCRIPT} is missing "
                          "(slimgraph is not running from its source tree)")
    if arch == "arm64":
        check_cross_compiler()
    env = {**os.environ, RUNNER_CACHE_ENV: str(runner_cache_dir())}
    proc = subprocess.run(["bash", str(BUILD_SCRIPT), arch], capture_output=True, text=True,
                          env=env, timeout=900, check=False)
    if proc.returncode != 0 or not binary.is_file():
        why = _BUILD_FAILURES.get(proc.returncode, f"exit code {proc.returncode}")
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise TargetError(f"building the {arch} runner failed ({why}); run "
                          f"`bash tools/build_runner.sh {arch}` to see why:\n{tail}")
    return binary


def _runner_fresh(out: Path) -> bool:
    binary, versions = out / "runner", out / "VERSIONS"
    if not binary.is_file() or not versions.is_file():
        return False
    if RUNNER_SOURCE.is_file() and RUNNER_SOURCE.stat().st_mtime > binary.stat().st_mtime:
        return False
    try:
        return versions.read_text().strip() == _installed_versions()
    except Exception:  # noqa: BLE001 - unknown versions: rebuild
        return False


def runner_command(arch: str) -> list[str]:
    """The argv prefix that starts the runner for ``arch`` on this machine."""
    if arch not in ("arm64", "x86"):
        runner_path(arch, build=False)  # raises: the runner is for CPU artifacts
    if arch == host_arch():
        prefix = []
    elif arch == "arm64":
        prefix = check_qemu()
    else:
        raise TargetError(f"cannot run {arch} code on this {host_arch()} machine")
    return [*prefix, str(runner_path(arch))]


def read_manifest(artifact_dir: str | Path) -> dict:

    path = Path(artifact_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise BackendError(f"{path} is missing or unreadable: {err}") from err


def _check_inputs(inputs: Sequence, specs: list[dict]) -> list[np.ndarray]:
    if len(inputs) != len(specs):
        raise ShapeError(f"expected {len(specs)} input(s) "
                         f"{[(s['name'], s['shape']) for s in specs]}, got {len(inputs)}")
    arrays = []
    for value, spec in zip(inputs, specs, strict=True):
        array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        if list(array.shape) != list(spec["shape"]):
            raise ShapeError(f"input {spec['name']!r}: expected shape {spec['shape']}, "
                             f"got {list(array.shape)}")
        if str(array.dtype) != spec["dtype"]:
            raise ShapeError(f"input {spec['name']!r}: expected dtype {spec['dtype']}, "
                             f"got {array.dtype}")
        arrays.append(np.ascontiguousarray(array))
    return arrays


def run_with_runner(artifact_dir: str | Path, inputs: Sequence, arch: str | None = None, *,
                    repeat: int = 10, warmup: int = 1,
                    timeout_s: float = 600.0) -> tuple[list[np.ndarray], dict]:
    """Run a saved CPU artifact with the C++ runner; ``(outputs, latency)``.

    ``arch`` defaults to the artifact's target kind; arm64 on x86 runs under qemu-aarch64.
    ``latency`` holds ``median_ms``, ``min_ms``, ``max_ms``, ``repeat``, ``warmup`` and
    ``emulated`` (True under qemu: the times are then the emulator's, not the device's).
    """

    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    kind = manifest.get("target_kind")
    arch = arch or kind
    if kind != arch:
        raise TargetError(f"{artifact_dir} was built for {manifest.get('target')} ({kind}), "
                          f"not {arch}")
    command = runner_command(arch)
    arrays = _check_inputs(inputs, manifest.get("inputs", []))
    with tempfile.TemporaryDirectory(prefix="slimgraph-run-") as tmp:
        argv = [*command, str(artifact_dir / LIBRARY), "--out-dir", tmp,
                "--repeat", str(repeat), "--warmup", str(warmup)]
        for k, array in enumerate(arrays):
            path = Path(tmp) / f"input_{k}.bin"
            array.tofile(path)
            shape = "x".join(str(d) for d in array.shape) or "scalar"
            argv += ["--input", f"{path}:{shape}:{array.dtype}"]
        result = _run(argv, timeout_s)
        outputs = [np.fromfile(o["file"], dtype=o["dtype"]).reshape(o["shape"])
                   for o in result["outputs"]]
    lat = result["latency_ms"]
    latency = {"median_ms": lat["median"], "min_ms": lat["min"], "max_ms": lat["max"],
               "repeat": lat["repeat"], "warmup": lat["warmup"], "emulated": bool(command[:-1])}
    return outputs, latency


def _run(argv: list[str], timeout_s: float) -> dict:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s,
                              check=False)
    except subprocess.TimeoutExpired as err:
        raise BackendError(f"the runner did not finish within {timeout_s:.0f} s: "
                           f"{' '.join(argv[:4])} ...") from err
    if proc.returncode != 0:
        raise BackendError(f"the runner failed (exit {proc.returncode}): "
                           f"{proc.stderr.strip()[-2000:]}")
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError) as err:
        raise BackendError(f"the runner printed no result: {proc.stdout[-500:]!r}") from err


# ---------------------------------------------------------------- CUDA

def cuda_source(library: str | Path) -> str:
    """The CUDA kernels' source embedded in an exported CUDA library ('' if none).

    TVM stores the CUDA module as source (a length-prefixed string) in the library's binary
    blob; this finds it without a CUDA runtime, by the ``extern "C" __global__`` kernels."""
    data = Path(library).read_bytes()
    kernel = data.find(nvrtc.KERNEL_MARK.encode())
    if kernel < 0:
        return ""
    head = data.rfind(b"#ifdef __CUDACC_RTC__", 0, kernel)
    head = kernel if head < 0 else head
    for back in range(0, 16):  # the uint64 length sits just before the string's first byte
        begin = head - back
        size = int.from_bytes(data[begin - 8:begin], "little")
        if kernel < begin + size <= len(data):
            return data[begin:begin + size].decode("utf-8", errors="replace")
    end = data.find(b"\x00", kernel)
    return data[head:end if end > 0 else len(data)].decode("utf-8", errors="replace")


def nvcc_compile_callback(arch: str) -> Callable[[str], bytes]:
    """``tvm_callback_cuda_compile``: CUDA source -> fatbin via ``nvcc --fatbin -arch=arch``."""

    def compile_cuda(code: str) -> bytes:
        nvcc = shutil.which("nvcc")
        if nvcc is None:
            raise TargetError("compiling the CUDA kernels needs nvcc on PATH (CUDA toolkit)")
        with tempfile.TemporaryDirectory(prefix="slimgraph-nvcc-") as tmp:
            src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
            src.write_text(code)
            proc = subprocess.run([nvcc, "--fatbin", "-O3", f"-arch={arch}", "-o", str(out),
                                   str(src)], capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise BackendError(f"nvcc failed for {arch}: {proc.stderr[-2000:]}")
            return out.read_bytes()

    return compile_cuda


# Kernels compiled where the artifact was built (nvrtc.py), by the sha256 of their source.
_PRECOMPILED: dict[str, bytes] = {}


def register_precompiled(binary: CudaBinary) -> None:
    """Let ``cuda_compile_callback`` answer ``binary``'s source with its cubin."""
    _PRECOMPILED[binary.source_sha256] = binary.cubin


def cuda_compile_callback(arch: str) -> Callable[[str], bytes]:
    """``tvm_callback_cuda_compile`` for a process loading CUDA artifacts: the cubin the build
    shipped when the source matches one registered by ``prepare_cuda_runtime``; otherwise
    nvcc (fatbin) if on PATH, else NVRTC if installed; a ``TargetError`` naming both if not."""
    def compile_cuda(code: str) -> bytes:
        cubin = _PRECOMPILED.get(nvrtc.source_sha256(code))
        if cubin is not None:
            return cubin
        if shutil.which("nvcc") is not None:
            return nvcc_compile_callback(arch)(code)
        if nvrtc.unavailable() is None:
            return nvrtc.compile_source(code, arch).cubin
        raise TargetError("these CUDA kernels were not compiled when the artifact was built, and "
                          f"this machine has no CUDA compiler: install nvcc or {nvrtc.INSTALL_HINT}")

    return compile_cuda


def cuda_runner_init(arch: str) -> None:
    """MetaSchedule runner-worker start-up for CUDA tuning: the candidates it loads hold CUDA
    source, which TVM's runtime compiles through the callback registered here."""
    prepare_cuda_runtime(arch)


def prepare_cuda_runtime(arch: str, binary: CudaBinary | None = None) -> None:
    """Make this process able to load a CUDA artifact built for ``arch``.

    Loads ``libtvm_runtime_cuda.so`` (registers the CUDA module loader; needs the NVIDIA driver)
    and registers ``cuda_compile_callback`` as ``tvm_callback_cuda_compile``, which TVM's runtime
    calls on the library's CUDA source while loading it; ``binary`` (the artifact's
    ``kernels.cubin``) answers that call without a compiler. ``TargetError`` naming what is
    missing otherwise.
    """
    import tvm_ffi

    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
    except OSError as err:
        raise TargetError(f"this machine has no NVIDIA driver (libcuda.so.1): a {arch} CUDA "
                          "artifact runs only on a machine with an NVIDIA GPU") from err
    if tvm_ffi.get_global_func("ffi.Module.load_from_bytes.cuda", allow_missing=True) is None:
        import tvm

        lib = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
        try:
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
        except OSError as err:
            raise TargetError(f"could not load TVM's CUDA runtime {lib}: {err}") from err
    if binary is not None:
        register_precompiled(binary)
    elif shutil.which("nvcc") is None and nvrtc.unavailable() is not None:
        raise TargetError("loading a CUDA artifact without precompiled kernels compiles them: "
                          f"install the CUDA toolkit (nvcc on PATH) or {nvrtc.INSTALL_HINT}")
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", cuda_compile_callback(arch),
                                 override=True)
