"""Shared machinery of the low-rank passes: rank options, layer plans, rewriting, global targets.

Every weight-factorization pass (fc-svd, spatial-svd, tucker2, cp, flatten-conv, and the
data-driven channel-lowrank) is a ``LowRankPass``: it only says which layers it can factor and
how (a ``LayerPlan`` per layer); this module does everything else the same way for all of them.

Public API (stable; other passes build on it)
---------------------------------------------
Rank options
    ``parse_rank(value, option="rank") -> RankSpec``  parse a ``rank`` option value:
        int >= 1         fixed rank (every rank axis of the layer; above a layer's full rank the
                         layer is declined, not the pipeline);
        float in (0, 1]  energy fraction: the smallest rank keeping that share of the squared
                         singular values (per rank axis);
        "vbmf"           empirical VBMF on the axis's unfolding (Nakajima et al. 2013); rank 0
                         declines the layer;
        "macs=F"         per-layer MAC budget: the largest ranks (one common fraction of every
                         axis's full rank) whose factorized MACs are <= F x the layer's MACs;
        "frac=F"         rank fraction: ceil(F x full rank) per axis (the global selector's grid);
        "full"           full rank (exact up to rounding for SVD/Tucker; testing and analysis).
    Raises ``PassConfigError`` for 0, negative ints, energies outside (0, 1], unknown strings.
    ``resolve_ranks(spec, plan) -> tuple[int, ...]``  ranks for one layer, or raises ``Decline``.
    ``energy_rank(singular_values, fraction) -> int``.

Layer plans (one per layer a pass can factor; subclass and implement the abstract methods)
    ``LayerPlan(node, target, module, in_shape, out_shape, original_macs)``
        ``full_ranks: tuple[int, ...]``                    one entry per rank axis
        ``layers(ranks, device=None) -> list[nn.Module]``   factor layers' structure (abstract)
        ``build(ranks) -> Factorized``                     fitted factor layers (abstract; may
                                                           raise Decline, e.g. CP diverged)
        ``macs(ranks) -> int``                             MACs of ``layers`` (meta device)
        ``unfoldings() -> tuple[np.ndarray, ...]``         matrices revealing ranks (VBMF rule)
        ``spectra() -> tuple[np.ndarray, ...]``            their singular values (energy rule)
        ``from_unfolding_ranks(ranks) -> tuple[int, ...]`` per-unfolding ranks -> rank axes
        ``factorized(layers, ranks) -> Factorized``        wrap, on the layer's device/dtype
    ``Decline(reason)``: raise it anywhere in planning/building to decline a layer; the pass
    reports ``Skip(node, reason)``.

Rewriting
    ``Factorized(*layers, method, ranks, source)``: an ``nn.Sequential`` of factor layers (plain
        Conv2d/Linear with nn.Parameters: trainable, and it lowers through torch.export/ONNX/TVM
        like any conv). ``.method``, ``.ranks``, ``.source`` say what it came from; the cost
        analysis counts it as the sequence it is. Every factor layer carries
        ``slimgraph_factor = method``. ``is_factorized(module)`` recognises both.
    ``replace_module(gm, node, new, suffix="_lr") -> str``: install ``new`` as a sibling
        submodule ``<orig>_lr`` and point the call_module node at it (node name unchanged, so
        per-layer reports line up); the old module is dropped by ``finalize``.
    ``common_decline(gm, node, module, calls, kinds=...) -> str | None``: the shared declines
        (already factorized, shared module, transposed/grouped/depthwise conv, non-zero padding
        modes, conv dims a method does not handle).
    ``conv2d_geometry(conv) -> Conv2dGeometry | None``: stride/padding/dilation as int pairs
        (``padding="same"`` resolved), None when padding cannot be expressed symmetrically.
    ``conv_out_hw(h, w, kernel, stride, padding, dilation)``; MACs of a candidate come from the
        cost analysis's ``module_macs`` (one counter for the whole project).

Global target: the pass toolkit's sensitivity measurement (``toolkit.sensitivity.measure``:
each rank fraction of ``grid`` applied to one layer alone, scored by ``FidelityProbe``) and
its budget allocator (``toolkit.budget.allocate_threshold``: AIMET-style greedy selection).

The pass base
    ``LowRankPass``: a frozen-dataclass ``Pass`` with the common options
        ``rank`` (see above), ``target_macs: float | None`` (keep this share of the whole
        network's MACs, selected greedily from measured sensitivity; overrides ``rank``),
        ``grid: tuple[float, ...]`` (rank fractions tried per layer for the global target),
        ``fidelity: "cosine" | "top1" | "rel_l2"`` (the sensitivity metric),
        ``allow_costlier: bool`` (keep factorizations that cost >= the original MACs).
    Subclasses set ``name``, ``kinds`` (module types they factor), ``considers`` (module types
    reported when declined) and implement ``plan_layer(gm, node, module, in_shape, out_shape, macs,
    ctx, graph) -> LayerPlan`` (raise ``Decline`` to decline; ``decline(gm, node, module, calls)``
    adds method-specific declines before planning). Results: ``stats`` has
    ``layers_factorized``, ``ranks`` {node: [ranks]}, ``macs_saved``; with ``target_macs``,
    ``target_met`` and ``sensitivity`` (``SensitivityCurves``: {node: [[rank_fraction,
    fidelity], ...]}, fraction 1.0 = the original layer).
"""

