"""ONNX frontend: an ONNX model becomes an executable ``torch.fx.GraphModule``.

Pipeline (read top to bottom in :func:`import_onnx`):

1. load a private copy of the model (the user's file and ``ModelProto`` are never modified),
   with external data where the file has it; a model older than opset 7 is upgraded to opset 9
   with ``onnx.version_converter`` (``OnnxImport.upgraded_from`` says so), or refused with ONE
   ``ModelLoadError`` giving the converter's reason;
2. raise ONE ``UnsupportedOpError`` now if an unsupported op reads the model's inputs
   (folding cannot remove it);
3. resolve static input shapes: dynamic dims (symbolic, ``-1`` or ``0``) must be given in
   ``input_shapes``; unknown names and contradictions are a ``ShapeError``;
4. fold constants with onnx-graphsurgeon (onnxruntime evaluates the constant subgraphs), then
   ``cleanup().toposort()``; if folding fails the unfolded graph is converted as it is;
5. check every remaining node against the op table and the attribute checks, and raise ONE
   ``UnsupportedOpError`` listing all unsupported ops before any conversion work;
6. convert node by node through ``_CONVERTERS`` (op type -> function).

The builder gives every emitted node a meta tensor (static shape and dtype, no compute), so
converters see static shapes, and it runs an op whose inputs are all constants eagerly: the
``Shape`` -> ``Gather`` -> ``Concat`` chains and weight arithmetic graphsurgeon left (or all
of them, when folding failed) become constants. Nodes carry ``meta["onnx_node"]`` and
``meta["onnx_op"]`` (the ONNX node they came from).

Layers a compression pass wants become ``nn.Module``s (``Conv*d``, ``ConvTranspose*d``,
``BatchNorm*d`` in eval mode, ``Linear``, activations, pools, ``LocalResponseNorm``) named after
the ONNX node; asymmetric or ``SAME_*`` padding becomes a ``ConstantPad*d`` module before the
layer. Everything else is a ``call_function`` on ``torch``/``F`` with constants as buffers.

Batch flexibility: a ``Reshape`` whose folded target keeps the input's leading dim is emitted
with ``-1`` there (or as ``torch.flatten(x, 1)``), so classic CNNs imported at batch 1 also run
at other batch sizes. Correctness is only promised at the specialized shapes.

Dtypes are kept: a float64 model becomes a float64 graph (weights, constants and example
inputs), so values beyond float32's range survive.

Exact: yes (numerics match onnxruntime to float32 rounding). Declines (raises): ops outside the
table, data-dependent shapes, and the attribute values listed in ``_CHECKS``. Graph inputs that
also have an initializer (old exporters list weights as inputs) are treated as constants.
"""

from __future__ import annotations

import keyword
import logging
import math
import operator
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import fx, nn
from torch.fx.node import map_aggregate, map_arg

from slimgraph.errors import ModelLoadError, ShapeError, SlimgraphError, UnsupportedOpError

log = logging.getLogger(__name__)

Value = fx.Node | torch.Tensor  # a graph tensor, or a constant known at import time
_DEFAULT_DOMAINS = ("", "ai.onnx")
_MIN_OPSET = 7  # older files are upgraded to _UPGRADE_TO with onnx's version converter
_UPGRADE_TO = 9
_FLT_MAX = 3.4e38


@dataclass
class OnnxImport:
    """The result of :func:`import_onnx`.

    ``gm`` returns one tensor for a single-output model and a tuple otherwise, in the order of
    ``output_names``; its positional inputs follow ``input_names``.
    """

    gm: fx.GraphModule
    example_inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    opset: int  # the default-domain opset the graph was imported at
    producer: str
    upgraded_from: int | None = None  # the file's opset when it was upgraded to ``opset``
    batch_defaulted: tuple[str, ...] = ()  # inputs whose dynamic batch dim was imported as 1


