"""Compiling a CUDA artifact's kernels to GPU machine code on a machine without a GPU.

TVM 0.27's CUDA codegen stores the kernels as CUDA C++ source in the library; the process that
loads it must compile them (``tvm_callback_cuda_compile``), so a GPU machine would need nvcc or
NVRTC. NVIDIA's NVRTC is a compiler library that needs no GPU or driver, and PyPI ships it
(``nvidia-cuda-nvrtc-cu12``, with ``cuda-bindings`` and the runtime/CCCL headers: the
``slimgraph[cuda]`` extra). With it, a CUDA build here:

  * compiles every kernel for the target's ``sm_XX`` (a real check of the generated code: an
    error fails the build, not the first run on a GPU);
  * ships the cubin next to the library (``kernels.cubin``, keyed in the manifest by the
    sha256 of the source it came from), which ``slimgraph.load`` and tools/cuda_check.py hand
    to TVM's runtime at load time: the GPU machine needs no CUDA compiler.

The compile itself is TVM's ``tvm.support.nvcc.compile_cuda(..., compiler="nvrtc")`` (its
NVRTC preamble and flags); this module finds the headers in the pip packages for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from slimgraph.errors import BackendError

INSTALL_HINT = "pip install 'slimgraph[cuda]' (cuda-bindings and NVIDIA's NVRTC wheels)"


@dataclass(frozen=True)
class CudaBinary:
    """Kernels compiled for one GPU architecture, and the source they were compiled from."""

    arch: str
    cubin: bytes
    source_sha256: str
    kernels: int
    compiler: str

    def manifest(self, file: str) -> dict:
        return {"binary": file, "format": "cubin", "arch": self.arch, "kernels": self.kernels,
                "bytes": len(self.cubin), "compiler": self.compiler,
                "source_sha256": self.source_sha256,
                "binary_sha256": hashlib.sha256(self.cubin).hexdigest()}


KERNEL_MARK = 'extern "C" __global__'  # how TVM's CUDA codegen opens every kernel


def kernel_count(source: str) -> int:
    return source.count(KERNEL_MARK)


def source_sha256(source: str) -> str:
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def _package_dir(name: str) -> Path | None:
    try:
        module = __import__(f"nvidia.{name}", fromlist=["_"])
    except ImportError:
        return None
    paths = list(getattr(module, "__path__", []))
    return Path(paths[0]) if paths else None


def unavailable() -> str | None:
    """Why NVRTC cannot compile here (None when it can)."""
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        return f"cuda-bindings is not installed ({INSTALL_HINT})"
    runtime, cccl = _package_dir("cuda_runtime"), _package_dir("cuda_cccl")
    if runtime is None or not (runtime / "include" / "cuda_runtime.h").is_file():
        return f"the CUDA runtime headers (nvidia-cuda-runtime-cu12) are missing ({INSTALL_HINT})"
    if cccl is None or not (cccl / "include" / "cuda" / "std").is_dir():
        return f"the CCCL headers (nvidia-cuda-cccl-cu12) are missing ({INSTALL_HINT})"
    try:
        result, *_ = nvrtc.nvrtcVersion()
    except Exception as err:  # noqa: BLE001 - a missing libnvrtc raises from the bindings
        return f"NVRTC cannot be loaded ({err}); {INSTALL_HINT}"
    if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        return f"NVRTC cannot be loaded ({result}); {INSTALL_HINT}"
    return None


def version() -> str:
    from cuda.bindings import nvrtc

    _, major, minor = nvrtc.nvrtcVersion()
    return f"NVRTC {major}.{minor}"


@contextlib.contextmanager
def _cuda_path(root: Path):
    """TVM's NVRTC path looks for ``$CUDA_PATH/include/cuda_runtime.h``."""
    old = os.environ.get("CUDA_PATH")
    os.environ["CUDA_PATH"] = str(root)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CUDA_PATH", None)
        else:
            os.environ["CUDA_PATH"] = old


def compile_source(source: str, arch: str) -> CudaBinary:
    """Compile TVM-generated CUDA ``source`` to a cubin for ``arch`` (e.g. ``"sm_90"``)."""
    reason = unavailable()
    if reason is not None:
        raise BackendError(f"cannot compile CUDA kernels here: {reason}")
    from tvm.support import nvcc

    runtime, cccl = _package_dir("cuda_runtime"), _package_dir("cuda_cccl")
    with _cuda_path(runtime):
        try:
            cubin = nvcc.compile_cuda(source, target_format="cubin", arch=arch,
                                      options=[f"-I{cccl / 'include'}"], compiler="nvrtc")
        except Exception as err:
            raise BackendError(f"NVRTC could not compile the generated CUDA kernels for {arch}: "
                               f"{str(err)[-3000:]}") from err
    return CudaBinary(arch=arch, cubin=bytes(cubin), source_sha256=source_sha256(source),
                      kernels=kernel_count(source), compiler=version())


def cuda_sources(module) -> list[str]:
    """The CUDA source of every CUDA module imported (at any depth) by a built ``module``."""
    out, stack = [], [module]
    while stack:
        mod = stack.pop()
        if mod.kind == "cuda":
            out.append(str(mod.inspect_source("cuda")))
        stack.extend(mod.imports)
    return out
