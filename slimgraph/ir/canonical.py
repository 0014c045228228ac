"""Normalizations every frontend applies, so passes see one form of each layer.

``canonicalize(gm)`` runs all of them (``Graph.from_torch`` and the export frontend call it):

- Convolution padding is always numeric: ``padding="valid"`` becomes zeros and ``"same"``
  becomes the symmetric pad it means; where "same" is asymmetric (an even dilated kernel: torch
  pads the extra row/column at the end), an explicit ``F.pad`` node goes before the conv and the
  conv gets zero padding. Passes that unfold patches (pruning reconstruction, the low-rank fits)
  and the ONNX exporter (whose "same" with dilation ONNX Runtime refuses) then need no special
  case.
- A conv with a non-zero padding mode (reflect, replicate, circular) gets that padding as an
  explicit ``F.pad`` and zero padding, the form torch.export and ONNX give it; with no padding
  the mode means nothing and becomes "zeros".
- In-place activations (``nn.ReLU(inplace=True)``, ``F.relu(x, inplace=True)``) whose input
  nothing else reads become out-of-place: the same values, and training (autograd) works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn


def numeric_padding(gm: fx.GraphModule) -> bool:
    """Rewrite string conv padding in ``gm`` in place; True when something changed."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, nn.modules.conv._ConvNd) or mod.transposed or not isinstance(mod.padding, str):
            continue
        totals = [d * (k - 1) for k, d in zip(mod.kernel_size, mod.dilation, strict=True)]
        if mod.padding == "valid":
            totals = [0] * len(totals)
        if all(t % 2 == 0 for t in totals):
            _set_padding(mod, tuple(t // 2 for t in totals))
            changed = True
            continue
        if mod.padding_mode != "zeros":
            continue  # a reflect/replicate "same" with an odd total: leave it to the module
        pads: list[int] = []
        for t in reversed(totals):  # F.pad lists the last dim first: (left, right, top, bottom)
            pads += [t // 2, t - t // 2]
        for site in [n for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target]:
            with gm.graph.inserting_before(site):
                padded = gm.graph.call_function(F.pad, (site.args[0], tuple(pads)))
            site.args = (padded, *site.args[1:])
        _set_padding(mod, (0,) * len(totals))
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def _set_padding(mod: nn.modules.conv._ConvNd, padding: tuple[int, ...]) -> None:
    mod.padding = padding
    mod._reversed_padding_repeated_twice = [p for p in reversed(padding) for _ in range(2)]


_INPLACE_FNS = {F.relu, F.relu6, F.hardtanh, F.leaky_relu, F.elu, F.hardswish, F.hardsigmoid,
                F.silu, F.mish, F.dropout}


def canonicalize(gm: fx.GraphModule) -> bool:
    """All the normalizations of this module, in place; True when something changed."""
    changed = explicit_padding_modes(gm)
    changed = numeric_padding(gm) or changed
    changed = out_of_place(gm) or changed
    return changed


def explicit_padding_modes(gm: fx.GraphModule) -> bool:
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if not isinstance(mod, nn.modules.conv._ConvNd) or mod.padding_mode == "zeros" or mod.transposed:
            continue
        # what torch's forward pads with (for "same" too: the extra row/column at the end)
        pads = [int(p) for p in mod._reversed_padding_repeated_twice]
        if any(pads):
            for site in [n for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target]:
                with gm.graph.inserting_before(site):
                    padded = gm.graph.call_function(F.pad, (site.args[0], tuple(pads), mod.padding_mode))
                site.args = (padded, *site.args[1:])
        _set_padding(mod, (0,) * len(mod.kernel_size))
        mod.padding_mode = "zeros"
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def out_of_place(gm: fx.GraphModule) -> bool:
    changed = False
    for node in gm.graph.nodes:
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) or len(src.users) != 1:
            continue
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            calls = sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target)
            if getattr(mod, "inplace", False) is True and calls == 1:
                mod.inplace = False
                changed = True
        elif node.op == "call_function" and node.target in _INPLACE_FNS and node.kwargs.get("inplace"):
            node.kwargs = {**node.kwargs, "inplace": False}
            changed = True
    if changed:
        gm.recompile()
    return changed


_SPLITS = {torch.split, torch.Tensor.split, "split"}
_CHUNKS = {torch.chunk, torch.Tensor.chunk, "chunk"}


def explicit_split_sizes(gm: fx.GraphModule, example_inputs: tuple) -> bool:
    """Give every ``split(x, size)`` / ``chunk(x, n)`` an explicit list of sizes, in place.

    For export only: torch's ONNX exporter turns ``split(x, 12, 1)`` into sizes computed from
    a shape it may not know (after a channel ``F.pad`` it wrote [12, 12, 12] for 29 channels, a
    model ONNX Runtime refuses); the sizes come from shape propagation on ``example_inputs``.
    """
    from torch.fx.passes.shape_prop import ShapeProp

    todo = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")
            and n.target in _SPLITS | _CHUNKS and len(n.args) >= 2 and isinstance(n.args[1], int)]
    if not todo:
        return False
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception:  # noqa: BLE001 - the exporter then sees the graph as it is
        return False
    for node in todo:
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        meta = node.args[0].meta.get("tensor_meta")
        if not isinstance(dim, int) or meta is None:
            continue
        length, k = int(meta.shape[dim]), node.args[1]
        size = -(-length // k) if node.target in _CHUNKS else k
        sizes = [size] * (length // size) + ([length % size] if length % size else [])
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.split, (node.args[0], sizes, dim))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.recompile()
    return True


def explicit_batch_norm_affine(gm: fx.GraphModule) -> bool:
    """Give every ``affine=False`` batch norm a weight of ones and a bias of zeros, in place.

    For export only: torch's ONNX exporter builds those constants from the input's channel
    count, and fails ("batch_norm for unknown channel size") where shape inference lost it
    (after a Reshape whose shape is computed, as on a graph imported from ONNX). Exact."""
    changed = False
    for mod in gm.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and not mod.affine:
            ref = mod.running_mean if mod.running_mean is not None else torch.empty(mod.num_features)
            mod.weight = nn.Parameter(torch.ones(mod.num_features, dtype=ref.dtype))
            mod.bias = nn.Parameter(torch.zeros(mod.num_features, dtype=ref.dtype))
            mod.affine = changed = True
    return changed
