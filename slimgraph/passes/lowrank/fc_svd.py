"""fc-svd: truncated SVD of fully connected (and 1x1 conv) weights into two thinner layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from slimgraph.passes.base import register_pass
from slimgraph.passes.lowrank.common import Decline, LayerPlan, LowRankPass, common_decline


def svd_factors(w: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """W (out x in) ~ P @ Q with P = U_r sqrt(S_r) (out x r), Q = sqrt(S_r) V_r^T (r x in)."""
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    root = np.sqrt(s[:r])
    return u[:, :r] * root, root[:, None] * vt[:r]


class FcSvdPlan(LayerPlan):
    method = "fc-svd"

    def _matrix(self) -> np.ndarray:
        w = self.module.weight.detach().double().cpu().numpy()
        return w.reshape(w.shape[0], -1)

    @property
    def full_ranks(self) -> tuple[int, ...]:
        return (min(self.module.weight.shape[0], self.module.weight.shape[1]),)

    def unfoldings(self) -> tuple[np.ndarray, ...]:
        return (self._matrix(),)

    def layers(self, ranks, device=None) -> list[nn.Module]:
        (r,), m = ranks, self.module
        bias = m.bias is not None
        if isinstance(m, nn.Linear):
            return [nn.Linear(m.in_features, r, bias=False, device=device),
                    nn.Linear(r, m.out_features, bias=bias, device=device)]
        return [nn.Conv2d(m.in_channels, r, 1, stride=m.stride, padding=m.padding, bias=False, device=device),
                nn.Conv2d(r, m.out_channels, 1, bias=bias, device=device)]

    def build(self, ranks):
        first, second = self.layers(ranks)
        p, q = svd_factors(self._matrix(), ranks[0])
        with torch.no_grad():
            first.weight.copy_(torch.from_numpy(q).reshape(first.weight.shape))
            second.weight.copy_(torch.from_numpy(p).reshape(second.weight.shape))
            if second.bias is not None:
                second.bias.copy_(self.module.bias.detach())
        return self.factorized([first, second], ranks)


@register_pass
@dataclass(frozen=True)
class FcSvd(LowRankPass):
    """Truncated SVD of Linear and 1x1 Conv2d weights: W ~ (U_r S_r^1/2)(S_r^1/2 V_r^T).

    Denton, Zaremba, Bruna, LeCun, Fergus, "Exploiting linear structure within convolutional
    networks for efficient evaluation", NIPS 2014; Xue, Li, Gong, "Restructuring of deep neural
    network acoustic models with singular value decomposition", Interspeech 2013.
    Linear(in, out) -> Linear(in, r, no bias) -> Linear(r, out, bias); a 1x1 conv -> two 1x1
    convs (stride and padding on the first; the padded border then sees only the bias, as in
    the original). The singular values are split evenly between the factors (same product as
    U_r S_r . V_r^T, better conditioned for fine-tuning).
    Options: ``rank`` (default energy 0.9; see ``lowrank.common.parse_rank``), ``target_macs``,
    ``grid``, ``fidelity``, ``allow_costlier``.
    Requires: shapes, cost. Preserves: nothing.
    Declines (reported): KxK convs (other passes factor them), grouped/depthwise/transposed
    convs, Conv1d/Conv3d, shared modules, already factorized layers, a rank above min(in, out),
    factorizations costing >= the original MACs.
    Exact: no (exact at full rank up to rounding); fidelity recorded by the pass manager.
    """

    name: ClassVar[str] = "fc-svd"
    kinds: ClassVar[tuple[type, ...]] = (nn.Linear, nn.Conv2d)
    considers: ClassVar[tuple[type, ...]] = (nn.Linear, nn.modules.conv._ConvNd)

    rank: str | int | float = 0.9

    def decline(self, gm, node, module, calls):
        reason = common_decline(gm, node, module, calls, self.kinds)
        if reason is None and isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1):
            reason = (f"{tuple(module.kernel_size)} conv: fc-svd factors Linear and 1x1 convs "
                      "(use spatial-svd, tucker2, cp or flatten-conv)")
        return reason

    def plan_layer(self, gm, node, module, in_shape, out_shape, macs, ctx, graph):
        if isinstance(module, nn.Conv2d) and isinstance(module.padding, str):
            raise Decline(f"padding={module.padding!r} on a 1x1 conv")
        return FcSvdPlan(node.name, node.target, module, in_shape, out_shape, macs)
