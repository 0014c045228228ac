"""Channel-group analysis: which channels must be pruned together, with index mappings.

Every tensor of rank >= 2 has a *channel space*: its dim 1 (NCHW, NCL, or N,F for linear
inputs). A per-channel constant that an element-wise op broadcasts against a space (e.g. a
``(1, C, 1, 1)`` scale) gets a space along its aligned dim. Rules (one per op kind, see
``_RULES``) connect spaces with *coupling edges* that carry explicit index mappings, in the
manner of Torch-Pruning's dependency graph (Fang et al., CVPR 2023):

- ``identity``   element-wise ops (broadcasting), batch norm, per-channel PReLU, activations, pooling, dropout,
                 resize, reductions over spatial dims, reshapes that keep (N, C): a_i <-> b_i
- ``index``      concat / split / chunk / ``x[:, a:b]``: input i <-> output at an offset
- ``expand``     flatten (N, C, H, W) -> (N, C*H*W): channel c <-> columns [c*HW, (c+1)*HW)
- ``group``      grouped / depthwise conv and conv-transpose: conv group g's input channels
                 <-> its output channels (whole groups are pruned; depthwise is 1:1)
- ``shared``     one module with weights called at several places: the call sites' spaces

A *unit* is a connected set of channels under these edges (one channel, or a whole conv
group); removing a unit removes exactly those channels from every space it touches. Units
that touch the same spaces form one ``ChannelGroup``. Producers (conv / conv-transpose / linear
out-channels) define a group; consumers (conv / conv-transpose / linear in-channels) read it;
members are the pass-through nodes whose parameters or arguments follow it.

Blocked (a group is never pruned, with the reason): a space that is a graph input or reaches a
graph output; a space touched by an op this analysis does not know (nothing is guessed: an
unknown op is never treated as element-wise); a group that no conv/linear produces.
"""

from __future__ import annotations

import math
import operator
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn

from slimgraph.ir.analysis.manager import Analysis
from slimgraph.ir.analysis.shapes import Shapes


# ------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Space:
    """The channel dimension of one tensor: a node's output, or a constant's aligned dim."""

    name: str  # the fx node name
    dim: int
    size: int
    const: bool = False  # a get_attr tensor (parameter or buffer) broadcast against a space


@dataclass(frozen=True)
class Port:
    """How one node touches a group: ``units[u]`` are the channel indices of unit u in ``space``.

    role: ``out`` (a producer's out-channels), ``in`` (a consumer's in-channels), ``through``
    (a pass-through node's output space), ``param`` (a per-channel constant).
    """

    node: str
    space: str
    role: str
    units: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Block:
    """An op that stops pruning of every group it touches."""

    op: str
    node: str
    reason: str
    spaces: tuple[str, ...]
    groups: tuple[int, ...] = ()


@dataclass
class ChannelGroup:
    id: int
    size: int  # pruning units: channels, or whole conv groups where grouped convs couple them
    producers: list[Port] = field(default_factory=list)
    consumers: list[Port] = field(default_factory=list)
    members: list[Port] = field(default_factory=list)
    blocked: str | None = None
    spaces: dict[str, tuple[tuple[int, ...], ...]] = field(default_factory=dict)

    @property
    def nodes(self) -> set[str]:
        return {p.node for p in (*self.producers, *self.consumers, *self.members)}

    def channels(self, space: str) -> int:
        return sum(len(u) for u in self.spaces[space])

    def removed_indices(self, units: Iterable[int]) -> dict[str, list[int]]:
        """Per space, the channel indices that removing ``units`` removes."""
        units = list(units)
        return {s: sorted(i for u in units for i in per_unit[u]) for s, per_unit in self.spaces.items()}


@dataclass
class ChannelGroups:
    graph: nx.MultiDiGraph  # nodes: spaces (attrs size, dim, const, blocked); edges: couplings
    groups: list[ChannelGroup]
    spaces: dict[str, Space]
    blocks: list[Block]
    # For the rewriter: split/chunk nodes -> (input node, dim, part sizes); channel slicing
    # getitem nodes -> their index with Ellipsis expanded.
    splits: dict[str, tuple[str, int, list[int]]] = field(default_factory=dict)
    slices: dict[str, tuple] = field(default_factory=dict)

    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.blocked is None]

    def groups_of(self, node: str) -> list[ChannelGroup]:
        return [g for g in self.groups if node in g.nodes]


