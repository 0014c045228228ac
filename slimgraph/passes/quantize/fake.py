"""Fake quantization for quantization-aware training (QAT).

``quantize{qat=true}`` replaces each layer it would convert by a ``QATLayer``: the same float
layer with its input, weights and (fused-activation) output rounded to the integer grid in the
forward pass and the straight-through estimator in the backward pass (Bengio et al. 2013; as in
Jacob et al. 2018 and Krishnamoorthi 2018). It is an ordinary module of the graph, so the
``finetune`` pass trains it like any other (distillation from the float model by default), and
a later plain ``quantize`` converts it to the integer ops with the activation parameters it was
calibrated with and the weights it was trained to.
"""

from __future__ import annotations

import torch
from torch import nn

from slimgraph.ir.analysis.cost import module_macs
from slimgraph.passes.quantize.observers import QParams, weight_scales


class _RoundSTE(torch.autograd.Function):
    """round() forward, identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad


def fake_quant(x: torch.Tensor, scale: torch.Tensor | float, zero_point: int | torch.Tensor,
               qmin: int, qmax: int) -> torch.Tensor:
    """``(clamp(round(x / s) + zp, qmin, qmax) - zp) * s`` with a straight-through round; the
    clamp passes gradient only inside the range (as the clipped real function would)."""
    q = torch.clamp(_RoundSTE.apply(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


class QATLayer(nn.Module):
    """A Conv2d/Linear trained under fake quantization (see the module docstring)."""

    def __init__(self, layer: nn.Module, in_qp: QParams, out_qp: QParams, bits: int,
                 per_channel: bool, clamp: str | None):
        super().__init__()
        self.layer = layer
        self.in_qp, self.out_qp = in_qp, out_qp
        self.bits, self.per_channel, self.clamp = bits, per_channel, clamp

    def out_range(self) -> tuple[int, int]:
        p = self.out_qp
        if self.clamp == "relu":
            return p.zero_point, 255
        if self.clamp == "relu6":
            return p.zero_point, int(min(255, p.zero_point + round(6.0 / p.scale)))
        return 0, 255

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = fake_quant(x, self.in_qp.scale, self.in_qp.zero_point, 0, 255)
        w = self.layer.weight
        limit = 2 ** (self.bits - 1) - 1
        s = weight_scales(w.detach(), self.bits, self.per_channel, mse=self.bits < 8).to(w.dtype)
        w = fake_quant(w, s.view(-1, *[1] * (w.dim() - 1)), 0, -limit, limit)
        y = self.layer._conv_forward(x, w, self.layer.bias) if isinstance(self.layer, nn.Conv2d) \
            else nn.functional.linear(x, w, self.layer.bias)
        return fake_quant(y, self.out_qp.scale, self.out_qp.zero_point, *self.out_range())

    def slimgraph_macs(self, in_shape, out_shape) -> int:
        """The cost analysis counts the wrapped layer's MACs."""
        return module_macs(self.layer, in_shape)[0]

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, per_channel={self.per_channel}, clamp={self.clamp}, "
                f"in={self.in_qp}, out={self.out_qp}")
