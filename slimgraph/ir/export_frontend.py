"""torch.export frontend: an ``ExportedProgram`` becomes a graph in slimgraph's canonical form.

The canonical form
------------------
Every frontend (torch.fx tracing, this one, the ONNX frontend) hands the passes one form, so a
pass, an analysis or a backend written once works on every import path:

- parametrized layers are ``call_module`` nodes on the torch.nn modules that hold their weights:
  ``Conv{1,2,3}d``, ``ConvTranspose{1,2,3}d``, ``Linear``, ``BatchNorm{1,2,3}d`` (eval mode),
  ``LayerNorm``, ``GroupNorm``, ``PReLU``;
- everything else is a ``call_function`` on the callables torch.fx tracing records for the same
  source (``torch.relu``, ``F.max_pool2d``, ``operator.add``, ``torch.cat``, ``operator.getitem``
  with slices, ...) or a ``call_method`` (``size``, ``contiguous``, ``expand``);
- weights and constants that are not inside such a module are ``get_attr`` parameters or buffers.

torch.export records ATen operator calls instead (``aten.conv2d``, ``aten.linear``,
``aten.batch_norm``, or after ``run_decompositions`` ``aten.convolution``, ``aten.addmm``,
``aten._native_batch_norm_legit_no_training``). This module rewrites them through one table,
``_CONVERTERS`` (ATen op name -> converter), in one walk over the exported graph:

1. placeholders that the graph signature says are parameters, buffers or lifted constants become
   constants (``_Const``); user inputs become the graph's inputs (tensors only);
2. an ATen call whose inputs are all constants is evaluated now (``aten.t`` of a weight, weight
   arithmetic), so ``addmm(b, x, t(W))`` is seen with ``W`` as a constant;
3. a call with a converter is emitted in canonical form; a parametrized op whose weights are
   constants becomes a module named after the weight's owner in the original model (the state
   dict prefix, e.g. ``layer1.0.conv1``), so layer names survive; the same weights used at
   several call sites with the same settings become one module called at each (shared weights,
   as tracing would show them); weights computed at run time give the functional form
   (``F.conv2d`` with a weight node);
4. a call without a converter is kept as the ATen call (it runs and exports unchanged) and marked
   ``node.meta["slimgraph_untranslated"]``; the pass manager lists such nodes in every pass's
   record, so no pass silently skips a layer it cannot see;
5. higher-order ops (``cond``, ``while_loop``, ``map``, ...) are refused with one
   ``UnsupportedOpError`` naming each, before any conversion.

Runtime assertion nodes (``_assert_tensor_metadata``, ``_assert_scalar``, ...) are dropped.
Symbolic sizes (a dynamic batch) become ``x.size(d)`` calls, so the graph runs at any batch size
the program was exported for.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.node import map_aggregate

from slimgraph.errors import ModelLoadError, UnsupportedOpError

_INT64_MAX = 2**63 - 1
_DROP = {"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size",
         "sym_constrain_range", "_assert_async", "_functional_assert_async",
         "_functional_sym_constrain_range", "_functional_sym_constrain_range_for_size"}
_IDENTITY = {"alias", "detach", "lift_fresh_copy", "_to_copy_identity"}
_RANDOM = re.compile(r"rand|normal|bernoulli|dropout|uniform|multinomial|poisson")


@dataclass
class _Const:
    """A tensor known at import time: a parameter, buffer, lifted constant, or folded value."""

    value: torch.Tensor
    owner: str  # the state-dict name it came from ("" for folded values with no single owner)
    trainable: bool = False


@dataclass
class ExportImport:
    """What :func:`import_exported_program` returns."""

    gm: fx.GraphModule
    input_names: list[str]
    dynamic_batch: bool
    untranslated: dict[str, list[str]] = field(default_factory=dict)  # ATen op -> node names


# ----------------------------------------------------------------------------- the builder
class _Builder:
    """Emits canonical nodes into a new fx graph over a new root module."""

    def __init__(self) -> None:
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.attrs: dict[int, fx.Node] = {}  # id(const tensor) -> its get_attr node
        self.modules: dict[tuple, str] = {}  # (kind, id(weight), settings) -> module path
        self.untranslated: dict[str, list[str]] = {}

    def call(self, target: Callable, args: tuple, kwargs: dict | None = None, *, name: str | None = None) -> fx.Node:
        args = map_aggregate(args, self.value)
        kwargs = {k: map_aggregate(v, self.value) for k, v in (kwargs or {}).items()}
        return self.graph.call_function(target, tuple(args), kwargs, name=name)

    def method(self, name: str, args: tuple) -> fx.Node:
        return self.graph.call_method(name, tuple(map_aggregate(args, self.value)))

    def value(self, v: Any) -> Any:
        """A constant becomes a get_attr node (parameter if it was one); everything else stays."""
        if not isinstance(v, _Const):
            return v
        key = id(v.value)
        if key not in self.attrs:
            path = self._free_path(_sanitize(v.owner) or "_const")
            owner, _, leaf = path.rpartition(".")
            parent = self._container(owner)
            tensor = v.value.detach().clone()
            if v.trainable and tensor.is_floating_point():
                parent.register_parameter(leaf, nn.Parameter(tensor))
            else:
                parent.register_buffer(leaf, tensor)
            self.attrs[key] = self.graph.get_attr(path)
        return self.attrs[key]

    def module(self, mod: nn.Module, owner: str, share_key: tuple, x: Any) -> fx.Node:
        """Call ``mod`` (installed at ``owner``'s path, once per ``share_key``) on ``x``."""
        path = self.modules.get(share_key)
        if path is None:
            path = self._free_path(_sanitize(owner) or type(mod).__name__.lower())
            parent_path, _, leaf = path.rpartition(".")
            self._container(parent_path).add_module(leaf, mod.eval())
            self.modules[share_key] = path
        return self.graph.call_module(path, (self.value(x),))

    def _container(self, path: str) -> nn.Module:
        mod = self.root
        for part in filter(None, path.split(".")):
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        return mod

    def _taken(self, path: str) -> bool:
        mod: Any = self.root
        for part in path.split("."):
            if not hasattr(mod, part):
                return False
            mod = getattr(mod, part)
            if not isinstance(mod, nn.Module):
                return True
        return type(mod) is not nn.Module or bool(list(mod.children()) or list(mod.named_buffers()))

    def _free_path(self, base: str) -> str:
        path, i = base, 1
        while self._taken(path) or self._blocked(path):
            path = f"{base}_{i}"
            i += 1
        return path

    def _blocked(self, path: str) -> bool:
        """A prefix of ``path`` is already a leaf module or tensor (cannot hold children)."""
        mod: Any = self.root
        parts = path.split(".")
        for part in parts[:-1]:
            if not hasattr(mod, part):
                return False
            mod = getattr(mod, part)
            if not isinstance(mod, nn.Module) or type(mod) is not nn.Module:
                return True
        return False


def _sanitize(name: str) -> str:
    parts = [re.sub(r"\W", "_", p) for p in name.split(".") if p]
    return ".".join(p if not p[0].isdigit() and p not in ("forward", "training") else p for p in parts)


# ----------------------------------------------------------------------------- helpers
def _bind(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The op's arguments by schema name, defaults filled in."""
    out = {}
    for i, a in enumerate(op._schema.arguments):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


def _ntuple(v: Any, n: int) -> tuple:
    if isinstance(v, list | tuple):
        return tuple(v) * n if len(v) == 1 else tuple(v)
    return (v,) * n


def _rank(x: Any) -> int | None:
    val = x.meta.get("val") if isinstance(x, fx.Node) else getattr(x, "value", None)
    return val.dim() if hasattr(val, "dim") else None


def _is_const(*values: Any) -> bool:
    return all(v is None or isinstance(v, _Const) for v in values)


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.detach().clone())


# ----------------------------------------------------------------------------- parametrized ops
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _conv(b: _Builder, a: dict, transposed: bool) -> Any:
    w, bias = a["weight"], a["bias"]
    nd = (w.value.dim() if isinstance(w, _Const) else _rank(w)) - 2
    groups = int(a.get("groups") or 1)
    stride, dilation = _ntuple(a["stride"], nd), _ntuple(a["dilation"], nd)
    padding = a["padding"] if isinstance(a["padding"], str) else _ntuple(a["padding"], nd)
    out_pad = _ntuple(a.get("output_padding") or 0, nd)
    if not _is_const(w, bias):
        if transposed:
            return b.call(_CONV_T_FN[nd], (a["input"], w, bias, stride, padding, out_pad, groups, dilation))
        return b.call(_CONV_FN[nd], (a["input"], w, bias, stride, padding, dilation, groups))
    wt = w.value
    if transposed:
        mod = _CONV_T[nd](wt.shape[0], wt.shape[1] * groups, tuple(wt.shape[2:]), stride, padding,
                          out_pad, groups, bias is not None, dilation)
    else:
        mod = _CONV[nd](wt.shape[1] * groups, wt.shape[0], tuple(wt.shape[2:]), stride, padding,
                        dilation, groups, bias is not None)
    mod.weight = _param(wt)
    if bias is not None:
        mod.bias = _param(bias.value)
    key = ("conv", transposed, id(wt), id(bias.value) if bias is not None else None, stride,
           str(padding), dilation, out_pad, groups)
    return b.module(mod, _owner(w), key, a["input"])


def _owner(w: _Const) -> str:
    return w.owner.rpartition(".")[0] if "." in w.owner else w.owner


def _linear(b: _Builder, x: Any, w: Any, bias: Any, *, transposed_weight: bool = False) -> Any:
    if not _is_const(w, bias) or (_rank(x) or 2) < 1:
        wn = b.call(torch.t, (w,)) if transposed_weight else w
        return b.call(F.linear, (x, wn, bias))
    wt = w.value.t() if transposed_weight else w.value
    mod = nn.Linear(wt.shape[1], wt.shape[0], bias=bias is not None)
    mod.weight = _param(wt)
    if bias is not None:
        mod.bias = _param(bias.value)
    key = ("linear", id(w.value), id(bias.value) if bias is not None else None)
    return b.module(mod, _owner(w), key, x)


def _cv_linear(b, a):
    return _linear(b, a["input"], a["weight"], a["bias"])


def _cv_addmm(b, a):
    bias, mat2 = a["self"], a["mat2"]
    if a.get("beta", 1) == 1 and a.get("alpha", 1) == 1 and isinstance(mat2, _Const) and \
            isinstance(bias, _Const) and bias.value.dim() == 1 and mat2.value.dim() == 2:
        return _linear(b, a["mat1"], mat2, bias, transposed_weight=True)
    return None


def _cv_mm(b, a):
    mat2 = a["mat2"]
    if isinstance(mat2, _Const) and mat2.value.dim() == 2 and _rank(a["self"]) == 2:
        return _linear(b, a["self"], mat2, None, transposed_weight=True)
    return b.call(torch.matmul, (a["self"], mat2))


_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _batch_norm(b: _Builder, x: Any, w, bias, mean, var, eps: float, momentum: float | None) -> Any:
    rank = _rank(x)
    if not (_is_const(w, bias) and isinstance(mean, _Const) and isinstance(var, _Const)) or rank not in _BN:
        return b.call(F.batch_norm, (x, mean, var, w, bias, False, momentum or 0.1, eps))
    c = mean.value.numel()
    mod = _BN[rank](c, eps=eps, momentum=momentum if momentum is not None else 0.1,
                    affine=w is not None or bias is not None)
    mod.running_mean.copy_(mean.value)
    mod.running_var.copy_(var.value)
    if mod.affine:
        mod.weight = _param(w.value if w is not None else torch.ones(c))
        mod.bias = _param(bias.value if bias is not None else torch.zeros(c))
    owner = _owner(mean)
    key = ("bn", id(mean.value), id(var.value), eps)
    return b.module(mod, owner, key, x)


def _cv_batch_norm(b, a):
    if a["training"]:
        return None
    return _batch_norm(b, a["input"], a["weight"], a["bias"], a["running_mean"], a["running_var"],
                       a["eps"], a["momentum"])


def _cv_native_bn_no_training(b, a):
    out = _batch_norm(b, a["input"], a["weight"], a["bias"], a["running_mean"], a["running_var"],
                      a["eps"], a["momentum"])
    return (out, None, None)


def _layer_norm(b: _Builder, x, shape, w, bias, eps) -> Any:
    shape = tuple(int(s) for s in shape)
    if not _is_const(w, bias):
        return b.call(F.layer_norm, (x, shape, w, bias, eps))
    mod = nn.LayerNorm(shape, eps=eps, elementwise_affine=w is not None, bias=bias is not None)
    if w is not None:
        mod.weight = _param(w.value)
    if bias is not None:
        mod.bias = _param(bias.value)
    owner = _owner(w) if w is not None else _owner(bias) if bias is not None else "layer_norm"
    key = ("ln", id(w.value) if w is not None else None, id(bias.value) if bias is not None else None,
           shape, eps)
    return b.module(mod, owner, key, x)


def _cv_layer_norm(b, a):
    return _layer_norm(b, a["input"], a["normalized_shape"], a["weight"], a["bias"], a["eps"])


def _cv_native_layer_norm(b, a):
    return (_layer_norm(b, a["input"], a["normalized_shape"], a["weight"], a["bias"], a["eps"]), None, None)


def _cv_group_norm(b, a):
    w, bias, x = a["weight"], a["bias"], a["input"]
    if not _is_const(w, bias) or w is None:
        return b.call(F.group_norm, (x, a["num_groups"], w, bias, a["eps"]))
    mod = nn.GroupNorm(int(a["num_groups"]), w.value.numel(), eps=a["eps"])
    mod.weight = _param(w.value)
    mod.bias = _param(bias.value if bias is not None else torch.zeros_like(w.value))
    return b.module(mod, _owner(w), ("gn", id(w.value), a["num_groups"]), x)


def _cv_prelu(b, a):
    w = a["weight"]
    if not isinstance(w, _Const) or w.value.dim() != 1:
        return b.call(F.prelu, (a["self"], w))
    mod = nn.PReLU(w.value.numel())
    mod.weight = _param(w.value)
    return b.module(mod, _owner(w), ("prelu", id(w.value)), a["self"])


# ----------------------------------------------------------------------------- parameter-free ops
def _fn(target: Callable, *names: str, **fixed: Any) -> Callable:
    """A converter calling ``target`` with the bound arguments ``names`` (positionally)."""
    def convert(b: _Builder, a: dict) -> Any:
        return b.call(target, tuple(a[n] for n in names), dict(fixed))
    return convert


def _binary(target: Callable) -> Callable:
    def convert(b: _Builder, a: dict) -> Any:
        other = a["other"]
        alpha = a.get("alpha", 1)
        if alpha not in (None, 1):
            return b.call(target, (a["self"], b.call(operator.mul, (other, alpha))))
        return b.call(target, (a["self"], other))
    return convert


def _cv_div(b, a):
    mode = a.get("rounding_mode")
    if mode is None:
        return b.call(operator.truediv, (a["self"], a["other"]))
    return b.call(torch.div, (a["self"], a["other"]), {"rounding_mode": mode})


def _cv_hardtanh(b, a):
    lo, hi = float(a["min_val"]), float(a["max_val"])
    if lo == 0.0 and hi == 6.0:
        return b.call(F.relu6, (a["self"],))
    return b.call(F.hardtanh, (a["self"], lo, hi))


def _cv_elu(b, a):
    if a["scale"] != 1 or a["input_scale"] != 1:
        return None
    return b.call(F.elu, (a["self"], float(a["alpha"])))


def _cv_max_pool(nd: int) -> Callable:
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]

    def convert(b, a):
        k = _ntuple(a["kernel_size"], nd)
        stride = _ntuple(a["stride"], nd) if a["stride"] else k
        return b.call(fn, (a["self"], k, stride, _ntuple(a["padding"], nd), _ntuple(a["dilation"], nd),
                           bool(a["ceil_mode"])))
    return convert