# ------------------------------------------------------------------------- op tables
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
    nn.Tanh, nn.ELU, nn.Mish, nn.Hardtanh, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d,
    nn.ConstantPad1d, nn.ConstantPad2d, nn.ReflectionPad1d, nn.ReflectionPad2d,
    nn.ReplicationPad1d, nn.ReplicationPad2d,
)
_UNARY_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.hardswish, F.hardsigmoid,
    F.elu, F.mish, F.hardtanh, F.softplus, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh,
    F.dropout, F.dropout1d, F.dropout2d, torch.dropout, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.interpolate,
    F.pad, torch.clamp, torch.abs, torch.neg, operator.neg, torch.exp, torch.erf,
}
_UNARY_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "clamp", "clamp_", "abs", "erf",
                  "neg", "exp", "contiguous", "clone", "detach", "float"}
_BINARY_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd,
                     operator.imul, torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
                     torch.minimum}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"view", "reshape", "flatten"}
_SPLIT_FUNCTIONS = {torch.split, torch.chunk}
_SPLIT_METHODS = {"split", "chunk"}
_CAT_FUNCTIONS = {torch.cat, torch.concat}
_META_METHODS = {"size", "dim"}
_META_FUNCTIONS = {getattr, len}


def op_kind(gm: fx.GraphModule, node: fx.Node) -> str:
    """The rule that handles ``node`` (a key of ``_RULES``); ``unknown`` when none does."""
    if node.op in ("placeholder", "output", "get_attr"):
        return {"placeholder": "input", "output": "output", "get_attr": "const"}[node.op]
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.PReLU):  # one slope per channel follows the channel; one shared slope does not
            return "batchnorm" if mod.num_parameters > 1 else "unary"
        for types, kind in ((_CONV, "conv"), (_CONV_T, "conv_transpose"), ((nn.Linear,), "linear"),
                            (_BN, "batchnorm"), (_UNARY_MODULES, "unary"), ((nn.Flatten,), "reshape"),
                            ((nn.Softmax, nn.LogSoftmax), "softmax")):
            if isinstance(mod, types):
                return kind
        return "unknown"
    tables = {
        "call_function": ((_UNARY_FUNCTIONS, "unary"), (_BINARY_FUNCTIONS, "binary"),
                          (_REDUCE_FUNCTIONS, "reduce"), (_RESHAPE_FUNCTIONS, "reshape"),
                          (_SPLIT_FUNCTIONS, "split"), (_CAT_FUNCTIONS, "cat"),
                          ({operator.getitem}, "getitem"), (_META_FUNCTIONS, "meta"),
                          ({F.softmax, torch.softmax, F.log_softmax}, "softmax")),
        "call_method": ((_UNARY_METHODS, "unary"), (_BINARY_METHODS, "binary"),
                        (_REDUCE_METHODS, "reduce"), (_RESHAPE_METHODS, "reshape"),
                        (_SPLIT_METHODS, "split"), (_META_METHODS, "meta"),
                        ({"softmax", "log_softmax"}, "softmax")),
    }
    for names, kind in tables.get(node.op, ()):
        if node.target in names:
            return kind
    return "unknown"


