"""Integer kernels: the quantized reference ops, their TVM lowerings, the dot-product intrinsics.

Every comparison here is bit-exact (``==``), never "within one quantization step": the ops'
arithmetic is all-integer (the requantization ``floor(acc * scale + 1/2)`` is evaluated exactly
as ``(acc * mult + 2**(shift-1)) >> shift``), and the float edges are single IEEE operations
(one float32 division then round-half-even; one float32 multiplication) that PyTorch, numpy and
LLVM compute identically.

Assembly checks build one tensorized schedule per kernel without tuning (``int8.sketch_database``)
and look for the target's instruction; builds for CPUs this machine can run are run too. The
test that tunes is marked slow.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

import slimgraph.ops  # noqa: F401 - registers torch.ops.slimgraph.*
from slimgraph.backends.tvm import build, get_target, int8, lower
from slimgraph.backends.tvm import intrinsics as intr
from slimgraph.backends.tvm.tune import (
    apply_and_build,
    load_tensor_intrinsics,
    open_database,
    prepare,
)
from slimgraph.errors import BackendError, TargetError
from slimgraph.ops import QuantizationError, requant_multiplier

ops = torch.ops.slimgraph


# ---------------------------------------------------------------- independent numpy reference

def np_requant(acc: np.ndarray, scale: np.ndarray, out_zp: int, qmin: int, qmax: int):
    """floor(acc * scale + 1/2) with exact rationals (no fixed point), then zp and clamp."""
    scales = [Fraction(float(np.float32(s))) for s in scale]
    out = np.empty(acc.shape, np.int64)
    for idx, v in np.ndenumerate(acc):
        y = math.floor(int(v) * scales[idx[1]] + Fraction(1, 2))
        out[idx] = min(max(y + out_zp, qmin), qmax)
    return out.astype(np.uint8)


def np_qconv2d(x, x_zp, w, bias, scale, out_zp, stride, padding, dilation, groups, qmin, qmax):
    n, c, h, wd = x.shape
    o, i, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    xp = np.full((n, c, h + 2 * ph, wd + 2 * pw), x_zp, np.int64)
    xp[:, :, ph:ph + h, pw:pw + wd] = x
    xs = xp - x_zp
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    acc = np.zeros((n, o, oh, ow), np.int64)
    per_group = o // groups
    for oc in range(o):
        g = oc // per_group
        for a in range(kh):
            for b in range(kw):
                patch = xs[:, g * i:(g + 1) * i, a * dh:a * dh + sh * (oh - 1) + 1:sh,
                           b * dw:b * dw + sw * (ow - 1) + 1:sw]
                acc[:, oc] += np.einsum("nchw,c->nhw", patch, w[oc, :, a, b].astype(np.int64))
    acc += bias.astype(np.int64)[None, :, None, None]
    return np_requant(acc, scale, out_zp, qmin, qmax)


def np_qlinear(x, x_zp, w, bias, scale, out_zp, qmin, qmax):
    acc = (x.astype(np.int64) - x_zp) @ w.astype(np.int64).T + bias.astype(np.int64)
    return np_requant(acc, scale, out_zp, qmin, qmax)


def np_quantize(x, scale, zp):
    q = np.round(x / np.float32(scale)) + zp  # float32 division, round half to even
    return np.clip(q, 0, 255).astype(np.uint8)


def np_dequantize(q, scale, zp):
    return (q.astype(np.int32) - zp).astype(np.float32) * np.float32(scale)


# ---------------------------------------------------------------- modules

def _rand_int(gen, lo, hi, shape, dtype):
    return torch.randint(lo, hi, shape, generator=gen, dtype=dtype)


class QConv(torch.nn.Module):
    def __init__(self, c=8, o=20, k=3, stride=(1, 1), padding=(1, 1), dilation=(1, 1),
                 groups=1, x_zp=131, out_zp=7, qmin=7, qmax=200, wbits=8, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        lim = 2 ** (wbits - 1)
        self.register_buffer("w", _rand_int(gen, -lim, lim, (o, c // groups, k, k), torch.int8))
        self.register_buffer("b", _rand_int(gen, -4000, 4000, (o,), torch.int32))
        self.register_buffer("s", torch.rand(o, generator=gen) * 3e-3 + 1e-4)
        self.args = (x_zp, out_zp, list(stride), list(padding), list(dilation), groups, qmin,
                     qmax)

    def forward(self, x):
        x_zp, out_zp, stride, padding, dilation, groups, qmin, qmax = self.args
        return ops.qconv2d(x, x_zp, self.w, self.b, self.s, out_zp, stride, padding, dilation,
                           groups, qmin, qmax)

    def numpy_reference(self, x):
        x_zp, out_zp, stride, padding, dilation, groups, qmin, qmax = self.args
        return np_qconv2d(x, x_zp, self.w.numpy(), self.b.numpy(), self.s.numpy(), out_zp,
                          stride, padding, dilation, groups, qmin, qmax)


class QNet(torch.nn.Module):
    """float -> quantize -> qconv (pad, nonzero zp) -> depthwise qconv -> qlinear -> float."""

    def __init__(self, c=16, o=32, hw=6, wbits=8, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        lim = 2 ** (wbits - 1)
        self.conv = QConv(c, o, 3, x_zp=118, out_zp=3, qmin=3, qmax=255, wbits=wbits, seed=seed)
        self.dw = QConv(o, o, 3, groups=o, x_zp=3, out_zp=0, qmin=0, qmax=250, wbits=wbits,
                        seed=seed + 1)
        k = o * hw * hw
        self.register_buffer("lw", _rand_int(gen, -lim, lim, (10, k), torch.int8))
        self.register_buffer("lb", _rand_int(gen, -4000, 4000, (10,), torch.int32))
        self.register_buffer("ls", torch.rand(10, generator=gen) * 1e-3 + 1e-5)

    def forward(self, x):
        q = ops.quantize_u8(x, 0.0213, 118)
        y = self.dw(self.conv(q))
        z = ops.qlinear(y.reshape(y.shape[0], -1), 0, self.lw, self.lb, self.ls, 128, 0, 255)
        return ops.dequantize_u8(z, 0.05, 128), y


CONV_CASES = {
    "pad-nonzero-zp": dict(c=8, o=20, k=3, padding=(1, 1), x_zp=131),
    "stride2-asym-pad": dict(c=6, o=16, k=3, stride=(2, 2), padding=(2, 1), x_zp=255),
    "dilated-groups": dict(c=8, o=8, k=3, padding=(2, 2), dilation=(2, 2), groups=2, x_zp=9),
    "depthwise": dict(c=12, o=12, k=3, padding=(1, 1), groups=12, x_zp=200, qmin=0, qmax=255),
    "1x1-zp0": dict(c=3, o=17, k=1, padding=(0, 0), x_zp=0, out_zp=128, qmin=128, qmax=255),
    "rgb-stem": dict(c=3, o=16, k=7, stride=(2, 2), padding=(3, 3), x_zp=77),
    "grey-dilated": dict(c=1, o=8, k=3, padding=(2, 2), dilation=(2, 2), x_zp=5),
}


def _u8(shape, seed=0):
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


# ---------------------------------------------------------------- the reference ops

@pytest.mark.parametrize("case", list(CONV_CASES))
def test_qconv2d_reference_matches_numpy(case):
    cfg = CONV_CASES[case]
    model, x = QConv(**cfg), _u8((2, cfg["c"], 9, 7))
    assert np.array_equal(model(x).numpy(), model.numpy_reference(x.numpy()))


def test_qlinear_reference_matches_numpy():
    gen = torch.Generator().manual_seed(3)
    x, w = _u8((5, 37)), _rand_int(gen, -128, 128, (11, 37), torch.int8)
    b, s = _rand_int(gen, -5000, 5000, (11,), torch.int32), torch.rand(11, generator=gen) * 1e-3
    out = ops.qlinear(x, 77, w, b, s, 60, 10, 240).numpy()
    assert np.array_equal(out, np_qlinear(x.numpy(), 77, w.numpy(), b.numpy(), s.numpy(), 60,
                                          10, 240))


def _half_cases():
    """qlinear with acc * scale landing exactly on +-0.5 and +-1.5: round half up."""
    x = torch.tensor([[3], [1], [0], [0]], dtype=torch.uint8)
    w = torch.ones((1, 1), dtype=torch.int8)
    return x, w, torch.tensor([-4], dtype=torch.int32), torch.tensor([0.5])


def test_requantization_rounds_half_up():
    x, w, b, s = _half_cases()  # acc = x - 4 = -1, -3, -4, -4 -> -0.5, -1.5, -2, -2
    out = ops.qlinear(x, 0, w, b, s, 100, 0, 255).numpy().ravel()
    assert out.tolist() == [100, 99, 98, 98]  # floor(-0.5 + 0.5) = 0, floor(-1.5 + 0.5) = -1
    out = ops.qlinear(x, 0, w, -b, s, 100, 0, 255).numpy().ravel()  # +3.5, +2.5, +2, +2
    assert out.tolist() == [104, 103, 102, 102]


def test_requant_multiplier_is_exact():
    rng = np.random.default_rng(0)
    scales = np.concatenate([10.0 ** rng.uniform(-9, 3, 200), [1.0, 0.5, 2.0**-30]])
    mult, shift = requant_multiplier(scales.astype(np.float32))
    for s, m, k in zip(scales.astype(np.float32), mult, shift, strict=True):
        assert Fraction(float(s)) == Fraction(int(m), 2 ** int(k))
        assert 0 < m < 2**24 and 1 <= k <= 62
    mult, shift = requant_multiplier(np.float32([1e-30, 0.0]))  # acc * scale < 1/2: always 0
    assert mult.tolist() == [0, 0] and shift.tolist() == [1, 1]
    for bad in (-1.0, np.nan, np.inf, 2.0**23):
        with pytest.raises(QuantizationError):
            requant_multiplier(np.float32([bad]))


def test_quantize_and_dequantize_match_numpy_including_ties():
    x = torch.cat([torch.randn(500, generator=torch.Generator().manual_seed(0)) * 3,
                   torch.tensor([0.125, 0.375, -0.125, -0.375, 0.625, 1e9, -1e9])])
    q = ops.quantize_u8(x, 0.25, 128)  # the ties land on k + 0.5: half to even
    assert np.array_equal(q.numpy(), np_quantize(x.numpy(), 0.25, 128))
    assert q[-7:-2].tolist() == [128, 130, 128, 126, 130]
    q = ops.quantize_u8(x, 0.0213, 118)
    assert np.array_equal(q.numpy(), np_quantize(x.numpy(), 0.0213, 118))
    assert np.array_equal(ops.dequantize_u8(q, 0.0213, 118).numpy(),
                          np_dequantize(q.numpy(), 0.0213, 118))


def np_qadd(a, a_zp, a_scale, b, b_zp, b_scale, out_zp, qmin, qmax):
    """floor((a - a_zp) * a_scale + (b - b_zp) * b_scale + 1/2) with exact rationals."""
    sa, sb = (Fraction(float(np.float32(s))) for s in (a_scale, b_scale))
    a, b = np.broadcast_arrays(a.astype(np.int64), b.astype(np.int64))
    out = np.empty(a.shape, np.int64)
    for idx in np.ndindex(a.shape):
        y = math.floor((int(a[idx]) - a_zp) * sa + (int(b[idx]) - b_zp) * sb + Fraction(1, 2))
        out[idx] = min(max(y + out_zp, qmin), qmax)
    return out.astype(np.uint8)


QADD_CASES = {  # (a shape, b shape, a_zp, a_scale, b_zp, b_scale, out_zp, qmin, qmax)
    "resnet-relu": ((2, 5, 3, 4), (2, 5, 3, 4), 7, 0.61, 130, 1.37, 9, 9, 255),
    "broadcast-channels": ((2, 5, 3, 4), (1, 5, 1, 1), 0, 2.5, 255, 0.003, 128, 0, 255),
    "scales-far-apart": ((3, 7), (7,), 100, 2e-4, 3, 5e3, 0, 0, 200),  # 2**-25 apart
}


@pytest.mark.parametrize("case", list(QADD_CASES))
def test_qadd_reference_matches_numpy(case):
    sa, sb, *p = QADD_CASES[case]
    a, b = _u8(sa, seed=1), _u8(sb, seed=2)
    args = (a, p[0], p[1], b, p[2], p[3], *p[4:])
    assert np.array_equal(ops.qadd(*args).numpy(), np_qadd(a.numpy(), p[0], p[1], b.numpy(),
                                                           *p[2:]))


def test_qadd_rounds_half_up_and_checks_its_arguments():
    a = torch.tensor([1, 3, 5, 0], dtype=torch.uint8)  # (a - 0) * 0.5 + 0: 0.5, 1.5, 2.5, 0
    assert ops.qadd(a, 0, 0.5, a * 0, 0, 1.0, 10, 0, 255).tolist() == [11, 12, 13, 10]
    with pytest.raises(QuantizationError, match="broadcast"):
        ops.qadd(a, 0, 0.5, _u8((3,)), 0, 1.0, 10, 0, 255)
    with pytest.raises(QuantizationError, match="apart"):
        ops.qadd(a, 0, 1e4, a, 0, 1e-6, 10, 0, 255)
    with pytest.raises(QuantizationError, match="b must"):
        ops.qadd(a, 0, 0.5, a.to(torch.int8), 0, 1.0, 10, 0, 255)


class QAdd(torch.nn.Module):
    def __init__(self, params):
        super().__init__()
        self.p = params

    def forward(self, a, b):
        a_zp, a_scale, b_zp, b_scale, out_zp, qmin, qmax = self.p
        return ops.qadd(a, a_zp, a_scale, b, b_zp, b_scale, out_zp, qmin, qmax)


@pytest.mark.parametrize("case", list(QADD_CASES))
def test_qadd_tvm_is_bit_exact(case):
    sa, sb, *p = QADD_CASES[case]
    model, a, b = QAdd(p), _u8(sa, seed=3), _u8(sb, seed=4)
    assert np.array_equal(build(model, (a, b), "x86", progress=False)(a, b)[0],
                          model(a, b).numpy())


@pytest.mark.parametrize("bad, match", [
    (dict(x_zp=256), "x_zp"), (dict(qmin=9, qmax=8), "qmin"), (dict(x_dtype=torch.int8), "x must"),
    (dict(bias_dtype=torch.int64), "bias must"), (dict(groups=3), "groups"),
])
def test_invalid_arguments_raise(bad, match):
    x = _u8((1, 4, 5, 5)).to(bad.get("x_dtype", torch.uint8))
    w = torch.zeros((8, 4, 3, 3), dtype=torch.int8)
    b = torch.zeros(8, dtype=bad.get("bias_dtype", torch.int32))
    with pytest.raises(QuantizationError, match=match):
        ops.qconv2d(x, bad.get("x_zp", 0), w, b, torch.ones(8), 0, [1, 1], [1, 1], [1, 1],
                    bad.get("groups", 1), bad.get("qmin", 0), bad.get("qmax", 255))


def test_ops_survive_export_as_single_nodes():
    ep = torch.export.export(QNet().eval(), (torch.randn(1, 16, 6, 6),))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    for op in ("quantize_u8", "qconv2d", "qlinear", "dequantize_u8"):
        assert any(t.startswith(f"slimgraph.{op}.") for t in targets), targets
    assert sum(t.startswith("slimgraph.qconv2d.") for t in targets) == 2


# ---------------------------------------------------------------- TVM lowering, untuned

@pytest.mark.parametrize("case", list(CONV_CASES))
def test_qconv2d_tvm_untuned_is_bit_exact(case):
    cfg = CONV_CASES[case]
    model, x = QConv(**cfg), _u8((1, cfg["c"], 9, 7), seed=1)
    out = build(model, (x,), "x86", progress=False)(x)[0]
    assert np.array_equal(out, model(x).numpy())


def test_quantized_graph_tvm_untuned_is_bit_exact():
    model, x = QNet().eval(), torch.randn(2, 16, 6, 6, generator=torch.Generator().manual_seed(5))
    compiled = build(model, (x,), "x86", progress=False)
    with torch.no_grad():
        ref = [t.numpy() for t in model(x)]
    out = compiled(x)
    assert out[0].dtype == np.float32 and out[1].dtype == np.uint8
    assert all(np.array_equal(o, r) for o, r in zip(out, ref, strict=True))


def test_rounding_ties_are_bit_exact_in_tvm():
    x, w, b, s = _half_cases()

    class Half(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", w)
            self.register_buffer("b", b)
            self.register_buffer("s", s)

        def forward(self, q):
            return ops.qlinear(q, 0, self.w, self.b, self.s, 100, 0, 255)

    assert build(Half(), (x,), "x86", progress=False)(x)[0].ravel().tolist() == [100, 99, 98, 98]


def test_weights_must_be_constants():
    class WeightAsInput(torch.nn.Module):
        def forward(self, x, w):
            return ops.qlinear(x, 0, w, torch.zeros(4, dtype=torch.int32), torch.ones(4), 0, 0,
                               255)

    inputs = (_u8((1, 8)), torch.zeros((4, 8), dtype=torch.int8))
    with pytest.raises(BackendError, match="w must be a constant"):
        lower(WeightAsInput(), inputs)


# ---------------------------------------------------------------- capabilities, intrinsics

@pytest.mark.parametrize("target, intrinsic, reduce_range", [
    ("x86:cascadelake", intr.VNNI_16x4, False),
    ("x86:sapphirerapids", intr.VNNI_16x4, False),
    ("x86:alderlake", intr.AVXVNNI_8x4, False),
    ("x86:skylake-avx512", intr.AVX512_16x4, True),
    ("x86:haswell", intr.AVX2_8x4, True),
    ("x86:znver3", intr.AVX2_8x4, True),
    ("x86:x86-64", None, False),
    ("arm64:dotprod", intr.ARM_SDOT_4x4, False),
    ("arm64", None, False),
    ("cuda:sm_90", None, False),
])
def test_int8_capability_follows_target_features(target, intrinsic, reduce_range):
    cap = intr.int8_capability(get_target(target))
    assert (cap.intrinsic, cap.reduce_range) == (intrinsic, reduce_range)
    assert cap.activation_dtype == ("int8" if target == "arm64:dotprod" else "uint8")


def _cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    match = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    return set(match.group(1).split()) if match else set()


# intrinsic -> (target that has it, /proc/cpuinfo flags needed to run its code, instruction)
INTRINSIC_TARGETS = {
    intr.VNNI_16x4: ("x86:cascadelake", {"avx512f", "avx512bw", "avx512_vnni"}, "vpdpbusd"),
    intr.AVXVNNI_8x4: ("x86:alderlake", {"avx2", "avx_vnni"}, "{vex}\tvpdpbusd"),
    intr.AVX512_16x4: ("x86:skylake-avx512", {"avx512f", "avx512bw"}, "vpmaddubsw"),
    intr.AVX2_8x4: ("x86:haswell", {"avx2"}, "vpmaddubsw"),
}


def test_host_capability_matches_cpuinfo():
    cap, flags = intr.int8_capability(get_target("x86")), _cpu_flags()
    if "avx512_vnni" in flags:
        assert cap.intrinsic == intr.VNNI_16x4
    elif "avx2" in flags:
        assert cap.intrinsic is not None
    assert intr.int8_capability(get_target("x86:znver3")).reduce_range  # never assumed


def _dot_kernel(intrinsic: str, lanes: int):
    """C[o, i] = sum_k A[k] * B[o, k/4, i, k%4], tensorized directly with ``intrinsic``."""
    from tvm import s_tir, te

    a = te.placeholder((64,), "uint8", name="A")
    b = te.placeholder((2, 16, lanes, 4), "int8", name="B")
    k, kk = te.reduce_axis((0, 16), "k"), te.reduce_axis((0, 4), "kk")
    c = te.compute((2, lanes), lambda o, i: te.sum(
        a[k * 4 + kk].astype("int32") * b[o, k, i, kk].astype("int32"), axis=[k, kk]), name="C")
    sch = s_tir.Schedule(te.create_prim_func([a, b, c]))
    block = sch.get_sblock("C")
    o, i, ko, ki = sch.get_loops(block)
    sch.reorder(o, ko, i, ki)
    sch.decompose_reduction(block, ko)
    sch.tensorize(i, intrinsic)
    return sch.mod


@pytest.mark.parametrize("intrinsic", list(INTRINSIC_TARGETS))
def test_x86_intrinsic_compiles_and_is_exact_on_7bit_weights(intrinsic):
    import tvm

    target, flags, instruction = INTRINSIC_TARGETS[intrinsic]
    load_tensor_intrinsics("x86")
    lanes = 16 if "16x4" in intrinsic else 8
    lib = tvm.compile(_dot_kernel(intrinsic, lanes), target=get_target(target).to_tvm())
    assert instruction in lib.mod.inspect_source("asm")
    if not flags <= _cpu_flags():
        pytest.skip(f"this CPU lacks {sorted(flags - _cpu_flags())}: compiled, not run")
    rng = np.random.default_rng(0)
    a = np.full(64, 255, np.uint8)  # the worst case for int16 pairs
    b = rng.integers(-64, 64, (2, 16, lanes, 4)).astype(np.int8)
    c = tvm.runtime.tensor(np.zeros((2, lanes), np.int32))
    lib(tvm.runtime.tensor(a), tvm.runtime.tensor(b), c)
    ref = np.einsum("kq,okiq->oi", a.astype(np.int64).reshape(16, 4), b.astype(np.int64))
    assert np.array_equal(c.numpy(), ref)


def test_avx2_dot_saturates_on_full_range_weights():
    """Why AVX2/AVX-512BW need 7-bit weights: 255 * 127 * 2 overflows vpmaddubsw's int16."""
    import tvm

    if "avx2" not in _cpu_flags():
        pytest.skip("this CPU has no AVX2")
    load_tensor_intrinsics("x86")
    lib = tvm.compile(_dot_kernel(intr.AVX2_8x4, 8), target=get_target("x86:haswell").to_tvm())
    a, b = np.full(64, 255, np.uint8), np.full((2, 16, 8, 4), 127, np.int8)
    c = tvm.runtime.tensor(np.zeros((2, 8), np.int32))
    lib(tvm.runtime.tensor(a), tvm.runtime.tensor(b), c)
    assert (c.numpy() == 32 * 32767).all()  # exact would be 64 * 255 * 127 = 2072640
    assert not int8.pairs_fit_int16(b)


