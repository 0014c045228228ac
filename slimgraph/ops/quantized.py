"""Integer (u8 activations x s8 weights) conv and linear ops, and the float <-> u8 edges.

These are the ops a quantization pass rewrites conv/linear layers into. Each is a
``torch.library.custom_op`` with a ``register_fake`` (so it survives ``torch.export`` as one
node) and an exact PyTorch reference implementation; ``slimgraph.backends.tvm.int8`` lowers
them to integer TVM kernels that compute the same bits.

    slimgraph::quantize_u8(x: f32, scale: float, zp: int) -> u8
        q = clamp(round_half_to_even(x / float32(scale)) + zp, 0, 255)      (ONNX QuantizeLinear)
    slimgraph::dequantize_u8(q: u8, scale: float, zp: int) -> f32
        x = float32(q - zp) * float32(scale)                               (ONNX DequantizeLinear)
    slimgraph::qconv2d(x: u8 NCHW, x_zp, w: s8 OIHW, bias: s32 (O,), scale: f32 (O,), out_zp,
                       stride, padding, dilation, groups, qmin, qmax) -> u8 NCHW
    slimgraph::qlinear(x: u8 (N, K), x_zp, w: s8 (M, K), bias: s32 (M,), scale: f32 (M,),
                       out_zp, qmin, qmax) -> u8 (N, M)
    slimgraph::qadd(a: u8, a_zp, a_scale: float, b: u8, b_zp, b_scale: float, out_zp, qmin,
                    qmax) -> u8 (broadcast shape)
        out = clamp(floor((a - a_zp) * a_scale + (b - b_zp) * b_scale + 1/2) + out_zp, qmin, qmax)
        a_scale = s_a / s_out, b_scale = s_b / s_out: a residual add (and its ReLU, as qmin)
        on uint8 codes, both products exact as below (aligned to the larger shift)

Semantics of qconv2d / qlinear (all integer, no float arithmetic anywhere):

    acc[o]  = sum_k (x[k] - x_zp) * w[o, k] + bias[o]               exact, must fit in int32
              (conv padding holds x_zp, i.e. real zero; weights are symmetric: zero point 0)
    y[o]    = floor(acc[o] * scale[o] + 1/2)                         round half up (toward +inf)
    out[o]  = clamp(y[o] + out_zp, qmin, qmax)                       as uint8

``acc * scale`` is the *exact* real product of the integer and the float32 value of ``scale``
(no float rounding): every float32 ``scale`` in [0, 2**23) is ``mult * 2**-shift`` exactly,
with ``mult < 2**24`` and ``1 <= shift <= 62`` (``requant_multiplier``), so

    y = (acc * mult + 2**(shift - 1)) >> shift                       int64, arithmetic shift

which is what both the reference and the TVM kernels evaluate, bit for bit on every target.
``bias`` holds everything constant per channel (the float bias, zero-point cross terms of a
per-tensor weight zero point, ...); ``scale`` is the requantization multiplier
``s_x * s_w[o] / s_out``. ``qmin``/``qmax`` (in [0, 255]) also express a fused ReLU
(``qmin = out_zp``) or ReLU6 (``qmax = out_zp + round(6 / s_out)``).

Domain: x_zp, out_zp in [0, 255]; 0 <= qmin <= qmax <= 255; scale finite, >= 0 and < 2**23.
``acc`` must fit int32 (the references raise otherwise; kernels would wrap): guaranteed when the
reduction length K (= C_in / groups * KH * KW) satisfies ``K * 255 * 128 + max|bias| < 2**31``,
e.g. K <= 65_000 with |bias| < 2**24. Integer-only targets whose dot products saturate int16
pairs (x86 without VNNI) need 7-bit weights; see ``slimgraph.backends.tvm.intrinsics``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from slimgraph.errors import SlimgraphError

U8_MIN, U8_MAX = 0, 255
MAX_SHIFT = 62  # beyond it, |acc * scale| < 2**55 * 2**-63 < 1/2: the result is exactly 0
MAX_SCALE = float(2**23)
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


class QuantizationError(SlimgraphError, ValueError):
    """Quantized op arguments outside their domain (dtype, shape, zero point, scale, range)."""


# ---------------------------------------------------------------- requantization

def requant_multiplier(scale) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``scale`` (array-like) -> (mult, shift), int64 arrays with
    ``float32(scale) == mult * 2.0**-shift`` exactly, ``0 <= mult < 2**24``, ``1 <= shift <= 62``.

    Scales so small that ``acc * scale`` rounds to 0 for every int32 ``acc`` get (0, 1).
    """
    s = np.asarray(scale, dtype=np.float32).astype(np.float64)
    if not np.all(np.isfinite(s)) or np.any(s < 0) or np.any(s >= MAX_SCALE):
        raise QuantizationError(f"requantization scales must be finite, >= 0 and < 2**23; got "
                                f"min {s.min(initial=0.0)}, max {s.max(initial=0.0)}")
    mant, exp = np.frexp(s)  # s = mant * 2**exp, mant in [0.5, 1): 24 significant bits
    mult = np.round(mant * (1 << 24)).astype(np.int64)  # exact: float32 has 24-bit significands
    shift = (24 - exp).astype(np.int64)
    tiny = (shift > MAX_SHIFT) | (mult == 0)
    mult = np.where(tiny, 0, mult)
    shift = np.where(tiny, 1, shift)
    return mult, shift