def import_onnx(
    model: str | os.PathLike | onnx.ModelProto,
    input_shapes: dict[str, Sequence[int]] | None = None,
) -> OnnxImport:
    """Import an ONNX model (a path or a ``ModelProto``) as an executable fx ``GraphModule``.

    Raises ``ModelLoadError`` (missing, corrupt or incomplete model), ``ShapeError`` (dynamic
    dims without ``input_shapes``, unknown or contradicting ``input_shapes``) and
    ``UnsupportedOpError`` (every unsupported op of the model, in one error).
    """
    proto, where = _load(model)
    opset = _default_opset(proto, where)
    upgraded_from = None
    if opset < _MIN_OPSET:
        proto, upgraded_from, opset = _upgrade(proto, opset, where), opset, _UPGRADE_TO
    inputs = _graph_inputs(proto.graph, where)
    unsupported, stuck = _unsupported(proto.graph, opset)
    if stuck:  # folding cannot help: fail before doing any work
        raise UnsupportedOpError(unsupported, where=where)
    shapes, batch_defaulted = _resolve_shapes(inputs, input_shapes)
    folded = _fold_constants(proto, shapes, partition=bool(unsupported))
    unsupported, _ = _unsupported(folded.graph, opset)
    if unsupported:
        raise UnsupportedOpError(unsupported, where=where)
    example = _example_inputs(inputs, shapes)
    gm = _convert(folded, opset, inputs, example, where, source_opset=upgraded_from or opset)
    return OnnxImport(
        gm=gm,
        example_inputs=example,
        input_names=[i.name for i in inputs],
        output_names=[o.name for o in folded.graph.output],
        opset=opset,
        producer=f"{proto.producer_name} {proto.producer_version}".strip(),
        upgraded_from=upgraded_from,
        batch_defaulted=batch_defaulted,
    )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _load(model: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """A private copy of the model with its external data, and a label for error messages."""
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        where = f"ONNX model {model.graph.name or '(unnamed)'!r}"
        missing = _external_tensors(proto)
        if missing:
            raise ModelLoadError(
                f"{where} keeps tensor(s) {', '.join(missing[:5])} in external data that is not "
                "loaded; pass the model's file path, or load it with onnx.load(path) first"
            )
    elif isinstance(model, str | os.PathLike):
        path = os.fspath(model)
        where = f"ONNX model {path}"
        proto = _load_file(path)
    else:
        raise ModelLoadError(f"expected an ONNX file path or onnx.ModelProto, got {type(model)}")
    if not proto.graph.node and not proto.graph.output:
        raise ModelLoadError(f"{where} has an empty graph (is it an ONNX model?)")
    if proto.functions:
        proto = _inline_functions(proto, where)
    return proto, where


def _load_file(path: str) -> onnx.ModelProto:
    if not os.path.isfile(path):
        raise ModelLoadError(f"ONNX model file not found: {path}")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as err:  # DecodeError, OSError, ...: all mean "not a readable ONNX file"
        raise ModelLoadError(f"cannot read ONNX model {path}: {err}") from err
    if _external_tensors(proto):
        try:
            onnx.load_external_data_for_model(proto, os.path.dirname(os.path.abspath(path)))
        except Exception as err:
            raise ModelLoadError(
                f"cannot load the external data of ONNX model {path} (tensors "
                f"{', '.join(_external_tensors(proto)[:5])}): {err}"
            ) from err
    return proto


def _external_tensors(proto: onnx.ModelProto) -> list[str]:
    from onnx.external_data_helper import uses_external_data

    return [t.name for t in _all_tensors(proto.graph) if uses_external_data(t)]


def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _all_tensors(a.g)
            for g in a.graphs:
                yield from _all_tensors(g)


def _inline_functions(proto: onnx.ModelProto, where: str) -> onnx.ModelProto:
    try:
        from onnx.inliner import inline_local_functions

        return inline_local_functions(proto)
    except Exception as err:
        raise ModelLoadError(f"{where}: cannot inline its local functions: {err}") from err


def _default_opset(proto: onnx.ModelProto, where: str) -> int:
    versions = [o.version for o in proto.opset_import if o.domain in _DEFAULT_DOMAINS]
    if not versions:
        raise ModelLoadError(f"{where} declares no default-domain opset")
    return int(versions[0])


def _upgrade(proto: onnx.ModelProto, opset: int, where: str) -> onnx.ModelProto:
    """The private model upgraded from ``opset`` to ``_UPGRADE_TO`` by onnx's version converter.

    Two gaps of the converter are closed: legacy ``broadcast=1, axis=k`` operands are aligned
    first (:func:`_align_legacy_broadcast`); and the converter passes opset-6 ``PRelu`` through
    unchanged although a 1-D slope meant axis 1 before opset 7 and the last axis after, so
    ``_prelu`` applies the old meaning (it sees the file's opset as ``_Node.source_opset``).
    """
    from onnx import version_converter

    proto = _align_legacy_broadcast(proto)
    try:
        return version_converter.convert_version(proto, _UPGRADE_TO)
    except Exception as err:  # the converter's C++ assertion, as RuntimeError/ValueError/...
        reason = _converter_reason(err, proto, opset)
    # Raised outside the handler: the converter's traceback explains nothing to a user.
    raise ModelLoadError(
        f"{where} uses opset {opset}; slimgraph imports opset {_MIN_OPSET} and newer and "
        f"onnx.version_converter cannot upgrade it to opset {_UPGRADE_TO}: {reason}"
    )


def _align_legacy_broadcast(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Opset < 7 ``broadcast=1, axis=k`` as numpy broadcasting: B gets trailing unit dims.

    The converter's 6 -> 7 adapter appends ``rank(A) - rank(B)`` unit dims to B whatever the
    axis, which is wrong (and fails its own check) when B aligns inside A, e.g. a per-channel
    (C,) bias added at axis 1 of an NCHW tensor. Here B is unsqueezed to end at A's last dim
    and ``axis`` dropped; nodes whose ranks shape inference cannot tell are left to the converter.
    """
    if all(_legacy_axis(n) is None for n in proto.graph.node):
        return proto
    ranks = _ranks(proto)
    nodes = []
    for old in proto.graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(old)
        axis_attr = _legacy_axis(node)
        if axis_attr is None:
            nodes.append(node)
            continue
        rank_a, rank_b = ranks.get(node.input[0]), ranks.get(node.input[1])
        if rank_a is not None and rank_b is not None:
            end = rank_a - (axis_attr.i + rank_a if axis_attr.i < 0 else axis_attr.i)
            if end > rank_b:
                aligned = f"{node.input[1]}__aligned_{len(nodes)}"
                nodes.append(onnx.helper.make_node("Unsqueeze", [node.input[1]], [aligned],
                                                   axes=list(range(rank_b, end))))
                node.input[1] = aligned
            node.attribute.remove(axis_attr)
        nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return proto


def _legacy_axis(node: onnx.NodeProto) -> onnx.AttributeProto | None:
    """The ``axis`` attribute of an opset < 7 ``broadcast=1`` binary op (not Gemm's C)."""
    if node.op_type == "Gemm" or len(node.input) < 2:
        return None
    if not any(a.name == "broadcast" and a.i for a in node.attribute):
        return None
    return next((a for a in node.attribute if a.name == "axis"), None)


def _ranks(proto: onnx.ModelProto) -> dict[str, int]:
    """The rank of every tensor whose shape the model states or shape inference finds."""
    try:
        graph = onnx.shape_inference.infer_shapes(proto).graph
    except Exception as err:  # an old or odd model: the stated shapes only
        log.debug("ONNX shape inference failed (%s)", err)
        graph = proto.graph
    ranks = {t.name: len(t.dims) for t in graph.initializer}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        if vi.type.tensor_type.HasField("shape"):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    return ranks


def _converter_reason(err: Exception, proto: onnx.ModelProto, opset: int) -> str:
    """The converter's message without its C++ source location and assertion text."""
    text = " ".join(str(err).split()) or type(err).__name__
    text = re.sub(r"^[^`]*Assertion `.*?` failed: ", "", text)
    if "no registered schema" in text:
        unknown = sorted({n.op_type for n in proto.graph.node if n.domain in _DEFAULT_DOMAINS
                          and not onnx.defs.has(n.op_type)})
        text = f"no ONNX schema for op(s) {', '.join(unknown) or '?'} (opset {opset})"
    return text


# --------------------------------------------------------------------------------------------
# Inputs and shapes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Input:
    name: str
    dims: tuple[int | str, ...] | None  # str: a dynamic dim's label; None: rank unknown
    elem_type: int


def _graph_inputs(graph: onnx.GraphProto, where: str) -> list[_Input]:
    """The graph's real inputs (old models also list their initializers as inputs)."""
    initializers = {t.name for t in graph.initializer}
    inputs = []
    for vi in graph.input:
        if vi.name in initializers:
            continue
        if vi.type.WhichOneof("value") != "tensor_type":
            raise ModelLoadError(f"{where}: input {vi.name!r} is not a tensor")
        tt = vi.type.tensor_type
        dims = None
        if tt.HasField("shape"):
            dims = tuple(_dim(d) for d in tt.shape.dim)
        inputs.append(_Input(vi.name, dims, tt.elem_type))
    return inputs


def _dim(d: onnx.TensorShapeProto.Dimension) -> int | str:
    if d.HasField("dim_value") and d.dim_value > 0:
        return int(d.dim_value)
    if d.HasField("dim_param") and d.dim_param:
        return d.dim_param
    return "?" if not d.HasField("dim_value") else str(d.dim_value)


def _resolve_shapes(
    inputs: list[_Input], input_shapes: dict[str, Sequence[int]] | None
) -> tuple[dict[str, tuple[int, ...]], tuple[str, ...]]:
    """Static input shapes, and the inputs whose dynamic batch dim (dim 0, the only dynamic one)
    was taken as 1; any other dynamic dim must be given."""
    given = dict(input_shapes or {})
    names = [i.name for i in inputs]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ShapeError(
            f"input_shapes names unknown input(s) {unknown}; the model's inputs are {names}"
        )
    shapes, missing, defaulted = {}, [], []
    for inp in inputs:
        if inp.name in given:
            shapes[inp.name] = _checked_shape(inp, given[inp.name])
        elif inp.dims is None:
            missing.append(f"input {inp.name!r} has no shape in the model")
        elif inp.dims and isinstance(inp.dims[0], str) and all(isinstance(d, int) for d in inp.dims[1:]):
            shapes[inp.name] = (1, *(int(d) for d in inp.dims[1:]))
            defaulted.append(inp.name)
        elif any(isinstance(d, str) for d in inp.dims):
            dyn = ", ".join(f"dim {i} ({d!r})" for i, d in enumerate(inp.dims) if isinstance(d, str))
            example = tuple(d if isinstance(d, int) else 1 for d in inp.dims)
            missing.append(
                f"input {inp.name!r} has dynamic {dyn} in shape {inp.dims}; give static shapes: "
                f"--input-shape {inp.name}={','.join(map(str, example))} on the command line, "
                f"input_shapes={{{inp.name!r}: {example}}} in Python"
            )
        else:
            shapes[inp.name] = tuple(int(d) for d in inp.dims)
    if missing:
        raise ShapeError("; ".join(missing))
    return shapes, tuple(defaulted)


def _checked_shape(inp: _Input, want: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in want)
    except (TypeError, ValueError) as err:
        raise ShapeError(f"input_shapes[{inp.name!r}] = {want!r} is not a sequence of ints") from err
    if any(d <= 0 for d in shape):
        raise ShapeError(f"input_shapes[{inp.name!r}] = {shape} has a non-positive dim")
    if inp.dims is None:
        return shape
    if len(shape) != len(inp.dims):
        raise ShapeError(
            f"input_shapes[{inp.name!r}] = {shape} has rank {len(shape)}, but the model's "
            f"input has rank {len(inp.dims)} (shape {inp.dims})"
        )
    for i, (model_dim, dim) in enumerate(zip(inp.dims, shape, strict=True)):
        if isinstance(model_dim, int) and model_dim != dim:
            raise ShapeError(
                f"input_shapes[{inp.name!r}] = {shape} contradicts the model's static dim {i} "
                f"= {model_dim} (model shape {inp.dims})"
            )
    return shape


_DTYPES: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.BOOL: torch.bool,
}


def _example_inputs(inputs: list[_Input], shapes: dict[str, tuple[int, ...]]) -> tuple:
    gen = torch.Generator().manual_seed(0)
    out = []
    for inp in inputs:
        dtype = _DTYPES.get(inp.elem_type)
        shape = shapes[inp.name]
        if dtype is None:
            raise UnsupportedOpError(
                {f"input dtype {onnx.TensorProto.DataType.Name(inp.elem_type)}": [inp.name]}
            )
        if dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(dtype))
        elif dtype == torch.bool:
            out.append(torch.randint(0, 2, shape, generator=gen).bool())
        else:
            out.append(torch.randint(0, 10, shape, generator=gen).to(dtype))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Constant folding (onnx-graphsurgeon + onnxruntime)
# --------------------------------------------------------------------------------------------


def _fold_constants(proto: onnx.ModelProto, shapes: dict[str, tuple[int, ...]],
                    partition: bool) -> onnx.ModelProto:
    """Fold with static input shapes; on failure, return the unfolded (private) proto.

    The converter folds whatever it can convert on constants by itself, so the slow
    partitioned retry only runs when unsupported ops on constants need onnxruntime to fold.
    """
    if not _worth_folding(proto.graph):
        return proto  # saves graphsurgeon's copies of every weight on big, clean models
    try:
        import onnx_graphsurgeon as gs
        from onnx_graphsurgeon.logger import G_LOGGER

        _set_input_shapes(proto, shapes)  # our private copy
        static = proto
        # graphsurgeon folds Shape ignoring its opset-15 start/end; the converter folds it then.
        fold_shapes = not any(node.op_type == "Shape" and node.attribute
                              for node in proto.graph.node)
        if fold_shapes and any(node.op_type in ("Shape", "Size") for node in proto.graph.node):
            try:  # lets graphsurgeon fold Shape nodes (the converter folds the rest)
                static = onnx.shape_inference.infer_shapes(proto, data_prop=True)
            except Exception as err:
                log.debug("ONNX shape inference failed (%s); folding without it", err)
        with G_LOGGER.suppress(G_LOGGER.CRITICAL):
            try:  # one onnxruntime session for the whole constant subgraph: fast
                graph = gs.import_onnx(static).toposort()
                graph.fold_constants(fold_shapes=fold_shapes, error_ok=False)
            except Exception as err:  # partitioned: slow, but folds what it can
                if not partition:
                    raise
                log.debug("whole-graph constant folding failed (%s); partitioning", err)
                graph = gs.import_onnx(static).toposort()
                graph.fold_constants(fold_shapes=fold_shapes, partitioning="basic")
            graph.cleanup().toposort()
            return gs.export_onnx(graph, do_type_check=False)
    except Exception as err:  # exotic models: convert the unfolded graph instead
        log.warning("constant folding failed (%s: %s); converting the unfolded graph",
                    type(err).__name__, err)
        return proto


def _worth_folding(graph: onnx.GraphProto) -> bool:
    """Whether graphsurgeon has work: foldable, shape, control-flow, dead or unsorted nodes."""
    constants = {t.name for t in graph.initializer}
    known = constants | {i.name for i in graph.input}
    used = {i for node in graph.node for i in node.input} | {o.name for o in graph.output}
    for node in graph.node:
        inputs = [i for i in node.input if i]
        if (node.op_type in ("Shape", "Size", "Constant", "If", "Loop", "Scan")
                or any(i not in known for i in inputs)
                or (inputs and all(i in constants for i in inputs))
                or not any(o in used for o in node.output if o)):
            return True
        known.update(node.output)
    return False


def _set_input_shapes(proto: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> None:
    for vi in proto.graph.input:
        if vi.name in shapes:
            shape = vi.type.tensor_type.shape
            shape.ClearField("dim")
            for d in shapes[vi.name]:
                shape.dim.add().dim_value = d


# --------------------------------------------------------------------------------------------
# Support check: one error listing everything, before any conversion
# --------------------------------------------------------------------------------------------


def _op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in _DEFAULT_DOMAINS else f"{node.domain}.{node.op_type}"


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"#{index}->{node.output[0] if node.output else '?'}"


def _unsupported(graph: onnx.GraphProto, opset: int) -> tuple[dict[str, list[str]], bool]:
    """Unsupported ops (op -> node labels), and whether one of them reads the model's inputs.

    An unsupported op on constants only may still fold away; one that reads the inputs
    (other than through ``Shape``, static here) cannot.
    """
    bad: dict[str, list[str]] = {}
    stuck = False
    live = {i.name for i in graph.input} - {t.name for t in graph.initializer}
    for index, node in enumerate(graph.node):
        reads_inputs = node.op_type not in ("Shape", "Size") and any(i in live for i in node.input)
        if reads_inputs:
            live.update(node.output)
        key, label = _op_key(node), _node_label(node, index)
        if key not in _CONVERTERS:
            bad.setdefault(key, []).append(label)
        else:
            check = _CHECKS.get(key)
            reason = check(_attrs(node, tensors=False), node, opset) if check else None
            if not reason:
                continue
            bad.setdefault(key, []).append(f"{label} ({reason})")
        stuck = stuck or reads_inputs
    if graph.sparse_initializer:
        bad["sparse_initializer"] = [t.values.name for t in graph.sparse_initializer]
        stuck = True
    return bad, stuck


def _check_bn(attrs: dict, node: onnx.NodeProto, opset: int) -> str | None:
    if attrs.get("training_mode", 0):
        return "training_mode=1"
    if opset < 9 and attrs.get("spatial", 1) == 0:
        return "spatial=0"
    return None


def _check_max_pool(attrs: dict, node: onnx.NodeProto, opset: int) -> str | None:
    if len(node.output) > 1 and node.output[1]:
        return "the Indices output is used"
    return None


def _check_avg_pool(attrs: dict, node: onnx.NodeProto, opset: int) -> str | None:
    if any(d != 1 for d in attrs.get("dilations", [])):
        return f"dilations={attrs['dilations']}"
    return None


def _check_resize(attrs: dict, node: onnx.NodeProto, opset: int) -> str | None:
    mode = attrs.get("mode", "nearest")
    if mode not in ("nearest", "linear", "bilinear", "cubic"):
        return f"mode={mode!r}"
    coord = attrs.get("coordinate_transformation_mode", "half_pixel")
    if coord not in _COORDINATES:
        return f"coordinate_transformation_mode={coord!r}"
    if attrs.get("antialias", 0):
        return "antialias=1"
    policy = attrs.get("keep_aspect_ratio_policy", "stretch")
    if policy != "stretch":
        return f"keep_aspect_ratio_policy={policy!r}"
    return None


def _check_cast(attrs: dict, node: onnx.NodeProto, opset: int) -> str | None:
    to = attrs.get("to")
    if to not in _DTYPES:
        return f"to={onnx.TensorProto.DataType.Name(to) if to is not None else None}"
    return None


def _check_constant(attrs: dict, node: onnx.NodeProto, opset: int) -> str | None:
    if not set(attrs) & {"value", "value_float", "value_floats", "value_int", "value_ints"}:
        return f"attribute {sorted(attrs)}"
    return None


def _check_arg_reduce(attrs: dict, node: onnx.NodeProto, opset: int) -> str | None:
    return "select_last_index=1" if attrs.get("select_last_index", 0) else None


def _check_single_output(attrs: dict, node: onnx.NodeProto, opset: int) -> str | None:
    if any(node.output[1:]):
        return "its extra outputs are used"
    return None


def _check_pad(attrs: dict, node: onnx.NodeProto, opset: int) -> str | None:
    mode = attrs.get("mode", "constant")
    return None if mode in _PAD_MODES else f"mode={mode!r}"


# --------------------------------------------------------------------------------------------
# The builder: emits fx nodes with meta values, folds ops on constants eagerly
# --------------------------------------------------------------------------------------------


def _ident(text: str, fallback: str) -> str:
    """A readable Python identifier for ``text`` (an ONNX node or tensor name)."""
    name = re.sub(r"_+", "_", re.sub(r"\W", "_", text, flags=re.ASCII)).strip("_")
    if not name:
        name = fallback
    if name[0].isdigit():
        name = f"{fallback}_{name}"
    if keyword.iskeyword(name):
        name += "_"
    return name


def _layer_name(node_name: str) -> str:
    """The layer's own name in a scoped node name: torch's exporter writes
    ``/features/features.0/features.0.0/Conv`` for module ``features.0.0`` (-> ``features_0_0``,
    the name the fx and .pt2 paths give it); other names are kept as they are."""
    parts = [p for p in node_name.split("/") if p]
    if not node_name.startswith("/") or len(parts) < 2:
        return node_name
    path: list[str] = []  # scopes are relative: /features/features.1/conv/conv.0 -> features.1.conv.0
    for scope in parts[:-1]:
        if path and scope.startswith(path[-1] + "."):
            path[-1] = scope
        else:
            path.append(scope)
    return ".".join(path)


def _has_node(obj: Any) -> bool:
    found = []
    map_aggregate(obj, lambda a: found.append(a) if isinstance(a, fx.Node) else None)
    return bool(found)


def _meta_module(mod: nn.Module) -> Callable:
    """``mod`` as a function of meta tensors (shapes and dtypes only, no compute)."""
    state = {k: v.to("meta") for k, v in [*mod.named_parameters(), *mod.named_buffers()]}
    if not state:
        return mod
    return lambda *args: torch.func.functional_call(mod, state, args)


class _Builder:
    """Builds one fx graph.

    Every graph node gets a meta-tensor value (``self.vals``: static shape and dtype, no
    compute); an op whose inputs are all constants runs eagerly and yields a constant.
    """

    def __init__(self) -> None:
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.vals: dict[fx.Node, Any] = {}
        self.node_hint = "v"
        self.module_hint = "m"
        self.meta: dict[str, str] = {}
        self._taken: set[str] = set()
        self._const_names: dict[int, str] = {}
        self._lifted: dict[int, tuple[torch.Tensor, fx.Node]] = {}
        self._shared: dict[tuple, str] = {}

    # ---- values
    def is_node(self, v: Any) -> bool:
        return isinstance(v, fx.Node)

    def val(self, v: Value) -> torch.Tensor:
        """The constant, or the meta tensor (shape and dtype only) of a graph tensor."""
        return self.vals[v] if isinstance(v, fx.Node) else v

    def shape(self, v: Value) -> tuple[int, ...]:
        return tuple(self.val(v).shape)

    def constant(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        self._const_names[id(tensor)] = name
        self._lifted.setdefault(id(tensor), (tensor, None))  # keeps the id valid
        return tensor

    # ---- emission
    def placeholder(self, name: str, example: torch.Tensor) -> fx.Node:
        node = self.graph.placeholder(self.unique(_ident(name, "input")))
        self.vals[node] = example.to("meta")
        return node

    def call(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        return self._emit("call_function", fn, fn, args, kwargs)

    def method(self, name: str, *args: Any, **kwargs: Any) -> Any:
        def run(obj, *a, **k):
            return getattr(obj, name)(*a, **k)

        return self._emit("call_method", name, run, args, kwargs)

    def module(self, mod: nn.Module, *args: Any, suffix: str = "") -> Any:
        if not _has_node(args):
            with torch.no_grad():
                return mod(*args)
        key = getattr(mod, "_slimgraph_share", None)
        if key is not None:
            del mod._slimgraph_share
            # only tensors this builder keeps alive (initializers, constants): their ids are stable
            if not all(i in self._lifted for i in key[-1]):
                key = None
        name = self._shared.get(key) if key is not None else None
        if name is None:
            name = self.unique(_ident(self.module_hint + suffix, "layer"))
            self.root.add_module(name, mod)
            if key is not None:
                self._shared[key] = name
        return self._emit("call_module", name, _meta_module(getattr(self.root, name)), args, {})

    def output(self, values: list[Value]) -> None:
        outs = [self._as_arg(v) for v in values]
        self.graph.output(outs[0] if len(outs) == 1 else tuple(outs))

    def unique(self, base: str) -> str:
        name, i = base, 0
        while name in self._taken or hasattr(self.root, name) or hasattr(fx.GraphModule, name):
            i += 1
            name = f"{base}_{i}"
        self._taken.add(name)
        return name

    def _emit(self, op: str, target: Any, run: Callable, args: tuple, kwargs: dict) -> Any:
        if not _has_node((args, kwargs)):
            with torch.no_grad():
                return run(*args, **kwargs)
        args = map_aggregate(args, self._as_arg)
        kwargs = map_aggregate(kwargs, self._as_arg)
        node = self.graph.create_node(op, target, args, kwargs, name=self.node_hint)
        node.meta.update(self.meta)
        vargs = map_arg(args, self.vals.__getitem__)
        vkwargs = map_arg(kwargs, self.vals.__getitem__)
        with torch.no_grad():
            self.vals[node] = run(*vargs, **vkwargs)
        return node

    def _as_arg(self, a: Any) -> Any:
        if not isinstance(a, torch.Tensor):
            return a
        kept = self._lifted.get(id(a))
        if kept is not None and kept[1] is not None:
            return kept[1]
        base = self._const_names.get(id(a), f"{self.module_hint}_const")
        name = self.unique(_ident(base, "const"))
        keep = a.detach().clone() if a._is_view() else a.detach().contiguous()
        self.root.register_buffer(name, keep)
        node = self.graph.get_attr(name)
        self.vals[node] = a.to("meta")
        self._lifted[id(a)] = (a, node)
        return node

    def finish(self, class_name: str) -> fx.GraphModule:
        gm = fx.GraphModule(self.root, self.graph, class_name=class_name)
        _fold_linear_bias_adds(gm, self.vals)
        _fold_group_norms(gm, self.vals, self.unique)
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for name, _ in list(gm.named_buffers(recurse=False)):
            if name not in used:
                delattr(gm, name)
        gm.graph.lint()
        gm.recompile()
        return gm.eval()


def _fold_linear_bias_adds(gm: fx.GraphModule, vals: dict) -> None:
    """``Add(MatMul(x, W), b)`` -> ``Linear(bias=b)`` where ``b`` is a constant over the last
    dimension: exporters write a linear layer on a tensor of rank > 2 (a channel mix after a
    permute) as MatMul + Add, and a bias-less Linear plus a loose constant is a layer whose bias
    no pass sees (pruning, factorization and quantization would leave it behind). Only a Linear
    called once whose output nothing else reads; the same values up to the addition's order.
    """
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.add or len(node.args) != 2 or node.kwargs:
            continue
        lin = next((a for a in node.args if isinstance(a, fx.Node) and a.op == "call_module"), None)
        const = next((a for a in node.args if a is not lin), None)
        if lin is None or not (isinstance(const, fx.Node) and const.op == "get_attr"):
            continue
        mod = gm.get_submodule(lin.target)
        if type(mod) is not nn.Linear or mod.bias is not None or calls[lin.target] != 1 or len(lin.users) != 1:
            continue
        bias = getattr(gm, const.target)
        if not (isinstance(bias, torch.Tensor) and bias.dtype == mod.weight.dtype
                and bias.dim() >= 1 and bias.shape[-1] == mod.out_features
                and bias.numel() == mod.out_features and bias.dim() <= vals[lin].dim()):
            continue
        mod.bias = nn.Parameter(bias.detach().reshape(-1).clone())
        node.replace_all_uses_with(lin)
        gm.graph.erase_node(node)


def _sole_user(node: fx.Node, target: Any, op: str = "call_function") -> fx.Node | None:
    users = list(node.users)
    if len(users) == 1 and users[0].op == op and (target is None or users[0].target is target):
        return users[0]
    return None


def _channel_constant(gm: fx.GraphModule, node: fx.Node, other: Any, channels: int, rank: int) -> torch.Tensor | None:
    """The per-channel vector ``other`` holds when ``node op other`` broadcasts it over
    dimension 1 of a rank-``rank`` tensor (shape (C, 1, ...) or (1, C, 1, ...)), else None."""
    if not (isinstance(other, fx.Node) and other.op == "get_attr" and len(node.args) == 2 and not node.kwargs):
        return None
    t = getattr(gm, other.target)
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() > rank:
        return None
    if t.numel() == 1:  # a scalar (GroupNorm without affine: 1 and 0) is the same for every channel
        return t.reshape(1).expand(channels)
    shape = (1,) * (rank - t.dim()) + tuple(t.shape)
    return t.reshape(-1) if t.numel() == channels and shape[1] == channels else None


def _group_norm_affine(gm: fx.GraphModule, back: fx.Node, channels: int,
                       rank: int) -> tuple[torch.Tensor | None, torch.Tensor | None, list[fx.Node]]:
    """(gamma, beta, [mul, add]) when ``back`` is followed by ``* gamma + beta`` over channels
    and nothing else reads the intermediates; else (None, None, [])."""
    mul = _sole_user(back, torch.mul)
    if mul is None:
        return None, None, []
    weight = _channel_constant(gm, mul, next((a for a in mul.args if a is not back), None), channels, rank)
    add = _sole_user(mul, torch.add) if weight is not None else None
    if add is None:
        return None, None, []
    bias = _channel_constant(gm, add, next((a for a in add.args if a is not mul), None), channels, rank)
    return (weight, bias, [mul, add]) if bias is not None else (None, None, [])


def _fold_group_norms(gm: fx.GraphModule, vals: dict, unique: Callable[[str], str]) -> None:
    """``Reshape(N, G, -1) -> InstanceNormalization(scale 1, bias 0) -> Reshape back -> Mul(gamma)
    -> Add(beta)`` (how torch's exporter writes ``nn.GroupNorm``) -> ``nn.GroupNorm``: the
    layer the model had, with its 2C parameters, instead of an instance norm over G "channels"
    and two loose constants no pass sees. Without the Mul/Add: ``GroupNorm(affine=False)``.
    """
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.reshape:
            continue
        x = node.args[0]
        norm = _sole_user(node, None, "call_module")
        if not isinstance(x, fx.Node) or x not in vals or norm is None:
            continue
        mod = gm.get_submodule(norm.target)
        xs, ys = tuple(vals[x].shape), tuple(vals[node].shape)
        if (type(mod) is not nn.InstanceNorm1d or mod.track_running_stats or len(xs) < 3
                or len(ys) != 3 or ys[0] != xs[0] or xs[1] % ys[1] or mod.num_features != ys[1]):
            continue
        if mod.affine and not (bool((mod.weight == 1).all()) and bool((mod.bias == 0).all())):
            continue
        back = _sole_user(norm, torch.reshape)
        if back is None or tuple(vals[back].shape) != xs:
            continue
        groups, channels = ys[1], xs[1]
        weight, bias, affine_nodes = _group_norm_affine(gm, back, channels, len(xs))
        chain = [node, norm, back, *affine_nodes]
        last = chain[-1]
        if (weight is not None and weight.stride(0) == 0 and bias.stride(0) == 0
                and bool((weight == 1).all()) and bool((bias == 0).all())):
            # scalar 1 and 0: how the exporter writes GroupNorm(affine=False) (an affine one
            # gets per-channel constants, whatever their values)
            weight = bias = None
        gn = nn.GroupNorm(groups, channels, eps=mod.eps, affine=weight is not None, dtype=vals[x].dtype)
        if weight is not None:
            gn.weight = nn.Parameter(weight.detach().contiguous().clone())
            gn.bias = nn.Parameter(bias.detach().contiguous().clone())
        # the instance norm holds nothing (scale 1, bias 0): a shared one (deduplicated
        # initializers) gives each group norm a name of its own (``_Builder.unique``)
        name = norm.target if calls[norm.target] == 1 else unique(norm.target)
        gm.add_submodule(name, gn)
        with gm.graph.inserting_before(norm):
            new = gm.graph.call_module(name, (x,))
        new.meta.update(norm.meta)
        vals[new] = vals[last]
        last.replace_all_uses_with(new)
        for dead in reversed(chain):
            gm.graph.erase_node(dead)


# --------------------------------------------------------------------------------------------
# The converter driver
# --------------------------------------------------------------------------------------------


@dataclass
class _Node:
    """One ONNX node as a converter sees it: inputs are fx nodes or constant tensors."""

    op: str
    label: str
    inputs: list[Value | None]
    attrs: dict[str, Any]
    opset: int
    n_outputs: int
    source_opset: int  # the file's opset: older than ``opset`` when the model was upgraded

    def input(self, i: int) -> Value | None:
        return self.inputs[i] if i < len(self.inputs) else None

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def const(self, i: int, what: str) -> torch.Tensor | None:
        """Input ``i`` as a constant (None when absent); a graph tensor is unsupported."""
        v = self.input(i)
        if isinstance(v, fx.Node):
            raise self.unsupported(f"its {what} input is computed from the model's inputs")
        return v

    def ints(self, i: int, what: str) -> list[int] | None:
        v = self.const(i, what)
        return None if v is None else [int(x) for x in v.flatten().tolist()]

    def floats(self, i: int, what: str) -> list[float] | None:
        v = self.const(i, what)
        return None if v is None else [float(x) for x in v.flatten().tolist()]

    def unsupported(self, reason: str) -> UnsupportedOpError:
        return UnsupportedOpError({self.op: [f"{self.label} ({reason})"]})


def _attrs(node: onnx.NodeProto, tensors: bool = True) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode("utf-8", errors="replace")
        elif isinstance(v, onnx.TensorProto) and tensors:
            v = _tensor(v)
        out[a.name] = v
    return out


def _tensor(t: onnx.TensorProto) -> torch.Tensor:
    if t.data_type == onnx.TensorProto.BFLOAT16:
        arr = numpy_helper.to_array(t).astype(np.float32)
        return torch.from_numpy(arr).to(torch.bfloat16)
    if t.data_type not in _DTYPES:
        name = onnx.TensorProto.DataType.Name(t.data_type)
        raise UnsupportedOpError({f"tensor dtype {name}": [t.name or "(constant)"]})
    arr = numpy_helper.to_array(t)
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def _convert(
    proto: onnx.ModelProto, opset: int, inputs: list[_Input], example: tuple, where: str,
    source_opset: int,
) -> fx.GraphModule:
    b = _Builder()
    env: dict[str, Value] = {}
    for t in proto.graph.initializer:
        env[t.name] = b.constant(_tensor(t), t.name)
    for inp, ex in zip(inputs, example, strict=True):
        env[inp.name] = b.placeholder(inp.name, ex)
    for index, node in enumerate(proto.graph.node):
        _convert_node(b, env, node, index, opset, where, source_opset)
    outputs = []
    for o in proto.graph.output:
        if o.name not in env:
            raise ModelLoadError(f"{where}: graph output {o.name!r} is produced by no node")
        outputs.append(env[o.name])
    b.node_hint = "output"
    b.output(outputs)
    return b.finish(_ident(proto.graph.name, "OnnxModel") if proto.graph.name else "OnnxModel")


def _convert_node(b: _Builder, env: dict, node: onnx.NodeProto, index: int, opset: int,
                  where: str, source_opset: int) -> None:
    label = _node_label(node, index)
    ins = []
    for name in node.input:
        if name and name not in env:
            raise ModelLoadError(f"{where}: node {label} reads {name!r}, which nothing produces")
        ins.append(env[name] if name else None)
    n = _Node(node.op_type, label, ins, _attrs(node), opset, len(node.output), source_opset)
    out_name = node.output[0] if node.output else node.op_type
    b.node_hint = _ident(out_name, node.op_type.lower())
    b.module_hint = _ident(_layer_name(node.name) or out_name, node.op_type.lower())
    b.meta = {"onnx_node": node.name or out_name, "onnx_op": node.op_type}
    try:
        outs = _CONVERTERS[_op_key(node)](b, n)
    except SlimgraphError:
        raise
    except Exception as err:  # an inconsistent model: one line naming the node, not torch's trace
        raise ModelLoadError(f"{where}: node {label} ({node.op_type}) is inconsistent: "
                             f"{type(err).__name__}: {str(err).splitlines()[0]}") from err
    if not isinstance(outs, list | tuple):
        outs = [outs]
    for i, name in enumerate(node.output):
        if not name:
            continue
        if i >= len(outs):
            raise n.unsupported(f"output #{i} is not supported")
        out = outs[i]
        env[name] = b.constant(out, name) if isinstance(out, torch.Tensor) else out


# --------------------------------------------------------------------------------------------
# Converter helpers
# --------------------------------------------------------------------------------------------


def _new(cls: type[nn.Module], *args: Any, **tensors_and_kwargs: Any) -> nn.Module:
    """Construct a layer without initializing its weights, then set them from ONNX tensors."""
    tensors = {k: v for k, v in tensors_and_kwargs.items() if k.startswith("t_")}
    kwargs = {k: v for k, v in tensors_and_kwargs.items() if not k.startswith("t_")}
    mod = cls(*args, **kwargs, device="meta")
    # Layers built from the same initializers with the same settings are one shared layer (a
    # module called twice exports its weights once); see _Builder.module.
    mod._slimgraph_share = (cls, repr(args), repr(sorted(kwargs.items())),
                            tuple(id(v) for v in tensors.values() if v is not None))
    for key, value in tensors.items():
        name = key[2:]
        if value is None:
            setattr(mod, name, None)
        elif isinstance(getattr(mod, name), nn.Parameter):
            setattr(mod, name, nn.Parameter(value.detach().contiguous()))
        else:
            setattr(mod, name, value.detach().contiguous())
    return mod


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _pads(n: _Node, spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
          dilations: Sequence[int]) -> tuple[list[int], list[int]]:
    """(begins, ends) of the spatial padding, with ``auto_pad`` resolved on static shapes."""
    rank = len(spatial)
    auto = n.attr("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        pads = list(n.attr("pads", [0] * 2 * rank))
        return pads[:rank], pads[rank:]
    if auto == "VALID":
        return [0] * rank, [0] * rank
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        begins.append(small if auto == "SAME_UPPER" else big)
        ends.append(big if auto == "SAME_UPPER" else small)
    return begins, ends


def _torch_pad_order(begins: Sequence[int], ends: Sequence[int]) -> tuple[int, ...]:
    """ONNX (all begins, all ends) -> torch's (last_begin, last_end, prev_begin, ...)."""
    out: list[int] = []
    for bgn, end in zip(reversed(begins), reversed(ends), strict=True):
        out += [int(bgn), int(end)]
    return tuple(out)


_CONSTANT_PAD = {1: nn.ConstantPad1d, 2: nn.ConstantPad2d, 3: nn.ConstantPad3d}


def _pad_spatial(b: _Builder, x: Value, begins: Sequence[int], ends: Sequence[int],
                 value: float) -> Value:
    if not any(begins) and not any(ends):
        return x
    pads = _torch_pad_order(begins, ends)
    cls = _CONSTANT_PAD.get(len(begins))
    if cls is None:
        return b.call(F.pad, x, pads, "constant", value)
    return b.module(cls(pads, value), x, suffix="_pad")


def _crop_spatial(b: _Builder, n: _Node, y: Value, begins: Sequence[int],
                  sizes: Sequence[int]) -> Value:
    """Keep ``sizes[i]`` elements from ``begins[i]`` of each spatial dim of ``y``."""
    have = b.shape(y)[2:]
    if list(have) == list(sizes) and not any(begins):
        return y
    if any(bg + s > h or bg < 0 for bg, s, h in zip(begins, sizes, have, strict=True)):
        raise n.unsupported(f"cannot produce the output size {list(sizes)} from {list(have)}")
    index = (slice(None), slice(None)) + tuple(
        slice(bg, bg + s) for bg, s in zip(begins, sizes, strict=True))
    return b.call(operator.getitem, y, index)


def _flex_shape(b: _Builder, x: Value, shape: Sequence[int]) -> tuple[int, ...]:
    """``shape`` with -1 in the batch position when it keeps the input's leading dim."""
    shape = tuple(int(s) for s in shape)
    in_shape = b.shape(x)
    if (b.is_node(x) and in_shape and shape and shape[0] == in_shape[0]
            and math.prod(shape[1:]) > 0):
        return (-1, *shape[1:])
    return shape


def _reshape_to(b: _Builder, x: Value, shape: Sequence[int]) -> Value:
    in_shape = b.shape(x)
    shape = tuple(int(s) for s in shape)
    if shape == in_shape:
        return x
    if (len(shape) == 2 and len(in_shape) >= 2 and shape[0] == in_shape[0]
            and shape[1] == math.prod(in_shape[1:])):
        return b.call(torch.flatten, x, 1)
    return b.call(torch.reshape, x, _flex_shape(b, x, shape))


# --------------------------------------------------------------------------------------------
# Converters: convolution, normalization, dense
# --------------------------------------------------------------------------------------------

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_F_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_F_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _conv(b: _Builder, n: _Node) -> Value:
    x, w, bias = n.input(0), n.input(1), n.input(2)
    spatial, kernel = b.shape(x)[2:], b.shape(w)[2:]
    rank = len(spatial)
    if rank not in _CONV:
        raise n.unsupported(f"{rank}-D convolution")
    strides = list(n.attr("strides", [1] * rank))
    dilations = list(n.attr("dilations", [1] * rank))
    groups = int(n.attr("group", 1))
    begins, ends = _pads(n, spatial, kernel, strides, dilations)
    common = [min(p, q) for p, q in zip(begins, ends, strict=True)]
    x = _pad_spatial(b, x, [p - c for p, c in zip(begins, common, strict=True)],
                     [q - c for q, c in zip(ends, common, strict=True)], 0.0)
    if b.is_node(w) or b.is_node(bias):
        return b.call(_F_CONV[rank], x, w, bias, tuple(strides), tuple(common),
                      tuple(dilations), groups)
    mod = _new(_CONV[rank], w.shape[1] * groups, w.shape[0], tuple(kernel),
               stride=tuple(strides), padding=tuple(common), dilation=tuple(dilations),
               groups=groups, bias=bias is not None, dtype=w.dtype, t_weight=w, t_bias=bias)
    return b.module(mod, x)


def _conv_transpose_pads(n: _Node, spatial, kernel, strides, dilations, out_pad):
    """(begins, ends) of the crop of the full transposed-conv output, as onnxruntime does."""
    rank = len(spatial)
    full = [s * (i - 1) + (k - 1) * d + 1
            for i, k, s, d in zip(spatial, kernel, strides, dilations, strict=True)]
    auto = n.attr("auto_pad", "NOTSET")
    target = n.attr("output_shape")
    if target is None and auto in ("SAME_UPPER", "SAME_LOWER"):
        target = [i * s for i, s in zip(spatial, strides, strict=True)]
    if target is not None:
        target = list(target)[-rank:]
        totals = [f + op - t for f, op, t in zip(full, out_pad, target, strict=True)]
        if auto == "SAME_UPPER":
            return [t // 2 for t in totals], [t - t // 2 for t in totals]
        return [t - t // 2 for t in totals], [t // 2 for t in totals]
    if auto == "VALID":
        return [0] * rank, [0] * rank
    pads = list(n.attr("pads", [0] * 2 * rank))
    return pads[:rank], pads[rank:]


def _conv_transpose(b: _Builder, n: _Node) -> Value:
    x, w, bias = n.input(0), n.input(1), n.input(2)
    spatial, kernel = b.shape(x)[2:], b.shape(w)[2:]
    rank = len(spatial)
    if rank not in _CONV_T:
        raise n.unsupported(f"{rank}-D transposed convolution")
    strides = list(n.attr("strides", [1] * rank))
    dilations = list(n.attr("dilations", [1] * rank))
    groups = int(n.attr("group", 1))
    out_pad = list(n.attr("output_padding", [0] * rank))
    begins, ends = _conv_transpose_pads(n, spatial, kernel, strides, dilations, out_pad)
    end_crop = [e - op for e, op in zip(ends, out_pad, strict=True)]  # crop of the full output
    limit = [max(s, d) for s, d in zip(strides, dilations, strict=True)]
    padding, extra = list(begins), [p - e for p, e in zip(begins, end_crop, strict=True)]
    if any(p < 0 or not 0 <= op < lim for p, op, lim in zip(padding, extra, limit, strict=True)):
        padding = [max(0, min(p, e)) for p, e in zip(begins, end_crop, strict=True)]
        extra = [max(0, p - e) for p, e in zip(padding, end_crop, strict=True)]
        if any(op >= lim for op, lim in zip(extra, limit, strict=True)):
            raise n.unsupported(f"pads {begins + ends} with output_padding {out_pad}")
    if b.is_node(w) or b.is_node(bias):
        y = b.call(_F_CONV_T[rank], x, w, bias, tuple(strides), tuple(padding), tuple(extra),
                   groups, tuple(dilations))
    else:
        mod = _new(_CONV_T[rank], w.shape[0], w.shape[1] * groups, tuple(kernel),
                   stride=tuple(strides), padding=tuple(padding), output_padding=tuple(extra),
                   groups=groups, bias=bias is not None, dilation=tuple(dilations),
                   dtype=w.dtype, t_weight=w, t_bias=bias)
        y = b.module(mod, x)
    full = [s * (i - 1) + (k - 1) * d + 1
            for i, k, s, d in zip(spatial, kernel, strides, dilations, strict=True)]
    sizes = [f + op - bg - e for f, op, bg, e in zip(full, out_pad, begins, ends, strict=True)]
    return _crop_spatial(b, n, y, [bg - p for bg, p in zip(begins, padding, strict=True)], sizes)


_BATCH_NORM = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _batch_norm(b: _Builder, n: _Node) -> Value:
    x, scale, bias, mean, var = (n.input(i) for i in range(5))
    eps = float(n.attr("epsilon", 1e-5))
    cls = _BATCH_NORM.get(len(b.shape(x)))
    params = (scale, bias, mean, var)
    if cls is None or any(b.is_node(p) for p in params) or scale.dim() != 1:
        return b.call(F.batch_norm, x, mean, var, scale, bias, False, 0.0, eps)
    momentum = 1.0 - float(n.attr("momentum", 0.9))  # ONNX keeps, torch replaces, a fraction
    # ONNX has no affine=False: exporters write scale 1 and bias 0. Those are no parameters
    # (the same layer, the same values: x * 1 + 0 is exact), so parameter counts agree with
    # the model the file came from. An affine BN exported at its initial values (an untrained
    # model) looks the same and imports without its 2C parameters: the file cannot tell.
    affine = not (bool((scale == 1).all()) and bool((bias == 0).all()))
    mod = _new(cls, scale.shape[0], eps=eps, momentum=momentum, affine=affine, dtype=scale.dtype,
               t_weight=scale if affine else None, t_bias=bias if affine else None,
               t_running_mean=mean, t_running_var=var,
               t_num_batches_tracked=torch.tensor(0, dtype=torch.long))
    return b.module(mod.eval(), x)


_INSTANCE_NORM = {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}


def _instance_norm(b: _Builder, n: _Node) -> Value:
    x, scale, bias = n.input(0), n.input(1), n.input(2)
    eps = float(n.attr("epsilon", 1e-5))
    cls = _INSTANCE_NORM.get(len(b.shape(x)))
    if cls is None or b.is_node(scale) or b.is_node(bias):
        return b.call(F.instance_norm, x, None, None, scale, bias, True, 0.0, eps)
    mod = _new(cls, scale.shape[0], eps=eps, affine=True, dtype=scale.dtype,
               t_weight=scale, t_bias=bias)
    return b.module(mod, x)


def _layer_norm(b: _Builder, n: _Node) -> Value:
    x, scale, bias = n.input(0), n.input(1), n.input(2)
    shape = b.shape(x)
    axis = _norm_axis(int(n.attr("axis", -1)), len(shape))
    eps = float(n.attr("epsilon", 1e-5))
    normalized = tuple(shape[axis:])
    if b.is_node(scale) or b.is_node(bias):
        y = b.call(F.layer_norm, x, normalized, None, None, eps)
        y = b.call(torch.mul, y, scale)
        return y if bias is None else b.call(torch.add, y, bias)
    weight = scale.expand(normalized)
    bias_t = None if bias is None else bias.expand(normalized)
    mod = _new(nn.LayerNorm, normalized, eps=eps, bias=bias is not None, dtype=scale.dtype,
               t_weight=weight, t_bias=bias_t)
    return b.module(mod, x)


def _linear(b: _Builder, x: Value, weight: torch.Tensor, bias: torch.Tensor | None) -> Value:
    """``x @ weight.T + bias`` as an ``nn.Linear`` (weight: (out, in))."""
    mod = _new(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None,
               dtype=weight.dtype, t_weight=weight, t_bias=bias)
    return b.module(mod, x)


def _gemm(b: _Builder, n: _Node) -> Value:
    a, bm, c = n.input(0), n.input(1), n.input(2)
    alpha, beta = float(n.attr("alpha", 1.0)), float(n.attr("beta", 1.0))
    trans_a, trans_b = bool(n.attr("transA", 0)), bool(n.attr("transB", 0))
    if trans_a:
        a = b.call(torch.transpose, a, 0, 1)
    if b.is_node(bm) or not b.is_node(a):
        if trans_b:
            bm = b.call(torch.transpose, bm, 0, 1)
        y = b.call(torch.matmul, a, bm)
        y = y if alpha == 1.0 else b.call(torch.mul, y, alpha)
        if c is None or beta == 0.0:
            return y
        return b.call(torch.add, y, c if beta == 1.0 else b.call(torch.mul, c, beta))
    weight = bm if trans_b else bm.t()
    weight = weight * alpha if alpha != 1.0 else weight
    n_out, bias = weight.shape[0], None
    c = None if beta == 0.0 else c
    if c is not None and beta != 1.0:
        c = b.call(torch.mul, c, beta)  # folded eagerly when C is a constant
    if c is not None and not b.is_node(c):
        if c.numel() in (1, n_out) and (c.dim() < 2 or c.shape[0] == 1):
            bias, c = c.reshape(-1).expand(n_out).to(weight.dtype), None
    y = _linear(b, a, weight, bias)
    return y if c is None else b.call(torch.add, y, c)


def _matmul(b: _Builder, n: _Node) -> Value:
    a, bm = n.input(0), n.input(1)
    if b.is_node(a) and not b.is_node(bm) and bm.dim() == 2:
        return _linear(b, a, bm.t(), None)
    return b.call(torch.matmul, a, bm)


# --------------------------------------------------------------------------------------------
# Converters: pooling and LRN
# --------------------------------------------------------------------------------------------

_MAX_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_AVG_POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}


@dataclass
class _PoolGeometry:
    kernel: list[int]
    strides: list[int]
    dilations: list[int]
    begins: list[int]
    ends: list[int]
    ceil: bool
    out: list[int]  # the output size onnxruntime produces


def _pool_geometry(b: _Builder, n: _Node, x: Value) -> _PoolGeometry:
    spatial = b.shape(x)[2:]
    rank = len(spatial)
    if rank not in _MAX_POOL:
        raise n.unsupported(f"{rank}-D pooling")
    kernel = list(n.attr("kernel_shape"))
    strides = list(n.attr("strides", [1] * rank))
    dilations = list(n.attr("dilations", [1] * rank))
    ceil = bool(n.attr("ceil_mode", 0))
    begins, ends = _pads(n, spatial, kernel, strides, dilations)
    out = []
    for size, k, s, d, pb, pe in zip(spatial, kernel, strides, dilations, begins, ends,
                                     strict=True):
        span = size + pb + pe - ((k - 1) * d + 1)
        o = (-(-span // s) if ceil else span // s) + 1
        if ceil and (o - 1) * s >= size + pb:  # the last window must start inside
            o -= 1
        out.append(o)
    return _PoolGeometry(kernel, strides, dilations, begins, ends, ceil, out)


def _native_padding(g: _PoolGeometry) -> bool:
    """Whether torch's own symmetric pool padding can express the ONNX pads."""
    eff = [(k - 1) * d + 1 for k, d in zip(g.kernel, g.dilations, strict=True)]
    return g.begins == g.ends and all(p <= e // 2 for p, e in zip(g.begins, eff, strict=True))


def _max_pool(b: _Builder, n: _Node) -> Value:
    x = n.input(0)
    g = _pool_geometry(b, n, x)
    cls = _MAX_POOL[len(g.kernel)]
    if _native_padding(g):
        padding = g.begins
    else:
        x, padding = _pad_spatial(b, x, g.begins, g.ends, -math.inf), [0] * len(g.kernel)
    mod = cls(tuple(g.kernel), tuple(g.strides), tuple(padding), tuple(g.dilations),
              ceil_mode=g.ceil)
    return _crop_spatial(b, n, b.module(mod, x), [0] * len(g.out), g.out)


def _avg_pool(b: _Builder, n: _Node) -> Value:
    x = n.input(0)
    g = _pool_geometry(b, n, x)
    rank = len(g.kernel)
    include_pad = bool(n.attr("count_include_pad", 0))
    cls = _AVG_POOL[rank]
    if _native_padding(g):
        mod = cls(tuple(g.kernel), tuple(g.strides), tuple(g.begins), ceil_mode=g.ceil,
                  count_include_pad=include_pad)
        return _crop_spatial(b, n, b.module(mod, x), [0] * rank, g.out)
    # Explicit zero padding; without count_include_pad, divide by the pooled valid-mask.
    mod = cls(tuple(g.kernel), tuple(g.strides), 0, ceil_mode=g.ceil, count_include_pad=True)
    y = b.module(mod, _pad_spatial(b, x, g.begins, g.ends, 0.0))
    if not include_pad:
        mask = torch.ones((1, 1, *b.shape(x)[2:]), dtype=b.val(x).dtype)
        mask = F.pad(mask, _torch_pad_order(g.begins, g.ends))
        y = b.call(torch.div, y, mod(mask))
    return _crop_spatial(b, n, y, [0] * rank, g.out)


def _global_pool(kind: str) -> Callable:
    classes = {"avg": {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d},
               "max": {1: nn.AdaptiveMaxPool1d, 2: nn.AdaptiveMaxPool2d, 3: nn.AdaptiveMaxPool3d}}

    def convert(b: _Builder, n: _Node) -> Value:
        x = n.input(0)
        rank = len(b.shape(x)) - 2
        cls = classes[kind].get(rank)
        if cls is None:
            raise n.unsupported(f"{rank}-D global pooling")
        return b.module(cls(1), x)

    return convert


def _lrn(b: _Builder, n: _Node) -> Value:
    x = n.input(0)
    size = int(n.attr("size"))
    mod = nn.LocalResponseNorm(size, float(n.attr("alpha", 1e-4)), float(n.attr("beta", 0.75)),
                               float(n.attr("bias", 1.0)))
    if size % 2:
        return b.module(mod, x)
    # Even windows: ONNX puts the longer half after the channel, torch before it.
    y = b.module(mod, b.call(torch.flip, x, (1,)))
    return b.call(torch.flip, y, (1,))


# --------------------------------------------------------------------------------------------
# Converters: activations and element-wise
# --------------------------------------------------------------------------------------------


def _module_op(factory: Callable[[_Node], nn.Module]) -> Callable:
    def convert(b: _Builder, n: _Node) -> Value:
        return b.module(factory(n), n.input(0))

    return convert


def _function_op(fn: Callable, n_inputs: int = 1) -> Callable:
    def convert(b: _Builder, n: _Node) -> Value:
        return b.call(fn, *(n.input(i) for i in range(n_inputs)))

    return convert


def _variadic(fn: Callable) -> Callable:
    def convert(b: _Builder, n: _Node) -> Value:
        acc = n.input(0)
        for other in n.inputs[1:]:
            acc = b.call(fn, acc, other)
        return acc

    return convert


def _mean(b: _Builder, n: _Node) -> Value:
    total = _variadic(torch.add)(b, n)
    return total if len(n.inputs) == 1 else b.call(torch.div, total, float(len(n.inputs)))


def _div(b: _Builder, n: _Node) -> Value:
    x, y = n.input(0), n.input(1)
    if b.val(x).dtype.is_floating_point:
        return b.call(torch.div, x, y)
    return b.call(torch.div, x, y, rounding_mode="trunc")


def _pow(b: _Builder, n: _Node) -> Value:
    x, y = n.input(0), n.input(1)
    dtype = b.val(x).dtype
    if not b.is_node(y) and y.dtype != dtype and dtype.is_floating_point:
        y = y.to(dtype)
    out = b.call(torch.pow, x, y)
    return out if b.val(out).dtype == dtype else b.method("to", out, dtype)


def _scalar(v: torch.Tensor | None) -> float | None:
    return None if v is None else float(v.reshape(-1)[0])


def _clip(b: _Builder, n: _Node) -> Value:
    x = n.input(0)
    if n.opset < 11:
        lo, hi = n.attr("min"), n.attr("max")
    else:
        lo, hi = n.input(1), n.input(2)
        if b.is_node(lo) or b.is_node(hi):
            return b.call(torch.clamp, x, lo, hi)
        lo, hi = _scalar(lo), _scalar(hi)
    # Exporters write +-FLT_MAX for "no bound"; in float64 that is a real bound.
    unbounded = torch.finfo(torch.float64).max if b.val(x).dtype == torch.float64 else _FLT_MAX
    lo = None if lo is None or lo <= -unbounded else lo
    hi = None if hi is None or hi >= unbounded else hi
    if not b.val(x).dtype.is_floating_point:
        return b.call(torch.clamp, x, None if lo is None else int(lo),
                      None if hi is None else int(hi))
    if lo == 0.0 and hi is None:
        return b.module(nn.ReLU(), x)
    if lo == 0.0 and hi == 6.0:
        return b.module(nn.ReLU6(), x)
    if lo is not None and hi is not None:
        return b.module(nn.Hardtanh(lo, hi), x)
    if lo is None and hi is None:
        return x
    return b.call(torch.clamp, x, lo, hi)


def _hard_sigmoid(b: _Builder, n: _Node) -> Value:
    x = n.input(0)
    alpha, beta = float(n.attr("alpha", 0.2)), float(n.attr("beta", 0.5))
    if math.isclose(alpha, 1 / 6, rel_tol=1e-6) and beta == 0.5:
        return b.module(nn.Hardsigmoid(), x)
    y = b.call(torch.add, b.call(torch.mul, x, alpha), beta)
    return b.call(torch.clamp, y, 0.0, 1.0)


def _slope_shape(n: _Node, x_shape: tuple[int, ...], slope_shape: tuple[int, ...]
                 ) -> tuple[int, ...]:
    """The PRelu slope's shape aligned to X's rank (ONNX unidirectional broadcasting).

    Before opset 7 a 1-D slope of X's channel count applies along axis 1 (Caffe2's and
    PyTorch's per-channel PReLU); from opset 7 on, it is right-aligned like numpy.
    """
    rank = len(x_shape)
    if (n.source_opset < 7 and len(slope_shape) == 1 and rank >= 3
            and slope_shape[0] == x_shape[1]):
        return (1, slope_shape[0]) + (1,) * (rank - 2)
    full = (1,) * (rank - len(slope_shape)) + tuple(slope_shape)
    if len(slope_shape) > rank or any(s not in (1, d) for s, d in zip(full, x_shape,
                                                                        strict=True)):
        raise n.unsupported(f"slope shape {list(slope_shape)} is not unidirectionally "
                            f"broadcastable to input shape {list(x_shape)}")
    return full


def _prelu(b: _Builder, n: _Node) -> Value:
    x, slope = n.input(0), n.input(1)
    shape = b.shape(x)
    full = _slope_shape(n, shape, b.shape(slope))
    if not b.is_node(slope) and b.val(x).dtype.is_floating_point:
        slope = slope.to(b.val(x).dtype)
        if math.prod(full) == 1:
            return b.module(_new(nn.PReLU, 1, dtype=slope.dtype, t_weight=slope.reshape(1)), x)
        per_channel = (1, shape[1]) + (1,) * (len(shape) - 2) if len(shape) >= 2 else None
        if full == per_channel:
            mod = _new(nn.PReLU, shape[1], dtype=slope.dtype, t_weight=slope.reshape(-1))
            return b.module(mod, x)
    if b.shape(slope) != full:
        slope = b.call(torch.reshape, slope, full)
    return b.call(torch.where, b.call(torch.lt, x, 0), b.call(torch.mul, x, slope), x)


def _selu(n: _Node) -> nn.Module:
    alpha = float(n.attr("alpha", 1.67326319217681884765625))
    gamma = float(n.attr("gamma", 1.05070102214813232421875))
    if math.isclose(alpha, 1.6732632, rel_tol=1e-6) and math.isclose(gamma, 1.0507010,
                                                                     rel_tol=1e-6):
        return nn.SELU()
    raise n.unsupported(f"alpha={alpha}, gamma={gamma}")


def _softmax(cls: type[nn.Module]) -> Callable:
    def convert(b: _Builder, n: _Node) -> Value:
        x = n.input(0)
        rank = len(b.shape(x))
        axis = _norm_axis(int(n.attr("axis", -1 if n.opset >= 13 else 1)), rank)
        if n.opset >= 13 or axis == rank - 1:
            return b.module(cls(dim=axis), x)
        # Before opset 13 the input is coerced to 2-D at `axis`.
        flat = b.call(torch.flatten, x, axis)
        y = b.module(cls(dim=-1), flat)
        return b.method("reshape_as", y, x)

    return convert


def _dropout(b: _Builder, n: _Node) -> list[Value]:
    x = n.input(0)
    if n.n_outputs < 2:
        return [x]
    return [x, b.call(torch.ones_like, x, dtype=torch.bool)]


def _cast(b: _Builder, n: _Node) -> Value:
    dtype = _DTYPES[int(n.attr("to"))]
    x = n.input(0)
    return x if b.val(x).dtype == dtype else b.method("to", x, dtype)


def _cast_like(b: _Builder, n: _Node) -> Value:
    x, dtype = n.input(0), b.val(n.input(1)).dtype
    return x if b.val(x).dtype == dtype else b.method("to", x, dtype)


def _identity(b: _Builder, n: _Node) -> Value:
    return n.input(0)


# --------------------------------------------------------------------------------------------
# Converters: shapes, indexing, constants
# --------------------------------------------------------------------------------------------


def _constant(b: _Builder, n: _Node) -> torch.Tensor:
    if "value" in n.attrs:
        return n.attrs["value"]
    if "value_float" in n.attrs:
        return torch.tensor(n.attrs["value_float"], dtype=torch.float32)
    if "value_floats" in n.attrs:
        return torch.tensor(n.attrs["value_floats"], dtype=torch.float32)
    if "value_int" in n.attrs:
        return torch.tensor(n.attrs["value_int"], dtype=torch.int64)
    return torch.tensor(n.attrs["value_ints"], dtype=torch.int64)


def _shape(b: _Builder, n: _Node) -> torch.Tensor:
    shape = b.shape(n.input(0))
    start, end = n.attr("start", 0), n.attr("end")
    return torch.tensor(shape[start:end], dtype=torch.int64)


def _size(b: _Builder, n: _Node) -> torch.Tensor:
    return torch.tensor(math.prod(b.shape(n.input(0))), dtype=torch.int64)


def _constant_of_shape(b: _Builder, n: _Node) -> torch.Tensor:
    shape = n.ints(0, "shape")
    value = n.attr("value", torch.zeros(1, dtype=torch.float32))
    return torch.full(tuple(shape), value.reshape(-1)[0].item(), dtype=value.dtype)


def _reshape(b: _Builder, n: _Node) -> Value:
    x = n.input(0)
    target = n.ints(1, "shape") if "shape" not in n.attrs else list(n.attrs["shape"])
    in_shape = b.shape(x)
    if not n.attr("allowzero", 0):
        target = [in_shape[i] if t == 0 else t for i, t in enumerate(target)]
    if -1 in target:
        known = math.prod(t for t in target if t != -1)
        target[target.index(-1)] = math.prod(in_shape) // known if known else 0
    if math.prod(target) != math.prod(in_shape):
        raise n.unsupported(f"cannot reshape {list(in_shape)} to {target}")
    return _reshape_to(b, x, target)


def _flatten(b: _Builder, n: _Node) -> Value:
    x = n.input(0)
    shape = b.shape(x)
    rank = len(shape)
    axis = _norm_axis(int(n.attr("axis", 1)), rank)
    if axis in (0, rank):
        return _reshape_to(b, x, (math.prod(shape[:axis]), math.prod(shape[axis:])))
    if axis < rank - 1:  # flattens of the leading dims keep a flexible batch
        x = b.call(torch.flatten, x, axis)
    return x if axis == 1 else b.call(torch.flatten, x, 0, axis - 1)


def _transpose(b: _Builder, n: _Node) -> Value:
    x = n.input(0)
    perm = n.attr("perm") or list(reversed(range(len(b.shape(x)))))
    return b.call(torch.permute, x, tuple(perm))


def _axes(n: _Node, index: int) -> list[int] | None:
    """Axes from the attribute (old opsets) or from input ``index`` (newer opsets)."""
    if "axes" in n.attrs:
        return list(n.attrs["axes"])
    return n.ints(index, "axes")


def _squeeze(b: _Builder, n: _Node) -> Value:
    x = n.input(0)
    shape = b.shape(x)
    axes = _axes(n, 1)
    if axes is None:
        axes = [i for i, s in enumerate(shape) if s == 1]
    axes = tuple(sorted(_norm_axis(a, len(shape)) for a in axes))
    return x if not axes else b.call(torch.squeeze, x, axes)


def _unsqueeze(b: _Builder, n: _Node) -> Value:
    x = n.input(0)
    axes = _axes(n, 1)
    rank = len(b.shape(x)) + len(axes)
    for a in sorted(_norm_axis(a, rank) for a in axes):
        x = b.call(torch.unsqueeze, x, a)
    return x


def _concat(b: _Builder, n: _Node) -> Value:
    parts = [v for v in n.inputs if v is not None]
    return b.call(torch.cat, parts, int(n.attr("axis")))


def _split(b: _Builder, n: _Node) -> list[Value]:
    x = n.input(0)
    shape = b.shape(x)
    axis = _norm_axis(int(n.attr("axis", 0)), len(shape))
    sizes = list(n.attr("split", [])) or n.ints(1, "split")
    if not sizes:
        count = int(n.attr("num_outputs", n.n_outputs))
        chunk = -(-shape[axis] // count)
        sizes = [chunk] * (count - 1) + [shape[axis] - chunk * (count - 1)]
    parts = b.call(torch.split, x, sizes, axis)
    return [b.call(operator.getitem, parts, i) for i in range(len(sizes))]


def _slice_bounds(start: int, end: int, step: int, dim: int) -> range:
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        return range(min(max(start, 0), dim), min(max(end, 0), dim), step)
    return range(min(max(start, 0), dim - 1), min(max(end, -1), dim - 1), step)


def _slice(b: _Builder, n: _Node) -> Value:
    x = n.input(0)
    shape = b.shape(x)
    if "starts" in n.attrs:
        starts, ends = list(n.attrs["starts"]), list(n.attrs["ends"])
        axes, steps = n.attrs.get("axes"), None
    else:
        starts, ends = n.ints(1, "starts"), n.ints(2, "ends")
        axes, steps = n.ints(3, "axes"), n.ints(4, "steps")
    axes = list(axes) if axes else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index = [slice(None)] * len(shape)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = _norm_axis(axis, len(shape))
        rng = _slice_bounds(start, end, step, shape[axis])
        if step < 0:
            idx = torch.tensor(list(rng), dtype=torch.int64)
            x = b.call(torch.index_select, x, axis, idx)
        else:
            stop = None if end >= shape[axis] else rng.stop
            index[axis] = slice(rng.start or None, stop, None if step == 1 else step)
    if all(s == slice(None) for s in index):
        return x
    while index[-1] == slice(None):
        index.pop()
    return b.call(operator.getitem, x, tuple(index))


def _gather(b: _Builder, n: _Node) -> Value:
    x, idx = n.input(0), n.input(1)
    shape = b.shape(x)
    axis = _norm_axis(int(n.attr("axis", 0)), len(shape))
    idx_shape = b.shape(idx)
    if b.is_node(idx):
        idx = b.call(torch.where, b.call(torch.lt, idx, 0), b.call(torch.add, idx, shape[axis]),
                     idx)
    else:
        idx = torch.where(idx < 0, idx + shape[axis], idx).to(torch.int64)
        if idx.dim() == 0:
            return b.call(torch.select, x, axis, int(idx))
    if len(idx_shape) != 1:
        idx = b.call(torch.reshape, idx, (-1,))
    y = b.call(torch.index_select, x, axis, idx)
    if len(idx_shape) == 1:
        return y
    return _reshape_to(b, y, shape[:axis] + tuple(idx_shape) + shape[axis + 1:])


def _gather_elements(b: _Builder, n: _Node) -> Value:
    x, idx = n.input(0), n.input(1)
    shape = b.shape(x)
    axis = _norm_axis(int(n.attr("axis", 0)), len(shape))
    idx = b.call(torch.where, b.call(torch.lt, idx, 0), b.call(torch.add, idx, shape[axis]), idx)
    return b.call(torch.gather, x, axis, idx)


def _expand(b: _Builder, n: _Node) -> Value:
    x = n.input(0)
    shape = np.broadcast_shapes(b.shape(x), tuple(n.ints(1, "shape")))
    if tuple(shape) == b.shape(x):
        return x
    if len(shape) == len(b.shape(x)):
        shape = _flex_shape(b, x, shape)
    return b.method("expand", x, tuple(shape))


def _tile(b: _Builder, n: _Node) -> Value:
    return b.method("repeat", n.input(0), tuple(n.ints(1, "repeats")))


def _range(b: _Builder, n: _Node) -> torch.Tensor:
    start, limit, delta = (n.const(i, name) for i, name in enumerate(("start", "limit", "delta")))
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


def _where(b: _Builder, n: _Node) -> Value:
    return b.call(torch.where, n.input(0), n.input(1), n.input(2))


def _einsum(b: _Builder, n: _Node) -> Value:
    return b.call(torch.einsum, n.attr("equation"), *n.inputs)


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate",
              "wrap": "circular"}


def _pad(b: _Builder, n: _Node) -> Value:
    x = n.input(0)
    rank = len(b.shape(x))
    if "pads" in n.attrs:
        pads, value, axes = list(n.attrs["pads"]), float(n.attr("value", 0.0)), None
    else:
        pads, value = n.ints(1, "pads"), _scalar(n.const(2, "constant_value")) or 0.0
        axes = n.ints(3, "axes")
    axes = [_norm_axis(a, rank) for a in axes] if axes else list(range(rank))
    begins, ends = [0] * rank, [0] * rank
    for i, a in enumerate(axes):
        begins[a], ends[a] = pads[i], pads[len(axes) + i]
    mode = _PAD_MODES[n.attr("mode", "constant")]
    if not any(begins) and not any(ends):
        return x
    first = min(i for i in range(rank) if begins[i] or ends[i])
    if mode != "constant":
        if first < 2 or rank - 2 not in (1, 2, 3):
            raise n.unsupported(f"mode {n.attr('mode')!r} padding outside the spatial dims")
        first = 2
        return b.call(F.pad, x, _torch_pad_order(begins[first:], ends[first:]), mode)
    if not b.val(x).dtype.is_floating_point:
        value = int(value)
    return b.call(F.pad, x, _torch_pad_order(begins[first:], ends[first:]), "constant", value)


def _depth_to_space(b: _Builder, n: _Node) -> Value:
    x = n.input(0)
    bs = int(n.attr("blocksize"))
    if n.attr("mode", "DCR") == "CRD":
        return b.call(F.pixel_shuffle, x, bs)
    nb, c, h, w = b.shape(x)
    y = _reshape_to(b, x, (nb, bs, bs, c // (bs * bs), h, w))
    y = b.call(torch.permute, y, (0, 3, 4, 1, 5, 2))
    return b.call(torch.reshape, y, (-1, c // (bs * bs), h * bs, w * bs))


def _space_to_depth(b: _Builder, n: _Node) -> Value:
    x = n.input(0)
    bs = int(n.attr("blocksize"))
    nb, c, h, w = b.shape(x)
    y = _reshape_to(b, x, (nb, c, h // bs, bs, w // bs, bs))
    y = b.call(torch.permute, y, (0, 3, 5, 1, 2, 4))
    return b.call(torch.reshape, y, (-1, c * bs * bs, h // bs, w // bs))


# --------------------------------------------------------------------------------------------
# Converters: reductions
# --------------------------------------------------------------------------------------------


def _reduce(fn: Callable) -> Callable:
    def convert(b: _Builder, n: _Node) -> Value:
        x = n.input(0)
        rank = len(b.shape(x))
        axes = _axes(n, 1)
        if not axes:
            if n.attr("noop_with_empty_axes", 0):
                return x
            axes = list(range(rank))
        dims = tuple(sorted(_norm_axis(a, rank) for a in axes))
        return fn(b, x, dims, bool(n.attr("keepdims", 1)))

    return convert


def _reduce_call(torch_fn: Callable) -> Callable:
    return _reduce(lambda b, x, dims, keep: b.call(torch_fn, x, dims, keepdim=keep))


def _reduce_prod(b: _Builder, x: Value, dims: tuple[int, ...], keep: bool) -> Value:
    for d in sorted(dims, reverse=True):
        x = b.call(torch.prod, x, d, keepdim=keep)
    return x


def _reduce_norm(order: int) -> Callable:
    return _reduce(lambda b, x, dims, keep: b.call(torch.linalg.vector_norm, x, order, dims,
                                                   keep))


def _reduce_sum_square(b: _Builder, x: Value, dims: tuple[int, ...], keep: bool) -> Value:
    return b.call(torch.sum, b.call(torch.mul, x, x), dims, keepdim=keep)


def _arg_reduce(fn: Callable) -> Callable:
    def convert(b: _Builder, n: _Node) -> Value:
        x = n.input(0)
        axis = _norm_axis(int(n.attr("axis", 0)), len(b.shape(x)))
        return b.call(fn, x, axis, keepdim=bool(n.attr("keepdims", 1)))

    return convert


# --------------------------------------------------------------------------------------------
# Converters: Resize / Upsample
# --------------------------------------------------------------------------------------------


def _half_pixel_symmetric(x, scale, size_in, size_out):
    adjustment = np.float32(size_out) / (scale * np.float32(size_in))
    offset = np.float32(size_in) / np.float32(2) * (np.float32(1) - adjustment)
    return offset + (x + np.float32(0.5)) / scale - np.float32(0.5)


_COORDINATES: dict[str, Callable] = {
    "half_pixel": lambda x, s, i, o: (x + np.float32(0.5)) / s - np.float32(0.5),
    "pytorch_half_pixel": lambda x, s, i, o: ((x + np.float32(0.5)) / s - np.float32(0.5)
                                               if o > 1 else np.zeros_like(x)),
    "align_corners": lambda x, s, i, o: (x * np.float32(i - 1) / np.float32(o - 1)
                                         if o > 1 else np.zeros_like(x)),
    "asymmetric": lambda x, s, i, o: x / s,
    "tf_half_pixel_for_nn": lambda x, s, i, o: (x + np.float32(0.5)) / s,
    "half_pixel_symmetric": _half_pixel_symmetric,
}


def _round_nearest(x: np.ndarray, mode: str, scale: float) -> np.ndarray:
    floor = np.floor(x)
    tie = (x - floor) == 0.5
    if mode == "round_prefer_floor":
        return np.where(tie, floor, np.floor(x + 0.5))
    if mode == "round_prefer_ceil":
        return np.where(tie, np.ceil(x), np.floor(x + 0.5))
    if mode == "floor":
        return floor
    if mode == "ceil":
        return np.ceil(x)
    return np.ceil(x) if scale < 1 else np.trunc(x)  # opset < 11 ("simple")


def _cubic_weights(s: np.ndarray, a: float) -> np.ndarray:
    """(out, 4) weights of the neighbours floor-1 .. floor+2 (Keys' cubic, coefficient a)."""
    t = np.stack([s + 1, s, 1 - s, 2 - s], axis=1).astype(np.float64)
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.concatenate([far[:, :1], near[:, 1:3], far[:, 3:]], axis=1)


@dataclass
class _ResizeAxis:
    axis: int
    size_in: int
    size_out: int
    coords: np.ndarray  # source coordinate of every output position (float32)


def _resize_matrix(ax: _ResizeAxis, n: _Node) -> np.ndarray:
    """The (out, in) interpolation matrix of one axis (linear or cubic)."""
    m = np.zeros((ax.size_out, ax.size_in), dtype=np.float64)
    rows = np.arange(ax.size_out)
    if n.attr("mode", "nearest") == "cubic":
        base = np.floor(ax.coords).astype(np.int64)
        weights = _cubic_weights((ax.coords - base).astype(np.float64),
                                 float(n.attr("cubic_coeff_a", -0.75)))
        idx = base[:, None] + np.arange(-1, 3)[None, :]
        if n.attr("exclude_outside", 0):
            weights = np.where((idx >= 0) & (idx < ax.size_in), weights, 0.0)
            weights /= weights.sum(axis=1, keepdims=True)
        for j in range(4):
            np.add.at(m, (rows, np.clip(idx[:, j], 0, ax.size_in - 1)), weights[:, j])
        return m
    x = np.clip(ax.coords, 0, ax.size_in - 1).astype(np.float64)
    i0 = np.floor(x).astype(np.int64)
    i1 = np.minimum(i0 + 1, ax.size_in - 1)
    np.add.at(m, (rows, i0), 1.0 - (x - i0))
    np.add.at(m, (rows, i1), x - i0)
    return m


def _resize_axes(b: _Builder, n: _Node, x: Value) -> list[_ResizeAxis]:
    shape = b.shape(x)
    rank = len(shape)
    if n.op == "Upsample":
        scales = list(n.attrs["scales"]) if "scales" in n.attrs else n.floats(1, "scales")
        sizes = None
    elif n.opset < 11:
        scales, sizes = n.floats(1, "scales"), None
    else:
        scales, sizes = n.floats(2, "scales") or None, n.ints(3, "sizes") or None
    axes = [_norm_axis(a, rank) for a in n.attr("axes", range(rank))]
    coord = n.attr("coordinate_transformation_mode",
                   "half_pixel" if n.opset >= 11 and n.op == "Resize" else "asymmetric")
    transform = _COORDINATES[coord]
    out = []
    for i, axis in enumerate(axes):
        size_in = shape[axis]
        if sizes is not None:
            size_out = sizes[i]
            scale = np.float32(size_out) / np.float32(size_in)
        else:
            scale = np.float32(scales[i])
            size_out = int(np.float32(size_in) * scale)
        if size_out == size_in and scale == 1:
            continue
        coords = transform(np.arange(size_out, dtype=np.float32), scale, size_in, size_out)
        out.append(_ResizeAxis(axis, size_in, size_out, np.asarray(coords, dtype=np.float32)))
    return out


_TORCH_INTERP = {"nearest": (("nearest", None), ("nearest-exact", None)),
                 "linear": (("linear", False), ("linear", True)),
                 "cubic": (("bicubic", False), ("bicubic", True))}


def _probe(mode: str, align: bool | None, size_in: int, size_out: int) -> np.ndarray:
    """torch's (out, in) resampling matrix of one axis, measured on an identity input."""
    eye = torch.eye(size_in, dtype=torch.float32)
    if mode == "bicubic":
        y = F.interpolate(eye.view(size_in, 1, 1, size_in), size=(1, size_out), mode=mode,
                          align_corners=align)
    else:
        y = F.interpolate(eye.view(size_in, 1, size_in), size=size_out, mode=mode,
                          align_corners=align)
    return y.reshape(size_in, size_out).T.double().numpy()


def _resize_fast(b: _Builder, n: _Node, x: Value, axes: list[_ResizeAxis],
                 matrices: list[np.ndarray]) -> Value | None:
    """``F.interpolate`` when it computes exactly the ONNX resampling, else None."""
    rank = len(b.shape(x))
    if rank not in (3, 4, 5) or any(ax.axis < 2 for ax in axes):
        return None
    mode = "linear" if n.attr("mode", "nearest") == "bilinear" else n.attr("mode", "nearest")
    size = list(b.shape(x)[2:])
    for ax in axes:
        size[ax.axis - 2] = ax.size_out
    for torch_mode, align in _TORCH_INTERP[mode]:
        if torch_mode == "bicubic" and rank != 4:
            continue
        if all(np.allclose(_probe(torch_mode, align, ax.size_in, ax.size_out), m, atol=1e-5)
               for ax, m in zip(axes, matrices, strict=True)):
            if torch_mode == "linear":
                torch_mode = {3: "linear", 4: "bilinear", 5: "trilinear"}[rank]
            return b.call(F.interpolate, x, size=tuple(size), mode=torch_mode,
                          align_corners=align)
    return None


def _nearest_matrix(ax: _ResizeAxis, n: _Node) -> np.ndarray:
    default = "round_prefer_floor" if n.opset >= 11 and n.op == "Resize" else "legacy"
    scale = ax.size_out / ax.size_in
    idx = _round_nearest(ax.coords, n.attr("nearest_mode", default), scale)
    idx = np.clip(idx, 0, ax.size_in - 1).astype(np.int64)
    m = np.zeros((ax.size_out, ax.size_in))
    m[np.arange(ax.size_out), idx] = 1.0
    return m


def _resize(b: _Builder, n: _Node) -> Value:
    x = n.input(0)
    axes = _resize_axes(b, n, x)
    if not axes:
        return x
    nearest = n.attr("mode", "nearest") == "nearest"
    matrices = [_nearest_matrix(ax, n) if nearest else _resize_matrix(ax, n) for ax in axes]
    fast = _resize_fast(b, n, x, axes, matrices)
    if fast is not None:
        return fast
    rank = len(b.shape(x))
    dtype = b.val(x).dtype
    for ax, m in zip(axes, matrices, strict=True):
        if nearest:
            idx = torch.from_numpy(m.argmax(axis=1))
            x = b.call(torch.index_select, x, ax.axis, idx)
            continue
        mt = torch.from_numpy(m).to(dtype)
        if ax.axis == rank - 1:
            x = b.call(torch.matmul, x, mt.T.contiguous())
        elif ax.axis == rank - 2:
            x = b.call(torch.matmul, mt, x)
        else:
            moved = b.call(torch.movedim, x, ax.axis, -1)
            x = b.call(torch.movedim, b.call(torch.matmul, moved, mt.T.contiguous()), -1, ax.axis)
    return x


# --------------------------------------------------------------------------------------------
# The op table
# --------------------------------------------------------------------------------------------

_CONVERTERS: dict[str, Callable[[_Builder, _Node], Any]] = {
    # convolution, normalization, dense
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "BatchNormalization": _batch_norm,
    "InstanceNormalization": _instance_norm,
    "LayerNormalization": _layer_norm,
    "Gemm": _gemm,
    "MatMul": _matmul,
    # pooling
    "MaxPool": _max_pool,
    "AveragePool": _avg_pool,
    "GlobalAveragePool": _global_pool("avg"),
    "GlobalMaxPool": _global_pool("max"),
    "LRN": _lrn,
    # activations
    "Relu": _module_op(lambda n: nn.ReLU()),
    "LeakyRelu": _module_op(lambda n: nn.LeakyReLU(float(n.attr("alpha", 0.01)))),
    "Elu": _module_op(lambda n: nn.ELU(float(n.attr("alpha", 1.0)))),
    "Selu": _module_op(_selu),
    "Sigmoid": _module_op(lambda n: nn.Sigmoid()),
    "Tanh": _module_op(lambda n: nn.Tanh()),
    "HardSwish": _module_op(lambda n: nn.Hardswish()),
    "Softplus": _module_op(lambda n: nn.Softplus()),
    "Softsign": _module_op(lambda n: nn.Softsign()),
    "Mish": _module_op(lambda n: nn.Mish()),
    "Gelu": _module_op(lambda n: nn.GELU(approximate=n.attr("approximate", "none"))),
    "HardSigmoid": _hard_sigmoid,
    "Clip": _clip,
    "PRelu": _prelu,
    "Softmax": _softmax(nn.Softmax),
    "LogSoftmax": _softmax(nn.LogSoftmax),
    "Dropout": _dropout,
    # element-wise
    "Add": _function_op(torch.add, 2),
    "Sub": _function_op(torch.sub, 2),
    "Mul": _function_op(torch.mul, 2),
    "Div": _div,
    "Pow": _pow,
    "Sum": _variadic(torch.add),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Mean": _mean,
    "Sqrt": _function_op(torch.sqrt),
    "Exp": _function_op(torch.exp),
    "Log": _function_op(torch.log),
    "Neg": _function_op(torch.neg),
    "Abs": _function_op(torch.abs),
    "Reciprocal": _function_op(torch.reciprocal),
    "Floor": _function_op(torch.floor),
    "Ceil": _function_op(torch.ceil),
    "Round": _function_op(torch.round),
    "Sign": _function_op(torch.sign),
    "Erf": _function_op(torch.erf),
    "Sin": _function_op(torch.sin),
    "Cos": _function_op(torch.cos),
    "Equal": _function_op(torch.eq, 2),
    "Less": _function_op(torch.lt, 2),
    "LessOrEqual": _function_op(torch.le, 2),
    "Greater": _function_op(torch.gt, 2),
    "GreaterOrEqual": _function_op(torch.ge, 2),
    "Not": _function_op(torch.logical_not),
    "And": _function_op(torch.logical_and, 2),
    "Or": _function_op(torch.logical_or, 2),
    "Xor": _function_op(torch.logical_xor, 2),
    "Where": _where,
    "Cast": _cast,
    "CastLike": _cast_like,
    "Einsum": _einsum,
    # shapes, indexing, constants
    "Identity": _identity,
    "Constant": _constant,
    "Shape": _shape,
    "Size": _size,
    "ConstantOfShape": _constant_of_shape,
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Transpose": _transpose,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "GatherElements": _gather_elements,
    "Expand": _expand,
    "Tile": _tile,
    "Range": _range,
    "Pad": _pad,
    "Resize": _resize,
    "Upsample": _resize,
    "DepthToSpace": _depth_to_space,
    "SpaceToDepth": _space_to_depth,
    # reductions
    "ReduceMean": _reduce_call(torch.mean),
    "ReduceSum": _reduce_call(torch.sum),
    "ReduceMax": _reduce_call(torch.amax),
    "ReduceMin": _reduce_call(torch.amin),
    "ReduceProd": _reduce(_reduce_prod),
    "ReduceL1": _reduce_norm(1),
    "ReduceL2": _reduce_norm(2),
    "ReduceSumSquare": _reduce(_reduce_sum_square),
    "ReduceLogSumExp": _reduce_call(torch.logsumexp),
    "ArgMax": _arg_reduce(torch.argmax),
    "ArgMin": _arg_reduce(torch.argmin),
}

# Attribute values the converters cannot honour; checked for the whole model up front.
_CHECKS: dict[str, Callable[[dict, onnx.NodeProto, int], str | None]] = {
    "BatchNormalization": _check_bn,
    "MaxPool": _check_max_pool,
    "AveragePool": _check_avg_pool,
    "Resize": _check_resize,
    "Upsample": _check_resize,
    "Cast": _check_cast,
    "Constant": _check_constant,
    "ArgMax": _check_arg_reduce,
    "ArgMin": _check_arg_reduce,
    "LayerNormalization": _check_single_output,
    "Pad": _check_pad,
}

SUPPORTED_OPS: tuple[str, ...] = tuple(sorted(_CONVERTERS))
