"""spatial-svd: a KxK conv as a vertical Kx1 conv (C -> r) then a horizontal 1xK conv (r -> N)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from slimgraph.errors import PassConfigError
from slimgraph.passes.base import register_pass
from slimgraph.passes.lowrank.common import (
    Decline,
    LayerPlan,
    LowRankPass,
    common_decline,
    conv2d_geometry,
)
from slimgraph.passes.toolkit.capture import stream


def spatial_matrix(w: np.ndarray) -> np.ndarray:
    """W (N, C, Kh, Kw) as M[(c, i), (n, j)] = W[n, c, i, j], shape (C*Kh, N*Kw).

    W[n, c, i, j] = sum_k H[n, k, j] V[k, c, i] is exactly M = V' H' with V'[(c,i), k] and
    H'[k, (n,j)], so the best rank-r filters come from the truncated SVD of M.
    """
    n, c, kh, kw = w.shape
    return w.transpose(1, 2, 0, 3).reshape(c * kh, n * kw)


def spatial_factors(w: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Vertical filters V (r, C, Kh, 1) and horizontal filters H (N, r, 1, Kw)."""
    n, c, kh, kw = w.shape
    u, s, vt = np.linalg.svd(spatial_matrix(w), full_matrices=False)
    root = np.sqrt(s[:r])
    v = (u[:, :r] * root).reshape(c, kh, r).transpose(2, 0, 1)[..., None]
    h = (root[:, None] * vt[:r]).reshape(r, n, kw).transpose(1, 0, 2)[:, :, None, :]
    return np.ascontiguousarray(v), np.ascontiguousarray(h)


class SpatialSvdPlan(LayerPlan):
    method = "spatial-svd"

    def __init__(self, *args, inputs: list[torch.Tensor] | None = None, steps: int = 0):
        super().__init__(*args)
        self.inputs, self.steps = inputs, steps

    def _weight(self) -> np.ndarray:
        return self.module.weight.detach().double().cpu().numpy()

    @property
    def full_ranks(self) -> tuple[int, ...]:
        n, c, kh, kw = self.module.weight.shape
        return (min(c * kh, n * kw),)

    def unfoldings(self) -> tuple[np.ndarray, ...]:
        return (spatial_matrix(self._weight()),)

    def layers(self, ranks, device=None) -> list[nn.Module]:
        (r,), m = ranks, self.module
        g = conv2d_geometry(m)
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = g.kernel, g.stride, g.padding, g.dilation
        return [nn.Conv2d(m.in_channels, r, (kh, 1), (sh, 1), (ph, 0), (dh, 1), bias=False, device=device),
                nn.Conv2d(r, m.out_channels, (1, kw), (1, sw), (0, pw), (1, dw),
                          bias=m.bias is not None, device=device)]

    def build(self, ranks):
        vert, horiz = self.layers(ranks)
        v, h = spatial_factors(self._weight(), ranks[0])
        with torch.no_grad():
            vert.weight.copy_(torch.from_numpy(v))
            horiz.weight.copy_(torch.from_numpy(h))
            if horiz.bias is not None:
                horiz.bias.copy_(self.module.bias.detach())
        layers = [vert, horiz]
        if self.inputs and self.steps > 0:
            refine_on_data(self.module, layers, self.inputs, self.steps)
        return self.factorized(layers, ranks)


def refine_on_data(original: nn.Module, layers: list[nn.Module], inputs: list[torch.Tensor],
                   steps: int, lr: float = 1e-3) -> None:
    """Minimise ||original(x) - layers(x)||^2 over the calibration inputs of this layer (Adam,
    the layer alone; the paper's data reconstruction objective). Keeps the best parameters
    seen, so it never ends worse than the closed-form start."""
    seq = nn.Sequential(*layers).double()
    xs = [x.double() for x in inputs]
    with torch.no_grad():
        targets = [_reference_conv(original, x) for x in xs]

    def loss() -> torch.Tensor:
        return sum(((seq(x) - t) ** 2).sum() for x, t in zip(xs, targets, strict=True))

    opt = torch.optim.Adam(seq.parameters(), lr=lr)
    with torch.no_grad():
        best, best_state = float(loss()), {k: v.clone() for k, v in seq.state_dict().items()}
    for _ in range(steps):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
        with torch.no_grad():
            current = float(loss())
        if current < best:
            best, best_state = current, {k: v.clone() for k, v in seq.state_dict().items()}
    seq.load_state_dict(best_state)
    seq.float()


