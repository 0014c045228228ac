"""A quantized graph in ONNX's QDQ form, for ONNX Runtime and other runtimes.

ONNX has no op with ``qconv2d``'s exact fixed-point requantization, so ``to_qdq`` rewrites a
copy of an integer graph into the form every ONNX quantization tool writes: each integer layer
becomes ``DequantizeLinear(x) -> Conv/Gemm(DequantizeLinear(w_int8, per-channel scales), float
bias) -> [Clip] -> QuantizeLinear(y)``; runtimes fuse the pattern back into integer kernels
(ONNX Runtime's QLinearConv); a ``qadd`` becomes ``DequantizeLinear`` x 2 -> ``Add`` -> [Clip]
-> ``QuantizeLinear`` (QLinearAdd). The values agree with slimgraph's integer reference to one
quantization step (ONNX rounds the requantization half to even in float, the integer kernel half
up in fixed point). The layer's quantization parameters come from ``node.meta[QDQ_META]``,
written by the quantize pass.

``register_onnx_symbolics()`` maps ``slimgraph::quantize_u8`` / ``dequantize_u8`` /
``dequantize_s8`` to ``QuantizeLinear`` / ``DequantizeLinear`` for torch's ONNX exporter.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

QDQ_META = "slimgraph_qdq"
_OPSET = 13


@dataclass(frozen=True)
class QDQInfo:
    """A layer's quantization, as QDQ needs it: input and output (scale, zero point) and the
    weights' per-output-channel scales."""

    in_scale: float
    in_zp: int
    out_scale: float
    out_zp: int
    weight_scales: tuple[float, ...]


@dataclass(frozen=True)
class QAddInfo:
    """A ``qadd``'s quantization, as QDQ needs it: both inputs' and the output's (scale,
    zero point)."""

    a_scale: float
    a_zp: int
    b_scale: float
    b_zp: int
    out_scale: float
    out_zp: int


@torch.library.custom_op("slimgraph::dequantize_s8", mutates_args=())
def dequantize_s8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 (O, ...) -> float32: w * scale[o] (symmetric, per output channel)."""
    return w.to(torch.float32) * scale.view(-1, *[1] * (w.dim() - 1))


@dequantize_s8.register_fake
def _dequantize_s8_fake(w, scale):
    return torch.empty_like(w, dtype=torch.float32)


def has_integer_ops(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and str(n.target).startswith("slimgraph.q")
               for n in gm.graph.nodes)


def to_qdq(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` with every qconv2d / qlinear / qadd in QDQ form (see the module
    docstring)."""
    gm = copy.deepcopy(gm)
    for node in list(gm.graph.nodes):
        info = node.meta.get(QDQ_META)
        if isinstance(info, QDQInfo):
            _rewrite(gm, node, info)
        elif isinstance(info, QAddInfo):
            _rewrite_add(gm, node, info)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm


def _rewrite(gm: fx.GraphModule, node: fx.Node, info: QDQInfo) -> None:
    conv = node.target is torch.ops.slimgraph.qconv2d.default
    xq, _, w_node, b_node = node.args[:4]
    qmin, qmax = node.args[-2:]
    ws = torch.tensor(info.weight_scales, dtype=torch.float32)
    bias = _get(gm, b_node).double() * info.in_scale * ws.double()
    names = [_register(gm, f"{node.name}_{k}", t) for k, t in
             (("w_scale", ws), ("bias_f", bias.float()))]
    graph = gm.graph
    with graph.inserting_before(node):
        x = graph.call_function(torch.ops.slimgraph.dequantize_u8.default, (xq, info.in_scale, info.in_zp))
        w = graph.call_function(torch.ops.slimgraph.dequantize_s8.default, (w_node, graph.get_attr(names[0])))
        b = graph.get_attr(names[1])
        if conv:
            stride, padding, dilation, groups = node.args[6:10]
            y = graph.call_function(F.conv2d, (x, w, b, tuple(stride), tuple(padding), tuple(dilation), groups))
        else:
            y = graph.call_function(F.linear, (x, w, b))
        y = _clip(graph, y, qmin, qmax, info.out_scale, info.out_zp)
        q = graph.call_function(torch.ops.slimgraph.quantize_u8.default, (y, info.out_scale, info.out_zp))
    node.replace_all_uses_with(q)
    graph.erase_node(node)


def _rewrite_add(gm: fx.GraphModule, node: fx.Node, info: QAddInfo) -> None:
    """qadd -> DequantizeLinear(a) + DequantizeLinear(b) -> [Clip] -> QuantizeLinear."""
    a, b = node.args[0], node.args[3]
    qmin, qmax = node.args[-2:]
    graph = gm.graph
    with graph.inserting_before(node):
        x = graph.call_function(torch.ops.slimgraph.dequantize_u8.default, (a, info.a_scale, info.a_zp))
        y = graph.call_function(torch.ops.slimgraph.dequantize_u8.default, (b, info.b_scale, info.b_zp))
        s = graph.call_function(torch.add, (x, y))
        s = _clip(graph, s, qmin, qmax, info.out_scale, info.out_zp)
        q = graph.call_function(torch.ops.slimgraph.quantize_u8.default, (s, info.out_scale, info.out_zp))
    node.replace_all_uses_with(q)
    graph.erase_node(node)


def _clip(graph: fx.Graph, y: fx.Node, qmin: int, qmax: int, scale: float, zp: int) -> fx.Node:
    """The float clamp a qmin/qmax narrower than [0, 255] stands for (a fused ReLU/ReLU6)."""
    if qmin > 0 or qmax < 255:
        return graph.call_function(torch.clamp, (y, (qmin - zp) * scale, (qmax - zp) * scale))
    return y


def _get(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    obj = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj


def _register(gm: fx.GraphModule, base: str, t: torch.Tensor) -> str:
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    gm.register_buffer(name, t)
    return name


# ------------------------------------------------------------------------- ONNX symbolics
def _constant(g, value: torch.Tensor):
    return g.op("Constant", value_t=value)


def _scalar_args(scale, zp) -> tuple[float, int]:
    from torch.onnx import symbolic_helper

    return symbolic_helper._maybe_get_const(scale, "f"), symbolic_helper._maybe_get_const(zp, "i")


def _quantize_u8(g, x, scale, zp):
    s, z = _scalar_args(scale, zp)
    return g.op("QuantizeLinear", x, _constant(g, torch.tensor(s, dtype=torch.float32)),
                _constant(g, torch.tensor(z, dtype=torch.uint8)))


def _dequantize_u8(g, q, scale, zp):
    s, z = _scalar_args(scale, zp)
    return g.op("DequantizeLinear", q, _constant(g, torch.tensor(s, dtype=torch.float32)),
                _constant(g, torch.tensor(z, dtype=torch.uint8)))


def _dequantize_s8(g, w, scale):
    from torch.onnx import symbolic_helper

    channels = symbolic_helper._get_tensor_dim_size(w, 0)
    zero = _constant(g, torch.zeros(channels, dtype=torch.int8))
    return g.op("DequantizeLinear", w, scale, zero, axis_i=0)


_REGISTERED = []


def register_onnx_symbolics() -> None:
    """Teach torch's (TorchScript) ONNX exporter the QDQ ops (once per process)."""
    if _REGISTERED:
        return
    for name, fn in (("quantize_u8", _quantize_u8), ("dequantize_u8", _dequantize_u8),
                     ("dequantize_s8", _dequantize_s8)):
        torch.onnx.register_custom_op_symbolic(f"slimgraph::{name}", fn, _OPSET)
    _REGISTERED.append(True)