from __future__ import annotations

import contextlib
import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
from torch import fx, nn

from slimgraph.errors import PassConfigError
from slimgraph.ir.analysis import Analysis, Cost, Shapes
from slimgraph.ir.analysis.cost import module_macs
from slimgraph.passes._fx import describe, finalize, module_call_counts
from slimgraph.passes.base import Pass, PassResult, Skip
from slimgraph.passes.lowrank.vbmf import vbmf_rank
from slimgraph.passes.toolkit.budget import allocate_threshold
from slimgraph.passes.toolkit.sensitivity import FidelityProbe, measure
from slimgraph.schema import SensitivityCurves


class Decline(Exception):  # noqa: N818  (a control-flow signal, not an error)
    """Raised while planning or building a layer: the pass skips it with this reason."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ------------------------------------------------------------------ rank options
RankKind = Literal["fixed", "energy", "vbmf", "macs", "frac", "full"]


@dataclass(frozen=True)
class RankSpec:
    kind: RankKind
    value: float = 0.0

    def __str__(self) -> str:
        if self.kind in ("vbmf", "full"):
            return self.kind
        if self.kind == "fixed":
            return str(int(self.value))
        if self.kind == "energy":
            return str(self.value)
        return f"{self.kind}={self.value:g}"


def _fraction(text: str, option: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise PassConfigError(f"option {option}: {what} must be a number in (0, 1], got {text!r}") from err
    if not 0.0 < value <= 1.0:
        raise PassConfigError(f"option {option}: {what} must be in (0, 1], got {value:g}")
    return value


def parse_rank(value: Any, option: str = "rank") -> RankSpec:
    """Parse a ``rank`` option: int, energy float, "vbmf", "full", "macs=F", "energy=F", "frac=F"."""
    if isinstance(value, bool):
        raise PassConfigError(f"option {option}={value!r}: expected an int, a float in (0, 1] or a string")
    if isinstance(value, int):
        if value < 1:
            raise PassConfigError(f"option {option}={value}: a fixed rank must be >= 1")
        return RankSpec("fixed", value)
    if isinstance(value, float):
        return RankSpec("energy", _fraction(str(value), option, "an energy fraction"))
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("vbmf", "full"):
            return RankSpec(text)
        for kind, what in (("macs", "a MAC budget fraction"), ("energy", "an energy fraction"),
                           ("frac", "a rank fraction")):
            if text.startswith(kind + "="):
                return RankSpec(kind, _fraction(text[len(kind) + 1:], option, what))
        raise PassConfigError(f"option {option}={value!r}: expected an int >= 1, a float in (0, 1], "
                              "'vbmf', 'full', 'macs=F', 'energy=F' or 'frac=F'")
    raise PassConfigError(f"option {option}={value!r}: unsupported type {type(value).__name__}")


def energy_rank(singular_values: np.ndarray, fraction: float) -> int:
    """Smallest r with sum(s[:r]^2) >= fraction * sum(s^2) (at least 1)."""
    s2 = np.sort(np.asarray(singular_values, dtype=np.float64))[::-1] ** 2
    total = s2.sum()
    if total <= 0:
        return 1
    cum = np.cumsum(s2) / total
    return int(min(np.searchsorted(cum, fraction - 1e-12) + 1, len(s2)))


# ------------------------------------------------------------------ geometry and cost
@dataclass(frozen=True)
class Conv2dGeometry:
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]


def conv2d_geometry(conv: nn.Conv2d) -> Conv2dGeometry | None:
    """Geometry as int pairs; ``padding='same'`` resolved; None if it is not symmetric."""
    kh, kw = conv.kernel_size
    dh, dw = conv.dilation
    pad = conv.padding
    if pad == "valid":
        pad = (0, 0)
    elif pad == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        if th % 2 or tw % 2:
            return None
        pad = (th // 2, tw // 2)
    return Conv2dGeometry((kh, kw), tuple(conv.stride), tuple(pad), (dh, dw))


def conv_out_hw(h: int, w: int, kernel, stride, padding, dilation) -> tuple[int, int]:
    oh = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    return oh, ow


# ------------------------------------------------------------------ rewriting
class Factorized(nn.Sequential):
    """A layer replaced by a sequence of factor layers (conv/linear), recognisable as such."""

    def __init__(self, *layers: nn.Module, method: str, ranks: Sequence[int], source: str = ""):
        super().__init__(*layers)
        self.method = method
        self.ranks = tuple(int(r) for r in ranks)
        self.source = source
        for layer in layers:
            layer.slimgraph_factor = method

    def extra_repr(self) -> str:
        return f"method={self.method}, ranks={list(self.ranks)}"


def is_factorized(module: nn.Module) -> bool:
    return isinstance(module, Factorized) or hasattr(module, "slimgraph_factor")


def replace_module(gm: fx.GraphModule, node: fx.Node, new: nn.Module, suffix: str = "_lr") -> str:
    """Install ``new`` next to ``node``'s module as ``<name><suffix>``; retarget the node."""
    parent_name, _, leaf = str(node.target).rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    name, i = f"{leaf}{suffix}", 1
    while hasattr(parent, name):
        name, i = f"{leaf}{suffix}_{i}", i + 1
    parent.add_module(name, new)
    node.target = f"{parent_name}.{name}" if parent_name else name
    return node.target


