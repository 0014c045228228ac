"""Integer kernels for slimgraph's quantized ops: TVM lowerings and MetaSchedule rules.

Lowering (``register_lowerings``, run on import; ``convert_map(spec)`` for one target):

    slimgraph::qconv2d, groups == 1   two kernels (PrimFuncs):
        pack      x (N, C, H, W) u8 -> xp (N, C/4, H+2ph, W+2pw, 4), padded with x_zp
        conv      acc (N, O/16, OH, OW, 16) = sum_{c/4, kh, kw, 4} int32(xp) * int32(wp),
                  wp = weights packed here in numpy: (O/16, C/4, KH, KW, 16, 4); then
                  out (N, O, OH, OW) u8 = clamp((((acc + corr) * mult + rnd) >> shift) + zp)
    slimgraph::qconv2d, groups > 1    one kernel of direct NCHW integer loops (exact; not
                                      tensorized: depthwise has nothing to reduce 4 at a time)
    slimgraph::qlinear                pack (N, K/4, 4) (a reshape when K % 4 == 0 and the
                                      activations stay u8) + (N, K/4, 4) x (M/16, K/4, 16, 4)
    slimgraph::qadd                   elementwise int64 (fused by Relax into the producing conv)
    slimgraph::quantize_u8 / dequantize_u8   elementwise

The pack is a kernel of its own: as a stage of the conv, MetaSchedule's RandomComputeLocation
sometimes inlines it into the reduction, whose reads (an if_then_else) then match no intrinsic.
Weight blocks hold 16 output channels: the 16-lane x86 intrinsics take one, the 8-lane (AVX2,
AVX-VNNI) and 4-lane (ARM) ones tile it.

The kernels add ``x_u8 * w`` (never ``x - x_zp``: dot instructions take u8) and fold the zero
point into the per-channel constant ``corr = bias - x_zp * sum(w[o])``, which is exact
because padding holds x_zp too. On ARM (``activation_dtype="int8"``: ``sdot`` is s8 x s8) the
pack stage flips the activations to ``x - 128`` and ``corr = bias - (x_zp - 128) * sum(w)``.
The requantization is the integer one of ``slimgraph.ops.quantized`` (``mult``, ``rnd``,
``shift`` per channel), so the kernels are bit-exact against the PyTorch reference.

Weights, bias and scale must be constants (module parameters or buffers): they are packed
and folded here in numpy. The packed layouts are those TVM tensorizes
(``topi.nn.conv2d_NCHWc_int8``); Relax's own int8 conv2d legalization (NCHW/OIHW) is not.

Tuning (``space_generator``, ``sketch_database``): a task is an int8 task when its PrimFunc has
an int8/uint8 parameter. Its design space is TVM's x86/ARM rule list with
``MultiLevelTilingWithIntrin`` on the target's intrinsic (``intrinsics.int8_capability``)
and ``RewriteTensorize``; intrinsics that saturate int16 pairs (AVX2, AVX-512BW) are used
only on kernels whose weights fit (annotation ``slimgraph.int8_pairs_fit_i16``, set here from
the constants), else the kernel stays plain integer code. Three additions to TVM's rules: the
packing kernels get a fixed schedule (``schedule_pack``, through ApplyCustomRule; 46x faster
than the generic one); no loop around an intrinsic call is vectorized
(``_keep_tensorized_loops_scalar``); and a packed conv's space is the union of TVM's rules
with register-tile spaces of our own (``schedule_conv_tile``: the whole reduction over a tile
of accumulators that fits the register file, requantized per tile), which on ResNet-18's convs
ran 1.0-1.8x faster than the tuned MultiLevelTiling kernels (Zen 4, the same database).
``tune.py`` asks ``space_generator`` through its ``SPACE_GENERATORS`` hook (registered on import). Candidates build in 0.3-0.6 s in process;
the 30 s builder timeouts seen before came from TVM's LocalBuilder workers importing all of
``tvm.s_tir.tensor_intrin`` (22 s on 2 cores), which tune.py's builder never does, so int8
tasks need no timeout of their own.

``sketch_database`` fills a database with one tensorized schedule per int8 task without
measuring anything: the way to build a tensorized kernel for a target this machine cannot
run (cross builds, tests).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from slimgraph.errors import BackendError

from .intrinsics import Int8Capability, int8_capability
from .lower import register_custom_op_lowering
from .targets import TargetSpec, get_target
from .tune import SPACE_GENERATORS, load_tensor_intrinsics

if TYPE_CHECKING:
    import tvm

BLOCK_O = 16  # output channels per packed weight block (>= every intrinsic's lanes)
BLOCK_K = 4  # reduction elements per dot-product step
ANN_KERNEL = "slimgraph.int8"  # block annotation: which op the reduction block computes
ANN_PAIRS = "slimgraph.int8_pairs_fit_i16"  # 1: u8 x s8 pair sums of these weights fit int16
ANN_TILE = "slimgraph.conv_tile"  # block annotation: schedule_conv_tile's register tile
AUTO_TENSORIZE = "meta_schedule.auto_tensorize"  # MetaSchedule's mark of a block to tensorize

KEEP_SCALAR = "slimgraph.keep_scalar"  # loop annotation: stops RewriteParallelVectorizeUnroll
PACK_RULE = "slimgraph_int8_pack"  # MetaSchedule custom rule of the activation-packing kernels
MAX_UNROLL = (0, 16, 64, 512)  # explicit unroll steps sampled (TVM's DefaultX86 values)


# ---------------------------------------------------------------- constants (numpy)

def pack_conv_weight(w: np.ndarray) -> np.ndarray:
    """OIHW int8 -> (O/16, I/4, KH, KW, 16, 4), zero-padded to whole blocks."""
    o, i, kh, kw = w.shape
    ob, ib = -(-o // BLOCK_O), -(-i // BLOCK_K)
    padded = np.zeros((ob * BLOCK_O, ib * BLOCK_K, kh, kw), np.int8)
    padded[:o, :i] = w
    packed = padded.reshape(ob, BLOCK_O, ib, BLOCK_K, kh, kw).transpose(0, 2, 4, 5, 1, 3)
    return np.ascontiguousarray(packed)


def pack_dense_weight(w: np.ndarray) -> np.ndarray:
    """(M, K) int8 -> (M/16, K/4, 16, 4), zero-padded to whole blocks."""
    return pack_conv_weight(w[:, :, None, None])[:, :, 0, 0]


def pairs_fit_int16(w_packed: np.ndarray) -> bool:
    """Whether ``vpmaddubsw`` is exact on these weights for every u8 activation: each pair
    (k = 0,1 and k = 2,3 of a 4-block) sums its same-sign weights to at most 128 in magnitude
    (255 * 128 = 32640 <= 32767). 7-bit weights ([-64, 63]) always do."""
    w = w_packed.astype(np.int32).reshape(-1, 2, 2)
    pos = np.clip(w, 0, None).sum(-1)
    neg = np.clip(w, None, 0).sum(-1)
    return bool(pos.max(initial=0) <= 128 and neg.min(initial=0) >= -128)


@dataclass(frozen=True)
class ChannelConstants:
    """Per-output-channel constants of the requantizing epilogue (see the module docstring)."""

    corr: np.ndarray  # int32: bias - zp_eff * sum(w[o])
    mult: np.ndarray  # int64
    rnd: np.ndarray  # int64: 1 << (shift - 1)
    shift: np.ndarray  # int64


def channel_constants(w: np.ndarray, bias: np.ndarray, scale: np.ndarray,
                      zp_eff: int) -> ChannelConstants:
    from slimgraph.ops.quantized import requant_multiplier

    wsum = w.astype(np.int64).reshape(w.shape[0], -1).sum(1)
    corr = bias.astype(np.int64) - int(zp_eff) * wsum
    if corr.min(initial=0) < -(2**31) or corr.max(initial=0) >= 2**31:
        raise BackendError("int8 kernel: bias - x_zp * sum(w) overflows int32")
    mult, shift = requant_multiplier(scale)
    return ChannelConstants(corr.astype(np.int32), mult, np.left_shift(np.int64(1), shift - 1),
                            shift)


# ---------------------------------------------------------------- TE computes

def _requant(acc, o, consts, out_zp: int, qmin: int, qmax: int):
    """u8 output of int32 accumulator ``acc`` (sum of x * w) for output channel ``o``."""
    import tvm
    from tvm import te

    corr, mult, rnd, shift = consts
    v = (acc.astype("int64") + corr[o].astype("int64")) * mult[o] + rnd[o]
    y = tvm.tirx.shift_right(v, shift[o]) + tvm.tirx.const(out_zp, "int64")
    lo, hi = tvm.tirx.const(qmin, "int64"), tvm.tirx.const(qmax, "int64")
    return te.min(te.max(y, lo), hi).astype("uint8")


def _act(value, act_dtype: str):
    """An activation byte as the kernel's dtype: u8 as is, or flipped to s8 (x ^ 0x80
    reinterpreted is x - 128)."""
    import tvm

    if act_dtype == "uint8":
        return value
    return tvm.tirx.reinterpret("int8", value ^ tvm.tirx.const(0x80, "uint8"))


def _pad_value(x_zp: int, act_dtype: str):
    import tvm

    return tvm.tirx.const(x_zp if act_dtype == "uint8" else x_zp - 128, act_dtype)


@dataclass(frozen=True)
class ConvGeometry:
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    out_channels: int


def pack_conv_input_te(x, *, padding: tuple[int, int], x_zp: int, act_dtype: str = "uint8"):
    """u8 NCHW -> (N, C/4, H+2ph, W+2pw, 4) in the kernel's dtype, padded with x_zp.

    A kernel of its own (not a stage of the conv's PrimFunc): MetaSchedule would otherwise
    sometimes inline it into the reduction, whose reads (an if_then_else) then match no
    intrinsic. Scheduled by ``schedule_pack`` (its ``schedule_rule`` annotation).
    """
    import tvm
    from tvm import te

    n, c, h, w = (int(d) for d in x.shape)
    (ph, pw), cb = padding, -(-c // BLOCK_K)
    pad = _pad_value(x_zp, act_dtype)

    def pack(b, q, y, z, r):
        ch, yy, zz = q * BLOCK_K + r, y - ph, z - pw
        inside = tvm.tirx.all(ch < c, yy >= 0, yy < h, zz >= 0, zz < w)
        return tvm.tirx.if_then_else(inside, _act(x[b, ch, yy, zz], act_dtype), pad)

    return te.compute((n, cb, h + 2 * ph, w + 2 * pw, BLOCK_K), pack, name="qconv2d_pack",
                      attrs={"schedule_rule": PACK_RULE})


def qconv2d_packed_te(xp, wp, corr, mult, rnd, shift, *, geom: ConvGeometry, out_zp: int,
                      qmin: int, qmax: int, pairs_fit: bool = False):
    """Packed, padded input ``xp`` x packed weights ``wp`` -> u8 NCHW (groups == 1)."""
    from tvm import te

    n, _, hp, wpad, _ = (int(d) for d in xp.shape)
    ocb, icb, kh, kw = (int(d) for d in wp.shape[:4])
    (sh, sw), (dh, dw) = geom.stride, geom.dilation
    oh, ow = (hp - dh * (kh - 1) - 1) // sh + 1, (wpad - dw * (kw - 1) - 1) // sw + 1
    ric = te.reduce_axis((0, icb), "ic")
    rkh, rkw = te.reduce_axis((0, kh), "kh"), te.reduce_axis((0, kw), "kw")
    rk = te.reduce_axis((0, BLOCK_K), "ik")
    acc = te.compute(
        (n, ocb, oh, ow, BLOCK_O),
        lambda b, oc, y, z, ob: te.sum(
            xp[b, ric, y * sh + rkh * dh, z * sw + rkw * dw, rk].astype("int32")
            * wp[oc, ric, rkh, rkw, ob, rk].astype("int32"),
            axis=[ric, rkh, rkw, rk]),
        name="qconv2d_acc", attrs={ANN_KERNEL: "qconv2d", ANN_PAIRS: int(pairs_fit)})
    consts = (corr, mult, rnd, shift)
    return te.compute(
        (n, geom.out_channels, oh, ow),
        lambda b, o, y, z: _requant(acc[b, o // BLOCK_O, y, z, o % BLOCK_O], o, consts,
                                    out_zp, qmin, qmax),
        name="qconv2d_requant")


def qconv2d_grouped_te(x, w, corr, mult, rnd, shift, *, geom: ConvGeometry, groups: int,
                       x_zp: int, out_zp: int, qmin: int, qmax: int):
    """Grouped/depthwise qconv2d as direct NCHW integer loops (not tensorized)."""
    import tvm
    from tvm import te

    n, c, h, wd = (int(d) for d in x.shape)
    o, i, kh, kw = (int(d) for d in w.shape)
    (sh, sw), (ph, pw), (dh, dw) = geom.stride, geom.padding, geom.dilation
    oh, ow = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    per_group = o // groups
    pad = tvm.tirx.const(x_zp, "uint8")

    def padded(b, ch, y, z):
        yy, zz = y - ph, z - pw
        inside = tvm.tirx.all(yy >= 0, yy < h, zz >= 0, zz < wd)
        return tvm.tirx.if_then_else(inside, x[b, ch, yy, zz], pad)

    xpad = te.compute((n, c, h + 2 * ph, wd + 2 * pw), padded, name="qconv2d_pad")
    ri, rkh, rkw = te.reduce_axis((0, i), "i"), te.reduce_axis((0, kh), "kh"), te.reduce_axis(
        (0, kw), "kw")
    acc = te.compute(
        (n, o, oh, ow),
        lambda b, oc, y, z: te.sum(
            xpad[b, oc // per_group * i + ri, y * sh + rkh * dh, z * sw + rkw * dw].astype(
                "int32") * w[oc, ri, rkh, rkw].astype("int32"),
            axis=[ri, rkh, rkw]),
        name="qconv2d_acc", attrs={ANN_KERNEL: "qconv2d_grouped", ANN_PAIRS: 0})
    consts = (corr, mult, rnd, shift)
    return te.compute((n, o, oh, ow),
                      lambda b, oc, y, z: _requant(acc[b, oc, y, z], oc, consts, out_zp,
                                                   qmin, qmax),
                      name="qconv2d_requant")


def pack_dense_input_te(x, *, x_zp: int, act_dtype: str = "uint8"):
    """u8 (N, K) -> (N, K/4, 4) in the kernel's dtype, padded with x_zp."""
    import tvm
    from tvm import te

    n, k = (int(d) for d in x.shape)
    pad = _pad_value(x_zp, act_dtype)

    def pack(b, q, r):
        idx = q * BLOCK_K + r
        return tvm.tirx.if_then_else(idx < k, _act(x[b, idx], act_dtype), pad)

    return te.compute((n, -(-k // BLOCK_K), BLOCK_K), pack, name="qlinear_pack",
                      attrs={"schedule_rule": PACK_RULE})


def qlinear_packed_te(xp, wp, corr, mult, rnd, shift, *, out_features: int, out_zp: int,
                      qmin: int, qmax: int, pairs_fit: bool = False):
    """Packed input (N, K/4, 4) x packed weights (M/16, K/4, 16, 4) -> u8 (N, M)."""
    from tvm import te

    n, mb, kb = int(xp.shape[0]), int(wp.shape[0]), int(wp.shape[1])
    rkb, rk = te.reduce_axis((0, kb), "kb"), te.reduce_axis((0, BLOCK_K), "ik")
    acc = te.compute(
        (n, mb, BLOCK_O),
        lambda b, m, mi: te.sum(xp[b, rkb, rk].astype("int32") * wp[m, rkb, mi, rk].astype(
            "int32"), axis=[rkb, rk]),
        name="qlinear_acc", attrs={ANN_KERNEL: "qlinear", ANN_PAIRS: int(pairs_fit)})
    consts = (corr, mult, rnd, shift)
    return te.compute((n, out_features),
                      lambda b, m: _requant(acc[b, m // BLOCK_O, m % BLOCK_O], m, consts,
                                            out_zp, qmin, qmax),
                      name="qlinear_requant")


def qadd_te(a, b, *, a_zp: int, a_scale: float, b_zp: int, b_scale: float, out_zp: int,
            qmin: int, qmax: int):
    """u8 + u8 -> u8 with numpy broadcasting, the integer arithmetic of ``slimgraph::qadd``
    (``ops.quantized.qadd_terms``: both rescales exact in int64 with one shift)."""
    import tvm
    from tvm import te

    from slimgraph.ops.quantized import qadd_terms

    ma, mb, shift = qadd_terms(a_scale, b_scale)
    sa, sb = ([int(d) for d in t.shape] for t in (a, b))
    rank = max(len(sa), len(sb))
    out_shape = [max(x, y) for x, y in zip([1] * (rank - len(sa)) + sa,
                                            [1] * (rank - len(sb)) + sb, strict=True)]

    def read(t, shape, idx):  # right-aligned broadcasting: a stretched dimension reads index 0
        idx, out = idx[rank - len(shape):], out_shape[rank - len(shape):]
        # (same-shape inputs keep every index: Relax then sees an elementwise op and fuses it
        # into the producing conv's kernel)
        return t[tuple(0 if n < m else i for n, m, i in zip(shape, out, idx, strict=True))]

    def i64(v):
        return tvm.tirx.const(v, "int64")

    def f(*idx):
        va = (read(a, sa, idx).astype("int64") - i64(a_zp)) * i64(ma)
        vb = (read(b, sb, idx).astype("int64") - i64(b_zp)) * i64(mb)
        y = tvm.tirx.shift_right(va + vb + i64(1 << (shift - 1)), i64(shift)) + i64(out_zp)
        return te.min(te.max(y, i64(qmin)), i64(qmax)).astype("uint8")

    return te.compute(out_shape, f, name="qadd")


def quantize_te(x, *, scale: float, zp: int):
    """clamp(round_half_even(x / float32(scale)) + zp, 0, 255) as u8 (``tirx.round`` is LLVM's
    nearbyint: half to even, as torch.round)."""
    import tvm
    from tvm import te

    s = tvm.tirx.const(float(np.float32(scale)), "float32")
    lo, hi = tvm.tirx.const(0.0, "float32"), tvm.tirx.const(255.0, "float32")

    def f(*i):
        q = tvm.tirx.round(x(*i) / s) + tvm.tirx.const(float(zp), "float32")
        return te.min(te.max(q, lo), hi).astype("uint8")

    return te.compute(x.shape, f, name="quantize_u8")


def dequantize_te(q, *, scale: float, zp: int):
    """float32(q - zp) * float32(scale)."""
    import tvm
    from tvm import te

    s = tvm.tirx.const(float(np.float32(scale)), "float32")
    return te.compute(q.shape, lambda *i: (q(*i).astype("int32") - zp).astype("float32") * s,
                      name="dequantize_u8")


# ---------------------------------------------------------------- lowerings (fx node -> Relax)

_QCONV_ARGS = ("x", "x_zp", "w", "bias", "scale", "out_zp", "stride", "padding", "dilation",
               "groups", "qmin", "qmax")
_QLINEAR_ARGS = ("x", "x_zp", "w", "bias", "scale", "out_zp", "qmin", "qmax")
_EDGE_ARGS = ("x", "scale", "zp")
_QADD_ARGS = ("a", "a_zp", "a_scale", "b", "b_zp", "b_scale", "out_zp", "qmin", "qmax")


def _node_args(node, names: Sequence[str]) -> dict:
    values = dict(zip(names, node.args, strict=False))
    values.update({k: v for k, v in node.kwargs.items() if k in names})
    missing = [n for n in names if n not in values]
    if missing:
        raise BackendError(f"{node.target}: missing argument(s) {missing}")
    return values


def _constant(arg, importer, what: str, op: str) -> np.ndarray:
    """The value of a constant tensor argument: a Relax constant, a tensor attribute, or a
    parameter/buffer/constant of the exported program the importer is converting (``lower``
    hands it over as ``importer.exported_program``)."""
    import tvm

    expr = importer.env.get(arg)
    if isinstance(expr, tvm.ir.expr.Constant) and hasattr(expr, "value"):  # a Relax constant
        return expr.value.numpy()
    if hasattr(expr, "detach"):  # a get_attr tensor
        return expr.detach().cpu().numpy()
    ep = getattr(importer, "exported_program", None)
    if ep is not None and getattr(arg, "op", None) == "placeholder":
        for spec in ep.graph_signature.input_specs:
            if spec.arg.name == arg.name and spec.target is not None:
                for table in (ep.state_dict, ep.constants):
                    if spec.target in table:
                        return table[spec.target].detach().cpu().numpy()
    raise BackendError(f"{op}: {what} must be a constant (a parameter, buffer or constant of "
                       f"the module), got {getattr(arg, 'name', arg)!r}")


def _pair(v) -> tuple[int, int]:
    v = tuple(int(i) for i in v)
    return (v * 2) if len(v) == 1 else v


def _emit(importer, fn, *args, name: str):
    import tvm
    from tvm import relax

    # relax.const stores int64 arrays as int32 unless told the dtype
    exprs = [a if isinstance(a, tvm.ir.expr.Expr) else relax.const(a, str(a.dtype)) for a in args]
    return importer.block_builder.emit_te(fn, *exprs, primfunc_name_hint=name)


def _qparams(a: dict) -> dict:
    return {k: int(a[k]) for k in ("x_zp", "out_zp", "qmin", "qmax")}


def _lower_qconv2d(node, importer, act_dtype: str = "uint8"):
    a = _node_args(node, _QCONV_ARGS)
    w = _constant(a["w"], importer, "w", "qconv2d").astype(np.int8)
    bias = _constant(a["bias"], importer, "bias", "qconv2d")
    scale = _constant(a["scale"], importer, "scale", "qconv2d")
    geom = ConvGeometry(_pair(a["stride"]), _pair(a["padding"]), _pair(a["dilation"]),
                        int(w.shape[0]))
    x, q, groups = importer.env[a["x"]], _qparams(a), int(a["groups"])
    if groups != 1:
        k = channel_constants(w, bias, scale, q["x_zp"])
        fn = functools.partial(qconv2d_grouped_te, geom=geom, groups=groups, **q)
        return _emit(importer, fn, x, w, k.corr, k.mult, k.rnd, k.shift, name="qconv2d_grouped")
    x_zp = q.pop("x_zp")
    k = channel_constants(w, bias, scale, x_zp if act_dtype == "uint8" else x_zp - 128)
    wp = pack_conv_weight(w)
    xp = _emit(importer, functools.partial(pack_conv_input_te, padding=geom.padding, x_zp=x_zp,
                                           act_dtype=act_dtype), x, name="qconv2d_pack")
    fn = functools.partial(qconv2d_packed_te, geom=geom, pairs_fit=pairs_fit_int16(wp), **q)
    return _emit(importer, fn, xp, wp, k.corr, k.mult, k.rnd, k.shift, name="qconv2d")


def _lower_qlinear(node, importer, act_dtype: str = "uint8"):
    from tvm import relax

    a = _node_args(node, _QLINEAR_ARGS)
    w = _constant(a["w"], importer, "w", "qlinear").astype(np.int8)
    bias = _constant(a["bias"], importer, "bias", "qlinear")
    scale = _constant(a["scale"], importer, "scale", "qlinear")
    x, q = importer.env[a["x"]], _qparams(a)
    x_zp = q.pop("x_zp")
    k = channel_constants(w, bias, scale, x_zp if act_dtype == "uint8" else x_zp - 128)
    wp = pack_dense_weight(w)
    n, kdim = (int(d) for d in x.ty.shape.values)
    if act_dtype == "uint8" and kdim % BLOCK_K == 0:  # the packing is a reshape
        xp = importer.block_builder.emit(relax.op.reshape(x, (n, kdim // BLOCK_K, BLOCK_K)))
    else:
        xp = _emit(importer, functools.partial(pack_dense_input_te, x_zp=x_zp,
                                               act_dtype=act_dtype), x, name="qlinear_pack")
    fn = functools.partial(qlinear_packed_te, out_features=int(w.shape[0]),
                           pairs_fit=pairs_fit_int16(wp), **q)
    return _emit(importer, fn, xp, wp, k.corr, k.mult, k.rnd, k.shift, name="qlinear")


def _lower_qadd(node, importer):
    a = _node_args(node, _QADD_ARGS)
    fn = functools.partial(qadd_te, a_scale=float(a["a_scale"]), b_scale=float(a["b_scale"]),
                           **{k: int(a[k]) for k in ("a_zp", "b_zp", "out_zp", "qmin", "qmax")})
    return _emit(importer, fn, importer.env[a["a"]], importer.env[a["b"]], name="qadd")


def _lower_quantize(node, importer):
    a = _node_args(node, _EDGE_ARGS)
    fn = functools.partial(quantize_te, scale=float(a["scale"]), zp=int(a["zp"]))
    return _emit(importer, fn, importer.env[a["x"]], name="quantize_u8")


def _lower_dequantize(node, importer):
    a = _node_args(node, _EDGE_ARGS)
    fn = functools.partial(dequantize_te, scale=float(a["scale"]), zp=int(a["zp"]))
    return _emit(importer, fn, importer.env[a["x"]], name="dequantize_u8")


def convert_map(spec: TargetSpec | str | None = None) -> dict:
    """Lowerings of the quantized ops for ``spec`` (``build(..., custom_convert_map=...)``).

    Only ARM differs from the registered default: its ``sdot`` wants s8 activations.
    """
    act = "uint8"
    if spec is not None:
        act = int8_capability(get_target(spec)).activation_dtype
    return {"qconv2d": functools.partial(_lower_qconv2d, act_dtype=act),
            "qlinear": functools.partial(_lower_qlinear, act_dtype=act),
            "qadd": _lower_qadd, "quantize_u8": _lower_quantize,
            "dequantize_u8": _lower_dequantize}


_DEFAULT_LOWERINGS = convert_map()


def register_lowerings() -> list[str]:
    """Register the default (u8 activations) lowerings for every ``lower`` call."""
    return [register_custom_op_lowering(f"slimgraph::{op}", fn)
            for op, fn in _DEFAULT_LOWERINGS.items()]


register_lowerings()


# ---------------------------------------------------------------- MetaSchedule

def is_int8_task(mod: tvm.IRModule) -> bool:
    """A PrimFunc (module) with an int8/uint8 parameter: the tasks our rules are for."""
    from tvm import tirx

    for func in mod.functions.values():
        if isinstance(func, tirx.PrimFunc):
            for param in func.params:  # 0.27: a buffer parameter's type is its BufferType
                if str(getattr(param.ty, "dtype", "")) in ("int8", "uint8"):
                    return True
    return False


def _block_annotations(mod: tvm.IRModule) -> list[dict]:
    """Annotations of the top-level blocks of ``mod``'s PrimFuncs that carry ``ANN_KERNEL``."""
    import tvm
    from tvm import s_tir, tirx

    found: list[dict] = []
    for func in mod.functions.values():
        if not isinstance(func, tirx.PrimFunc):
            continue
        sch = s_tir.Schedule(tvm.IRModule({"main": func}))
        for rv in sch.get_child_blocks(sch.get_sblock("root")):
            ann = sch.get(rv).annotations
            if ANN_KERNEL in ann:
                found.append({k: ann[k] for k in ann})
    return found


def task_intrinsic(mod: tvm.IRModule, cap: Int8Capability) -> str | None:
    """The intrinsic an int8 task may tensorize with on ``cap``'s target: the capability's,
    unless it saturates and the task's weights are not known to fit (then None)."""
    if cap.intrinsic is None:
        return None
    if cap.reduce_range:
        anns = _block_annotations(mod)
        if not anns or not all(int(a.get(ANN_PAIRS, 0)) for a in anns):
            return None
    return cap.intrinsic


def schedule_pack(sch, block):
    """The schedule of an activation-packing block (``PACK_RULE``): the outer loops fused and
    parallel, the lane loop (4 channels) unrolled, the loop over pixels left to LLVM's loop
    vectorizer, which turns the 4-way interleave into shuffles. 1x64x56x56 on 2 cores: 9.5 us,
    against 440 us for MetaSchedule's generic fuse-everything-and-vectorize (a gather per
    lane). The loops are annotated so that RewriteParallelVectorizeUnroll leaves them alone.
    Registered as ``s_tir.meta_schedule.cpu.slimgraph_int8_pack`` (ApplyCustomRule)."""
    loops = sch.get_loops(block)
    outer = sch.fuse(*loops[:-2]) if len(loops) > 3 else loops[0]
    sch.parallel(outer)
    sch.unroll(loops[-1])
    for loop in (outer, loops[-1]):
        sch.annotate(loop, KEEP_SCALAR, 1)
    return [sch]


def vector_registers(kind: str, lanes: int) -> int:
    """Architectural vector registers the register tile may use: 32 for AVX-512 (16 int32
    lanes) and NEON, 16 for AVX2 / AVX-VNNI (8 lanes, ymm)."""
    return 32 if kind != "x86" or lanes >= 16 else 16


def register_tiles(out_blocks: int, oh: int, ow: int, *, lanes: int, registers: int,
                   temporaries: int = 1, limit: int = 8) -> list[tuple[int, int, int]]:
    """Register tiles (16-channel blocks, rows, columns) of a packed conv for
    ``schedule_conv_tile``: exact divisors of the output, the accumulators
    (``rows x cols x blocks x 16/lanes`` vectors) plus one weight vector per lane group and the
    intrinsic's temporaries within ``registers``. Tiles less than 4 columns wide are left out
    when the output has 4 (they ran at half the speed of the rest on ResNet-18's convs), and
    tiles less than half the largest (too few accumulators to hide the latency). Up to
    ``limit``, spread over tile sizes: the widest tile of each size, largest size first, then
    the second widest of each, and so on (a larger tile reuses each loaded vector more, but the
    fastest tile was not always the largest: 14 accumulators on a 56x56 conv, 16 on the stem,
    by 5-10%)."""
    per_block = BLOCK_O // lanes
    divisors = [[d for d in range(1, n + 1) if n % d == 0] for n in (out_blocks, oh, ow)]
    tiles = [(ob, y, z) for ob in divisors[0] for y in divisors[1] for z in divisors[2]
             if 2 <= ob * y * z * per_block
             and (ob * y * z + ob) * per_block + temporaries <= registers]
    wide = [t for t in tiles if t[2] >= min(4, ow)]
    tiles = wide or tiles
    largest = max((t[0] * t[1] * t[2] for t in tiles), default=0)
    tiles = [t for t in tiles if 2 * t[0] * t[1] * t[2] >= largest]  # at least half as big
    by_size: dict[int, list] = {}
    for t in sorted(tiles, key=lambda t: (-t[2], t[1])):
        by_size.setdefault(t[0] * t[1] * t[2], []).append(t)
    ranked = sorted(tiles, key=lambda t: (by_size[t[0] * t[1] * t[2]].index(t),
                                          -(t[0] * t[1] * t[2])))
    return ranked[:limit]


def schedule_conv_tile(sch, block, *, intrinsic: str, lanes: int,
                       tile: tuple[int, int, int], inner_ic: int | None = None):
    """A fixed loop structure for a packed int8 conv (``qconv2d_acc``), the structure of
    TVM's hand-written x86 int8 schedule (``topi.x86.conv2d_int8``, after Intel's oneDNN
    direct conv): a register tile of ``tile`` = (16-channel blocks, rows, columns) output
    vectors that stay in registers while the whole reduction runs over them (input channel
    blocks outer, then kh, kw, then an inner run of channel blocks), one intrinsic call per
    (pixel, lane group) per step, the tile's requantization (and whatever Relax fused after
    it) right after its reduction, and (batch, channel block, row block) fused and parallel.
    MetaSchedule's MultiLevelTiling spreads the reduction loops among the spatial tiles and
    finds this shape only by chance; TVM has no rule that imposes it, so it is written here.
    ``inner_ic`` None: sampled (``sample_perfect_tile``, so the tuner's mutator varies it)."""
    loops = sch.get_loops(block)
    b, oc, y, z, ob, ric, rkh, rkw, rk = loops
    t_oc, t_y, t_z = tile
    sch.annotate(block, ANN_TILE, f"{t_oc}x{t_y}x{t_z}")
    oc_o, oc_i = sch.split(oc, [None, t_oc])
    y_o, y_i = sch.split(y, [None, t_y])
    z_o, z_i = sch.split(z, [None, t_z])
    icb = int(sch.get(ric).extent)
    if inner_ic is None:
        inner = sch.sample_perfect_tile(ric, n=2, max_innermost_factor=min(icb, 8))
        ic_o, ic_i = sch.split(ric, inner)
    else:
        ic_o, ic_i = sch.split(ric, [None, inner_ic])
    lane_loops = [ob] if lanes == BLOCK_O else sch.split(ob, [None, lanes])
    sch.reorder(b, oc_o, y_o, z_o, ic_o, rkh, rkw, ic_i, y_i, z_i, oc_i, *lane_loops, rk)
    _attach_epilogue(sch, block, z_o)
    sch.parallel(sch.fuse(b, oc_o, y_o))
    # Tensorized the way MultiLevelTilingWithIntrin does it: blockized and marked here, the
    # init split off (RewriteReductionBlock) and the intrinsic applied (RewriteTensorize) by
    # the postprocessors. (Tensorizing here leaves a block the schedule cannot copy.)
    inner = sch.blockize(lane_loops[-1])
    sch.annotate(inner, AUTO_TENSORIZE, intrinsic)
    for loop in (y_i, z_i, oc_i, *lane_loops[:-1]):
        sch.unroll(loop)
    if int(sch.get(rkw).extent) <= 3:
        sch.unroll(rkw)
    return sch


def _attach_epilogue(sch, block, loop) -> None:
    """Everything but the reduction ``block`` in its PrimFunc (its requantization and what
    Relax fused around it: a residual operand's dequantize, an add, a clamp) computed per tile
    under ``loop``: blocks that inline are inlined, the output blocks are moved under the loop
    with their innermost loop vectorized."""
    root = sch.get_sblock("root")
    kept = []
    for blk in sch.get_child_blocks(root):
        if sch.get(blk).same_as(sch.get(block)):
            continue
        try:
            sch.compute_inline(blk)
        except Exception:  # noqa: BLE001 - an output block (or one that does not inline)
            kept.append(blk)
    for blk in kept:
        sch.reverse_compute_at(blk, loop, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(blk)[-1])


def schedule_rules(kind: str, intrinsic: str | None, *, max_unroll: Sequence[int] = MAX_UNROLL):
    """TVM's CPU rule list (``ScheduleRule::DefaultX86`` / ``DefaultARM``) with ``intrinsic``
    in ``MultiLevelTilingWithIntrin`` (None: plain ``MultiLevelTiling`` only), without
    ``AddRFactor``: the integer kernels' spatial extents (output pixels x channels) are wide,
    and rfactor variants of the reduction only dilute the search.
    """
    from tvm.s_tir import meta_schedule as ms

    jobs, inner = (16, 64) if kind == "x86" else (8, 32)
    reuse = ms.schedule_rule.ReuseType(req="may", levels=[1, 2], scope="global")
    rules = [
        ms.schedule_rule.ApplyCustomRule(),
        ms.schedule_rule.InlineConstantScalars(),
        ms.schedule_rule.AutoInline(into_producer=False, into_consumer=True,
                                    inline_const_tensor=True, disallow_if_then_else=True,
                                    require_injective=True, require_ordered=True,
                                    disallow_op=["tirx.exp"]),
    ]
    if intrinsic is not None:
        rules.append(ms.schedule_rule.MultiLevelTilingWithIntrin(
            intrinsic, structure="SSRSRS", max_innermost_factor=inner, reuse_write=reuse))
    rules += [
        ms.schedule_rule.MultiLevelTiling(structure="SSRSRS", max_innermost_factor=inner,
                                          reuse_write=reuse),
        ms.schedule_rule.ParallelizeVectorizeUnroll(max_jobs_per_core=jobs,
                                                    max_vectorize_extent=inner,
                                                    unroll_max_steps=list(max_unroll),
                                                    unroll_explicit=True),
        ms.schedule_rule.RandomComputeLocation(),
    ]
    return rules


def _keep_tensorized_loops_scalar():
    """A postproc (before RewriteParallelVectorizeUnroll) that marks the innermost loop around
    every block MultiLevelTilingWithIntrin blockized, so that no loop around an intrinsic call
    gets vectorized. TVM's vectorizer otherwise widens the intrinsic's own vector operands
    ("Cannot broadcast lanes=4 to 16" at build time): whenever an intrinsic covers fewer output
    channels than a packed block (ARM's 4 or AVX2's 8 of 16) the tile around it can be
    vectorized. The loop annotation ends the vectorizer's search (it skips annotated loops)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.postproc import PyPostproc

    @derived_object
    class KeepTensorizedLoopsScalar(PyPostproc):
        def _initialize_with_tune_context(self, context) -> None:
            pass

        def apply(self, sch) -> bool:
            for block in sch.get_child_blocks(sch.get_sblock("root")):
                if str(sch.get(block).annotations.get(AUTO_TENSORIZE, "")):
                    loops = sch.get_loops(block)
                    if loops:
                        sch.annotate(loops[-1], KEEP_SCALAR, 1)
            return True

        def clone(self):
            return KeepTensorizedLoopsScalar()

    return KeepTensorizedLoopsScalar()


def postprocs():
    """``Postproc::DefaultCPUTensorization``, plus ``_keep_tensorized_loops_scalar``."""
    from tvm.s_tir import meta_schedule as ms

    return [ms.postproc.DisallowDynamicLoop(), _keep_tensorized_loops_scalar(),
            ms.postproc.RewriteParallelVectorizeUnroll(),
            ms.postproc.RewriteReductionBlock(),
            ms.postproc.RewriteTensorize(vectorize_init_loop=True),
            ms.postproc.RewriteLayout()]


@functools.cache
def _register_pack_rule() -> None:
    import tvm_ffi

    tvm_ffi.register_global_func(f"s_tir.meta_schedule.cpu.{PACK_RULE}", schedule_pack,
                                 override=True)


def conv_tile_spaces(sch, *, intrinsic: str, lanes: int, registers: int,
                     temporaries: int = 1, limit: int = 8) -> list:
    """The ``schedule_conv_tile`` design spaces of a task with one packed conv: one per
    register tile of ``register_tiles`` (the channel split inside the reduction sampled).
    A tile the task's structure does not admit is skipped; none for any other task."""
    blocks = [b for b in sch.get_child_blocks(sch.get_sblock("root"))
              if str(sch.get(b).annotations.get(ANN_KERNEL, "")) == "qconv2d"]
    if len(blocks) != 1:
        return []
    extents = [int(sch.get(loop).extent) for loop in sch.get_loops(blocks[0])]
    if len(extents) != 9:
        return []
    spaces = []
    for tile in register_tiles(*extents[1:4], lanes=lanes, registers=registers,
                               temporaries=temporaries, limit=limit):
        space = sch.copy()
        try:
            schedule_conv_tile(space, blocks[0], intrinsic=intrinsic, lanes=lanes, tile=tile)
        except Exception:  # noqa: BLE001 - TVM's ScheduleError: this tile does not apply
            continue
        spaces.append(space)
    return spaces


def conv_tile_space_fn(spec: TargetSpec, intrinsic: str):
    """``conv_tile_spaces`` for ``spec``'s register file and ``intrinsic``: schedule ->
    design spaces (what ``space_generator``'s ScheduleFn calls)."""
    cap = int8_capability(spec)
    return functools.partial(conv_tile_spaces, intrinsic=intrinsic, lanes=cap.lanes,
                             registers=vector_registers(spec.kind, cap.lanes),
                             temporaries=2 if cap.reduce_range else 1)


def space_generator(mod: tvm.IRModule, spec: TargetSpec):
    """The design space of an int8 task on ``spec``, or None for any other task (the caller
    keeps TVM's default, ``"post-order-apply"``): TVM's rules with the intrinsic
    (PostOrderApply), and for a task with a tensorizable packed conv, the union of that with
    the ``schedule_conv_tile`` spaces, so the tuner measures both and keeps the faster. The
    tile spaces come first: ``sketch_schedule`` (untuned builds) takes the first that
    tensorizes, the largest register tile."""
    if spec.kind not in ("x86", "arm64") or not is_int8_task(mod):
        return None
    from tvm.s_tir import meta_schedule as ms

    load_tensor_intrinsics(spec.kind)
    _register_pack_rule()
    intrinsic = task_intrinsic(mod, int8_capability(spec))
    mutators = ms.mutator.Mutator.create("llvm")
    rules = ms.space_generator.PostOrderApply(
        sch_rules=schedule_rules(spec.kind, intrinsic), postprocs=postprocs(),
        mutator_probs=mutators)
    if intrinsic is None or not any(str(a.get(ANN_KERNEL)) == "qconv2d"
                                    for a in _block_annotations(mod)):
        return rules
    tiles = ms.space_generator.ScheduleFn(conv_tile_space_fn(spec, intrinsic), sch_rules=[],
                                          postprocs=postprocs(), mutator_probs=mutators)
    return ms.space_generator.SpaceGeneratorUnion([tiles, rules], sch_rules=[],
                                                  postprocs=postprocs(), mutator_probs=mutators)


def tensorized(sch) -> bool:
    """Whether a schedule's trace tensorizes (contains a ``tensorize`` instruction)."""
    return any(inst.kind.name == "Tensorize" for inst in sch.trace.insts)


def _tensorize_attempted(sch) -> bool:
    """Whether MultiLevelTilingWithIntrin blockized a block for an intrinsic."""
    return any(inst.kind.name == "Annotate" and str(inst.attrs[0]) == AUTO_TENSORIZE
               and str(inst.inputs[1]) for inst in sch.trace.insts)


def sketch_schedule(mod: tvm.IRModule, spec: TargetSpec, *, seed: int = 0, tries: int = 8):
    """One schedule of ``mod`` (an int8 task) from our design space, post-processed, without
    measuring: the first sample that tensorizes, or, for a task nothing tensorizes (grouped
    convs, packing kernels), the first valid one. A sample the intrinsic was meant for but
    that did not tensorize (its activation stage was inlined into the reduction) is dropped.
    None when ``tries`` samplings of the space give nothing valid."""
    from tvm.s_tir import meta_schedule as ms

    space = space_generator(mod, spec)
    if space is None:
        return None
    for attempt in range(tries):
        ctx = ms.TuneContext(mod=mod, target=spec.to_tvm(), space_generator=space,
                             search_strategy="replay-trace", rand_state=seed + attempt,
                             num_threads=1)
        for sch in ctx.generate_design_space():
            if not all(p.apply(sch) for p in ctx.space_generator.postprocs):
                continue
            if tensorized(sch) or not _tensorize_attempted(sch):
                return sch
    return None


def sketch_database(prepared: tvm.IRModule, spec: TargetSpec, database=None, *, seed: int = 0):
    """Commit one unmeasured sketch per int8 task of ``prepared`` (``tune.prepare``'s output)
    into ``database`` (default: a new MemoryDatabase); returns (database, task names that
    tensorize, task names without a schedule). Tasks that already have a record keep it."""
    from tvm.s_tir import meta_schedule as ms

    load_tensor_intrinsics(spec.kind)
    database = database if database is not None else ms.database.MemoryDatabase()
    target = spec.to_tvm()
    done, missing = [], []
    for task in ms.relax_integration.extract_tasks(prepared, target):
        mod = task.dispatched[0]
        if not is_int8_task(mod):
            continue
        if database.has_workload(mod) and database.query_tuning_record(mod, target,
                                                                       task.task_name):
            continue
        sch = sketch_schedule(mod, spec, seed=seed)
        if sch is None:
            missing.append(str(task.task_name))
            continue
        workload = database.commit_workload(mod)
        database.commit_tuning_record(ms.database.TuningRecord(
            trace=sch.trace, workload=workload, run_secs=[1.0], target=target,
            args_info=ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
        if tensorized(sch):
            done.append(str(task.task_name))
    return database, done, missing


def assembly(executable) -> str:
    """The assembly of every LLVM module in a compiled executable (for checking which
    instructions the kernels use)."""
    module = getattr(executable, "mod", executable)
    out, seen, stack = [], set(), [module]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        if m.kind in ("llvm", "c"):
            try:
                out.append(m.inspect_source("asm"))
            except Exception:  # noqa: BLE001 - a module without assembly
                pass
        stack.extend(m.imports)
    return "\n".join(out)


if space_generator not in SPACE_GENERATORS:  # tune.py asks every registered generator
    SPACE_GENERATORS.append(space_generator)
