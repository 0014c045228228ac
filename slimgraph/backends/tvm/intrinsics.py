"""Integer dot-product tensor intrinsics for MetaSchedule, and which one a target gets.

Every intrinsic here computes, for a u8 (or s8) vector ``A`` of 4 and an s8 matrix ``B`` of
LANES x 4 (row-major, contiguous), ``C[i] += sum_k int32(A[k]) * int32(B[i, k])`` for
i < LANES, in one or a few instructions. A kernel whose reduction block reads 4 contiguous
activation bytes and LANES x 4 contiguous weight bytes (``int8.py``'s packed layouts)
tensorizes with any of them.

    name                        target feature    instructions (LLVM intrinsic)        exact
    slimgraph_dot_16x4_vnni     avx512vnni        vpdpbusd zmm (avx512.vpdpbusd.512)    yes
    slimgraph_dot_8x4_avxvnni   avxvnni           {vex} vpdpbusd ymm (vpdpbusd.256)     yes
    slimgraph_dot_16x4_avx512   avx512bw          vpmaddubsw + vpmaddwd zmm             7-bit w
    slimgraph_dot_8x4_avx2      avx2              vpmaddubsw + vpmaddwd + vpaddd ymm    7-bit w
    dot_4x4_i8i8s32_sdot (TVM)  arm64 dotprod     sdot (s8 x s8: activations xor 0x80)  yes

``vpmaddubsw`` multiplies u8 x s8 pairs and adds each pair into an int16 **with saturation**:
with full-range operands 255 * (-128) * 2 = -65280 does not fit. The sum of a pair fits for
any u8 activations when ``|w[2j]| + |w[2j+1]| <= 128``, which 7-bit weights ([-64, 63])
guarantee: those targets report ``reduce_range=True`` (ONNX Runtime's ``reduce_range`` does the
same on such CPUs), and the kernels tensorize with them only when the weights are known to fit
(``int8.py`` checks the constants), else they stay plain (exact) integer code.

TVM 0.27's own ``dot_16x4_vnni`` fails LLVM 22 module verification (``vpdpbusd.512`` now takes
``<64 x i8>`` operands, TVM passes ``<16 x i32>``); ``register_intrinsics`` re-registers it
under its own name with the corrected operands too, so TVM's default "vnni" rules work.
TVM has nothing for AVX2, 256-bit AVX-VNNI or AMX; AMX (tile registers, ``tdpbusd``) would
need a tile-config prologue and is not done.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from .targets import TargetSpec

VNNI_16x4 = "slimgraph_dot_16x4_vnni"
AVXVNNI_8x4 = "slimgraph_dot_8x4_avxvnni"
AVX512_16x4 = "slimgraph_dot_16x4_avx512"
AVX2_8x4 = "slimgraph_dot_8x4_avx2"
ARM_SDOT_4x4 = "dot_4x4_i8i8s32_sdot"  # TVM's (tvm.s_tir.tensor_intrin.arm_cpu)
TVM_VNNI_16x4 = "dot_16x4_vnni"  # TVM's name, re-registered with the fixed implementation


@dataclass(frozen=True)
class Int8Capability:
    """How int8 kernels compile for a target.

    ``intrinsic``: the tensor intrinsic MetaSchedule tensorizes with (None: plain integer
    code, still exact). ``lanes``: output channels per instruction. ``activation_dtype``:
    what the kernels' activations are ("uint8"; "int8" for ARM's s8 x s8 ``sdot``, which
    flips the activations' top bit). ``reduce_range``: the intrinsic saturates int16 pairs, so
    weights must be 7-bit ([-64, 63]) for it to be used (exact either way).
    """

    intrinsic: str | None
    reduce_range: bool
    description: str
    lanes: int = 16
    activation_dtype: str = "uint8"
    features: tuple[str, ...] = ()

    @property
    def tensorized(self) -> bool:
        return self.intrinsic is not None


# (required LLVM features, capability), first match wins: x86 then arm64.
_X86_TABLE = [
    (("avx512vnni",), Int8Capability(
        VNNI_16x4, False, "AVX512-VNNI vpdpbusd (u8 x s8 -> s32, 16 lanes, exact)", 16)),
    (("avxvnni",), Int8Capability(
        AVXVNNI_8x4, False, "AVX-VNNI vpdpbusd ymm (u8 x s8 -> s32, 8 lanes, exact)", 8)),
    (("avx512bw",), Int8Capability(
        AVX512_16x4, True, "AVX-512BW vpmaddubsw + vpmaddwd (16 lanes; int16 pair saturation: "
                           "needs 7-bit weights)", 16)),
    (("avx2",), Int8Capability(
        AVX2_8x4, True, "AVX2 vpmaddubsw + vpmaddwd (8 lanes; int16 pair saturation: needs "
                        "7-bit weights)", 8)),
]
_ARM_TABLE = [
    (("dotprod",), Int8Capability(
        ARM_SDOT_4x4, False, "Armv8.2 dotprod sdot (s8 x s8 -> s32, 4 lanes, exact; "
                             "activations shifted to s8)", 4, "int8")),
]
_PLAIN = Int8Capability(None, False, "no integer dot-product instruction: plain integer code")


def int8_capability(spec: TargetSpec) -> Int8Capability:
    """Which int8 path ``spec`` gets, from the LLVM features of its CPU and attributes
    (``x86:cascadelake`` -> VNNI, ``x86:haswell``/``x86:znver3`` -> AVX2 + reduce_range,
    ``arm64:dotprod`` -> sdot, ``arm64`` or CUDA -> plain integer code)."""
    if spec.kind == "x86":
        table = _X86_TABLE
    elif spec.kind == "arm64":
        table = _ARM_TABLE
    else:
        return _PLAIN
    have = _features(spec)
    for needed, cap in table:
        if all(have.get(f) for f in needed):
            return Int8Capability(cap.intrinsic, cap.reduce_range, cap.description, cap.lanes,
                                  cap.activation_dtype, needed)
    return _PLAIN


def _features(spec: TargetSpec) -> dict[str, bool]:
    from tvm.target import codegen

    target = spec.to_tvm()
    names = ("avx512vnni", "avxvnni", "avx512bw", "avx2", "dotprod")
    return {f: bool(codegen.target_has_features(f, target)) for f in names}


# ---------------------------------------------------------------- TVMScript definitions

def _desc(lanes: int, a_dtype: str = "uint8"):
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), a_dtype, offset_factor=1)
        B = T.match_buffer(b, (lanes, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


def _vpdpbusd(lanes: int):
    """vpdpbusd with LLVM 22's operand types: <lanes x i32>, <4*lanes x i8>, <4*lanes x i8>."""
    from tvm.script import tirx as T

    intrin = f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"
    bytes_ = 4 * lanes

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (lanes, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            a_u8 = T.reinterpret(T.broadcast(a_i32, lanes), dtype=f"uint8x{bytes_}")
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(intrin),
                C.vload([0], dtype=f"int32x{lanes}"),
                a_u8,
                B.vload([0, 0], dtype=f"int8x{bytes_}"),
                dtype=f"int32x{lanes}",
            )

    return impl


