"""tucker2: Tucker-2 of a conv kernel into 1x1 (S -> R3), KxK core (R3 -> R4), 1x1 (R4 -> T)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from tensorly.decomposition import partial_tucker
from torch import nn

from slimgraph.errors import PassConfigError
from slimgraph.passes.base import register_pass
from slimgraph.passes.lowrank.common import LayerPlan, LowRankPass, conv2d_geometry


def unfold(w: np.ndarray, mode: int) -> np.ndarray:
    return np.moveaxis(w, mode, 0).reshape(w.shape[mode], -1)


def tucker2_factors(w: np.ndarray, r_in: int, r_out: int, n_iter: int = 50
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W (T, S, Kh, Kw) ~ core x_0 U_out x_1 U_in: returns (U_in (S, R3), core (R4, R3, Kh, Kw),
    U_out (T, R4)), by HOOI (TensorLy ``partial_tucker``, SVD init)."""
    t, s = w.shape[:2]
    if r_out == t and r_in == s:  # full rank: identity factors, exact
        return np.eye(s), w.copy(), np.eye(t)
    (core, (u_out, u_in)), _ = partial_tucker(w, rank=[r_out, r_in], modes=[0, 1], init="svd",
                                              n_iter_max=n_iter, tol=1e-6, random_state=0)
    return np.asarray(u_in), np.asarray(core), np.asarray(u_out)


class Tucker2Plan(LayerPlan):
    method = "tucker2"

    def __init__(self, *args, n_iter: int = 50):
        super().__init__(*args)
        self.n_iter = n_iter

    def _weight(self) -> np.ndarray:
        return self.module.weight.detach().double().cpu().numpy()

    @property
    def full_ranks(self) -> tuple[int, ...]:
        t, s, kh, kw = self.module.weight.shape
        return (min(s, t * kh * kw), min(t, s * kh * kw))  # (R3 on input channels, R4 on output)

    def unfoldings(self) -> tuple[np.ndarray, ...]:
        w = self._weight()
        return (unfold(w, 1), unfold(w, 0))

    def layers(self, ranks, device=None) -> list[nn.Module]:
        (r3, r4), m = ranks, self.module
        g = conv2d_geometry(m)
        return [nn.Conv2d(m.in_channels, r3, 1, bias=False, device=device),
                nn.Conv2d(r3, r4, g.kernel, g.stride, g.padding, g.dilation, bias=False, device=device),
                nn.Conv2d(r4, m.out_channels, 1, bias=m.bias is not None, device=device)]

    def build(self, ranks):
        first, core_conv, last = self.layers(ranks)
        u_in, core, u_out = tucker2_factors(self._weight(), *ranks, n_iter=self.n_iter)
        with torch.no_grad():
            first.weight.copy_(torch.from_numpy(np.ascontiguousarray(u_in.T))[:, :, None, None])
            core_conv.weight.copy_(torch.from_numpy(np.ascontiguousarray(core)))
            last.weight.copy_(torch.from_numpy(np.ascontiguousarray(u_out))[:, :, None, None])
            if last.bias is not None:
                last.bias.copy_(self.module.bias.detach())
        return self.factorized([first, core_conv, last], ranks)


@register_pass
@dataclass(frozen=True)
class Tucker2(LowRankPass):
    """Factor a KxK conv into 1x1 (S -> R3) -> KxK core (R3 -> R4) -> 1x1 (R4 -> T).

    Kim, Park, Yoo, Choi, Yang, Shin, "Compression of deep convolutional neural networks for
    fast and low power mobile applications", ICLR 2016: Tucker-2 decomposition of the kernel
    along its output and input channel modes (HOOI via TensorLy ``partial_tucker``); the paper's
    ranks (``rank=vbmf``) come from global analytic VBMF on the mode-1 and mode-0 unfoldings
    (Nakajima et al. 2013). The core
    keeps the stride, padding and dilation; the bias moves to the last 1x1.
    Options: ``rank`` (an energy fraction per mode, default 0.93; "vbmf", the paper's rule,
    picks ranks of 2-7 on the trained digits CNN and drops it to chance, see
    tools/defaults_eval.py; an int for both modes,
    "macs=F", "frac=F", "full"), ``n_iter`` (HOOI iterations), plus the common ``target_macs``,
    ``grid``, ``fidelity``, ``allow_costlier``. Ranks are reported as [R3, R4].
    Requires: shapes, cost. Preserves: nothing.
    Declines (reported): 1x1 convs (use fc-svd), grouped/depthwise/transposed convs,
    Conv1d/Conv3d, non-zero padding modes, shared modules, already factorized layers, an int
    rank above either mode's full rank, VBMF rank 0, factorizations costing >= the original.
    Exact: no (exact at full rank); fidelity recorded by the pass manager.
    """

    name: ClassVar[str] = "tucker2"
    pointwise_decline: ClassVar[str | None] = "Tucker-2 adds nothing over an SVD (use fc-svd)"

    rank: str | int | float = 0.93  # per mode: energy fraction (default), vbmf (the paper's rule), int, macs=F, frac=F, full
    n_iter: int = 50  # HOOI iterations

    def validate(self) -> None:
        super().validate()
        if self.n_iter < 1:
            raise PassConfigError(f"tucker2: option n_iter must be >= 1, got {self.n_iter}")

    def plan_layer(self, gm, node, module, in_shape, out_shape, macs, ctx, graph):
        return Tucker2Plan(node.name, node.target, module, in_shape, out_shape, macs, n_iter=self.n_iter)
