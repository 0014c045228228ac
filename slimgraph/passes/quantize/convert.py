"""The rewrite half of quantization: annotated float layers -> integer ops.

``annotate`` (PT2E's shape: it only decides, and writes a frozen ``QuantAnnotation`` into the
layer node's ``meta``) finds the conv/linear layers to quantize and the activation each one
absorbs. ``convert`` rewrites a copy of the graph from the annotations and the calibrated
``QParams`` of the float tensors:

- a conv/linear becomes ``slimgraph::qconv2d`` / ``qlinear``: int8 weights (symmetric, per
  output channel or per tensor, ``bits`` wide), an int32 bias ``round(b / (s_in s_w))``, the
  requantization multiplier ``s_in s_w / s_out``, and the fused ReLU / ReLU6 as the output
  clamp (``qmin`` = the zero point, ``qmax`` = the code of 6);
- its input is the uint8 output of another quantized layer when one reaches it through
  ``max_pool`` / ``flatten`` / ``reshape`` (which run on uint8 unchanged: maximum and layout
  commute with a monotone affine map), else a ``quantize_u8`` of the float tensor;
- a residual add whose two operands are both quantized values becomes ``slimgraph::qadd`` on
  their uint8 codes, with a ReLU/ReLU6 after it fused as the output clamp, when its output was
  calibrated (``residual_adds``); so ResNet's residual stream stays uint8 between blocks;
- float users of a quantized value (global pooling, the graph output, an add that stays float)
  read a ``dequantize_u8`` of it.

Everything the annotation does not cover stays float, exactly as it was.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from slimgraph.ops.qdq import QDQ_META, QAddInfo, QDQInfo
from slimgraph.ops.quantized import QuantizationError, qadd_terms
from slimgraph.passes._fx import fresh_attr_name
from slimgraph.passes.quantize.observers import QParams, weight_scales

META = "slimgraph_quant"
_RELU_FNS = {torch.relu, F.relu}
_RELU6_FNS = {F.relu6}
_TRANSPARENT_FNS = {F.max_pool2d, torch.flatten, torch.reshape, operator.getitem}
_TRANSPARENT_METHODS = {"view", "reshape", "flatten", "contiguous"}
_ADD_FNS = {operator.add, operator.iadd, torch.add}


@dataclass(frozen=True)
class QuantAnnotation:
    """What ``annotate`` decided for one layer (stored in ``node.meta[META]``)."""

    kind: str  # "conv2d" | "linear"
    activation: str | None  # the node of the fused activation, if any
    clamp: str | None  # "relu" | "relu6"
    weight_bits: int
    per_channel: bool


def activation_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """"relu" / "relu6" if ``node`` is one (module or function form), else None."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if type(mod) is nn.ReLU:
            return "relu"
        if type(mod) is nn.ReLU6 or (type(mod) is nn.Hardtanh and (mod.min_val, mod.max_val) == (0.0, 6.0)):
            return "relu6"
        return None
    if node.op == "call_function":
        if node.target in _RELU_FNS and len(node.args) == 1:
            return "relu"
        if node.target in _RELU6_FNS:
            return "relu6"
        if node.target is F.hardtanh and tuple(node.args[1:3]) == (0.0, 6.0):
            return "relu6"
    if node.op == "call_method" and node.target == "relu" and len(node.args) == 1:
        return "relu"
    return None


def is_transparent(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Ops that run on uint8 codes unchanged (they commute with the dequantization)."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.MaxPool2d | nn.Flatten)
    if node.op == "call_function":
        if node.target is operator.getitem:
            return False  # slicing is fine, but getitem also reads tuples: not worth the risk
        return node.target in _TRANSPARENT_FNS
    return node.op == "call_method" and node.target in _TRANSPARENT_METHODS


def residual_add(node: fx.Node) -> bool:
    """A plain add of two tensors (``a + b``, ``torch.add(a, b)``, ``a.add(b)``; no alpha)."""
    tensor_args = len(node.args) == 2 and not node.kwargs and all(
        isinstance(a, fx.Node) for a in node.args)
    if node.op == "call_function":
        return node.target in _ADD_FNS and tensor_args
    return node.op == "call_method" and node.target == "add" and tensor_args


def residual_adds(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node, str | None]]:
    """(add, the node its output is read at, the fused activation kind) for every residual add:
    the output is that of a ReLU/ReLU6 right after it when the add is its only input."""
    found = []
    for node in gm.graph.nodes:
        if residual_add(node):
            act, kind = fused_activation(gm, node)
            found.append((node, act or node, kind))
    return found


