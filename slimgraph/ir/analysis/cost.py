"""Cost analysis: MACs, parameters, weight and activation bytes, and an energy estimate per node.

Energy uses the 45 nm per-operation energies the compression literature uses (Horowitz, ISSCC
2014, as tabulated by Han et al. 2016): 32-bit float add 0.9 pJ, 32-bit float multiply 3.7 pJ,
8-bit integer multiply 0.2 pJ and 32-bit integer add 0.1 pJ (the MACs of quantized layers),
32-bit SRAM read 5 pJ, 32-bit DRAM read 640 pJ. The model is deliberately coarse and stated:
each MAC costs one multiply and one add; each weight word is fetched once from DRAM (a layer's
weights do not fit on chip); each activation element a compute node reads or writes costs one
SRAM access. Weight words scale with the stored bit width (an int8 weight is a quarter word), so
the quantization passes can report their energy saving with the same model.

MACs are those of convolutions, linear layers and matrix products, per the literature's
convention, for the example inputs' batch (batch 1 when the example input has batch 1).
Batch norm, activations and pooling count no MACs; their cost enters the energy estimate
through the activation traffic they cause (and, for batch norm, its stored statistics).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from slimgraph.ir.analysis.manager import Analysis
from slimgraph.ir.analysis.shapes import Shapes

PJ_FLOAT_ADD = 0.9
PJ_FLOAT_MULT = 3.7
PJ_INT8_MULT = 0.2  # integer MACs (quantized layers): 8-bit multiply, 32-bit add
PJ_INT32_ADD = 0.1
_INTEGER_OPS = {"slimgraph.qconv2d.default", "slimgraph.qlinear.default"}
PJ_SRAM_READ_32 = 5.0
PJ_DRAM_READ_32 = 640.0

# Ops that only re-view data; they cost no compute and no memory traffic in the model.
VIEW_OPS = {
    "reshape", "view", "flatten", "getitem", "size", "getattr", "contiguous", "squeeze",
    "unsqueeze", "Flatten", "Identity", "Dropout", "Dropout1d", "Dropout2d", "dropout", "expand",
    "permute", "transpose", "t",
}


@dataclass(frozen=True)
class NodeCost:
    op: str
    macs: int = 0
    params: int = 0
    weight_bytes: int = 0
    act_bytes: int = 0
    energy_pj: float = 0.0


@dataclass
class GraphCost:
    nodes: dict[str, NodeCost] = field(default_factory=dict)

    def _sum(self, key: str):
        return sum(getattr(c, key) for c in self.nodes.values())

    @property
    def macs(self) -> int:
        return self._sum("macs")

    @property
    def params(self) -> int:
        return self._sum("params")

    @property
    def weight_bytes(self) -> int:
        return self._sum("weight_bytes")

    @property
    def energy_pj(self) -> float:
        return float(self._sum("energy_pj"))

    def totals(self) -> dict[str, float]:
        return {"macs": self.macs, "params": self.params, "weight_bytes": self.weight_bytes,
                "energy_pj": self.energy_pj}


def op_label(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return name.split(".")[0] if "." in name and "aten" in str(node.target) else name
    if node.op == "call_method":
        return str(node.target)
    return node.op


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _conv_macs(out_shape, weight_shape, groups: int, transposed: bool, in_shape) -> int:
    k = _numel(weight_shape[2:])
    if transposed:  # each input element scatters into Cout/groups * k outputs
        return _numel(in_shape) * int(weight_shape[1]) * k
    return _numel(out_shape) * int(weight_shape[1]) * k


def _module_macs(mod: nn.Module, in_shape, out_shape) -> int:
    if isinstance(mod, nn.modules.conv._ConvNd):
        return _conv_macs(out_shape, mod.weight.shape, mod.groups, mod.transposed, in_shape)
    if isinstance(mod, nn.Linear):
        return _numel(out_shape) * mod.in_features
    if isinstance(mod, nn.Sequential):  # a layer a pass replaced by a sequence (factorized)
        return module_macs(mod, in_shape)[0]
    custom = getattr(mod, "slimgraph_macs", None)  # custom layers (perforated conv, ...) say so
    return int(custom(in_shape, out_shape)) if callable(custom) else 0


def module_macs(module: nn.Module, in_shape) -> tuple[int, tuple[int, ...]]:
    """(MACs, output shape) of a conv, linear or a sequence of them applied to ``in_shape``,
    without running it: how passes price a candidate rewrite, by this analysis's own rule."""
    in_shape = tuple(int(d) for d in in_shape)
    if isinstance(module, nn.Sequential):
        total = 0
        for child in module:
            macs, in_shape = module_macs(child, in_shape)
            total += macs
        return total, in_shape
    if isinstance(module, nn.Linear):
        out = (*in_shape[:-1], module.out_features)
    elif isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        out = (*in_shape[:-len(module.kernel_size) - 1], module.out_channels,
               *_conv_spatial(module, in_shape[-len(module.kernel_size):]))
    else:
        raise TypeError(f"module_macs: unsupported layer {type(module).__name__}")
    return _module_macs(module, in_shape, out), out


def _conv_spatial(conv: nn.modules.conv._ConvNd, size) -> tuple[int, ...]:
    if conv.padding == "same":
        return tuple(size)
    pad = (0,) * len(size) if conv.padding == "valid" else conv.padding
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                 zip(size, pad, conv.dilation, conv.kernel_size, conv.stride, strict=True))