def _with_indices(convert: Callable) -> Callable:
    def wrapped(b, a):
        return (convert(b, a), None)
    return wrapped


def _cv_avg_pool(nd: int) -> Callable:
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]

    def convert(b, a):
        k = _ntuple(a["kernel_size"], nd)
        stride = _ntuple(a["stride"], nd) if a["stride"] else k
        args = [a["self"], k, stride, _ntuple(a["padding"], nd), bool(a["ceil_mode"]),
                bool(a["count_include_pad"])]
        if nd > 1:
            args.append(a.get("divisor_override"))
        return b.call(fn, tuple(args))
    return convert


def _cv_adaptive(fn: Callable, with_indices: bool = False) -> Callable:
    def convert(b, a):
        out = b.call(fn, (a["self"], tuple(a["output_size"])))
        return (out, None) if with_indices else out
    return convert


def _cv_reduce(fn: Callable) -> Callable:
    def convert(b, a):
        dims = a.get("dim")
        if dims is None or (isinstance(dims, list | tuple) and not dims):
            if a.get("keepdim"):
                return None
            return b.call(fn, (a["self"],))
        return b.call(fn, (a["self"], tuple(dims) if isinstance(dims, list | tuple) else dims, bool(a.get("keepdim"))))
    return convert


def _cv_max_dim(b, a):
    return b.call(torch.max, (a["self"], a["dim"], bool(a["keepdim"])))