def op_label(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{type(gm.get_submodule(node.target)).__name__} ({node.target})"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f".{node.target}()"
    return node.op


def _arg(node: fx.Node, i: int, key: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key, default)


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


# ------------------------------------------------------------------------- builder
class _Builder:
    """Walks the fx graph once, creating spaces and coupling edges, then forms groups."""

    def __init__(self, gm: fx.GraphModule, shapes: dict):
        self.gm, self.shapes = gm, shapes
        self.g = nx.MultiDiGraph()
        self.spaces: dict[str, Space] = {}
        self.offset: dict[str, int] = {}
        self.parent: list[int] = []
        self.blocked: dict[str, list[str]] = defaultdict(list)
        self.blocks: list[Block] = []
        self.roles: list[tuple[str, str, str]] = []  # (node, space, role)
        self.splits: dict[str, tuple[fx.Node, int, list[int]]] = {}
        self.slices: dict[str, tuple] = {}
        self.order: dict[str, int] = {}

    # ---- spaces and union-find
    def shape(self, node) -> tuple[int, ...] | None:
        s = self.shapes.get(node.name) if isinstance(node, fx.Node) else None
        return tuple(s.shape) if s is not None and hasattr(s, "shape") else None

    def space(self, node: fx.Node) -> str | None:
        """The channel space of a node's tensor output (created on first use), or None."""
        if node.name in self.spaces:
            return node.name
        s = self.shape(node)
        if s is None or len(s) < 2 or node.op == "get_attr":
            return None
        return self._add_space(Space(node.name, 1, int(s[1])))

    def _add_space(self, sp: Space) -> str:
        self.spaces[sp.name] = sp
        self.offset[sp.name] = len(self.parent)
        self.parent.extend(range(len(self.parent), len(self.parent) + sp.size))
        self.order[sp.name] = len(self.order)
        self.g.add_node(sp.name, size=sp.size, dim=sp.dim, const=sp.const)
        return sp.name

    def const_space(self, node: fx.Node, dim: int) -> str | None:
        if node.name in self.spaces:
            return node.name if self.spaces[node.name].dim == dim else None
        return self._add_space(Space(node.name, dim, int(self.shape(node)[dim]), const=True))

    def _find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def _union(self, i: int, j: int) -> None:
        ri, rj = self._find(i), self._find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)

    def couple(self, a: str, b: str, kind: str, node: fx.Node, pairs: Iterable[tuple[int, int]],
               **mapping) -> None:
        """Add a coupling edge a -> b: channel i of a and channel j of b go together."""
        oa, ob = self.offset[a], self.offset[b]
        for i, j in pairs:
            self._union(oa + i, ob + j)
        self.g.add_edge(a, b, kind=kind, node=node.name, **mapping)

    def identity(self, a: str, b: str, node: fx.Node, kind: str = "identity") -> None:
        n = self.spaces[a].size
        self.couple(a, b, kind, node, ((i, i) for i in range(n)))

    def block(self, node: fx.Node, reason: str, spaces: Iterable[str | None]) -> None:
        names = tuple(s for s in dict.fromkeys(spaces) if s is not None)
        for s in names:
            self.blocked[s].append(f"{reason} at {node.name}")
        if names:
            self.blocks.append(Block(op_label(self.gm, node), node.name, reason, names))

    def role(self, node: fx.Node, space: str | None, role: str) -> None:
        if space is not None:
            self.roles.append((node.name, space, role))

    def input_spaces(self, node: fx.Node) -> list[str]:
        return [s for s in (self.space(a) for a in node.all_input_nodes) if s is not None]

    def unknown(self, node: fx.Node, why: str | None = None) -> None:
        reason = why or f"op {op_label(self.gm, node)} is not understood by the channel analysis"
        self.block(node, reason, [*self.input_spaces(node), self.space(node)])

    # ---- the walk
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            kind = op_kind(self.gm, node)
            _RULES[kind](self, node)
        self._couple_shared_modules()

    def _couple_shared_modules(self) -> None:
        sites = defaultdict(list)
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                sites[node.target].append(node)
        for target, nodes in sites.items():
            mod = self.gm.get_submodule(target)
            if len(nodes) < 2 or not any(True for _ in mod.parameters()):
                continue
            for other in nodes[1:]:
                for a, b in ((nodes[0], other), (nodes[0].args[0], other.args[0])):
                    sa, sb = self.space(a), self.space(b)
                    if sa and sb and self.spaces[sa].size == self.spaces[sb].size:
                        self.identity(sa, sb, nodes[0], kind="shared")
                    elif sa or sb:
                        self.block(other, f"shared module {target} with mismatched spaces", [sa, sb])


# ------------------------------------------------------------------------- rules
def _rule_input(b: _Builder, node: fx.Node) -> None:
    b.block(node, "graph input (channels come from the user's data)", [b.space(node)])


def _rule_output(b: _Builder, node: fx.Node) -> None:
    outs = [n for n in torch.utils._pytree.tree_flatten(node.args)[0] if isinstance(n, fx.Node)]
    b.block(node, "graph output (output channels are never pruned)", [b.space(n) for n in outs])


def _rule_nothing(b: _Builder, node: fx.Node) -> None:
    """get_attr constants (spaces made when an op broadcasts them) and shape/size queries."""


def _rule_unknown(b: _Builder, node: fx.Node) -> None:
    b.unknown(node)


def _first_tensor(b: _Builder, node: fx.Node) -> fx.Node | None:
    x = _arg(node, 0, "input")
    return x if isinstance(x, fx.Node) else None