_CONV_DIMS = {nn.Conv1d: "Conv1d", nn.Conv3d: "Conv3d"}


def common_decline(gm: fx.GraphModule, node: fx.Node, module: nn.Module, calls,
                   kinds: tuple[type, ...] = (nn.Conv2d,)) -> str | None:
    """The declines every low-rank pass shares; None when ``module`` is a candidate."""
    if is_factorized(module):
        return f"already factorized ({getattr(module, 'method', getattr(module, 'slimgraph_factor', '?'))})"
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return f"transposed convolution {describe(gm, node)} is not supported"
    if not isinstance(module, kinds):
        names = "/".join(k.__name__ for k in kinds)
        return f"{describe(gm, node)} is not a {names} layer"
    if calls[node.target] > 1:
        return f"{node.target} is called at {calls[node.target]} places (shared weights)"
    if isinstance(module, nn.Conv2d):
        if module.groups == module.in_channels and module.groups > 1:
            return f"depthwise conv (groups={module.groups})"
        if module.groups > 1:
            return f"grouped conv (groups={module.groups})"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (only zero padding splits across factors)"
        if conv2d_geometry(module) is None:
            return "padding='same' with an even dilated kernel (asymmetric padding)"
    return None


def candidate_nodes(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, nn.Module]]:
    for node in gm.graph.nodes:
        if node.op == "call_module":
            yield node, gm.get_submodule(node.target)