def _cv_slice(b, a):
    x, dim = a["self"], a["dim"]
    start, end, step = a["start"], a["end"], a["step"]
    if isinstance(end, int) and end >= _INT64_MAX:
        end = None
    if start == 0 and end is None and step == 1:
        return b.value(x)
    sl = slice(start, end, None if step == 1 else step)
    idx = (slice(None),) * dim + (sl,) if dim >= 0 else (Ellipsis, sl) + (slice(None),) * (-dim - 1)
    return b.call(operator.getitem, (x, idx))


def _cv_select(b, a):
    dim, index = a["dim"], a["index"]
    idx = (slice(None),) * dim + (index,) if dim >= 0 else (Ellipsis, index) + (slice(None),) * (-dim - 1)
    return b.call(operator.getitem, (a["self"], idx))


def _cv_clone(b, a):
    fmt = a.get("memory_format")
    if fmt is None or fmt == torch.preserve_format:
        return b.call(torch.clone, (a["self"],))
    if fmt == torch.contiguous_format:
        return b.method("contiguous", (a["self"],))
    return b.call(torch.clone, (a["self"],), {"memory_format": fmt})


def _cv_contiguous(b, a):
    return b.method("contiguous", (a["self"],))


def _cv_expand(b, a):
    return b.method("expand", (a["self"], *a["size"]))


