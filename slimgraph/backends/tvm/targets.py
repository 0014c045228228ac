"""Named compilation targets: what a user types ("x86", "x86:skylake-avx512", "arm64",
"cuda:sm_90") and the TVM target dict it stands for.

TVM 0.27 takes targets as JSON dicts (the old ``"llvm -mcpu=..."`` strings raise). A
``TargetSpec`` carries that dict plus what the rest of slimgraph needs to know about it: can it
run on this machine (``is_host``), and which slimgraph pipeline suits it by default.

Host detection never runs TVM's thread pool: calling into TVM's runtime pins the calling thread
to core 0 unless ``TVM_NUM_THREADS`` is set first (see ``configure_runtime_threads``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

from slimgraph.errors import TargetError

DEFAULT_CPU_PIPELINE = "cleanup,const-fold,fold-bn"
DEFAULT_GPU_PIPELINE = "cleanup,const-fold,fold-bn"


@dataclass(frozen=True)
class TargetSpec:
    """One compilation target. ``tvm_target``/``host`` are JSON dicts for ``tvm.target.Target``."""

    name: str
    kind: str  # "x86" | "arm64" | "cuda"
    tvm_target: dict
    host: dict | None
    is_host: bool  # code built for it can run (and be measured) on this machine
    default_pipeline: str
    description: str

    @property
    def mcpu(self) -> str | None:
        return self.tvm_target.get("mcpu")

    @property
    def conv_layout(self) -> str:
        """The data layout convolutions are compiled in: NHWC on CPUs (channels innermost, so
        tuned kernels vectorize over them: 2.35x faster than NCHW on ResNet-18's 3x3 conv stages
        at the same trial budget, tools/layout_eval.py), NCHW (as exported) for TVM's default GPU rules."""
        return "NCHW" if self.kind == "cuda" else "NHWC"

    @property
    def key(self) -> str:
        """Directory-safe key of everything that changes generated code (tuning-cache key)."""
        canon = json.dumps({"target": self.tvm_target, "host": self.host}, sort_keys=True)
        digest = hashlib.sha256(canon.encode()).hexdigest()[:10]
        label = "-".join(
            str(p)
            for p in (self.kind, self.tvm_target.get("mcpu") or self.tvm_target.get("arch"),
                      _cores_label(self.tvm_target))
            if p
        )
        return f"{label}-{digest}"

    def to_tvm(self):
        """The ``tvm.target.Target`` (imports TVM)."""
        import tvm

        if self.host is None:
            return tvm.target.Target(self.tvm_target)
        return tvm.target.Target(self.tvm_target, host=self.host)


def _cores_label(tvm_target: dict) -> str | None:
    cores = tvm_target.get("num-cores")
    return f"{cores}c" if cores else None


# ---------------------------------------------------------------- host detection

def host_arch() -> str:
    """"x86", "arm64" or the raw machine name."""
    machine = platform.machine().lower()
    return {"x86_64": "x86", "amd64": "x86", "aarch64": "arm64", "arm64": "arm64"}.get(
        machine, machine
    )


