"""Where a run happened: CPU model and the features that decide its kernels, core count, library
versions, seed and machine load. The report shows it beside every measured number, since a
latency or a speed-up means little without the CPU it came from."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

# Features that change which kernels slimgraph can use (int8 dot products, vector width).
KERNEL_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile",
                   "amx_int8", "neon", "asimd", "asimddp", "i8mm", "sve")
_PACKAGES = ("torch", "apache-tvm", "tvm", "onnx", "onnxruntime", "numpy")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags() -> set[str]:
    """The host CPU's feature flags from /proc/cpuinfo (x86 ``flags``, arm ``Features``)."""
    match = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", _cpuinfo(), re.MULTILINE)
    return set(match.group(1).split()) if match else set()


def cpu_model() -> str:
    match = re.search(r"^(?:model name|Model|Hardware)\s*:\s*(.*)$", _cpuinfo(), re.MULTILINE)
    return match.group(1).strip() if match else (platform.processor() or platform.machine())


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def describe(seed: int | None = None) -> dict[str, Any]:
    """The environment as a JSON-ready dict (see the module docstring)."""
    from slimgraph import __version__

    flags = cpu_flags()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    versions = {"python": sys.version.split()[0], "slimgraph": __version__}
    versions.update({name: v for name in _PACKAGES if (v := _version(name))})
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count()
    return {"cpu": cpu_model(), "machine": platform.machine(), "cores": cores,
            "kernel_features": [f for f in KERNEL_FEATURES if f in flags],
            "os": f"{platform.system()} {platform.release()}", "versions": versions,
            "seed": seed, "load_average": load}