@pytest.mark.parametrize("pair, fits", [
    ((64, 64), True), ((65, 64), False), ((-64, -64), True), ((-65, -64), False),
    ((127, -128), True), ((127, 2), False), ((-128, 0), True), ((63, -64), True),
])
def test_pairs_fit_int16(pair, fits):
    w = np.zeros((1, 1, 16, 4), np.int8)
    w[0, 0, 3, 2:] = pair
    assert int8.pairs_fit_int16(w) is fits


def test_tvm_vnni_intrinsic_is_replaced_by_the_fixed_one():
    from tvm.s_tir import TensorIntrin

    load_tensor_intrinsics("x86")
    impl = TensorIntrin.get(intr.TVM_VNNI_16x4).impl.script()
    assert "uint8x64" in impl and "int8x64" in impl  # LLVM 22's <64 x i8> operands


# ---------------------------------------------------------------- tensorized builds (assembly)

def _prepared(model, inputs, target):
    """(spec, ``model`` lowered with the int8 ops for ``target`` and prepared for tuning)."""
    spec = get_target(target)
    return spec, prepare(lower(model, inputs, custom_convert_map=int8.convert_map(spec)), spec)


def _sketch_build(model, inputs, target, db_dir):
    """A build whose int8 kernels use one unmeasured tensorized schedule each."""
    spec, prepared = _prepared(model, inputs, target)
    _, done, missing = int8.sketch_database(prepared, spec, open_database(db_dir))
    return apply_and_build(prepared, spec, db_dir), sorted(done), missing