def _cv_squeeze(b, a):
    dim = a.get("dim")
    if dim is None:
        return b.call(torch.squeeze, (a["self"],))
    return b.call(torch.squeeze, (a["self"], tuple(dim) if isinstance(dim, list | tuple) else dim))


def _cv_split(b, a):
    return b.call(torch.split, (a["self"], a.get("split_size", a.get("split_sizes")), a["dim"]))


def _cv_interpolate(mode: str) -> Callable:
    def convert(b, a):
        size = a.get("output_size")
        scales = a.get("scale_factors")
        kwargs: dict[str, Any] = {"mode": mode}
        if "align_corners" in a and mode != "nearest":
            kwargs["align_corners"] = bool(a["align_corners"])
        if size:
            kwargs["size"] = tuple(size)
        elif scales:
            kwargs["scale_factor"] = tuple(float(s) for s in scales)
        else:
            return None
        return b.call(F.interpolate, (a["input"] if "input" in a else a["self"],), kwargs)
    return convert


def _cv_pad(b, a):
    mode = a.get("mode") or "constant"
    value = a.get("value")
    if mode == "constant":
        return b.call(F.pad, (a["self"], tuple(a["pad"]), "constant", float(value or 0.0)))
    return b.call(F.pad, (a["self"], tuple(a["pad"]), mode))