def _rule_unary(b: _Builder, node: fx.Node) -> None:
    x = _first_tensor(b, node)
    sx, so = (b.space(x) if x is not None else None), b.space(node)
    others = [a for a in node.all_input_nodes if a is not x and b.shape(a) is not None]
    if sx is None or so is None or others or b.spaces[sx].size != b.spaces[so].size:
        return b.unknown(node, f"{op_label(b.gm, node)} changes the channel dim or reads other tensors")
    b.identity(sx, so, node)
    b.role(node, so, "through")


def _rule_softmax(b: _Builder, node: fx.Node) -> None:
    x = _first_tensor(b, node)
    if node.op == "call_module":
        dim = b.gm.get_submodule(node.target).dim
    else:
        dim = _arg(node, 1, "dim")
    rank = len(b.shape(x) or ())
    if not isinstance(dim, int) or _norm_dim(dim, rank) == 1:
        return b.unknown(node, "softmax over the channel dim mixes channels")
    _rule_unary(b, node)


def _rule_batchnorm(b: _Builder, node: fx.Node) -> None:
    _rule_unary(b, node)


def _rule_binary(b: _Builder, node: fx.Node) -> None:
    so, out_shape = b.space(node), b.shape(node)
    if so is None:
        return b.unknown(node)
    rank, c = len(out_shape), out_shape[1]
    b.role(node, so, "through")
    for a in node.all_input_nodes:
        sa = b.shape(a)
        if sa is None:
            continue
        d = 1 - (rank - len(sa))
        if d < 0 or sa[d] == 1:  # broadcast across channels: no coupling
            if d < 0 and b.space(a) is not None:
                return b.unknown(node, "operand's channel dim aligns with a non-channel dim")
            continue
        if sa[d] != c:
            return b.unknown(node, "operand channel count differs from the output's")
        if a.op == "get_attr":
            sp = b.const_space(a, d)
            if sp is None:
                return b.unknown(node, f"constant {a.target} is broadcast along two different dims")
            b.identity(so, sp, node)
            b.role(a, sp, "param")
        elif d == 1 and b.space(a) is not None:
            b.identity(b.space(a), so, node)
        else:
            return b.unknown(node, "operand of lower rank carries the channel dim")


def _rule_reduce(b: _Builder, node: fx.Node) -> None:
    x = _first_tensor(b, node)
    dims = _arg(node, 1, "dim")
    rank = len(b.shape(x) or ())
    dims = (dims,) if isinstance(dims, int) else dims
    if (not isinstance(dims, tuple | list) or not dims or not all(isinstance(d, int) for d in dims)
            or {_norm_dim(d, rank) for d in dims} & {0, 1}):
        return b.unknown(node, "reduction over the batch or channel dim (or over all dims)")
    _rule_unary(b, node)


def _rule_reshape(b: _Builder, node: fx.Node) -> None:
    x = _first_tensor(b, node)
    si, so_shape = b.shape(x), b.shape(node)
    sx, so = (b.space(x) if x is not None else None), b.space(node)
    if sx is None or so is None or si[0] != so_shape[0]:
        return b.unknown(node, "reshape that moves the batch or channel dim")
    if si[:2] == so_shape[:2]:
        b.identity(sx, so, node)
    elif len(so_shape) == 2 and so_shape[1] == si[1] * math.prod(si[2:]):
        f = math.prod(si[2:])
        b.couple(sx, so, "expand", node, ((i, i * f + k) for i in range(si[1]) for k in range(f)),
                 factor=f)
    elif len(si) == 2 and si[1] == so_shape[1] * math.prod(so_shape[2:]):
        f = math.prod(so_shape[2:])
        b.couple(so, sx, "expand", node, ((i, i * f + k) for i in range(so_shape[1]) for k in range(f)),
                 factor=f)
    else:
        return b.unknown(node, f"reshape {si} -> {so_shape} mixes channels with other dims")
    b.role(node, so, "through")