# ------------------------------------------------------------------ layer plans
class LayerPlan(ABC):
    """How one layer would be factored; built by a pass's ``plan_layer`` and used by the engine.

    Implement ``full_ranks``, ``layers`` (the factor layers' structure) and ``build`` (the same
    layers with fitted weights); override ``unfoldings`` to support the energy/VBMF rules.
    """

    method: ClassVar[str] = ""

    def __init__(self, node: str, target: str, module: nn.Module, in_shape: tuple[int, ...],
                 out_shape: tuple[int, ...], original_macs: int):
        self.node, self.target, self.module = node, target, module
        # one sample: MACs per sample, as the cost analysis counts them (original_macs)
        self.in_shape, self.out_shape = (1, *tuple(in_shape)[1:]), (1, *tuple(out_shape)[1:])
        self.original_macs = int(original_macs)

    @property
    @abstractmethod
    def full_ranks(self) -> tuple[int, ...]:
        """The largest meaningful rank per rank axis."""

    @abstractmethod
    def layers(self, ranks: tuple[int, ...], device: str | None = None) -> list[nn.Module]:
        """The factor layers at ``ranks`` (uninitialised; ``device="meta"`` for cost only)."""

    @abstractmethod
    def build(self, ranks: tuple[int, ...]) -> Factorized:
        """The factor layers at ``ranks`` with fitted weights; raise ``Decline`` if it cannot."""

    def macs(self, ranks: tuple[int, ...]) -> int:
        """MACs of the factorized layer at ``ranks`` (same counting as the cost analysis)."""
        return module_macs(nn.Sequential(*self.layers(ranks, device="meta")), self.in_shape)[0]

    def factorized(self, layers: list[nn.Module], ranks: tuple[int, ...]) -> Factorized:
        """Wrap fitted layers, on the original layer's device and dtype."""
        w = self.module.weight
        return Factorized(*layers, method=self.method, ranks=ranks, source=self.target).to(
            device=w.device, dtype=w.dtype)

    def unfoldings(self) -> tuple[np.ndarray, ...]:
        """Matrices whose ranks reveal the layer's ranks (for the VBMF and energy rules)."""
        raise Decline(f"{self.method} has no rank-revealing unfolding; give an int rank, frac=F or macs=F")

    def spectra(self) -> tuple[np.ndarray, ...]:
        """Singular values of each unfolding (for the energy rule)."""
        return tuple(np.linalg.svd(u, compute_uv=False) for u in self.unfoldings())

    def from_unfolding_ranks(self, ranks: tuple[int, ...]) -> tuple[int, ...]:
        """Map per-unfolding ranks to the plan's rank axes (default: one to one, clipped)."""
        return tuple(min(r, n) for r, n in zip(ranks, self.full_ranks, strict=True))


def _frac_ranks(full: tuple[int, ...], f: float) -> tuple[int, ...]:
    return tuple(max(1, min(n, math.ceil(f * n - 1e-9))) for n in full)


def _budget_ranks(plan: LayerPlan, budget: float) -> tuple[int, ...]:
    full = plan.full_ranks
    fractions = sorted({k / n for n in full for k in range(1, n + 1)}, reverse=True)
    limit = budget * plan.original_macs
    for f in fractions:
        ranks = _frac_ranks(full, f)
        if plan.macs(ranks) <= limit:
            return ranks
    raise Decline(f"no rank fits the budget macs={budget:g} (rank 1 costs {plan.macs(_frac_ranks(full, 0))} "
                  f"MACs, original {plan.original_macs})")


def resolve_ranks(spec: RankSpec, plan: LayerPlan) -> tuple[int, ...]:
    """The ranks ``spec`` selects for ``plan``'s layer; raises ``Decline`` with the reason."""
    full = plan.full_ranks
    if spec.kind == "full":
        return full
    if spec.kind == "fixed":
        r = int(spec.value)
        if any(r > n for n in full):
            raise Decline(f"rank {r} exceeds the layer's full rank {_fmt(full)}")
        return tuple(r for _ in full)
    if spec.kind == "frac":
        return _frac_ranks(full, spec.value)
    if spec.kind == "macs":
        return _budget_ranks(plan, spec.value)
    if spec.kind == "energy":
        return plan.from_unfolding_ranks(tuple(energy_rank(s, spec.value) for s in plan.spectra()))
    ranks = tuple(vbmf_rank(u) for u in plan.unfoldings())
    if min(ranks) == 0:
        raise Decline(f"VBMF selects rank 0 (ranks {_fmt(ranks)}): the weights are indistinguishable from noise")
    return plan.from_unfolding_ranks(ranks)