def _tensorized_ops(task_names) -> set[str]:
    """The ops whose tasks tensorized ("fused_qlinear_dequantize_u81" -> qlinear)."""
    return {op for op in ("qconv2d_grouped", "qconv2d", "qlinear")
            for name in task_names if re.search(rf"(^|_){op}\d*(_(?!pack|grouped)|$)", name)}


def _run(executable, inputs):
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(executable, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(t.numpy())) for t in inputs])
    return [o.numpy() for o in out]


@pytest.fixture(scope="module")
def qnet7():
    """QNet with 7-bit weights (pairs fit int16: every x86 intrinsic may tensorize it)."""
    model = QNet(wbits=7).eval()
    x = torch.randn(1, 16, 6, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model, x, [t.numpy() for t in model(x)]


@pytest.mark.parametrize("target, flags, instruction", [
    ("x86:cascadelake", {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}, "vpdpbusd"),
    ("x86:haswell", {"avx2"}, "vpmaddubsw"),
    ("x86:alderlake", {"avx2", "avx_vnni"}, "{vex}\tvpdpbusd"),
])
def test_x86_tensorized_build_has_dot_instructions(qnet7, tmp_path, target, flags, instruction):
    model, x, ref = qnet7
    ex, done, missing = _sketch_build(model, (x,), target, tmp_path)
    assert _tensorized_ops(done) == {"qconv2d", "qlinear"} and not missing  # depthwise: plain
    asm = int8.assembly(ex)
    assert instruction in asm
    if not flags <= _cpu_flags():
        pytest.skip(f"this CPU lacks {sorted(flags - _cpu_flags())}: built, not run")
    out = _run(ex, (x,))
    assert all(np.array_equal(o, r) for o, r in zip(out, ref, strict=True))


def test_avx2_keeps_full_range_weights_plain_and_exact(tmp_path):
    model = QNet(wbits=8).eval()  # random full-range weights: pairs do not fit int16
    x = torch.randn(1, 16, 6, 6, generator=torch.Generator().manual_seed(4))
    ex, done, _ = _sketch_build(model, (x,), "x86:haswell", tmp_path)
    assert done == [] and "vpmaddubsw" not in int8.assembly(ex)
    if "avx2" in _cpu_flags():
        with torch.no_grad():
            ref = [t.numpy() for t in model(x)]
        assert all(np.array_equal(o, r) for o, r in zip(_run(ex, (x,)), ref, strict=True))


def test_arm64_dotprod_build_has_sdot(qnet7, tmp_path):
    from slimgraph.backends.tvm import device

    model, x, ref = qnet7
    spec = get_target("arm64:dotprod")
    ex, done, _ = _sketch_build(model, (x,), spec, tmp_path / "db")
    assert _tensorized_ops(done) == {"qconv2d", "qlinear"}
    assert re.search(r"\bsdot\b", int8.assembly(ex))
    try:  # numerics under qemu when the toolchain is there (tools/setup_toolchains.sh)
        device.check_cross_compiler()
        device.check_qemu()
        device.runner_path("arm64")
    except TargetError as err:
        pytest.skip(f"sdot found; not run: {err}")
    # the same schedules through build(): its database argument applies the sketches
    compiled = build(model, (x,), spec, database=tmp_path / "db", progress=False,
                     custom_convert_map=int8.convert_map(spec))
    out, _ = device.run_with_runner(compiled.save(tmp_path / "arm"), [x.numpy()], repeat=1,
                                    warmup=0)
    assert all(np.array_equal(o, r) for o, r in zip(out, ref, strict=True))


class QResidual(torch.nn.Module):
    """quantize -> conv a -> conv b; qadd(b, a) with a ReLU clamp -> dequantize: the add fuses
    into conv b's kernel."""

    def __init__(self):
        super().__init__()
        self.a = QConv(8, 16, 3, padding=(1, 1), x_zp=90, out_zp=11, qmin=11, qmax=255, wbits=7)
        self.b = QConv(16, 16, 3, padding=(1, 1), x_zp=11, out_zp=140, wbits=7, seed=1)

    def forward(self, x):
        a = self.a(ops.quantize_u8(x, 0.02, 90))
        y = ops.qadd(self.b(a), 140, 0.37, a, 11, 0.81, 20, 20, 255)
        return ops.dequantize_u8(y, 0.05, 20)


def test_conv_with_integer_add_tensorizes_and_is_bit_exact(tmp_path):
    model = QResidual().eval()
    x = torch.randn(1, 8, 7, 9, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = model(x).numpy()
    ex, done, missing = _sketch_build(model, (x,), "x86:cascadelake", tmp_path)
    assert any("qadd" in n and "qconv2d" in n for n in done) and not missing  # fused, tensorized
    if {"avx512f", "avx512bw", "avx512_vnni"} <= _cpu_flags():
        assert np.array_equal(_run(ex, (x,))[0], ref)
    assert np.array_equal(build(model, (x,), "x86", progress=False)(x)[0], ref)  # untuned


def test_space_generator_only_for_int8_tasks():
    import tvm
    from tvm import te

    spec = get_target("x86:cascadelake")
    a = te.placeholder((4,), "float32")
    fmod = tvm.IRModule({"main": te.create_prim_func([a, te.compute((4,), lambda i: a[i])])})
    assert int8.space_generator(fmod, spec) is None
    q = te.placeholder((4,), "uint8")
    qmod = tvm.IRModule({"main": te.create_prim_func([q, te.compute((4,), lambda i: q[i])])})
    assert int8.space_generator(qmod, spec) is not None
    assert int8.space_generator(qmod, get_target("cuda:sm_90")) is None


# ---------------------------------------------------------------- the conv register-tile spaces

@pytest.mark.parametrize("dims, lanes, registers, temporaries", [
    ((4, 56, 56), 16, 32, 1),  # AVX512-VNNI
    ((32, 7, 7), 16, 32, 1),
    ((4, 112, 112), 8, 16, 2),  # AVX2: ymm, pmaddubsw's temporaries
    ((8, 28, 28), 4, 32, 1),  # NEON sdot
])
def test_register_tiles_fit_the_register_file(dims, lanes, registers, temporaries):
    tiles = int8.register_tiles(*dims, lanes=lanes, registers=registers,
                                temporaries=temporaries, limit=50)
    assert tiles
    per_block = 16 // lanes
    for ob, y, z in tiles:
        assert dims[0] % ob == 0 and dims[1] % y == 0 and dims[2] % z == 0
        assert ob * y * z * per_block + ob * per_block + temporaries <= registers
    assert all(z >= min(4, dims[2]) for _, _, z in tiles)  # no narrow columns
    sizes = [ob * y * z for ob, y, z in tiles]
    # the first round: one tile per size, largest first; the largest that fits comes first
    first = sizes[:len(set(sizes))]
    assert first == sorted(set(sizes), reverse=True)
    best = max(ob * y * z for ob in range(1, dims[0] + 1) for y in range(1, dims[1] + 1)
               for z in range(min(4, dims[2]), dims[2] + 1)
               if not (dims[0] % ob or dims[1] % y or dims[2] % z)
               and (ob * y * z + ob) * per_block + temporaries <= registers)
    assert sizes[0] == best
    three = int8.register_tiles(*dims, lanes=lanes, registers=registers,
                                temporaries=temporaries, limit=3)
    assert three == tiles[:3]
    assert min(sizes) * 2 >= sizes[0]  # none less than half the largest


def test_register_tiles_none_for_a_single_output_vector():
    """One 16-channel block at one pixel: nothing to tile (TVM's rules alone schedule it)."""
    assert int8.register_tiles(1, 1, 1, lanes=16, registers=32) == []
    assert int8.register_tiles(1, 1, 1, lanes=8, registers=16, temporaries=2) == [(1, 1, 1)]


def _task_modules(model, inputs, target) -> dict:
    """name -> PrimFunc module of every tuning task of ``model`` lowered for ``target``."""
    from tvm.s_tir import meta_schedule as ms

    spec, prepared = _prepared(model, inputs, target)
    return {str(t.task_name): t.dispatched[0]
            for t in ms.relax_integration.extract_tasks(prepared, spec.to_tvm())}


def _tile_spaces(mod, target):
    from tvm import s_tir

    spec = get_target(target)
    load_tensor_intrinsics(spec.kind)
    fn = int8.conv_tile_space_fn(spec, intr.int8_capability(spec).intrinsic)
    return fn(s_tir.Schedule(mod))


def _tiles(sch) -> list[str]:
    """The register tiles ``schedule_conv_tile`` marked in ``sch``'s trace ("2x1x14")."""
    return [str(i.inputs[1]) for i in sch.trace.insts
            if i.kind.name == "Annotate" and str(i.attrs[0]) == int8.ANN_TILE]


def _random_args(mod, seed=0):
    """Random arguments for a task: u8 activations, 7-bit weights, requantization constants
    that keep int64 exact."""
    from tvm.s_tir import meta_schedule as ms

    rng, out = np.random.default_rng(seed), []
    for info in ms.arg_info.ArgInfo.from_prim_func(mod["main"]):
        shape, dtype = [int(d) for d in info.shape], str(info.dtype)
        if dtype == "uint8":
            a = rng.integers(0, 256, shape)
        elif dtype == "int8":
            a = rng.integers(-64, 64, shape)
        elif dtype == "int32":
            a = rng.integers(-4000, 4000, shape)
        elif dtype == "int64":  # mult, rnd, shift alike: [2**14, 2**15) >> 20 stays in range
            a = np.full(shape, 20) if len(out) == 5 else rng.integers(1 << 14, 1 << 15, shape)
        else:
            a = rng.standard_normal(shape)
        out.append(a.astype(dtype))
    return out


def _call(mod, target, args):
    import tvm

    lib = tvm.compile(mod, target=get_target(target).to_tvm())
    tensors = [tvm.runtime.tensor(a) for a in args]
    lib(*tensors)
    return [t.numpy() for t in tensors]


@pytest.mark.parametrize("target, flags, instruction", [
    ("x86:cascadelake", {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}, "vpdpbusd"),
    ("x86:haswell", {"avx2"}, "vpmaddubsw"),
    ("x86:alderlake", {"avx2", "avx_vnni"}, "{vex}\tvpdpbusd"),
    ("arm64:dotprod", None, "sdot"),
])
def test_conv_tile_spaces_tensorize_and_match_the_plain_kernel(target, flags, instruction):
    """Every register-tile space of a conv with a fused integer add (its epilogue: requant +
    qadd, computed per tile) tensorizes after the postprocessors; the first two, built, hold
    the target's instruction and compute what the unscheduled kernel computes, bit for bit."""
    import tvm

    x = torch.randn(1, 8, 8, 16, generator=torch.Generator().manual_seed(6))
    tasks = _task_modules(QResidual().eval(), (x,), target)
    [name] = [n for n in tasks if "qadd" in n and "qconv2d" in n]
    spaces = _tile_spaces(tasks[name], target)
    assert spaces and all(_tiles(s) for s in spaces)
    if target == "x86:cascadelake":
        assert len(spaces) >= 4  # 16 columns: several tile shapes fit 32 zmm registers
    for sch in spaces:
        assert all(p.apply(sch) for p in int8.postprocs()) and int8.tensorized(sch)
    args = _random_args(tasks[name])
    runs = flags is not None and flags <= _cpu_flags()
    want = _call(tasks[name], target, args) if runs else None
    for sch in spaces[:2]:
        with get_target(target).to_tvm():
            lib = tvm.compile(sch.mod, target=get_target(target).to_tvm())
        assert re.search(rf"\b{instruction}\b" if target.startswith("arm") else instruction,
                         int8.assembly(lib))
        if runs:
            assert all(np.array_equal(a, b) for a, b in zip(_call(sch.mod, target, args), want,
                                                              strict=True))


@pytest.mark.parametrize("case", [c for c, kw in CONV_CASES.items() if kw.get("groups", 1) == 1])
def test_conv_tile_spaces_are_exact_on_every_conv_geometry(case):
    """Strides, asymmetric padding, dilation, 1x1, a 7x7/2 RGB stem, 1 input channel, output
    channels not a multiple of 16: every tile space of the conv task computes what the
    unscheduled kernel computes (run when this CPU has VNNI; built either way)."""
    import tvm

    kw = CONV_CASES[case]
    model = QConv(**kw).eval()
    x = _u8((1, kw["c"], 9, 11), seed=3)
    tasks = _task_modules(model, (x,), "x86:cascadelake")
    [name] = [n for n in tasks if re.search(r"qconv2d\d*(_|$)", n) and "pack" not in n]
    spaces = _tile_spaces(tasks[name], "x86:cascadelake")
    assert spaces
    runs = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= _cpu_flags()
    args = _random_args(tasks[name], seed=4)
    want = _call(tasks[name], "x86:cascadelake", args) if runs else None
    for sch in spaces:
        assert all(p.apply(sch) for p in int8.postprocs()) and int8.tensorized(sch)
        if runs:
            got = _call(sch.mod, "x86:cascadelake", args)
            assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
        else:
            tvm.compile(sch.mod, target=get_target("x86:cascadelake").to_tvm())


def test_sketch_of_a_conv_task_is_its_largest_register_tile():
    x = torch.randn(1, 8, 7, 9, generator=torch.Generator().manual_seed(6))
    tasks = _task_modules(QResidual().eval(), (x,), "x86:cascadelake")
    conv = next(m for n, m in tasks.items() if "qconv2d" in n and "pack" not in n)
    sch = int8.sketch_schedule(conv, get_target("x86:cascadelake"))
    assert int8.tensorized(sch) and _tiles(sch)
    assert _tiles(sch) == _tiles(_tile_spaces(conv, "x86:cascadelake")[0])


def test_conv_tile_spaces_decline_other_tasks():
    """No tile space for a depthwise conv, a packing kernel or a linear layer; and a conv
    whose weights the target's intrinsic cannot take exactly (AVX2, full-range weights) keeps
    TVM's rules alone (plain integer code)."""
    from tvm.s_tir import meta_schedule as ms

    model = QNet(wbits=8).eval()
    x = torch.randn(1, 16, 6, 6, generator=torch.Generator().manual_seed(4))
    tasks = _task_modules(model, (x,), "x86:cascadelake")
    others = [n for n in tasks if not re.search(r"qconv2d\d*(_|$)", n) or "grouped" in n]
    assert any("grouped" in n for n in tasks) and any("pack" in n for n in tasks)
    for name in others:
        assert _tile_spaces(tasks[name], "x86:cascadelake") == [], name
    haswell = _task_modules(model, (x,), "x86:haswell")
    conv = next(m for n, m in haswell.items() if re.search(r"qconv2d\d*(_|$)", n)
                and "grouped" not in n and "pack" not in n)
    assert isinstance(int8.space_generator(conv, get_target("x86:haswell")),
                      ms.space_generator.PostOrderApply)
    assert isinstance(int8.space_generator(conv, get_target("x86:cascadelake")),
                      ms.space_generator.SpaceGeneratorUnion)


# ---------------------------------------------------------------- slow: tuning

def _disassemble(path: Path) -> str:
    tool = shutil.which("llvm-objdump") or shutil.which("objdump")
    if tool is None:
        pytest.skip("no objdump to disassemble the artifact")
    return subprocess.run([tool, "-d", str(path)], capture_output=True, text=True,
                          check=True).stdout


@pytest.mark.slow
def test_tuned_int8_build_uses_host_dot_instructions(qnet7, tmp_path):
    cap = intr.int8_capability(get_target("x86"))
    if cap.intrinsic is None:
        pytest.skip("this CPU has no integer dot-product instruction")
    model, x, ref = qnet7
    compiled = build(model, (x,), "x86", tune_trials=24, workdir=tmp_path, progress=False)
    assert compiled.info.tuned
    assert all(np.array_equal(o, r) for o, r in zip(compiled(x), ref, strict=True))
    asm = _disassemble(compiled.save(tmp_path / "art") / "model.so")
    assert ("vpdpbusd" if not cap.reduce_range else "vpmaddubsw") in asm


def test_optimize_for_arm64_dotprod_uses_sdot_and_matches_under_qemu(tmp_path):
    """An untuned device build of a quantized model still gets the target's dot instruction
    (one sketched schedule per integer kernel), and runs bit-exact under qemu-aarch64."""
    import slimgraph
    from slimgraph.backends.tvm import device
    from slimgraph.zoo.datasets import calibration_set, demo_model

    model, example = demo_model()
    try:
        device.check_cross_compiler()
        device.check_qemu()
        device.runner_path("arm64")
        emulate = True
    except TargetError:
        emulate = False
    result = slimgraph.optimize(model, "arm64:dotprod", example_inputs=example,
                                pipeline="cleanup,fold-bn,quantize", calibration=calibration_set(128),
                                tune_trials=0, emulate=emulate, progress=False)
    backend = result.report.to_dict()["backend"]
    assert backend["int8_sketched"] == 6 and "dot-product instruction" in backend["schedules"]
    assert re.search(r"\bsdot\b", int8.assembly(result.compiled._module))
    if emulate:
        assert "qemu-aarch64" in backend["numerics_how"]
        assert backend["numerics_vs_graph"]["max_abs"] == 0.0  # bit-exact integer kernels