def _rule_cat(b: _Builder, node: fx.Node) -> None:
    tensors, so = _arg(node, 0, "tensors"), b.space(node)
    rank = len(b.shape(node) or ())
    dim = _norm_dim(_arg(node, 1, "dim", 0), rank)
    spaces = [b.space(t) if isinstance(t, fx.Node) else None for t in tensors]
    if so is None or None in spaces:
        return b.unknown(node, "concat of non-tensor or rank-1 inputs")
    b.role(node, so, "through")
    offset = 0
    for s in spaces:
        n = b.spaces[s].size
        if dim == 1:
            b.couple(s, so, "index", node, ((i, offset + i) for i in range(n)), offset=offset)
            offset += n
        else:
            b.identity(s, so, node)


def _rule_split(b: _Builder, node: fx.Node) -> None:
    x = _first_tensor(b, node)
    parts = b.shapes.get(node.name)
    sx = b.space(x) if x is not None else None
    if sx is None or not isinstance(parts, tuple):
        return b.unknown(node)
    rank = len(b.shape(x))
    dim = _norm_dim(_arg(node, 2, "dim", 0), rank)
    if any(u.op != "call_function" or u.target is not operator.getitem
           or not isinstance(u.args[1], int) for u in node.users):
        return b.unknown(node, "split result used other than by indexing")
    b.splits[node.name] = (x, dim, [int(p.shape[dim]) for p in parts])


def _rule_getitem(b: _Builder, node: fx.Node) -> None:
    src, index = node.args
    if src.name in b.splits:
        return _getitem_of_split(b, node)
    if isinstance(b.shapes.get(src.name), tuple):
        return b.unknown(node, f"item of the tuple output of {src.name}")
    if b.shape(src) is None:
        return None  # indexing a size tuple or other metadata
    _getitem_of_tensor(b, node, index)


def _getitem_of_split(b: _Builder, node: fx.Node) -> None:
    x, dim, sizes = b.splits[node.args[0].name]
    sx, so, k = b.space(x), b.space(node), node.args[1]
    if so is None:
        return b.unknown(node)
    b.role(node, so, "through")
    if dim != 1:
        return b.identity(sx, so, node)
    start = sum(sizes[:k])
    b.couple(sx, so, "index", node, ((start + i, i) for i in range(sizes[k])), offset=start)


def _getitem_of_tensor(b: _Builder, node: fx.Node, index) -> None:
    x = node.args[0]
    rank = len(b.shape(x))
    idx = list(index) if isinstance(index, tuple) else [index]
    if idx.count(Ellipsis) == 1:
        at = idx.index(Ellipsis)
        idx[at:at + 1] = [slice(None)] * (rank - len(idx) + 1)
    if not all(isinstance(i, slice) for i in idx) or len(idx) > rank:
        return b.unknown(node, "indexing that drops, adds or gathers dims")
    if any(not isinstance(v, int | type(None)) for s in idx for v in (s.start, s.stop, s.step)):
        return b.unknown(node, "slice bounds computed at run time")
    if idx[0] != slice(None):
        return b.unknown(node, "slicing the batch dim")
    sx, so = b.space(x), b.space(node)
    b.role(node, so, "through")
    b.slices[node.name] = tuple(idx)
    sel = idx[1] if len(idx) > 1 else slice(None)
    if sel.step not in (None, 1):
        return b.unknown(node, "strided slicing of the channel dim")
    kept = range(b.spaces[sx].size)[sel]
    b.couple(sx, so, "index", node, ((i, j) for j, i in enumerate(kept)), offset=kept.start)


def _rule_conv(b: _Builder, node: fx.Node) -> None:
    mod = b.gm.get_submodule(node.target)
    x = _first_tensor(b, node)
    sx, so = (b.space(x) if x is not None else None), b.space(node)
    if sx is None or so is None or b.spaces[sx].size != mod.in_channels:
        return b.unknown(node, "conv input without a channel dim matching in_channels")
    b.role(node, so, "out")
    b.role(node, sx, "in")
    g = mod.groups
    if g > 1:
        cin, cout = mod.in_channels // g, mod.out_channels // g
        pairs = [(k * cin + i, k * cout + j) for k in range(g) for i in range(cin) for j in range(cout)]
        b.couple(sx, so, "group", node, pairs, groups=g)


def _rule_linear(b: _Builder, node: fx.Node) -> None:
    x = _first_tensor(b, node)
    if x is None or len(b.shape(x) or ()) != 2:
        return b.unknown(node, "Linear on a rank-3+ tensor (its features are the last dim, not dim 1)")
    sx, so = b.space(x), b.space(node)
    if so is None or b.spaces[sx].size != b.gm.get_submodule(node.target).in_features:
        return b.unknown(node, "Linear input width differs from in_features")
    b.role(node, so, "out")
    b.role(node, sx, "in")