def fused_activation(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node | None, str | None]:
    """The ReLU/ReLU6 right after ``node`` when it is the layer's only user."""
    users = list(node.users)
    if len(users) == 1:
        kind = activation_kind(gm, users[0])
        if kind is not None:
            return users[0], kind
    return None, None


# ------------------------------------------------------------------------- convert
@dataclass
class _Values:
    """uint8 twins of float nodes: ``u8[float node] = (uint8 node, its qparams)``."""

    u8: dict[fx.Node, tuple[fx.Node, QParams]]


def convert(gm: fx.GraphModule, qp: Mapping[str, QParams], symmetric: bool = False, *,
            integer_adds: bool = True) -> int:
    """Rewrite annotated layers of ``gm`` in place; ``qp`` maps float node names (layer inputs
    and fused outputs) to their calibrated uint8 parameters. With ``integer_adds``, residual
    adds of two quantized values become ``qadd``. Returns the layers converted."""
    values = _Values({})
    converted = 0
    adds = {add: (out, kind) for add, out, kind in residual_adds(gm)} if integer_adds else {}
    for node in list(gm.graph.nodes):
        ann = node.meta.get(META)
        if isinstance(ann, QuantAnnotation):
            _convert_layer(gm, node, ann, qp, values)
            converted += 1
        elif is_transparent(gm, node) and node.args and node.args[0] in values.u8:
            _twin(gm, node, values)
        elif node in adds and all(a in values.u8 for a in node.args):
            _convert_add(gm, node, *adds[node], qp, values)
    return converted


def _convert_add(gm: fx.GraphModule, node: fx.Node, out_node: fx.Node, kind: str | None,
                 qp: Mapping[str, QParams], values: _Values) -> None:
    """A residual add of two quantized values -> ``qadd`` (left float when its output was not
    calibrated or the two rescales are too far apart for the integer add)."""
    out_p = qp.get(out_node.name)
    if out_p is None:
        return
    (a, pa), (b, pb) = values.u8[node.args[0]], values.u8[node.args[1]]
    a_scale, b_scale = (float(torch.tensor(p.scale / out_p.scale, dtype=torch.float32))
                        for p in (pa, pb))
    try:
        qadd_terms(a_scale, b_scale)
    except QuantizationError:
        return
    qmin, qmax = _clamp(kind, out_p)
    with gm.graph.inserting_after(out_node):
        q = gm.graph.call_function(torch.ops.slimgraph.qadd.default, (
            a, pa.zero_point, a_scale, b, pb.zero_point, b_scale, out_p.zero_point, qmin, qmax))
    _publish(gm, q, out_node, out_p, values, QAddInfo(pa.scale, pa.zero_point, pb.scale,
                                                      pb.zero_point, out_p.scale, out_p.zero_point))


def _publish(gm: fx.GraphModule, q: fx.Node, out_node: fx.Node, out_p: QParams, values: _Values,
             info: QDQInfo | QAddInfo) -> None:
    """Make integer op ``q`` stand for float ``out_node``: its QDQ record, float readers moved
    to a dequantize of it, and ``q`` as the uint8 twin of both."""
    with gm.graph.inserting_after(q):
        deq = gm.graph.call_function(torch.ops.slimgraph.dequantize_u8.default,
                                     (q, out_p.scale, out_p.zero_point))
    q.meta[QDQ_META] = info
    out_node.replace_all_uses_with(deq, delete_user_cb=lambda u: u is not deq)
    values.u8[out_node] = values.u8[deq] = (q, out_p)