def _cv_constant_pad(b, a):
    return b.call(F.pad, (a["self"], tuple(a["pad"]), "constant", float(a["value"] or 0.0)))


def _cv_softmax(fn: Callable) -> Callable:
    def convert(b, a):
        return b.call(fn, (a["self"], a["dim"]))
    return convert


def _cv_dropout(b, a):
    if a.get("train"):
        return None
    return b.value(next(iter(a.values())))  # "input" or, in dropout_, "self"


def _cv_clamp(b, a):
    return b.call(torch.clamp, (a["self"], a.get("min"), a.get("max")))


def _cv_gelu(b, a):
    approx = a.get("approximate") or "none"
    return b.call(F.gelu, (a["self"],), {"approximate": approx} if approx != "none" else {})


def _cv_to(b, a):
    dtype = a.get("dtype")
    if dtype is None or any(a.get(k) not in (None, False) for k in ("layout", "device", "pin_memory")
                            if k in a and k != "device"):
        return None
    return b.method("to", (a["self"], dtype))


def _cv_size(b, a):
    return b.method("size", (a["self"], a["dim"]))


def _cv_identity(b, a):
    return b.value(next(iter(a.values())))


_UNARY_TORCH = ("relu", "sigmoid", "tanh", "exp", "neg", "abs", "sqrt", "rsqrt", "log", "erf",
                "reciprocal", "sin", "cos", "floor", "ceil", "round", "sign")