_RULES: dict[str, Callable[[_Builder, fx.Node], None]] = {
    "input": _rule_input, "output": _rule_output, "const": _rule_nothing, "meta": _rule_nothing,
    "unknown": _rule_unknown, "unary": _rule_unary, "softmax": _rule_softmax,
    "batchnorm": _rule_batchnorm, "binary": _rule_binary, "reduce": _rule_reduce,
    "reshape": _rule_reshape, "cat": _rule_cat, "split": _rule_split, "getitem": _rule_getitem,
    "conv": _rule_conv, "conv_transpose": _rule_conv, "linear": _rule_linear,
}


# ------------------------------------------------------------------------- groups
def _form_groups(b: _Builder) -> list[ChannelGroup]:
    units: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for name, sp in b.spaces.items():
        off = b.offset[name]
        for i in range(sp.size):
            units[b._find(off + i)][name].append(i)
    by_sig: dict[tuple[str, ...], list[dict[str, list[int]]]] = defaultdict(list)
    for unit in units.values():
        by_sig[tuple(sorted(unit, key=b.order.__getitem__))].append(unit)
    groups = []
    for sig, members in sorted(by_sig.items(), key=lambda kv: (b.order[kv[0][0]], kv[1][0][kv[0][0]][0])):
        members.sort(key=lambda u: u[sig[0]][0])
        spaces = {s: tuple(tuple(u[s]) for u in members) for s in sig}
        groups.append(_make_group(b, len(groups), spaces))
    return groups


def _make_group(b: _Builder, gid: int, spaces: dict) -> ChannelGroup:
    grp = ChannelGroup(gid, len(next(iter(spaces.values()))), spaces=spaces)
    lists = {"out": grp.producers, "in": grp.consumers, "through": grp.members, "param": grp.members}
    for node, space, role in b.roles:
        if space in spaces:
            lists[role].append(Port(node, space, role, spaces[space]))
    reasons = [r for s in spaces for r in b.blocked.get(s, ())]
    if reasons:
        grp.blocked = "; ".join(dict.fromkeys(reasons))
    elif not grp.producers:
        grp.blocked = "no conv/linear layer produces these channels"
    return grp


class Channels(Analysis[ChannelGroups]):
    """Coupled channel groups (``am.get(Channels, graph)``). Requires: Shapes."""

    name = "channel_groups"

    @staticmethod
    def compute(graph, am) -> ChannelGroups:
        return channel_groups(graph, am.get(Shapes, graph))


def channel_groups(graph, shapes) -> ChannelGroups:
    """Coupled channel groups of ``graph`` (see the module docstring)."""
    b = _Builder(graph.gm, shapes)
    b.run()
    groups = _form_groups(b)
    touched: dict[str, list[int]] = defaultdict(list)
    for grp in groups:
        for s in grp.spaces:
            touched[s].append(grp.id)
    blocks = [Block(k.op, k.node, k.reason, k.spaces,
                    tuple(sorted({gid for s in k.spaces for gid in touched[s]}))) for k in b.blocks]
    for name, reasons in b.blocked.items():
        b.g.nodes[name]["blocked"] = "; ".join(reasons)
    for grp in groups:
        for s in grp.spaces:
            b.g.nodes[s].setdefault("groups", []).append(grp.id)
    splits = {k: (x.name, d, sizes) for k, (x, d, sizes) in b.splits.items()}
    return ChannelGroups(b.g, groups, b.spaces, blocks, splits, dict(b.slices))


def describe_groups(cg: ChannelGroups) -> str:
    """A readable listing (for `slimgraph inspect` and debugging)."""
    lines = []
    for g in cg.groups:
        state = f"BLOCKED: {g.blocked}" if g.blocked else "prunable"
        prods = ", ".join(p.node for p in g.producers) or "-"
        cons = ", ".join(p.node for p in g.consumers) or "-"
        lines.append(f"group {g.id}: {g.size} units; producers {prods}; consumers {cons}; {state}")
    counts = Counter(k.op for k in cg.blocks)
    if counts:
        lines.append("blocking ops: " + ", ".join(f"{op} x{n}" for op, n in counts.items()))
    return "\n".join(lines)