def _twin(gm: fx.GraphModule, node: fx.Node, values: _Values) -> None:
    """The uint8 version of a transparent op whose input has a uint8 twin.

    Float readers of the op (a residual add after ResNet's stem max pool) then read a
    dequantize of the twin's output: the same values (max and layout commute with the
    monotone dequantization), the op runs once on uint8, and the dequantize touches the
    smaller pooled tensor instead of the pool's input."""
    src, params = values.u8[node.args[0]]
    with gm.graph.inserting_after(node):
        twin = gm.graph.node_copy(node, lambda a: src if a is node.args[0] else a)
    values.u8[node] = (twin, params)
    if not node.users:
        return
    with gm.graph.inserting_after(twin):
        deq = gm.graph.call_function(torch.ops.slimgraph.dequantize_u8.default,
                                     (twin, params.scale, params.zero_point))
    old_input = node.args[0]
    node.replace_all_uses_with(deq)
    values.u8[deq] = (twin, params)
    gm.graph.erase_node(node)
    if (isinstance(old_input, fx.Node) and not old_input.users
            and old_input.target is torch.ops.slimgraph.dequantize_u8.default):
        gm.graph.erase_node(old_input)


def _u8_input(gm: fx.GraphModule, x: fx.Node, qp: Mapping[str, QParams], values: _Values,
              at: fx.Node) -> tuple[fx.Node, QParams]:
    if x in values.u8:
        return values.u8[x]
    params = qp[x.name]
    with gm.graph.inserting_before(at):
        q = gm.graph.call_function(torch.ops.slimgraph.quantize_u8.default,
                                   (x, params.scale, params.zero_point))
    values.u8[x] = (q, params)
    return q, params


def _convert_layer(gm: fx.GraphModule, node: fx.Node, ann: QuantAnnotation,
                   qp: Mapping[str, QParams], values: _Values) -> None:
    mod = gm.get_submodule(node.target)
    mod = getattr(mod, "layer", mod)  # a fake-quant (QAT) layer converts its trained float layer
    out_node = next(n for n in gm.graph.nodes if n.name == ann.activation) if ann.activation else node
    xq, in_p = _u8_input(gm, node.args[0], qp, values, node)
    out_p = qp[out_node.name]
    w_scale = weight_scales(mod.weight, ann.weight_bits, ann.per_channel, mse=ann.weight_bits < 8)
    limit = 2 ** (ann.weight_bits - 1) - 1
    w_view = w_scale.view(-1, *[1] * (mod.weight.dim() - 1)).double()
    w_q = torch.clamp(torch.round(mod.weight.detach().double() / w_view), -limit, limit).to(torch.int8)
    acc_scale = in_p.scale * w_scale.double()
    bias = mod.bias.detach().double() if mod.bias is not None else torch.zeros(len(w_scale), dtype=torch.float64)
    b_q = torch.round(bias / acc_scale).to(torch.int32)
    requant = (acc_scale / out_p.scale).float()
    qmin, qmax = _clamp(ann.clamp, out_p)
    w_q.slimgraph_bits = ann.weight_bits  # the cost analysis counts weights at their width
    attrs = [_buffer(gm, node, suffix, t) for suffix, t in
             (("w_q", w_q), ("b_q", b_q), ("requant", requant))]
    with gm.graph.inserting_after(out_node):
        if ann.kind == "conv2d":
            args = (xq, in_p.zero_point, attrs[0], attrs[1], attrs[2], out_p.zero_point,
                    list(mod.stride), list(mod.padding), list(mod.dilation), mod.groups, qmin, qmax)
            q = gm.graph.call_function(torch.ops.slimgraph.qconv2d.default, args)
        else:
            args = (xq, in_p.zero_point, attrs[0], attrs[1], attrs[2], out_p.zero_point, qmin, qmax)
            q = gm.graph.call_function(torch.ops.slimgraph.qlinear.default, args)
    _publish(gm, q, out_node, out_p, values, QDQInfo(in_p.scale, in_p.zero_point, out_p.scale,
                                                     out_p.zero_point,
                                                     tuple(float(v) for v in w_scale)))


def _clamp(kind: str | None, p: QParams) -> tuple[int, int]:
    if kind == "relu":
        return p.zero_point, 255
    if kind == "relu6":
        return p.zero_point, int(min(255, p.zero_point + round(6.0 / p.scale)))
    return 0, 255


def _buffer(gm: fx.GraphModule, node: fx.Node, suffix: str, t: torch.Tensor) -> fx.Node:
    name = fresh_attr_name(gm, f"{node.name}_{suffix}")
    gm.register_buffer(name, t)
    with gm.graph.inserting_before(node):
        return gm.graph.get_attr(name)