def requantize(acc: torch.Tensor, scale: torch.Tensor, out_zp: int, qmin: int,
               qmax: int) -> torch.Tensor:
    """The epilogue of qconv2d/qlinear: int accumulators (channels on dim 1) -> uint8."""
    acc = acc.to(torch.int64)
    if acc.numel() and (int(acc.min()) < INT32_MIN or int(acc.max()) > INT32_MAX):
        raise QuantizationError("the int32 accumulator overflows: reduce the reduction length, "
                                "the bias or the operands' range")
    mult, shift = (torch.from_numpy(a) for a in requant_multiplier(scale.detach().cpu()))
    view = (1, -1) + (1,) * (acc.dim() - 2)
    mult, shift = mult.view(view), shift.view(view)
    rounding = torch.bitwise_left_shift(torch.ones_like(shift), shift - 1)
    y = torch.bitwise_right_shift(acc * mult + rounding, shift)
    # contiguous: uint8 codes are read by ops that run on them unchanged (max pool), and
    # torch's uint8 max_pool2d refuses channels-last input (a permuted ONNX graph makes one)
    return torch.clamp(y + out_zp, qmin, qmax).to(torch.uint8).contiguous()


# ---------------------------------------------------------------- argument checks

def _check_range(what: str, value: int, lo: int = U8_MIN, hi: int = U8_MAX) -> None:
    if not lo <= int(value) <= hi:
        raise QuantizationError(f"{what} = {value} is outside [{lo}, {hi}]")


