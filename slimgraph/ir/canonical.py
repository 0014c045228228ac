"""Normalizations every frontend applies, so passes see one form of each layer.

- Convolution padding is always numeric: ``padding="valid"`` becomes zeros and ``"same"``
  becomes the symmetric pad it means; where "same" is asymmetric (an even dilated kernel: torch
  pads the extra row/column at the end), an explicit ``F.pad`` node goes before the conv and the
  conv gets zero padding. Passes that unfold patches (pruning reconstruction, the low-rank fits)
  and the ONNX exporter (whose "same" with dilation ONNX Runtime refuses) then need no special
  case.
"""

from __future__ import annotations

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