def _fmt(ranks: tuple[int, ...]) -> str:
    return str(ranks[0]) if len(ranks) == 1 else str(list(ranks))


def blas_threads(n: int):
    """Limit BLAS threads (numpy/scipy/TensorLy) while factorizing: the matrices are small, and
    on a busy machine a multi-threaded OpenBLAS runs these SVDs ~40x slower than one thread."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: scikit-learn brings it
        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")


# ------------------------------------------------------------------ the pass base
DEFAULT_GRID = (0.125, 0.25, 0.375, 0.5, 0.75)


@dataclass(frozen=True)
class LowRankPass(Pass):
    """Base of the low-rank passes: planning, rank selection, global target, rewriting."""

    exact: ClassVar[bool] = False
    requires: ClassVar[tuple[type[Analysis], ...]] = (Shapes, Cost)
    kinds: ClassVar[tuple[type, ...]] = (nn.Conv2d,)  # module types the pass can factor
    considers: ClassVar[tuple[type, ...]] = (nn.modules.conv._ConvNd,)  # reported when declined

    rank: str | int | float = "vbmf"  # per layer: int rank, energy fraction in (0, 1], vbmf, full, macs=F, frac=F
    target_macs: float | None = None  # keep this share of the network's MACs, ranks chosen from measured sensitivity (overrides rank)
    grid: tuple[float, ...] = DEFAULT_GRID  # rank fractions tried per layer for target_macs
    fidelity: str = "cosine"  # sensitivity metric for target_macs: cosine, top1 or rel_l2
    allow_costlier: bool = False  # keep factorizations that cost as many MACs as the layer or more

    def validate(self) -> None:
        parse_rank(self.rank)
        if self.target_macs is not None and not 0.0 < self.target_macs <= 1.0:
            raise PassConfigError(f"{self.name}: option target_macs must be in (0, 1], got {self.target_macs}")
        if not self.grid or not all(isinstance(g, int | float) and 0.0 < g <= 1.0 for g in self.grid):
            raise PassConfigError(f"{self.name}: option grid must be rank fractions in (0, 1], got {self.grid}")
        if self.fidelity not in FidelityProbe.METRICS:
            raise PassConfigError(f"{self.name}: option fidelity must be one of {FidelityProbe.METRICS}")

    @abstractmethod
    def plan_layer(self, gm: fx.GraphModule, node: fx.Node, module: nn.Module, in_shape: tuple[int, ...],
             out_shape: tuple[int, ...], macs: int, ctx, graph) -> LayerPlan:
        """A plan for ``module`` (already past ``common_decline``); raise ``Decline`` to skip."""

    # why a 1x1 conv is declined by a method that factors the kernel's spatial extent
    pointwise_decline: ClassVar[str | None] = None

    def decline(self, gm, node, module, calls) -> str | None:
        """Declines before planning; override to add method-specific ones (call super)."""
        reason = common_decline(gm, node, module, calls, self.kinds)
        if reason is None and self.pointwise_decline and tuple(module.kernel_size) == (1, 1):
            reason = f"1x1 conv: {self.pointwise_decline}"
        return reason

    # -------------------------------------------------------------- run
    def run(self, graph, ctx) -> PassResult:
        with blas_threads(1):
            return self._run(graph, ctx)

    def _run(self, graph, ctx) -> PassResult:
        out = graph.copy()
        gm = out.gm
        plans, skipped = self._plans(out, graph, ctx)
        sens: SensitivityCurves | None = None
        stats: dict[str, Any] = {}
        if self.target_macs is None:
            chosen, declined = self._fixed_choice(plans)
        else:
            chosen, declined, sens, stats = self._global_choice(plans, out, graph, ctx)
        skipped += declined
        built = 0
        ranks: dict[str, list[int]] = {}
        saved = 0
        node_by_name = {n.name: n for n in gm.graph.nodes}
        for plan, r in chosen:
            try:
                module = plan.build(r)
            except Decline as d:
                skipped.append(Skip(plan.node, d.reason))
                continue
            replace_module(gm, node_by_name[plan.node], module)
            ranks[plan.node] = list(r)
            saved += plan.original_macs - plan.macs(r)
            built += 1
        if not built:
            return PassResult(graph, changed=False, skipped=skipped, stats=stats, sensitivity=sens)
        finalize(gm)
        stats.update({"layers_factorized": built, "ranks": ranks, "macs_saved": int(saved)})
        return PassResult(out, changed=True, skipped=skipped, stats=stats, sensitivity=sens)

    def _plans(self, out, graph, ctx) -> tuple[list[LayerPlan], list[Skip]]:
        gm = out.gm
        shapes, cost = ctx.analyses.get(Shapes, graph), ctx.analyses.get(Cost, graph)
        calls = module_call_counts(gm)
        plans, skipped = [], []
        for node, module in candidate_nodes(gm):
            if not isinstance(module, self.considers) and not is_factorized(module):
                continue
            reason = self.decline(gm, node, module, calls)
            if reason is None:
                src = node.args[0] if node.args else None
                in_meta = shapes.get(src.name) if isinstance(src, fx.Node) else None
                out_meta = shapes.get(node.name)
                if in_meta is None or out_meta is None or not hasattr(in_meta, "shape"):
                    reason = "input or output shape unknown"
            if reason is None:
                try:
                    plans.append(self.plan_layer(gm, node, module, in_meta.shape, out_meta.shape,
                                           cost.nodes[node.name].macs, ctx, graph))
                except Decline as d:
                    reason = d.reason
            if reason is not None:
                skipped.append(Skip(node.name, reason))
        return plans, skipped

    def _fixed_choice(self, plans: list[LayerPlan]):
        spec = parse_rank(self.rank)
        chosen, skipped = [], []
        for plan in plans:
            try:
                r = resolve_ranks(spec, plan)
                self._check_cost(plan, r)
            except Decline as d:
                skipped.append(Skip(plan.node, d.reason))
                continue
            chosen.append((plan, r))
        return chosen, skipped

    def _check_cost(self, plan: LayerPlan, ranks: tuple[int, ...]) -> None:
        macs = plan.macs(ranks)
        if macs >= plan.original_macs and not self.allow_costlier:
            raise Decline(f"factorized cost {macs} MACs >= original {plan.original_macs} "
                          f"(ranks {_fmt(ranks)})")

    def _global_choice(self, plans: list[LayerPlan], out, graph, ctx):
        """Per-layer ranks from measured sensitivity under the network MAC budget
        (toolkit: ``measure`` each rank fraction of the grid alone, ``allocate_threshold``)."""
        probe = FidelityProbe(graph, ctx, self.fidelity)
        gm = out.gm
        sens = measure({plan.node: self._candidates(plan, gm) for plan in plans},
                       lambda: probe.score(gm), x_label="rank fraction",
                       y_label=f"fidelity ({self.fidelity})", baseline_x=1.0)
        skipped = [Skip(p.node, "no rank in the grid saves MACs") for p in plans
                   if p.node not in sens.options]
        total = ctx.analyses.get(Cost, graph).macs
        alloc = allocate_threshold(sens.options, {p.node: p.original_macs for p in plans}, total,
                                   self.target_macs * total)
        by_node = {p.node: p for p in plans}
        chosen = [(by_node[n], o.setting) for n, o in alloc.choice.items() if o is not None]
        curves = sens.curves()
        report = SensitivityCurves({p.node: curves.get(p.node, [[1.0, sens.baseline]]) for p in plans},
                                   sens.x_label, sens.y_label)
        stats = {"target_met": alloc.met, "target_macs": int(self.target_macs * total),
                 "selected_macs": int(alloc.cost), "fidelity_threshold": (
                     None if not math.isfinite(alloc.threshold) else alloc.threshold)}
        return chosen, skipped, report, stats

    def _candidates(self, plan: LayerPlan, gm) -> list:
        """(ranks, MACs, rank fraction, swap-in) for each grid fraction that saves MACs."""
        cands, seen = [], set()
        for f in sorted(set(self.grid)):
            r = _frac_ranks(plan.full_ranks, f)
            macs = plan.macs(r)
            if r in seen or macs >= plan.original_macs:
                continue
            seen.add(r)
            try:
                module = plan.build(r)
            except Decline:
                continue
            cands.append((r, macs, float(f), functools.partial(FidelityProbe.swapped, gm, plan.target, module)))
        return cands
