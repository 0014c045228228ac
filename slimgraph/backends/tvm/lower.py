"""torch.nn.Module -> TVM Relax IRModule.

``lower`` exports the module with ``torch.export`` and imports it with TVM's
``from_exported_program`` (weights become Relax constants: ``keep_params_as_input=False``).

Ops no framework has (perforated conv, integer kernels, ...) are ``torch.library`` custom ops in
slimgraph's IR. Whoever defines one registers its TVM lowering here once, with
``register_custom_op_lowering``; every later ``lower`` call then knows it.

Errors: every failure is a ``BackendError``. Ops the importer has no converter for are listed
all at once, with the nodes that use them; a converter that raises is named with its node.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from slimgraph.errors import BackendError

if TYPE_CHECKING:  # imported lazily: build workers import this package and need neither
    import torch
    import tvm

# fn(node: torch.fx.Node, importer) -> relax.Expr, e.g.
#   importer.block_builder.emit_te(te_fn, importer.env[node.args[0]], ...)
CustomLowering = Callable[..., object]

_CUSTOM_LOWERINGS: dict[str, CustomLowering] = {}


def _op_key(name: str) -> str:
    """The key TVM's importer uses for an op: ``"ns::op"``/``"op"`` -> ``"op.default"``."""
    name = name.split("::")[-1]
    if name.startswith("torch.ops."):
        name = name.split(".", 3)[-1]  # torch.ops.ns.op.overload -> op.overload
    return name if "." in name else f"{name}.default"


def register_custom_op_lowering(name: str, fn: CustomLowering, *, replace: bool = False) -> str:
    """Register the TVM lowering of custom op ``name`` for every later ``lower`` call.

    ``name`` may be ``"slimgraph::perforated_conv2d"``, ``"perforated_conv2d"`` or
    ``"perforated_conv2d.default"``; it is stored under the importer's key (``op.overload``),
    which is returned. ``fn(node, importer)`` emits the Relax expression for the node.
    Registering a different function under a taken key needs ``replace=True``.
    """
    if not callable(fn):
        raise TypeError(f"lowering for {name!r} must be callable, got {type(fn).__name__}")
    key = _op_key(name)
    if key in _CUSTOM_LOWERINGS and _CUSTOM_LOWERINGS[key] is not fn and not replace:
        raise BackendError(f"a TVM lowering for {key!r} is already registered; "
                           "pass replace=True to override it")
    _CUSTOM_LOWERINGS[key] = fn
    return key


def unregister_custom_op_lowering(name: str) -> None:
    _CUSTOM_LOWERINGS.pop(_op_key(name), None)


def custom_op_lowerings() -> dict[str, CustomLowering]:
    """A copy of the registry (key -> lowering)."""
    return dict(_CUSTOM_LOWERINGS)


def _reduction(op_name: str) -> CustomLowering:
    """Lowering of ``aten.amax``/``aten.amin`` (``x, dim=[], keepdim=False``), which TVM 0.27's
    importer lacks (global max pooling written as ``x.amax((2, 3))``): Relax ``max``/``min``."""

    def lowering(node, importer):
        from tvm import relax

        x = importer.env[node.args[0]]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", [])
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        axis = list(dim) if dim else None  # [] reduces every dimension, as in torch
        return importer.block_builder.emit(getattr(relax.op, op_name)(x, axis, keepdims=bool(keepdim)))

    return lowering


for _aten, _relax in (("amax", "max"), ("amin", "min")):
    register_custom_op_lowering(_aten, _reduction(_relax))


def _adaptive_max_pool2d(node, importer):
    """Lowering of ``aten.adaptive_max_pool2d`` (``x, output_size``), which TVM 0.27's importer
    lacks: TOPI's ``adaptive_pool`` (the same bins as torch: floor(i*H/out) to
    ceil((i+1)*H/out)). The op returns (values, indices); only the values lower, so a model
    that reads the indices (``return_indices=True``) gets a clear error."""
    import operator

    from tvm import relax, topi

    if any(u.target is operator.getitem and u.args[1] != 0 for u in node.users):
        raise BackendError(f"node {node.name!r}: the indices of adaptive_max_pool2d "
                           "(return_indices=True) have no TVM lowering; only its values do")
    x = importer.env[node.args[0]]
    size = [int(v) for v in (node.args[1] if len(node.args) > 1 else node.kwargs["output_size"])]
    values = importer.block_builder.emit_te(topi.nn.adaptive_pool, x, size, "max", "NCHW",
                                            primfunc_name_hint="adaptive_max_pool2d")
    return relax.Tuple([values, values])  # slot 1 (the indices) is never read: checked above


