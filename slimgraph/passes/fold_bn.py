"""fold-bn: fold inference batch norm into the conv or linear layer that feeds it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx, nn

from slimgraph.passes._fx import describe, finalize, module_call_counts
from slimgraph.passes.base import Pass, PassResult, Skip, register_pass

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
             nn.ConvTranspose3d, nn.Linear)


def _scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    var, mean = bn.running_var.double(), bn.running_mean.double()
    gamma = bn.weight.double() if bn.affine else torch.ones_like(var)
    beta = bn.bias.double() if bn.affine else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def fold_into(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """y = scale * layer(x) + shift, folded into ``layer``'s weight and bias (in place)."""
    w = layer.weight.data.double()
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        g, cin = layer.groups, w.shape[0]
        k = w.shape[2:]
        w = (w.view(g, cin // g, w.shape[1], *k) * scale.view(g, 1, -1, *[1] * len(k))).view_as(w)
    else:
        w = w * scale.view(-1, *[1] * (w.dim() - 1))
    bias = layer.bias.data.double() if layer.bias is not None else torch.zeros_like(scale)
    dtype = layer.weight.dtype
    layer.weight.data = w.to(dtype)
    layer.bias = nn.Parameter((bias * scale + shift).to(dtype))


def _decline_reason(gm: fx.GraphModule, bn_node: fx.Node, bn: nn.Module, calls) -> str | None:
    src = bn_node.args[0] if bn_node.args else None
    if bn.training or not bn.track_running_stats or bn.running_mean is None:
        return "batch norm uses batch statistics (training mode or no running stats)"
    if not isinstance(src, fx.Node) or src.op != "call_module":
        return f"input is {describe(gm, src) if isinstance(src, fx.Node) else 'a constant'}, not a conv or linear layer"
    layer = gm.get_submodule(src.target)
    if not isinstance(layer, _FOLDABLE):
        return f"input is {describe(gm, src)}, not a conv or linear layer"
    if len(src.users) > 1:
        others = ", ".join(u.name for u in src.users if u is not bn_node)
        return f"{src.target} output is also read by {others}; folding would change them"
    if calls[src.target] > 1:
        return f"{src.target} is called at {calls[src.target]} places (shared weights)"
    if isinstance(layer, nn.Linear) and not isinstance(bn, nn.BatchNorm1d):
        return "linear layer followed by a 2-D/3-D batch norm"
    if layer.weight.shape[0 if not isinstance(layer, nn.modules.conv._ConvTransposeNd) else 1] * (
            layer.groups if isinstance(layer, nn.modules.conv._ConvTransposeNd) else 1) != bn.num_features:
        return "channel counts of the layer and the batch norm differ"
    return None


@register_pass
@dataclass(frozen=True)
class FoldBatchNorm(Pass):
    """Fold an inference-mode BatchNorm into the Conv/ConvTranspose/Linear before it.

    BN(W x + b) = (s * W) x + (s * (b - mu) + beta), s = gamma / sqrt(var + eps) (Ioffe and
    Szegedy 2015; the folding used by every inference compiler, e.g. Jacob et al. 2018).
    Requires: nothing. Preserves: nothing (weights change).
    Declines (reported): BN in training mode, BN whose input is not a conv/linear, a conv whose
    output is read elsewhere too, a conv module shared by several call sites, Linear -> BN2d.
    Exact: yes, up to float rounding (computed in float64).
    """

    name: ClassVar[str] = "fold-bn"
    exact: ClassVar[bool] = True
    nothing_found: ClassVar[str] = "no batch norm in the graph"

    def run(self, graph, ctx) -> PassResult:
        out = graph.copy()
        gm = out.gm
        calls = module_call_counts(gm)
        skipped, folded = [], 0
        for node in list(gm.graph.nodes):
            if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), _BN):
                continue
            bn = gm.get_submodule(node.target)
            reason = _decline_reason(gm, node, bn, calls)
            if reason:
                skipped.append(Skip(node.name, reason))
                continue
            src = node.args[0]
            fold_into(gm.get_submodule(src.target), *_scale_shift(bn))
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            folded += 1
        if not folded:
            return PassResult(graph, changed=False, skipped=skipped)
        finalize(gm)
        return PassResult(out, changed=True, skipped=skipped, stats={"bn_folded": folded})