_UNARY_F = {"hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid, "silu": F.silu, "mish": F.mish}

_CONVERTERS: dict[str, Callable[[_Builder, dict], Any]] = {
    "conv1d": lambda b, a: _conv(b, a, False), "conv2d": lambda b, a: _conv(b, a, False),
    "conv3d": lambda b, a: _conv(b, a, False),
    "conv_transpose1d": lambda b, a: _conv(b, a, True), "conv_transpose2d": lambda b, a: _conv(b, a, True),
    "conv_transpose3d": lambda b, a: _conv(b, a, True),
    "convolution": lambda b, a: _conv(b, a, bool(a["transposed"])),
    "_convolution": lambda b, a: _conv(b, a, bool(a["transposed"])),
    "linear": _cv_linear, "addmm": _cv_addmm, "mm": _cv_mm,
    "matmul": _fn(torch.matmul, "self", "other"), "bmm": _fn(torch.matmul, "self", "mat2"),
    "batch_norm": _cv_batch_norm, "_native_batch_norm_legit_no_training": _cv_native_bn_no_training,
    "layer_norm": _cv_layer_norm, "native_layer_norm": _cv_native_layer_norm,
    "group_norm": _cv_group_norm, "prelu": _cv_prelu, "_prelu_kernel": _cv_prelu,
    **{name: _fn(getattr(torch, name), "self") for name in _UNARY_TORCH},
    **{name: _fn(fn, "self") for name, fn in _UNARY_F.items()},
    "hardtanh": _cv_hardtanh, "relu6": _fn(F.relu6, "self"),
    "gelu": _cv_gelu, "elu": _cv_elu,
    "leaky_relu": _fn(F.leaky_relu, "self", "negative_slope"),
    "softplus": _fn(F.softplus, "self", "beta", "threshold"),
    "clamp": _cv_clamp,
    "clamp_min": lambda b, a: b.call(torch.clamp, (a["self"],), {"min": a["min"]}),
    "clamp_max": lambda b, a: b.call(torch.clamp, (a["self"],), {"max": a["max"]}),
    "add": _binary(operator.add), "sub": _binary(operator.sub), "mul": _binary(operator.mul),
    "div": _cv_div, "rsub": lambda b, a: b.call(operator.sub, (a["other"], a["self"])),
    "pow": _fn(torch.pow, "self", "exponent"), "maximum": _fn(torch.maximum, "self", "other"),
    "minimum": _fn(torch.minimum, "self", "other"),
    "max_pool1d": _cv_max_pool(1), "max_pool2d": _cv_max_pool(2), "max_pool3d": _cv_max_pool(3),
    "max_pool2d_with_indices": _with_indices(_cv_max_pool(2)),
    "max_pool3d_with_indices": _with_indices(_cv_max_pool(3)),
    "avg_pool1d": _cv_avg_pool(1), "avg_pool2d": _cv_avg_pool(2), "avg_pool3d": _cv_avg_pool(3),
    "adaptive_avg_pool1d": _cv_adaptive(F.adaptive_avg_pool1d),
    "adaptive_avg_pool2d": _cv_adaptive(F.adaptive_avg_pool2d),
    "_adaptive_avg_pool2d": _cv_adaptive(F.adaptive_avg_pool2d),
    "adaptive_avg_pool3d": _cv_adaptive(F.adaptive_avg_pool3d),
    "_adaptive_avg_pool3d": _cv_adaptive(F.adaptive_avg_pool3d),
    "adaptive_max_pool1d": _cv_adaptive(F.adaptive_max_pool1d, with_indices=True),
    "adaptive_max_pool2d": _cv_adaptive(F.adaptive_max_pool2d, with_indices=True),
    "mean": _cv_reduce(torch.mean), "sum": _cv_reduce(torch.sum), "amax": _cv_reduce(torch.amax),
    "amin": _cv_reduce(torch.amin), "max": lambda b, a: _cv_max_dim(b, a) if "dim" in a else b.call(torch.max, (a["self"],)),
    "view": _fn(torch.reshape, "self", "size"), "reshape": _fn(torch.reshape, "self", "shape"),
    "_unsafe_view": _fn(torch.reshape, "self", "size"),
    "flatten": _fn(torch.flatten, "self", "start_dim", "end_dim"),
    "transpose": _fn(torch.transpose, "self", "dim0", "dim1"), "permute": _fn(torch.permute, "self", "dims"),
    "t": _fn(torch.t, "self"), "contiguous": _cv_contiguous, "clone": _cv_clone, "expand": _cv_expand,
    "slice": _cv_slice, "select": _cv_select, "unsqueeze": _fn(torch.unsqueeze, "self", "dim"),
    "squeeze": _cv_squeeze, "split": _cv_split, "split_with_sizes": _cv_split,
    "chunk": _fn(torch.chunk, "self", "chunks", "dim"), "unbind": _fn(torch.unbind, "self", "dim"),
    "cat": _fn(torch.cat, "tensors", "dim"), "concat": _fn(torch.cat, "tensors", "dim"),
    "stack": _fn(torch.stack, "tensors", "dim"),
    "upsample_nearest2d": _cv_interpolate("nearest"), "upsample_bilinear2d": _cv_interpolate("bilinear"),
    "upsample_nearest1d": _cv_interpolate("nearest"), "upsample_linear1d": _cv_interpolate("linear"),
    "upsample_nearest3d": _cv_interpolate("nearest"), "upsample_bicubic2d": _cv_interpolate("bicubic"),
    "pad": _cv_pad, "constant_pad_nd": _cv_constant_pad,
    "softmax": _cv_softmax(F.softmax), "_softmax": _cv_softmax(F.softmax),
    "log_softmax": _cv_softmax(F.log_softmax), "_log_softmax": _cv_softmax(F.log_softmax),
    "dropout": _cv_dropout, "feature_dropout": _cv_dropout, "alpha_dropout": _cv_dropout,
    "pixel_shuffle": _fn(F.pixel_shuffle, "self", "upscale_factor"),
    "pixel_unshuffle": _fn(F.pixel_unshuffle, "self", "downscale_factor"),
    "where": _fn(torch.where, "condition", "self", "other"),
    **{cmp: _fn(getattr(torch, cmp), "self", "other") for cmp in ("gt", "lt", "ge", "le", "eq", "ne")},
    "sym_size": _cv_size, "to": _cv_to, "_to_copy": _cv_to,
    **{name: _cv_identity for name in _IDENTITY},
}


# ----------------------------------------------------------------------------- the walk
def _op_name(op: torch._ops.OpOverload) -> str:
    return op._schema.name.split("::", 1)[1]


def _higher_order(gm: fx.GraphModule) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator):
            found.setdefault(f"torch.ops.higher_order.{node.target.name()}", []).append(node.name)
    return found