register_custom_op_lowering("adaptive_max_pool2d", _adaptive_max_pool2d)


def export_program(module: torch.nn.Module,
                   example_inputs: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """``torch.export`` in eval mode, decomposed to the core ATen ops TVM's importer reads."""
    import torch

    if not isinstance(example_inputs, tuple):
        example_inputs = tuple(example_inputs) if isinstance(example_inputs, list) else (
            example_inputs,)
    try:
        ep = torch.export.export(module.eval(), example_inputs)
        return ep.run_decompositions()
    except Exception as err:
        raise BackendError(f"torch.export failed for {type(module).__name__}: {err}") from err


def lower(module: torch.nn.Module | torch.export.ExportedProgram,
          example_inputs: tuple[torch.Tensor, ...] = (), *,
          custom_convert_map: dict | None = None) -> tvm.IRModule:
    """Export ``module`` and import it into a Relax IRModule whose ``main`` returns a tuple.

    ``custom_convert_map`` adds lowerings for this call only, on top of the registry.
    """
    import torch
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    if isinstance(module, torch.export.ExportedProgram):
        ep = module.run_decompositions()
    else:
        ep = export_program(module, example_inputs)
    custom = {**_CUSTOM_LOWERINGS,
              **{_op_key(k): v for k, v in (custom_convert_map or {}).items()}}
    importer = ExportedProgramImporter()
    importer.exported_program = ep  # custom lowerings read constant tensors from it (int8.py)
    _check_supported(ep, set(importer.convert_map) | set(custom))
    _wrap_converters(importer, custom)
    try:
        return importer.from_exported_program(
            ep, keep_params_as_input=False, unwrap_unit_return_tuple=False,
            no_bind_return_tuple=False, custom_convert_map=custom or None)
    except BackendError:
        raise
    except Exception as err:
        raise BackendError(f"TVM Relax import failed: {type(err).__name__}: {err}") from err


def _check_supported(ep: torch.export.ExportedProgram, known: set) -> None:
    missing: dict[str, list[str]] = {}
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if name not in known:
            missing.setdefault(name, []).append(node.name)
    if missing:
        listing = "; ".join(
            f"{op} (nodes: {', '.join(nodes[:3])}{', ...' if len(nodes) > 3 else ''})"
            for op, nodes in sorted(missing.items())
        )
        raise BackendError(
            f"TVM's torch importer cannot convert {len(missing)} op(s): {listing}. "
            "Custom ops need slimgraph.backends.tvm.register_custom_op_lowering(name, fn)."
        )


def _wrap_converters(importer, custom: dict[str, CustomLowering]) -> None:
    """Make every converter failure name its op and node (the importer reports neither)."""

    def wrap(op: str, fn: Callable) -> Callable:
        def converter(node, *rest):
            try:
                return fn(node, *rest)
            except BackendError:
                raise
            except Exception as err:
                kind = "custom lowering" if op in custom else "converter"
                raise BackendError(
                    f"TVM {kind} for op {op!r} failed on node {node.name!r}: "
                    f"{type(err).__name__}: {err}") from err

        return converter

    importer.convert_map = {k: wrap(k, v) for k, v in importer.convert_map.items()}
    for key in list(custom):
        custom[key] = wrap(key, custom[key])


# data layout -> Relax ConvertLayout spec. Transposed convs stay NCHW: TVM 0.27 legalizes
# conv2d_transpose only in NCHW (left to layout inference, it would follow its NHWC input).
CONV_LAYOUTS = {"NCHW": None,
                "NHWC": {"relax.nn.conv2d": ["NHWC", "OHWI"],
                         "relax.nn.conv2d_transpose": ["NCHW", "IOHW"]}}


def convert_conv_layout(mod: tvm.IRModule, layout: str) -> tvm.IRModule:
    """Rewrite ``mod``'s 2-D convolutions to ``layout`` (``"NCHW"``: unchanged). Relax's
    ConvertLayout inserts the transposes at the edges and carries the layout through the ops
    between convolutions (activations, adds, pooling), so inputs and outputs keep theirs."""
    if layout not in CONV_LAYOUTS:
        raise BackendError(f"unknown conv layout {layout!r}: use one of {sorted(CONV_LAYOUTS)}")
    if CONV_LAYOUTS[layout] is None:
        return mod
    from tvm import relax

    try:
        return relax.transform.ConvertLayout(CONV_LAYOUTS[layout])(mod)
    except Exception as err:
        raise BackendError(f"converting convolutions to {layout} failed: "
                           f"{type(err).__name__}: {err}") from err
