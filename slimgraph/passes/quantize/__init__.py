"""quantize: int8 post-training quantization to integer kernels.

Quantization with integer-arithmetic-only inference (Jacob et al., "Quantization and Training
of Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018): uint8
activations with a zero point, int8 symmetric weights (per output channel by default; Krishnamoorthi
2018), int32 accumulation and a fixed-point requantization per channel. Activation ranges are
calibrated on the user's data (``observers``: min-max, percentile, entropy as TensorRT does,
MSE). The rewrite (``convert``) produces ``slimgraph::qconv2d`` / ``qlinear`` ops that the
TVM backend lowers to integer kernels using the target's dot-product instructions, and
``qadd`` for residual adds of two quantized values (the residual stream stays uint8).

What the user asks for (this pass's options) and what the target can run are separate: the
target (``ctx.target``) says whether its int8 dot product saturates 16-bit pairs (AVX2
``vpmaddubsw``), in which case weights get 7 bits (``reduce_range``, as ONNX Runtime does),
and the record says which instruction path the build will take.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import fx, nn

from slimgraph.errors import PassConfigError
from slimgraph.ir.analysis.shapes import shapes
from slimgraph.ops.quantized import MAX_SCALE
from slimgraph.passes._fx import finalize
from slimgraph.passes.base import Pass, PassResult, Skip, register_pass
from slimgraph.passes.quantize.convert import (
    META,
    QuantAnnotation,
    convert,
    fused_activation,
    residual_adds,
)
from slimgraph.passes.quantize.fake import QATLayer
from slimgraph.passes.quantize.observers import METHODS, Observer, QParams, qparams, weight_scales
from slimgraph.passes.toolkit.capture import stream
from slimgraph.passes.toolkit.sensitivity import FidelityProbe
from slimgraph.schema import SensitivityCurves


@register_pass
@dataclass(frozen=True)
class Quantize(Pass):
    """Rewrite conv/linear layers into int8 integer ops, calibrated on the user's data.

    Options: ``weight_bits`` (8; 2-7 for weights stored at that width and run on int8 kernels),
    ``per_channel`` weights (else one scale per tensor), ``symmetric`` activations (zero point
    128), ``calibration`` (minmax, percentile, entropy, mse), ``percentile``, ``keep_float``
    (comma-separated node/module name patterns left in float), ``first_last_float``,
    ``reduce_range`` (7-bit weights; default: what the target needs), ``integer_adds``
    (residual adds of two quantized values as ``qadd`` on uint8; false keeps them in float),
    ``target_agreement``
    (mixed precision: layers fall back to float, most sensitive first, until the top-1
    agreement with the reference on the calibration data reaches it), ``qat`` (prepare for
    quantization-aware training: layers become ``fake.QATLayer``s for ``finetune`` to train;
    a later ``quantize`` converts them with their calibrated activation parameters).
    Requires: calibration data from the user (random data says nothing about activation
    ranges); batch norm folded (``fold-bn`` first).
    Declines (reported): conv/linear layers that are transposed, 1-D/3-D, shared, not 2-D at
    their input (linear), or read by batch norm; layers the options keep in float.
    Exact: no; the integer graph is the reference of the compiled kernels (bit for bit).
    """

    name: ClassVar[str] = "quantize"
    exact: ClassVar[bool] = False
    nothing_found: ClassVar[str] = "no float Conv2d or Linear layer to quantize"

    weight_bits: int = 8  # weight bits (8; 2-7 are stored at that width and run on the int8 kernels)
    per_channel: bool = True  # one weight scale per output channel (else one per tensor)
    symmetric: bool = False  # symmetric activations (zero point 128) instead of asymmetric
    calibration: Literal["minmax", "percentile", "entropy", "mse"] = "minmax"  # activation ranges: minmax, percentile, entropy (KL) or mse
    percentile: float = 99.99  # the percentile for calibration=percentile
    keep_float: str = ""  # comma-separated node/module name patterns left in float
    first_last_float: bool = False  # keep the first and last quantizable layers in float
    reduce_range: bool | None = None  # 7-bit weights (default: when the target's int8 instruction needs them)
    target_agreement: float | None = None  # mixed precision: most sensitive layers fall back to float until top-1 agreement reaches this
    qat: bool = False  # prepare for quantization-aware training (finetune, then quantize converts)
    integer_adds: bool = True  # residual adds of two quantized values run on uint8 (qadd); false: in float
    seed: int = 0  # seed of the calibration sampling

    def validate(self) -> None:
        checks = [
            (2 <= self.weight_bits <= 8, "weight_bits must be in [2, 8]"),
            (self.calibration in METHODS, f"calibration must be one of {', '.join(METHODS)}"),
            (50.0 < self.percentile <= 100.0, "percentile must be in (50, 100]"),
            (self.target_agreement is None or 0.0 < self.target_agreement <= 1.0,
             "target_agreement must be in (0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise PassConfigError(f"quantize: {message}")

    # ------------------------------------------------------------------ run
    def run(self, graph, ctx) -> PassResult:
        if not ctx.calibration:
            return PassResult(graph, False, [Skip("*", "quantization needs calibration data from "
                                                      "the user (calibration=...): activation "
                                                      "ranges from random inputs are meaningless")])
        out = graph.copy()
        layers, skipped = self._annotate(out)
        if not layers:
            return PassResult(graph, False, skipped)
        capability, bits = self._weight_bits(ctx)
        params = self._calibrate(out, ctx, layers)
        layers, overflow = _fit_int32(out.gm, layers, params, bits, self.per_channel)
        skipped += overflow
        if not layers:
            return PassResult(graph, False, skipped)
        sens = None
        if self.target_agreement is not None:
            layers, sens, fallback = self._mixed_precision(out, ctx, layers, params, bits)
            skipped += [Skip(n, f"kept in float: among the most sensitive layers for "
                               f"target_agreement={self.target_agreement}") for n in fallback]
        if self.qat:
            return self._prepare_qat(out, layers, params, bits, skipped, capability)
        per_layer, extra_stats, alloc_sens = self._allocate_bits(out, ctx, layers, params, bits)
        params.update(_trained_params(out.gm, layers))
        for node in layers:
            node.meta[META] = QuantAnnotation(*self._layer_kind(out.gm, node), per_layer[node.name],
                                              self.per_channel)
        converted = convert(out.gm, params, integer_adds=self.integer_adds)
        finalize(out.gm)
        stats = self._stats(layers, params, bits, capability)
        stats.update(extra_stats, layers_quantized=converted, adds_quantized=sum(
            n.target is torch.ops.slimgraph.qadd.default for n in out.gm.graph.nodes))
        return PassResult(out, True, skipped, stats=stats, sensitivity=sens or alloc_sens)

    def _allocate_bits(self, out, ctx, layers, params, bits):
        """Weight bits per layer: the same for all here (``fixed-point`` allocates them)."""
        return {n.name: bits for n in layers}, {}, None

    # ------------------------------------------------------------------ annotate
    def _annotate(self, out) -> tuple[list[fx.Node], list[Skip]]:
        gm = out.gm
        patterns = [p.strip() for p in self.keep_float.split(",") if p.strip()]
        calls: dict[str, int] = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                calls[n.target] = calls.get(n.target, 0) + 1
        layers, skipped = [], []
        shape_map = shapes(out)
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            mod = gm.get_submodule(node.target)
            if isinstance(mod, QATLayer) and self.qat:
                skipped.append(Skip(node.name, "already prepared for QAT: run finetune, then "
                                               "quantize converts it"))
                continue
            mod = mod.layer if isinstance(mod, QATLayer) else mod
            if not isinstance(mod, nn.modules.conv._ConvNd | nn.Linear):
                continue
            reason = _decline(gm, node, mod, calls, shape_map)
            if reason is None and any(fnmatch.fnmatchcase(node.name, p) or
                                      fnmatch.fnmatchcase(str(node.target), p) for p in patterns):
                reason = f"kept in float by keep_float={self.keep_float!r}"
            if reason:
                skipped.append(Skip(node.name, reason))
            else:
                layers.append(node)
        if self.first_last_float and layers:
            ends = {layers[0], layers[-1]}
            skipped += [Skip(n.name, "kept in float by first_last_float") for n in ends]
            layers = [n for n in layers if n not in ends]
        return layers, skipped

    @staticmethod
    def _layer_kind(gm: fx.GraphModule, node: fx.Node) -> tuple[str, str | None, str | None]:
        mod = gm.get_submodule(node.target)
        mod = mod.layer if isinstance(mod, QATLayer) else mod
        kind = "conv2d" if isinstance(mod, nn.Conv2d) else "linear"
        act, clamp = fused_activation(gm, node)
        return kind, act.name if act is not None else None, clamp

    # ------------------------------------------------------------------ target
    def _weight_bits(self, ctx) -> tuple[Any, int]:
        """(the target's int8 capability or None, the weight bits to use)."""
        capability = None
        if ctx.target is not None:
            from slimgraph.backends.tvm.intrinsics import int8_capability

            capability = int8_capability(ctx.target)
        reduce = self.reduce_range if self.reduce_range is not None else bool(
            capability is not None and capability.reduce_range)
        return capability, min(self.weight_bits, 7) if reduce else self.weight_bits

    # ------------------------------------------------------------------ calibrate
    def _calibrate(self, out, ctx, layers: list[fx.Node]) -> dict[str, QParams]:
        """uint8 parameters for every layer input and every (fused) layer output."""
        gm = out.gm
        names = set()
        for node in layers:
            x = node.args[0]
            names.add(x.name)
            act, _ = fused_activation(gm, node)
            names.add((act or node).name)
        if self.integer_adds:
            names.update(out.name for _, out, _ in residual_adds(gm))  # their outputs (convert)
        observers = {n: Observer(self.seed) for n in names}
        stream(gm, ctx.calibration_batches(out), names, lambda n, v, _: observers[n].update(v))
        return {n: qparams(*o.range(self.calibration, self.percentile), self.symmetric)
                for n, o in observers.items()}

    # ------------------------------------------------------------------ mixed precision
    def _mixed_precision(self, out, ctx, layers, params, bits):
        """Layers fall back to float, most sensitive first, until the agreement target holds
        (sensitivity: the network's top-1 agreement with only that layer quantized)."""
        probe = FidelityProbe(out, ctx, "top1")

        def agreement(subset: list[fx.Node]) -> float:
            trial = out.copy()
            names = {n.name for n in subset}
            for node in trial.gm.graph.nodes:
                if node.name in names:
                    node.meta[META] = QuantAnnotation(*self._layer_kind(trial.gm, node), bits,
                                                      self.per_channel)
            convert(trial.gm, params, integer_adds=self.integer_adds)
            finalize(trial.gm)
            return probe.score(trial.gm)

        alone = {n.name: agreement([n]) for n in layers}
        kept, fallback = list(layers), []
        while kept and agreement(kept) < self.target_agreement:
            worst = min(kept, key=lambda n: alone[n.name])
            kept.remove(worst)
            fallback.append(worst.name)
        curves = {name: [[float(bits), value]] for name, value in alone.items()}
        sens = SensitivityCurves(curves, "weight bits (that layer alone quantized)",
                                 "top-1 agreement with the float model")
        return kept, sens, fallback

    # ------------------------------------------------------------------ QAT
    def _prepare_qat(self, out, layers, params, bits, skipped, capability) -> PassResult:
        gm = out.gm
        for node in layers:
            kind, act, clamp = self._layer_kind(gm, node)
            out_name = act or node.name
            parent, _, leaf = str(node.target).rpartition(".")
            owner = gm.get_submodule(parent) if parent else gm
            setattr(owner, leaf, QATLayer(getattr(owner, leaf), params[node.args[0].name],
                                          params[out_name], bits, self.per_channel, clamp))
        stats = self._stats(layers, params, bits, capability)
        stats.update(layers_prepared=len(layers),
                     next="train (finetune), then quantize converts the fake-quant layers")
        return PassResult(out, True, skipped, stats=stats)

    # ------------------------------------------------------------------ report
    def _stats(self, layers, params, bits, capability) -> dict[str, Any]:
        return {
            "weight_bits": bits, "per_channel": self.per_channel, "calibration": self.calibration,
            "activations": "uint8 symmetric (zero point 128)" if self.symmetric else "uint8 asymmetric",
            "int8_path": capability.description if capability is not None else
            "target not known to the pass (no device target): integer ops, kernel path decided at build",
            "reduce_range": bits == 7 and self.weight_bits == 8,
            "activation_params": {n: [p.scale, p.zero_point] for n, p in params.items()},
            "layers": [n.name for n in layers],
        }


def _trained_params(gm: fx.GraphModule, layers: list[fx.Node]) -> dict[str, QParams]:
    """The activation parameters QAT layers trained with (they win over a new calibration)."""
    params = {}
    for node in layers:
        mod = gm.get_submodule(node.target)
        if isinstance(mod, QATLayer):
            act, _ = fused_activation(gm, node)
            params[node.args[0].name] = mod.in_qp
            params[(act or node).name] = mod.out_qp
    return params


INT32_MAX = 2**31 - 1


def _fit_int32(gm: fx.GraphModule, layers: list[fx.Node], params: dict, bits: int,
               per_channel: bool) -> tuple[list[fx.Node], list[Skip]]:
    """Layers whose int32 accumulator cannot overflow: |bias / (s_in s_w)| plus the largest
    sum of products (reduction length x 255 x the weight limit). A nearly constant input (a
    calibrated scale near zero) makes the integer bias huge: such a layer stays float. So does
    one whose nearly constant output makes the requantization multiplier s_in s_w / s_out too
    large for the fixed-point epilogue (``MAX_SCALE``; found by the fuzzer behind an SE gate)."""
    keep, skipped = [], []
    for node in layers:
        mod = gm.get_submodule(node.target)
        mod = mod.layer if isinstance(mod, QATLayer) else mod
        in_p = params.get(node.args[0].name)
        if in_p is None:
            keep.append(node)
            continue
        w_scale = weight_scales(mod.weight.detach(), bits, per_channel, mse=bits < 8).double()
        bias = mod.bias.detach().double().abs() if mod.bias is not None else w_scale * 0
        worst = float((bias / (in_p.scale * w_scale)).max()) + mod.weight[0].numel() * 255 * (2 ** (bits - 1) - 1)
        act, _ = fused_activation(gm, node)
        out_p = params.get((act or node).name)
        requant = 0.0  # no calibrated output: nothing to check here
        if out_p is not None:
            requant = float(in_p.scale * w_scale.max() / out_p.scale) if out_p.scale > 0 else math.inf
        if worst > INT32_MAX:
            skipped.append(Skip(node.name, f"kept in float: its input's calibrated range is too "
                                f"narrow (scale {in_p.scale:.2g}) for an int32 accumulator"))
        elif requant * 2 ** (bits - 1) >= MAX_SCALE:  # margin: fewer bits per layer (fixed-point) grow s_w
            skipped.append(Skip(node.name, f"kept in float: its output's calibrated range is too "
                                f"narrow (scale {out_p.scale:.2g}) for the requantization "
                                f"multiplier ({requant:.3g})"))
        else:
            keep.append(node)
    return keep, skipped


def _decline(gm: fx.GraphModule, node: fx.Node, mod: nn.Module, calls: dict,
             shape_map: dict) -> str | None:
    if not isinstance(node.args[0], fx.Node):
        return "input is a constant"
    if isinstance(mod, nn.modules.conv._ConvNd):
        if mod.transposed:
            return "transposed convolution: no integer kernel (stays float)"
        if not isinstance(mod, nn.Conv2d):
            return f"{type(mod).__name__}: only 2-D convolutions have an integer kernel"
        if isinstance(mod.padding, str) or mod.padding_mode != "zeros":
            return f"padding {mod.padding!r} / mode {mod.padding_mode!r}: integer conv pads with zeros"
    if calls[node.target] > 1:
        return f"{node.target} is called at {calls[node.target]} places (shared weights)"
    if any(isinstance(gm.get_submodule(u.target), nn.modules.batchnorm._BatchNorm)
           for u in node.users if u.op == "call_module"):
        return "batch norm follows: run fold-bn before quantize"
    if isinstance(mod, nn.Linear):
        s = shape_map.get(node.args[0].name)
        rank = len(s.shape) if hasattr(s, "shape") else None
        if rank != 2:
            return f"linear on a rank-{rank} input: the integer kernel takes (N, K)"
    return None


import slimgraph.ops  # noqa: E402,F401  (registers the integer ops the rewrite emits)
from slimgraph.passes.quantize import fixed_point  # noqa: E402,F401  (registers fixed-point)

__all__ = ["QParams", "QuantAnnotation", "Quantize"]