def _pmaddubsw(lanes: int):
    """vpmaddubsw (u8 x s8 pairs -> saturated i16) + vpmaddwd (i16 pairs -> i32) + add."""
    from tvm.script import tirx as T

    if lanes == 8:
        maddubs, maddwd = "llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"
    else:
        maddubs, maddwd = "llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512"
    bytes_, halves = 4 * lanes, 2 * lanes

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (lanes, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            a_u8 = T.reinterpret(T.broadcast(a_i32, lanes), dtype=f"uint8x{bytes_}")
            pairs = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(maddubs),
                a_u8,
                B.vload([0, 0], dtype=f"int8x{bytes_}"),
                dtype=f"int16x{halves}",
            )
            C[T.ramp(T.int32(0), 1, lanes)] = C.vload([0], dtype=f"int32x{lanes}") + (
                T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(maddwd),
                    pairs,
                    T.broadcast(T.int16(1), halves),
                    dtype=f"int32x{lanes}",
                )
            )

    return impl


_REGISTERED: dict[str, tuple[str, ...]] = {}
_TVM_MODULES = {"x86": "tvm.s_tir.tensor_intrin.x86", "arm64": "tvm.s_tir.tensor_intrin.arm_cpu"}


def register_intrinsics(kind: str = "x86") -> tuple[str, ...]:
    """Register the int8 intrinsics of target kind ``kind`` ("x86" | "arm64"); idempotent.
    Returns the names of the intrinsics int8 kernels of that kind may use.

    ``tune.load_tensor_intrinsics(kind)`` calls this after importing TVM's intrinsics of that
    kind without the rest of ``tvm.s_tir.tensor_intrin`` (whose import takes ~20 s on 2
    cores); call that rather than this. TVM's ``x86`` module is imported before the fixed
    ``dot_16x4_vnni`` overrides it (a later import would raise on the duplicate name).
    """
    if kind in _REGISTERED:
        return _REGISTERED[kind]
    if kind not in _TVM_MODULES:
        return ()
    from tvm.s_tir import TensorIntrin

    importlib.import_module(_TVM_MODULES[kind])
    if kind == "arm64":
        _REGISTERED[kind] = (ARM_SDOT_4x4,)
        return _REGISTERED[kind]
    table = {
        VNNI_16x4: (_desc(16), _vpdpbusd(16)),
        AVXVNNI_8x4: (_desc(8), _vpdpbusd(8)),
        AVX512_16x4: (_desc(16), _pmaddubsw(16)),
        AVX2_8x4: (_desc(8), _pmaddubsw(8)),
    }
    for name, (desc, impl) in table.items():
        TensorIntrin.register(name, desc, impl, override=True)
    TensorIntrin.register(TVM_VNNI_16x4, *table[VNNI_16x4], override=True)
    _REGISTERED[kind] = (*table, TVM_VNNI_16x4)
    return _REGISTERED[kind]