def _reference_conv(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The original layer in float64 (without converting the module itself)."""
    w = module.weight.detach().double()
    b = module.bias.detach().double() if module.bias is not None else None
    return nn.functional.conv2d(x, w, b, module.stride, module.padding, module.dilation, module.groups)


def capture_inputs(graph, ctx, node: str) -> list[torch.Tensor]:
    """The inputs node ``node`` sees when the graph runs on the calibration batches, per batch."""
    seen: list[torch.Tensor] = []
    stream(graph.gm, ctx.calibration_batches(graph), [node],
           lambda _, x, __: seen.append(x.clone()), inputs=True)
    return seen


@register_pass
@dataclass(frozen=True)
class SpatialSvd(LowRankPass):
    """Jaderberg, Vedaldi, Zisserman, "Speeding up convolutional neural networks with low rank
    expansions", BMVC 2014, scheme 2: a KxK conv as a Kx1 conv (C -> r) then a 1xK conv (r -> N).

    Filter reconstruction in closed form: the truncated SVD of W reshaped to (C*Kh, N*Kw) gives
    the optimal vertical/horizontal filter pair for each rank (the paper's first objective).
    With ``data_reconstruction=true`` the pair is then refined on the layer's responses to the
    calibration batches (its second objective) by ``refine_steps`` Adam steps on that layer
    alone, keeping the best iterate. Stride, padding and dilation are split: the vertical conv
    takes (s_h, 1), (p_h, 0), (d_h, 1), the horizontal one (1, s_w), (0, p_w), (1, d_w).
    Options: ``rank`` (default 0.9: the energy fraction of the reshaped weight's spectrum;
    "vbmf" picks ranks of 2-6 on the trained digits CNN and drops it to chance, see
    tools/defaults_eval.py; see ``parse_rank``),
    ``data_reconstruction``, ``refine_steps``, plus the common ``target_macs``, ``grid``,
    ``fidelity``, ``allow_costlier``.
    Requires: shapes, cost (and calibration data with data_reconstruction).
    Declines (reported): 1x1 and 1-D kernels (Kh == 1 or Kw == 1), grouped/depthwise/transposed
    convs, Conv1d/Conv3d, non-zero padding modes, shared modules, already factorized layers,
    ranks above min(C*Kh, N*Kw), factorizations costing >= the original MACs.
    Exact: no (exact at full rank up to rounding); fidelity recorded by the pass manager.
    """

    name: ClassVar[str] = "spatial-svd"

    rank: str | int | float = 0.9  # per layer (see fc-svd's rank)
    data_reconstruction: bool = False  # refine the factors on the layer's calibration inputs (Adam)
    refine_steps: int = 100  # Adam steps of the data reconstruction

    def validate(self) -> None:
        super().validate()
        if self.refine_steps < 0:
            raise PassConfigError(f"spatial-svd: option refine_steps must be >= 0, got {self.refine_steps}")

    def decline(self, gm, node, module, calls):
        reason = common_decline(gm, node, module, calls, self.kinds)
        if reason is None and min(module.kernel_size) == 1:
            reason = f"kernel {tuple(module.kernel_size)} is already 1-D; nothing to separate"
        return reason

    def plan_layer(self, gm, node, module, in_shape, out_shape, macs, ctx, graph):
        inputs = capture_inputs(graph, ctx, node.name) if self.data_reconstruction else None
        if self.data_reconstruction and not inputs:
            raise Decline("data_reconstruction: the layer saw no calibration input")
        return SpatialSvdPlan(node.name, node.target, module, in_shape, out_shape, macs,
                              inputs=inputs, steps=self.refine_steps)
