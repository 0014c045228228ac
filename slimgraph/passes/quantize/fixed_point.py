"""fixed-point: per-layer weight bit-widths from the SQNR model, under a model-size budget.

Lin, Talathi and Annapureddy, "Fixed Point Quantization of Deep Convolutional Networks",
ICML 2016. Quantizing a layer's weights to beta bits adds noise with a signal-to-quantization-
noise ratio of about kappa * beta dB (kappa ~ 6.02 dB per bit for a uniform quantizer of a
bell-shaped distribution), and the noise of the layers adds up at the output:
``1 / SQNR_out = sum_i 1 / SQNR_i``. Minimizing that sum for a total weight size
``sum_i rho_i beta_i = C`` (rho_i the layer's weights) gives the paper's closed form

    beta_i - beta_j = log_{10^(kappa/10)}(rho_j / rho_i)       (log base 4 for 6.02 dB/bit)

so a layer with 4x fewer weights gets one more bit. The pass solves for the offset that meets
the budget, rounds to integers in [min_bits, max_bits] (largest fractional parts first while the
budget allows), measures each layer's weight SQNR at its bits and the network's top-1 agreement
with only that layer quantized (the report draws them side by side), and converts like
``quantize``: activations uint8, every layer at 8 bits or fewer on the int8 kernels, weights
counted at their bit-width in the size accounting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from slimgraph.errors import PassConfigError
from slimgraph.passes._fx import finalize
from slimgraph.passes.base import register_pass
from slimgraph.passes.quantize import Quantize
from slimgraph.passes.quantize.convert import META, QuantAnnotation, convert
from slimgraph.passes.quantize.observers import weight_scales
from slimgraph.passes.toolkit.sensitivity import FidelityProbe
from slimgraph.schema import SensitivityCurves

KAPPA_DB = 6.02  # SQNR gained per bit (uniform quantizer)


def sqnr_db(w: torch.Tensor, bits: int, per_channel: bool = True) -> float:
    """The measured signal-to-quantization-noise ratio (dB) of ``w`` at ``bits``."""
    limit = 2 ** (bits - 1) - 1
    s = weight_scales(w, bits, per_channel, mse=bits < 8).double().view(-1, *[1] * (w.dim() - 1))
    q = torch.clamp(torch.round(w.double() / s), -limit, limit) * s
    noise = float(((q - w.double()) ** 2).sum())
    return 10 * math.log10(float((w.double() ** 2).sum()) / max(noise, 1e-30))


def allocate(sizes: dict[str, int], budget_bits: float, lo: int, hi: int,
             keys: dict[str, str] | None = None) -> dict[str, int]:
    """Integer bits per layer from the closed form, total size <= budget_bits * sum(sizes).

    Spare bits go to the largest fractional parts; equal ones (layers of equal size) in the
    order of ``keys`` (default: the names), not the graph's order, which differs between
    import paths of the same model."""
    names = list(sizes)
    rho = np.array([sizes[n] for n in names], dtype=np.float64)
    base = 10 ** (KAPPA_DB / 10)  # ~4: one bit is worth a 4x ratio in layer size
    rel = -np.log(rho) / np.log(base)  # beta_i = offset + rel_i
    target = budget_bits * rho.sum()

    def total(offset: float) -> float:
        return float((np.clip(offset + rel, lo, hi) * rho).sum())

    a, b = lo - rel.max() - 1, hi - rel.min() + 1  # bisection on the continuous offset
    for _ in range(100):
        mid = (a + b) / 2
        a, b = (mid, b) if total(mid) <= target else (a, mid)
    cont = np.clip(a + rel, lo, hi)
    bits = np.floor(cont).astype(int)
    spare = target - (bits * rho).sum()
    keys = keys or {}
    frac = np.round(cont - bits, 9)
    for i in sorted(range(len(names)), key=lambda i: (-frac[i], keys.get(names[i], names[i]))):
        if bits[i] < hi and rho[i] <= spare:
            bits[i] += 1
            spare -= rho[i]
    return {n: int(b) for n, b in zip(names, bits, strict=True)}


@register_pass
@dataclass(frozen=True)
class FixedPoint(Quantize):
    """Per-layer weight bits by Lin et al.'s SQNR model under a size budget; then ``quantize``.

    Options: ``budget`` (average weight bits over the quantized layers, e.g. 4.0 = an eighth of
    float32), ``min_bits``, ``max_bits``, plus ``quantize``'s calibration and layer options.
    Requires, declines and exactness: as ``quantize``.
    """

    name: ClassVar[str] = "fixed-point"

    budget: float = 4.0  # average weight bits over the quantized layers
    min_bits: int = 2  # fewest weight bits a layer may get
    max_bits: int = 8  # most weight bits a layer may get

    def validate(self) -> None:
        super().validate()
        if not 2 <= self.min_bits <= self.max_bits <= 8:
            raise PassConfigError("fixed-point: need 2 <= min_bits <= max_bits <= 8")
        if not self.min_bits <= self.budget <= self.max_bits:
            raise PassConfigError(f"fixed-point: budget must be in [min_bits, max_bits] = "
                                  f"[{self.min_bits}, {self.max_bits}] bits per weight")
        if self.qat or self.target_agreement is not None:
            raise PassConfigError("fixed-point: qat and target_agreement belong to quantize")

    def _allocate_bits(self, out, ctx, layers, params, bits):
        gm = out.gm
        modules = {n.name: _layer(gm, n) for n in layers}
        hi = min(self.max_bits, bits)  # a target that needs reduce_range caps it at 7
        chosen = allocate({n: m.weight.numel() for n, m in modules.items()}, self.budget,
                          self.min_bits, hi, keys={n.name: str(n.target) for n in layers})
        probe = FidelityProbe(out, ctx, "top1")
        agreement = {}
        for node in layers:
            trial = out.copy()
            target = next(n for n in trial.gm.graph.nodes if n.name == node.name)
            target.meta[META] = QuantAnnotation(*self._layer_kind(trial.gm, target),
                                                chosen[node.name], self.per_channel)
            convert(trial.gm, params, integer_adds=self.integer_adds)
            finalize(trial.gm)
            agreement[node.name] = probe.score(trial.gm)
        sqnr = {n: round(sqnr_db(m.weight.detach(), chosen[n], self.per_channel), 2)
                for n, m in modules.items()}
        total = sum(m.weight.numel() for m in modules.values())
        stats = {"bits_per_layer": chosen, "weight_sqnr_db": sqnr,
                 "agreement_alone": agreement, "budget_bits": self.budget,
                 "average_bits": round(sum(chosen[n] * m.weight.numel()
                                           for n, m in modules.items()) / total, 4)}
        curves = {n: [[float(chosen[n]), agreement[n]]] for n in chosen}
        sens = SensitivityCurves(curves, "weight bits chosen for the layer",
                                 "top-1 agreement with only that layer quantized")
        return chosen, stats, sens


def _layer(gm, node):
    mod = gm.get_submodule(node.target)
    return getattr(mod, "layer", mod)