_CONV_FNS = {torch.conv1d, torch.conv2d, torch.conv3d, torch.nn.functional.conv1d,
             torch.nn.functional.conv2d, torch.nn.functional.conv3d}
_MATMUL_FNS = {torch.matmul, operator.matmul, torch.mm, torch.bmm, torch.nn.functional.linear}


def _function_macs(node: fx.Node, shapes, arg_shape) -> int:
    out = shapes.get(node.name)
    if out is None or not hasattr(out, "shape"):
        return 0
    target = node.target
    if target in _CONV_FNS or "convolution" in str(target) or "aten.conv" in str(target):
        w = arg_shape(node.args[1])
        return _numel(out.shape) * _numel(w[1:]) if w else 0
    if str(target) in _INTEGER_OPS:  # slimgraph's integer conv / linear: weights are args[2]
        w = arg_shape(node.args[2])
        return _numel(out.shape) * _numel(w[1:]) if w else 0
    if target in _MATMUL_FNS or str(target) in ("aten.mm.default", "aten.linear.default",
                                                "aten.addmm.default", "aten.bmm.default",
                                                "aten.matmul.default"):
        a = arg_shape(node.args[1] if "addmm" in str(target) else node.args[0])
        return _numel(out.shape) * int(a[-1]) if a else 0
    return 0


def _node_tensors(gm: fx.GraphModule, node: fx.Node) -> list[torch.Tensor]:
    """The stored tensors (weights, buffers, constants) a node reads."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return [*mod.parameters(recurse=True), *mod.buffers(recurse=True)]
    tensors = []
    for arg in node.all_input_nodes:
        if arg.op == "get_attr":
            value = _get_attr(gm, arg.target)
            if isinstance(value, torch.Tensor):
                tensors.append(value)
    return tensors


def _get_attr(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


class Cost(Analysis[GraphCost]):
    """Per-node MACs, parameters, bytes and energy (``am.get(Cost, graph)``)."""

    name = "cost"

    @staticmethod
    def compute(graph, am) -> GraphCost:
        return cost(graph, am.get(Shapes, graph))


def cost(graph, shapes) -> GraphCost:
    gm = graph.gm

    def arg_shape(arg):
        s = shapes.get(arg.name) if isinstance(arg, fx.Node) else None
        return s.shape if s is not None and hasattr(s, "shape") else None

    result = GraphCost()
    n = _samples(graph)
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        label = op_label(gm, node)
        out = shapes.get(node.name)
        out_shape = out.shape if out is not None and hasattr(out, "shape") else ()
        in_shape = arg_shape(node.args[0]) if node.args else None
        if node.op == "call_module":
            macs = _module_macs(gm.get_submodule(node.target), in_shape or (), out_shape)
        elif node.op == "call_function":
            macs = _function_macs(node, shapes, arg_shape)
        else:
            macs = 0
        stored = _node_tensors(gm, node)
        params = sum(t.numel() for t in stored if t.is_floating_point() or t.dtype in
                     (torch.int8, torch.uint8, torch.int32)) if stored else 0
        if node.op == "call_module":  # parameters proper; batch-norm running stats are buffers
            params = sum(p.numel() for p in gm.get_submodule(node.target).parameters())
        elif str(node.target) in _INTEGER_OPS:  # weights and bias; not the requantization scales
            params = sum(_numel(arg_shape(a) or ()) for a in node.args[2:4])
        weight_bytes = sum(_stored_bits(t) * t.numel() // 8 for t in stored)
        act_elems = 0
        if label not in VIEW_OPS:
            act_elems = _numel(out_shape) if out_shape else 0
            act_elems += sum(_numel(arg_shape(a) or ()) for a in node.all_input_nodes
                             if a.op != "get_attr" and arg_shape(a))
        macs, act_elems = macs / n, act_elems / n  # per sample: the same on every import path
        per_mac = (PJ_INT8_MULT + PJ_INT32_ADD) if str(node.target) in _INTEGER_OPS else (
            PJ_FLOAT_MULT + PJ_FLOAT_ADD)
        energy = (macs * per_mac + weight_bytes / 4 * PJ_DRAM_READ_32
                  + act_elems * PJ_SRAM_READ_32)
        act_bytes = _numel(out_shape) * (out.dtype.itemsize if out is not None and hasattr(out, "dtype") else 4) if out_shape else 0
        result.nodes[node.name] = NodeCost(label, round(macs), int(params), int(weight_bytes),
                                           round(act_bytes / n), float(energy))
    return result


def _samples(graph) -> int:
    """Samples in the graph's example batch (dim 0 of its first input): costs are per sample,
    so a model traced at batch 8 and one exported at batch 1 report the same MACs."""
    inputs = getattr(graph, "example_inputs", None) or ()
    first = inputs[0] if inputs else None
    if isinstance(first, torch.Tensor) and first.dim() >= 2 and first.shape[0] > 0:
        return int(first.shape[0])
    return 1


def _stored_bits(t: torch.Tensor) -> int:
    """Bits per stored element; a tensor tagged by a quantization pass reports its true width."""
    return int(getattr(t, "slimgraph_bits", t.element_size() * 8))