@functools.lru_cache(maxsize=1)
def host_num_cores() -> int:
    """CPU cores this process may use: the affinity mask, capped by a cgroup CPU quota.

    Cached on first call. slimgraph.backends.tvm calls it at import time, before TVM's thread
    pool can narrow the process affinity to one core.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _cgroup_cpu_quota() -> float | None:
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except OSError:
        return None
    if len(text) != 2 or text[0] == "max":
        return None
    try:
        return int(text[0]) / int(text[1])
    except (ValueError, ZeroDivisionError):
        return None


# Coarse /proc/cpuinfo fallback, most specific first: (required flags, LLVM cpu name).
_X86_FLAG_TABLE: list[tuple[frozenset[str], str]] = [
    (frozenset({"avx512f", "avx512_bf16", "amx_tile"}), "sapphirerapids"),
    (frozenset({"avx512f", "avx512_vnni", "avx512_vbmi2"}), "icelake-server"),
    (frozenset({"avx512f", "avx512_vnni"}), "cascadelake"),
    (frozenset({"avx512f", "avx512bw", "avx512vl"}), "skylake-avx512"),
    (frozenset({"avx2", "fma", "bmi2"}), "x86-64-v3"),
    (frozenset({"sse4_2", "popcnt"}), "x86-64-v2"),
]


def _cpuinfo_flags() -> set[str]:
    from slimgraph.environment import cpu_flags

    return cpu_flags()


def _mcpu_from_flags(flags: set[str]) -> str:
    for required, name in _X86_FLAG_TABLE:
        if required <= flags:
            return name
    return "x86-64"


@functools.lru_cache(maxsize=1)
def host_mcpu() -> str:
    """LLVM's name for this machine's CPU ("sapphirerapids", "skylake-avx512", ...).

    Asks LLVM through TVM when it is importable; falls back to /proc/cpuinfo flags.
    """
    name = None
    try:
        from tvm.target import codegen

        name = str(codegen.llvm_get_system_cpu())
    except Exception:  # noqa: BLE001 - any TVM/LLVM failure falls back to cpuinfo
        name = None
    if name and name != "generic":
        return name
    if host_arch() == "x86":
        return _mcpu_from_flags(_cpuinfo_flags())
    return "generic"


# LLVM lists scheduling hints ("fast-*", "slow-3ops-lea", ...) next to ISA extensions; only the
# ISA extensions decide whether code runs.
_TUNING_FEATURE = re.compile(
    r"^(fast|slow|faster|false-deps|prefer|tuning|idiv|lea-|pad-|use-|allow-|avoid-|"
    r"branchfusion|macrofusion|sbb-dep|no-bypass|insert-vzeroupper|vzeroupper|harden|"
    r"retpoline|lvi|seses|ermsb)"
)


def _llvm_cpu_features(mcpu: str) -> set[str] | None:
    """ISA features LLVM enables for ``mcpu`` (scheduling hints dropped)."""
    try:
        import tvm
        from tvm.target import codegen

        feats = codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": mcpu}))
    except Exception:  # noqa: BLE001 - unknown to LLVM or TVM missing
        return None
    return {f for f in feats if not _TUNING_FEATURE.match(f)}


def _is_known_cpu(mcpu: str, triple: str = "x86_64-linux-gnu") -> bool:
    try:
        from tvm.target import codegen

        return bool(codegen.llvm_is_valid_cpu(mcpu, triple))
    except Exception:  # noqa: BLE001 - without TVM accept the name; the build will tell
        return True


def _runs_here(mcpu: str) -> bool:
    """Code for ``mcpu`` runs on this host: host is x86 and has every feature ``mcpu`` uses."""
    if host_arch() != "x86":
        return False
    if mcpu == host_mcpu():
        return True
    wanted, have = _llvm_cpu_features(mcpu), _llvm_cpu_features(host_mcpu())
    return wanted is not None and have is not None and wanted <= have


# ---------------------------------------------------------------- the target table

def _x86(mcpu: str | None) -> TargetSpec:
    detected = mcpu is None
    mcpu = mcpu or host_mcpu()
    if not detected and not _is_known_cpu(mcpu):
        raise TargetError(f"x86:{mcpu}: LLVM does not know CPU {mcpu!r}")
    tvm_target = {"kind": "llvm", "mcpu": mcpu, "num-cores": host_num_cores()}
    if host_arch() != "x86":
        tvm_target["mtriple"] = "x86_64-linux-gnu"
    return TargetSpec(
        name="x86" if detected else f"x86:{mcpu}",
        kind="x86",
        tvm_target=tvm_target,
        host=None,
        is_host=_runs_here(mcpu),
        default_pipeline=DEFAULT_CPU_PIPELINE,
        description=(f"this machine's x86 CPU ({mcpu}, {host_num_cores()} cores)" if detected
                     else f"x86 CPU {mcpu}, {host_num_cores()} cores"),
    )


# arm64 ISA extensions a user may ask for: option -> LLVM attribute. `dotprod` (Armv8.2 SDOT/UDOT,
# Cortex-A55/A76 and later) speeds up int8 kernels 2-4x; `i8mm` (Armv8.6 SMMLA, Cortex-A510/X2
# and later) more again. Code using them faults on cores without them, so they are opt-in.
_ARM64_FEATURES = {"dotprod": "+dotprod", "i8mm": "+i8mm", "fp16": "+fullfp16"}


def _arm64(option: str | None) -> TargetSpec:
    """``arm64``, ``arm64:dotprod``, ``arm64:dotprod+i8mm``, ``arm64:cortex-a76``,
    ``arm64:cortex-a76+dotprod``: an LLVM CPU name and/or ISA extensions joined by ``+``."""
    mattr, mcpu = ["+neon"], None
    for part in (option or "").split("+"):
        part = part.strip()
        if not part:
            continue
        if part in _ARM64_FEATURES:
            mattr.append(_ARM64_FEATURES[part])
        elif re.fullmatch(r"[a-z][a-z0-9.-]*", part) and mcpu is None:
            mcpu = part
        else:
            raise TargetError(f"arm64:{option}: {part!r} is neither an extension "
                              f"({', '.join(_ARM64_FEATURES)}) nor an LLVM CPU name")
    if mcpu is not None and not _is_known_cpu(mcpu, "aarch64-linux-gnu"):
        raise TargetError(f"arm64:{option}: LLVM does not know the aarch64 CPU {mcpu!r}")
    tvm_target: dict = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": mattr,
                        "num-cores": host_num_cores()}
    if mcpu:
        tvm_target["mcpu"] = mcpu
    extras = [a[1:] for a in mattr[1:]]
    return TargetSpec(
        name="arm64" if not option else f"arm64:{option}",
        kind="arm64",
        tvm_target=tvm_target,
        host=None,
        is_host=host_arch() == "arm64" and not extras,
        default_pipeline=DEFAULT_CPU_PIPELINE,
        description="64-bit ARM (aarch64, NEON" + "".join(f", {e}" for e in extras)
                    + (f", {mcpu}" if mcpu else "")
                    + "); cross-compiled with aarch64-linux-gnu-g++ or --cc",
    )


# What MetaSchedule needs in a CUDA target dict (TVM_NOTES, CUDA section); H100-class values.
_CUDA_LIMITS = {"max_threads_per_block": 1024, "max_shared_memory_per_block": 49152,
                "thread_warp_size": 32, "registers_per_block": 65536, "max_num_threads": 1024}


# NVIDIA compute capabilities NVRTC 12.9 compiles for (Maxwell to Blackwell)
CUDA_ARCHS = {50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90, 100, 101, 103, 120, 121}


def _cuda(arch: str | None) -> TargetSpec:
    arch = arch or "sm_90"
    if not re.fullmatch(r"sm_\d{2,3}[a-z]?", arch):
        raise TargetError(f"cuda:{arch}: expected an arch like sm_80 or sm_90")
    if int(re.sub(r"\D", "", arch)) not in CUDA_ARCHS:
        raise TargetError(f"cuda:{arch}: no such NVIDIA architecture; known: "
                          + ", ".join(f"sm_{a}" for a in sorted(CUDA_ARCHS)))
    return TargetSpec(
        name=f"cuda:{arch}",
        kind="cuda",
        tvm_target={"kind": "cuda", "arch": arch, **_CUDA_LIMITS},
        host={"kind": "llvm"},
        is_host=_cuda_device_present(),
        default_pipeline=DEFAULT_GPU_PIPELINE,
        description=f"NVIDIA GPU {arch}; CUDA source compiled when the artifact is loaded",
    )


def _cuda_device_present() -> bool:
    return Path("/dev/nvidia0").exists()


# family -> (factory(option or None), one-line help). Names are "family" or "family:option".
_FAMILIES = {
    "x86": (_x86, "x86 CPU; 'x86' is this machine, 'x86:<llvm cpu>' e.g. x86:skylake-avx512"),
    "arm64": (_arm64, "aarch64 CPU with NEON, cross-compiled; options joined by '+': "
                      "dotprod, i8mm, fp16, an LLVM cpu (arm64:cortex-a76+dotprod)"),
    "cuda": (_cuda, "NVIDIA GPU; 'cuda:sm_80', 'cuda:sm_90', ... (default sm_90)"),
}

# The names list_targets() returns: one of each family plus common explicit CPUs.
_LISTED = ["x86", "x86:skylake-avx512", "x86:znver4", "x86:x86-64-v3", "arm64", "arm64:dotprod",
           "arm64:dotprod+i8mm", "cuda:sm_80", "cuda:sm_86", "cuda:sm_89", "cuda:sm_90"]


def get_target(name: str | TargetSpec) -> TargetSpec:
    """The ``TargetSpec`` for ``name``; ``TargetError`` listing the known names otherwise."""
    if isinstance(name, TargetSpec):
        return name
    family, _, option = str(name).strip().partition(":")
    if family not in _FAMILIES:
        known = ", ".join(_LISTED)
        families = "; ".join(f"{k}: {v[1]}" for k, v in _FAMILIES.items())
        raise TargetError(f"unknown target {name!r}. Known targets: {known} ({families})")
    return _FAMILIES[family][0](option or None)


def list_targets() -> list[TargetSpec]:
    """One spec per listed name (x86 host, explicit x86 CPUs, arm64, CUDA archs)."""
    return [get_target(n) for n in _LISTED]


def configure_runtime_threads() -> int:
    """Make TVM's CPU runtime use every core this process may use.

    TVM sizes its thread pool at hardware_concurrency()/2 on x86 (it assumes hyper-threading),
    which is 1 thread on a 2-core VM, and then pins the calling thread to core 0 so that later
    PyTorch / ONNX Runtime threads inherit a one-core mask. Setting ``TVM_NUM_THREADS`` before
    the pool starts avoids both. A value already in the environment wins.
    """
    cores = host_num_cores()
    os.environ.setdefault("TVM_NUM_THREADS", str(cores))
    return int(os.environ["TVM_NUM_THREADS"])