def _check_dtype(what: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise QuantizationError(f"{what} must be {dtype}, got {t.dtype}")


def _check_out_params(x_zp: int, out_zp: int, qmin: int, qmax: int) -> None:
    _check_range("x_zp", x_zp)
    _check_range("out_zp", out_zp)
    _check_range("qmin", qmin)
    _check_range("qmax", qmax)
    if qmin > qmax:
        raise QuantizationError(f"qmin = {qmin} > qmax = {qmax}")


def _check_channel_params(bias: torch.Tensor, scale: torch.Tensor, channels: int) -> None:
    _check_dtype("bias", bias, torch.int32)
    _check_dtype("scale", scale, torch.float32)
    for what, t in (("bias", bias), ("scale", scale)):
        if tuple(t.shape) != (channels,):
            raise QuantizationError(f"{what} must have shape ({channels},), got {tuple(t.shape)}")


def _pair(what: str, v: Sequence[int]) -> tuple[int, int]:
    v = tuple(int(i) for i in v)
    if len(v) == 1:
        v = v * 2
    if len(v) != 2:
        raise QuantizationError(f"{what} must have 1 or 2 entries, got {list(v)}")
    return v


def conv_out_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def _check_conv(x, w, bias, scale, stride, padding, dilation, groups, x_zp, out_zp, qmin, qmax):
    """Validate qconv2d's arguments; returns the output shape."""
    _check_dtype("x", x, torch.uint8)
    _check_dtype("w", w, torch.int8)
    _check_out_params(x_zp, out_zp, qmin, qmax)
    if x.dim() != 4 or w.dim() != 4:
        raise QuantizationError(f"qconv2d wants x NCHW and w OIHW, got {tuple(x.shape)} and "
                                f"{tuple(w.shape)}")
    n, c, h, wd = x.shape
    o, i, kh, kw = w.shape
    if groups < 1 or c % groups or o % groups or i * groups != c:
        raise QuantizationError(f"qconv2d: {c} input channels, weight {tuple(w.shape)} and "
                                f"groups={groups} do not fit")
    _check_channel_params(bias, scale, o)
    (sh, sw), (ph, pw), (dh, dw) = (_pair("stride", stride), _pair("padding", padding),
                                    _pair("dilation", dilation))
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise QuantizationError(f"qconv2d: bad stride {stride}, padding {padding} or dilation "
                                f"{dilation}")
    oh, ow = conv_out_size(h, kh, sh, ph, dh), conv_out_size(wd, kw, sw, pw, dw)
    if oh < 1 or ow < 1:
        raise QuantizationError(f"qconv2d: empty output for input {tuple(x.shape)}")
    return (n, o, oh, ow)


# ---------------------------------------------------------------- the ops

@torch.library.custom_op("slimgraph::qconv2d", mutates_args=())
def qconv2d(x: torch.Tensor, x_zp: int, w: torch.Tensor, bias: torch.Tensor,
            scale: torch.Tensor, out_zp: int, stride: list[int], padding: list[int],
            dilation: list[int], groups: int, qmin: int, qmax: int) -> torch.Tensor:
    """u8 NCHW x s8 OIHW -> u8 NCHW; see the module docstring for the exact semantics."""
    _check_conv(x, w, bias, scale, stride, padding, dilation, groups, x_zp, out_zp, qmin, qmax)
    # float64 is exact here: every product and partial sum is an integer below 2**53.
    xs = x.to(torch.float64) - float(x_zp)  # zero padding of x - x_zp == padding x with x_zp
    acc = F.conv2d(xs, w.to(torch.float64), None, _pair("stride", stride),
                   _pair("padding", padding), _pair("dilation", dilation), groups)
    acc = acc.round().to(torch.int64) + bias.to(torch.int64).view(1, -1, 1, 1)
    return requantize(acc, scale, out_zp, qmin, qmax)


@qconv2d.register_fake
def _qconv2d_fake(x, x_zp, w, bias, scale, out_zp, stride, padding, dilation, groups, qmin,
                  qmax):
    shape = _check_conv(x, w, bias, scale, stride, padding, dilation, groups, x_zp, out_zp,
                        qmin, qmax)
    return x.new_empty(shape, dtype=torch.uint8)


def _check_linear(x, w, bias, scale, x_zp, out_zp, qmin, qmax):
    _check_dtype("x", x, torch.uint8)
    _check_dtype("w", w, torch.int8)
    _check_out_params(x_zp, out_zp, qmin, qmax)
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise QuantizationError(f"qlinear wants x (N, K) and w (M, K), got {tuple(x.shape)} "
                                f"and {tuple(w.shape)}")
    _check_channel_params(bias, scale, w.shape[0])
    return (x.shape[0], w.shape[0])


@torch.library.custom_op("slimgraph::qlinear", mutates_args=())
def qlinear(x: torch.Tensor, x_zp: int, w: torch.Tensor, bias: torch.Tensor,
            scale: torch.Tensor, out_zp: int, qmin: int, qmax: int) -> torch.Tensor:
    """u8 (N, K) x s8 (M, K) -> u8 (N, M); see the module docstring for the exact semantics."""
    _check_linear(x, w, bias, scale, x_zp, out_zp, qmin, qmax)
    acc = (x.to(torch.float64) - float(x_zp)) @ w.to(torch.float64).T  # exact (see qconv2d)
    acc = acc.round().to(torch.int64) + bias.to(torch.int64).view(1, -1)
    return requantize(acc, scale, out_zp, qmin, qmax)


@qlinear.register_fake
def _qlinear_fake(x, x_zp, w, bias, scale, out_zp, qmin, qmax):
    return x.new_empty(_check_linear(x, w, bias, scale, x_zp, out_zp, qmin, qmax),
                       dtype=torch.uint8)


MAX_SHIFT_GAP = 28  # qadd: a_scale / b_scale within 2**±28 keeps both terms exact in int64


def qadd_terms(a_scale: float, b_scale: float) -> tuple[int, int, int]:
    """(mult_a, mult_b, shift): ``float32(a_scale) == mult_a * 2**-shift`` and the same for b,
    exactly, with one shared shift (the larger of the two; the other multiplier shifted up).
    |(a - a_zp) * mult_a| < 2**8 * 2**24 * 2**28: the int64 sum cannot overflow."""
    mult, shifts = requant_multiplier([a_scale, b_scale])
    (ma, mb), (sa, sb) = (int(v) for v in mult), (int(v) for v in shifts)
    sa, sb = (sb if ma == 0 else sa), (sa if mb == 0 else sb)  # a zero term has no shift
    if abs(sa - sb) > MAX_SHIFT_GAP:
        raise QuantizationError(f"qadd: the scales {a_scale:.3g} and {b_scale:.3g} are more than "
                                f"2**{MAX_SHIFT_GAP} apart")
    shift = max(sa, sb)
    return ma << (shift - sa), mb << (shift - sb), shift


def _check_add(a, a_zp, a_scale, b, b_zp, b_scale, out_zp, qmin, qmax):
    """(the output shape, ``qadd_terms``) of valid ``qadd`` arguments."""
    _check_dtype("a", a, torch.uint8)
    _check_dtype("b", b, torch.uint8)
    _check_out_params(a_zp, out_zp, qmin, qmax)
    _check_range("b_zp", b_zp)
    terms = qadd_terms(a_scale, b_scale)
    try:
        return tuple(torch.broadcast_shapes(a.shape, b.shape)), terms
    except RuntimeError as err:
        raise QuantizationError(f"qadd: shapes {tuple(a.shape)} and {tuple(b.shape)} do not "
                                "broadcast") from err


@torch.library.custom_op("slimgraph::qadd", mutates_args=())
def qadd(a: torch.Tensor, a_zp: int, a_scale: float, b: torch.Tensor, b_zp: int,
         b_scale: float, out_zp: int, qmin: int, qmax: int) -> torch.Tensor:
    """u8 + u8 -> u8 (broadcasting); see the module docstring for the exact semantics."""
    _, (ma, mb, shift) = _check_add(a, a_zp, a_scale, b, b_zp, b_scale, out_zp, qmin, qmax)
    v = (a.to(torch.int64) - a_zp) * ma + (b.to(torch.int64) - b_zp) * mb + (1 << (shift - 1))
    y = torch.bitwise_right_shift(v, shift)
    return torch.clamp(y + out_zp, qmin, qmax).to(torch.uint8).contiguous()  # see requantize


@qadd.register_fake
def _qadd_fake(a, a_zp, a_scale, b, b_zp, b_scale, out_zp, qmin, qmax):
    shape, _ = _check_add(a, a_zp, a_scale, b, b_zp, b_scale, out_zp, qmin, qmax)
    return a.new_empty(shape, dtype=torch.uint8)


def _check_edge(scale: float, zp: int) -> None:
    _check_range("zp", zp)
    if not (np.isfinite(scale) and np.float32(scale) > 0):
        raise QuantizationError(f"scale must be finite and > 0 as a float32, got {scale}")


@torch.library.custom_op("slimgraph::quantize_u8", mutates_args=())
def quantize_u8(x: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
    """float32 -> uint8: clamp(round_half_to_even(x / float32(scale)) + zp, 0, 255).

    The division is one IEEE float32 division (not a multiplication by 1/scale). NaN maps to
    an unspecified value.
    """
    _check_dtype("x", x, torch.float32)
    _check_edge(scale, zp)
    q = torch.round(x / torch.tensor(scale, dtype=torch.float32)) + zp
    return torch.clamp(q, U8_MIN, U8_MAX).to(torch.uint8).contiguous()  # see requantize


@quantize_u8.register_fake
def _quantize_u8_fake(x, scale, zp):
    _check_dtype("x", x, torch.float32)
    _check_edge(scale, zp)
    return x.new_empty(x.shape, dtype=torch.uint8)


@torch.library.custom_op("slimgraph::dequantize_u8", mutates_args=())
def dequantize_u8(q: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
    """uint8 -> float32: float32(q - zp) * float32(scale) (one float32 multiplication)."""
    _check_dtype("q", q, torch.uint8)
    _check_edge(scale, zp)
    return (q.to(torch.int32) - zp).to(torch.float32) * torch.tensor(scale, dtype=torch.float32)


@dequantize_u8.register_fake
def _dequantize_u8_fake(q, scale, zp):
    _check_dtype("q", q, torch.uint8)
    _check_edge(scale, zp)
    return torch.empty_like(q, dtype=torch.float32)