def _constants(ep: torch.export.ExportedProgram) -> dict[str, _Const]:
    """Placeholder name -> constant, from the graph signature."""
    sig = ep.graph_signature
    params = set(sig.parameters)
    state = dict(ep.state_dict)
    consts: dict[str, _Const] = {}
    for placeholder, fqn in {**sig.inputs_to_parameters, **sig.inputs_to_buffers}.items():
        tensor = state[fqn] if fqn in state else ep.constants[fqn]
        consts[placeholder] = _Const(tensor.detach(), fqn, trainable=fqn in params)
    for placeholder, fqn in sig.inputs_to_lifted_tensor_constants.items():
        consts[placeholder] = _Const(ep.constants[fqn].detach(), fqn)
    return consts


def _fold(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> Any:
    """Evaluate an op whose inputs are all constants; None if it cannot or must not be."""
    if _RANDOM.search(_op_name(op)):
        return None
    unwrap = lambda v: v.value if isinstance(v, _Const) else v  # noqa: E731
    try:
        with torch.no_grad():
            out = op(*map_aggregate(args, unwrap), **{k: map_aggregate(v, unwrap) for k, v in kwargs.items()})
    except Exception:  # a kernel that refuses these inputs: keep the call in the graph
        return None
    owners = set()
    map_aggregate((args, kwargs), lambda v: owners.add(v.owner) if isinstance(v, _Const) else v)
    owner = owners.pop() if len(owners) == 1 else ""  # t(W), W.view(...): still W's
    trainable = False
    if isinstance(out, torch.Tensor):
        return _Const(out, owner, trainable)
    if isinstance(out, tuple | list) and all(isinstance(o, torch.Tensor) for o in out):
        return tuple(_Const(o, owner, trainable) for o in out)
    return None


def _has_node(value: Any) -> bool:
    found = []
    map_aggregate(value, lambda v: found.append(v) if isinstance(v, fx.Node) else v)
    return bool(found)


def _convert_node(b: _Builder, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
    lookup = lambda v: env[v] if isinstance(v, fx.Node) else v  # noqa: E731
    args = map_aggregate(node.args, lookup)
    kwargs = {k: map_aggregate(v, lookup) for k, v in node.kwargs.items()}
    target = node.target
    if target is operator.getitem and isinstance(args[0], tuple | list):
        return args[0][args[1]]
    if not isinstance(target, torch._ops.OpOverload):  # symbolic-size arithmetic, getitem
        return b.call(target, tuple(args), kwargs)
    name = _op_name(target)
    if name in _DROP:
        return None
    if not _has_node(args) and not _has_node(kwargs) and name not in ("sym_size",):
        folded = _fold(target, tuple(args), kwargs)
        if folded is not None:
            return folded
    converter = _CONVERTERS.get(name)
    written = _written_arg(target)
    if written is not None:  # x.relu_(), out += identity: the functional op, then later
        source = node.args[written]  # readers of the mutated tensor read its result
        converter = _CONVERTERS.get(name.removesuffix("_"))
        writes = not (name in _EVAL_NOOPS and not _bind(target, tuple(args), kwargs).get("train"))
        if writes and (not isinstance(source, fx.Node) or (_is_view(source) and _alias_read_later(node, source))):
            converter = None  # writing through a view would reach its base: keep the ATen call
    out = converter(b, _bind(target, tuple(args), kwargs)) if converter else None
    if out is not None:
        if written is not None:
            env[node.args[written]] = out
        return out
    kept = b.call(target, tuple(args), kwargs)
    kept.meta["slimgraph_untranslated"] = str(target)
    b.untranslated.setdefault(f"aten.{name}", []).append(node.name)
    return kept


_EVAL_NOOPS = {"dropout_", "feature_dropout_", "alpha_dropout_"}  # nothing written at inference
_VIEWS = {"view", "_unsafe_view", "reshape", "slice", "select", "transpose", "permute", "t",
          "expand", "squeeze", "unsqueeze", "split", "split_with_sizes", "chunk", "unbind",
          "alias", "as_strided", "flatten", "narrow", "diagonal", "unflatten"}


def _written_arg(op: torch._ops.OpOverload) -> int | None:
    """The index of the argument an in-place op writes (``Tensor(a!) self``), or None."""
    for i, a in enumerate(op._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write and not a.kwarg_only:
            return i
    return None


def _alias_read_later(node: fx.Node, view: fx.Node) -> bool:
    """Whether anything after ``node`` (an in-place op writing ``view``) reads the tensor it
    writes through another name: the view's base or any view of it. When nothing does, the
    write is seen only through the op's result and the functional op is exact (and trainable:
    autograd refuses an in-place write to a tensor it saved)."""
    base = view
    while _is_view(base) and isinstance(base.args[0], fx.Node):
        base = base.args[0]
    aliases, todo = set(), [base]
    while todo:
        n = todo.pop()
        if n not in aliases:
            aliases.add(n)
            todo += [u for u in n.users if _is_view(u) and u.args and u.args[0] is n]
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return any(order[u] > order[node] for a in aliases for u in a.users if u is not node)


def _is_view(node: fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and \
        _op_name(node.target) in _VIEWS


def _copy_meta(new: Any, old: fx.Node) -> None:
    if isinstance(new, fx.Node) and new.op != "get_attr":
        for key in ("val", "nn_module_stack", "stack_trace"):
            if key in old.meta and key not in new.meta:
                new.meta[key] = old.meta[key]


def import_exported_program(ep: torch.export.ExportedProgram, where: str = "model") -> ExportImport:
    """Rewrite ``ep`` into slimgraph's canonical form (see the module docstring)."""
    gm = ep.graph_module
    higher = _higher_order(gm)
    if higher:
        raise UnsupportedOpError(higher, where=f"{where} (control flow from torch.export)")
    consts = _constants(ep)
    sig = ep.graph_signature
    user_inputs = list(sig.user_inputs)
    b = _Builder()
    env: dict[fx.Node, Any] = {}
    input_names, vals = [], []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node.name in consts:
                env[node] = consts[node.name]
                continue
            if node.name not in user_inputs:
                raise ModelLoadError(f"{where}: exported input {node.name!r} is neither a tensor input nor a weight")
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise ModelLoadError(f"{where}: input {node.name!r} is a {type(val).__name__}; slimgraph "
                                     "imports models whose inputs are tensors")
            env[node] = b.graph.placeholder(node.name)
            env[node].meta["val"] = val
            input_names.append(node.name)
            vals.append(val)
        elif node.op == "call_function":
            env[node] = _convert_node(b, node, env)
            _copy_meta(env[node], node)
        elif node.op == "output":
            _emit_output(b, node, env, sig)
        elif node.op == "get_attr":
            raise ModelLoadError(f"{where}: exported graph reads attribute {node.target!r} directly "
                                 "(a submodule graph); slimgraph cannot import it")
    out = fx.GraphModule(b.root, b.graph)
    out.graph.eliminate_dead_code()
    out.delete_all_unused_submodules()
    out.graph.lint()
    out.recompile()
    dynamic = bool(vals) and all(isinstance(v.shape[0], torch.SymInt) for v in vals if v.dim())
    return ExportImport(out, input_names, dynamic, b.untranslated)


def _emit_output(b: _Builder, node: fx.Node, env: dict, sig) -> None:
    kinds = [spec.kind for spec in sig.output_specs]
    values = list(node.args[0])
    user = [env[v] if isinstance(v, fx.Node) else v for v, kind in zip(values, kinds, strict=True)
            if kind == torch.export.graph_signature.OutputKind.USER_OUTPUT]
    user = [b.value(v) for v in user]
    b.graph.output(user[0] if len(user) == 1 else tuple(user))


# ----------------------------------------------------------------------------- exporting a module
def batch_dims(inputs: Sequence[torch.Tensor]) -> tuple:
    """``dynamic_shapes`` marking dim 0 of every input as one shared batch dimension."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    return tuple({0: batch} if x.dim() else None for x in inputs)


def export_module(module: nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[torch.export.ExportedProgram, bool, str | None]:
    """torch.export ``module``, with a dynamic batch where the model allows it.

    An example batch of 1 is exported as batch 2 (torch specializes sizes 0 and 1). Returns the
    program, whether its batch is dynamic, and why not when it is not.
    """
    inputs = tuple(inputs)
    wide = tuple(x.expand(2, *x.shape[1:]).clone() if x.dim() and x.shape[0] == 1 else x for x in inputs)
    try:
        return torch.export.export(module, wide, dynamic_shapes=batch_dims(wide)), True, None
    except Exception as err:  # the model fixes its batch size: export it as it is
        reason = _first_line(err)
    return torch.export.export(module, inputs), False, reason


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    for line in text.splitlines():
        line = line.strip(" -")
        if line and not line.startswith(("Constraints violated", "For more information")):
            return line[:200]
    return type(err).__name__

