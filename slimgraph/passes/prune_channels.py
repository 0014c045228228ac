"""prune-channels: structured channel pruning over coupled channel groups.

Plan first, then rewrite a copy:
1. ``channel_groups`` (analysis) says which channels must go together and which groups are
   blocked (graph inputs/outputs, unknown ops).
2. A criterion ranks each group's units (least important first).
3. How many units each group keeps: ``ratio`` per group, or ``target_macs`` met greedily from
   a per-group sensitivity table measured on calibration data.
4. The copy is rewritten physically: producers lose out-channels, consumers in-channels,
   batch norms / per-channel constants / grouped convs follow, shape literals are updated.
5. ``reconstruction`` then refits each pruned consumer by least squares (He et al. 2017).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from slimgraph.errors import PassConfigError
from slimgraph.ir.analysis import Analysis, Channels, Cost, Shapes
from slimgraph.ir.analysis.channels import ChannelGroup, ChannelGroups, op_kind
from slimgraph.ir.graph import flatten_outputs
from slimgraph.numerics import compare_outputs
from slimgraph.passes._fx import finalize
from slimgraph.passes.base import Pass, PassResult, Skip, register_pass
from slimgraph.passes.toolkit.budget import allocate_marginal
from slimgraph.passes.toolkit.capture import capture, patches, record
from slimgraph.passes.toolkit.sensitivity import Sensitivity, measure
from slimgraph.schema import SensitivityCurves

CRITERIA = ("l1", "bn_scale", "taylor", "reconstruction")
# GraphModule.meta key: the prune-channels specs that already ran on this graph (idempotence;
# GraphModule keeps ``meta`` through deepcopy, i.e. through Graph.copy()).
APPLIED_META = "slimgraph.prune_channels.applied"
CANDIDATE_RATIOS = tuple(k / 8 for k in range(1, 8))  # sensitivity grid for target_macs


def keep_count(size: int, ratio: float, min_channels: int, round_to: int) -> int:
    """Units a group of ``size`` keeps: ceil to ``round_to``, never below ``min_channels``."""
    keep = size - math.floor(size * ratio + 1e-9)
    if round_to > 1:
        keep = min(size, math.ceil(keep / round_to) * round_to)
    return max(keep, min(min_channels, size))


# ------------------------------------------------------------------------- the pass
@register_pass
@dataclass(frozen=True)
class PruneChannels(Pass):
    """Remove whole channels (filters) from coupled channel groups.

    Criteria: ``l1`` filter norm (Li et al., ICLR 2017); ``bn_scale`` batch-norm |gamma| (Liu
    et al., ICCV 2017, network slimming); ``taylor`` first-order Taylor saliency (Molchanov et
    al. 2017/2019) on calibration data, with the loss = cross-entropy when ``ctx.labels`` is set,
    else output distillation against the unpruned outputs (its gradient is zero at the unpruned
    point, so the Gauss-Newton term is estimated with random output projections);
    ``reconstruction`` (He et al., ICCV 2017; AIMET channel pruning): greedy selection that
    minimises the next layers' output reconstruction error, then least-squares refit of them.
    ``target_macs`` keeps that fraction of MACs, chosen greedily from per-group sensitivity
    (prune one group at each of ``CANDIDATE_RATIOS``, measure rel-L2 vs the unpruned outputs).
    Requires: channel_groups, shapes, cost. Preserves: nothing.
    Declines (reported): blocked groups (graph inputs/outputs, unknown ops), excluded layers,
    groups at ``min_channels``, ``bn_scale`` groups without batch norm.
    Exact: no (removing channels changes outputs). Counts are in pruning units: channels, or
    whole conv groups where a grouped conv couples them.
    """

    name: ClassVar[str] = "prune-channels"
    exact: ClassVar[bool] = False
    requires: ClassVar[tuple[type[Analysis], ...]] = (Channels, Shapes, Cost)
    ratio: float | None = None  # share of every prunable group's channels to remove (or use target_macs)
    target_macs: float | None = None  # keep this share of the network's MACs, ratios chosen per group from measured sensitivity
    criterion: str = "l1"  # which channels go: l1, bn_scale, taylor or reconstruction
    min_channels: int = 1  # never prune a group below this many channels
    round_to: int = 1  # keep channel counts multiples of this (vector widths)
    exclude: str = ""  # comma-separated node/module name patterns never pruned

    def validate(self) -> None:
        if (self.ratio is None) == (self.target_macs is None):
            raise PassConfigError("prune-channels needs exactly one of ratio=... or target_macs=...")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise PassConfigError(f"prune-channels: ratio={self.ratio} must be in [0, 1)")
        if self.target_macs is not None and not 0.0 < self.target_macs <= 1.0:
            raise PassConfigError(f"prune-channels: target_macs={self.target_macs} must be in (0, 1]")
        if self.criterion not in CRITERIA:
            raise PassConfigError(f"prune-channels: unknown criterion {self.criterion!r}; "
                                  f"choose one of {', '.join(CRITERIA)}")
        if not isinstance(self.min_channels, int) or self.min_channels < 1:
            raise PassConfigError(f"prune-channels: min_channels={self.min_channels} must be >= 1")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise PassConfigError(f"prune-channels: round_to={self.round_to} must be >= 1")

    def run(self, graph, ctx) -> PassResult:
        done = graph.gm.meta.get(APPLIED_META, [])
        if self.spec() in done:  # ratios are relative to the graph: a rerun would prune again
            return PassResult(graph, changed=False, skipped=[Skip("*", (
                f"{self.spec()} already pruned this graph; running it again would prune the "
                "pruned channels' neighbours further"))])
        cg: ChannelGroups = ctx.analyses.get(Channels, graph)
        skipped = [Skip(_group_label(g), f"group {g.id} blocked: {g.blocked}")
                   for g in cg.groups if g.blocked]
        candidates = self._candidates(graph, cg, skipped)
        if not candidates:
            return PassResult(graph, changed=False, skipped=skipped)
        orders = rank_units(graph, ctx, candidates, self.criterion, skipped)
        extra: dict[str, Any] = {}
        sens = None
        if self.ratio is not None:
            plan = self._ratio_plan(candidates, orders, skipped)
        else:
            plan, extra["target_plan"] = self._target_plan(graph, ctx, candidates, orders, skipped)
            # the report's per-layer sensitivity chart: {group: [[pruned fraction, rel-L2]]}
            sens = SensitivityCurves(extra["target_plan"].pop("curves"),
                                     "fraction of the group's channels pruned",
                                     "rel-L2 of the outputs vs unpruned")
        plan = {gid: units for gid, units in plan.items() if units}
        if not plan:
            return PassResult(graph, changed=False, skipped=skipped, extra=extra, sensitivity=sens)
        out, removed = build_pruned(graph, cg, plan)
        if self.criterion == "reconstruction":
            extra["refit"] = refit_consumers(graph, out, cg, removed, ctx)
        stats = _channel_stats(graph, cg, removed)
        stats.update(groups_pruned=len(plan), units_removed=sum(len(u) for u in plan.values()))
        extra["removed"] = _removed_by_node(graph, cg, removed)
        out.gm.meta[APPLIED_META] = [*done, self.spec()]
        return PassResult(out, changed=True, skipped=skipped, stats=stats, extra=extra, sensitivity=sens)

    # ---- planning
    def _candidates(self, graph, cg: ChannelGroups, skipped: list[Skip]) -> list[ChannelGroup]:
        patterns = [p.strip() for p in self.exclude.split(",") if p.strip()]
        targets = {n.name: str(n.target) for n in graph.nodes}
        out = []
        for g in cg.prunable():
            hit = sorted(n for n in g.nodes if any(fnmatch.fnmatchcase(n, p) or
                         fnmatch.fnmatchcase(targets.get(n, ""), p) for p in patterns))
            if hit:
                skipped.append(Skip(_group_label(g), f"group {g.id} touches excluded {', '.join(hit)}"))
            elif g.size <= self.min_channels:
                skipped.append(Skip(_group_label(g), f"group {g.id} already at min_channels="
                                    f"{self.min_channels} ({g.size} units)"))
            else:
                out.append(g)
        return out

    def _keep(self, size: int, ratio: float) -> int:
        return keep_count(size, ratio, self.min_channels, self.round_to)

    def _ratio_plan(self, groups, orders, skipped) -> dict[int, list[int]]:
        plan = {}
        for g in groups:
            if g.id not in orders:
                continue
            keep = self._keep(g.size, self.ratio)
            if keep == g.size and self.ratio > 0:
                skipped.append(Skip(_group_label(g), f"group {g.id}: ratio {self.ratio} with "
                                    f"min_channels/round_to keeps all {g.size} units"))
            plan[g.id] = sorted(orders[g.id][: g.size - keep])
        return plan

    def _target_plan(self, graph, ctx, groups, orders, skipped):
        """Ratios per group under the network MAC budget: each candidate ratio measured on one
        group alone (toolkit ``measure``), then ``allocate_marginal``: the step that loses the
        least fidelity per MAC saved, until the real (re-counted) MACs meet the target."""
        groups = [g for g in groups if g.id in orders]
        sens = sensitivity(graph, ctx, groups, orders, self._keep)
        base = ctx.analyses.get(Cost, graph).macs
        target = self.target_macs * base
        plan_of = {str(g.id): g for g in groups}

        def plan(choice) -> dict[int, list[int]]:
            return {g.id: sorted(orders[g.id][: g.size - choice[str(g.id)].setting["keep"]])
                    for g in groups if choice.get(str(g.id)) is not None}

        alloc = allocate_marginal(sens.options, {k: base for k in sens.options}, base, target, 0.0,
                                  actual=lambda choice: _macs_of(graph, ctx, plan(choice)))
        if not alloc.met:
            skipped.append(Skip("*", f"target_macs={self.target_macs} not reached: best plan keeps "
                                f"{alloc.cost / base:.3f} of MACs"))
        rows = {gid: [{**o.setting, "rel_l2": -o.fidelity, "macs": o.cost} for o in opts]
                for gid, opts in sens.options.items()}
        curves = {f"{_group_label(plan_of[gid])} (group {gid})": [[o.x, -o.fidelity] for o in opts]
                  for gid, opts in sens.options.items()}
        levels = {gid: (sens.options[gid].index(o) if o is not None else -1)
                  for gid, o in alloc.choice.items()}
        return plan(alloc.choice), {"groups": rows, "curves": curves, "macs_before": base,
                                    "macs_after": alloc.cost, "target_macs": target, "levels": levels}


def _group_label(g: ChannelGroup) -> str:
    return ",".join(p.node for p in g.producers) or ",".join(g.spaces)


# ------------------------------------------------------------------------- criteria
def rank_units(graph, ctx, groups, criterion: str, skipped: list[Skip]) -> dict[int, list[int]]:
    """Per group, its units ordered least important first."""
    if criterion == "reconstruction":
        return reconstruction_orders(graph, ctx, groups)
    if criterion == "taylor":
        scores = taylor_scores(graph, ctx, groups)
    else:
        scores = {}
        for g in groups:
            s = (l1_scores if criterion == "l1" else bn_scores)(graph.gm, g)
            if s is None:
                skipped.append(Skip(_group_label(g), f"group {g.id}: no batch norm for bn_scale"))
                continue
            scores[g.id] = s
    return {gid: [int(i) for i in np.argsort(s, kind="stable")] for gid, s in scores.items()}


def _out_channel_norms(mod: nn.Module) -> torch.Tensor:
    w = mod.weight.detach().abs()
    if isinstance(mod, nn.modules.conv._ConvTransposeNd):  # (Cin, Cout/g, k...)
        g = mod.groups
        per = w.reshape(g, w.shape[0] // g, w.shape[1], -1).sum(dim=(1, 3))  # (g, Cout/g)
        return per.reshape(-1)
    return w.reshape(w.shape[0], -1).sum(dim=1)


def _per_unit(values: torch.Tensor, units) -> np.ndarray:
    v = values.double()
    return np.array([float(v[list(u)].sum()) for u in units])


def l1_scores(gm: fx.GraphModule, g: ChannelGroup) -> np.ndarray:
    """Sum over the group's producers of filter L1 norms, each producer scaled to mean 1."""
    total = np.zeros(g.size)
    for p in g.producers:
        s = _per_unit(_out_channel_norms(_module(gm, p.node)), p.units)
        total += s / (s.mean() + 1e-12)
    return total


def bn_scores(gm: fx.GraphModule, g: ChannelGroup) -> np.ndarray | None:
    total, found = np.zeros(g.size), False
    for p in g.members:
        mod = _module(gm, p.node)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.weight is not None:
            s = _per_unit(mod.weight.detach().abs(), p.units)
            total += s / (s.mean() + 1e-12)
            found = True
    return total if found else None


def _module(gm: fx.GraphModule, node_name: str) -> nn.Module | None:
    node = next((n for n in gm.graph.nodes if n.name == node_name), None)
    return gm.get_submodule(node.target) if node is not None and node.op == "call_module" else None


def taylor_scores(graph, ctx, groups) -> dict[int, np.ndarray]:
    """sum_n (sum_{c in unit} sum_spatial a * dL/da)^2 at each producer's output (Molchanov 2019)."""
    gm = graph.to_torch()
    ports = defaultdict(list)  # producer node -> [(group id, units)]
    for g in groups:
        for p in g.producers:
            ports[p.node].append((g.id, p.units))
    scores = {g.id: np.zeros(g.size) for g in groups}
    batches = ctx.calibration_batches(graph)
    labels = ctx.labels if ctx.labels and len(ctx.labels) == len(batches) else None
    gen = torch.Generator().manual_seed(ctx.seed)
    for bi, batch in enumerate(batches):
        for _ in range(1 if labels else 2):
            with torch.enable_grad():
                out, seen = record(gm, batch, set(ports))
                y = flatten_outputs(out)[0]  # the first output, whatever the container
                if labels:
                    loss = F.cross_entropy(y, labels[bi].long(), reduction="sum")
                else:  # v ~ N(0, I): E[(v.J d)^2] = d^T J^T J d, the distillation loss's curvature
                    loss = (y * torch.randn(y.shape, generator=gen, dtype=y.dtype)).sum()
                names = list(seen)
                grads = torch.autograd.grad(loss, [seen[n] for n in names], allow_unused=True)
            for name, gr in zip(names, grads, strict=True):
                if gr is None:
                    continue
                a = seen[name].detach()
                per = (a * gr).reshape(a.shape[0], a.shape[1], -1).sum(-1).double()  # (N, C)
                for gid, units in ports[name]:
                    scores[gid] += np.array([float((per[:, list(u)].sum(1) ** 2).sum()) for u in units])
    return scores


# ------------------------------------------------------------------------- reconstruction
def _dense(mod: nn.Module | None) -> bool:
    """A consumer whose output is a sum of per-input-channel contributions we can unfold."""
    if isinstance(mod, nn.Linear):
        return True
    return isinstance(mod, nn.Conv2d) and mod.groups == 1 and mod.padding_mode == "zeros"


def _rows(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The consumer's input as rows (M, C, k): conv patches (im2col) or linear features."""
    if isinstance(mod, nn.Linear):
        return x.reshape(x.shape[0], -1, 1)
    return patches(mod, x).reshape(-1, x.shape[1], math.prod(mod.kernel_size))


def _subsample(m: int, limit: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(m, generator=gen)[:limit] if m > limit else torch.arange(m)


def _unit_contributions(mod, x, units, gen) -> torch.Tensor:
    """(U, M*Cout): what each unit of input channels adds to the consumer's output."""
    rows = _rows(mod, x).double()
    w = mod.weight.detach().double().reshape(mod.weight.shape[0], rows.shape[1], -1)  # (O, C, k)
    limit = max(256, int(4e6 // max(1, rows.shape[1] * w.shape[0])))
    rows = rows[_subsample(rows.shape[0], limit, gen)]
    per_channel = torch.einsum("mck,ock->cmo", rows, w)
    return torch.stack([per_channel[list(u)].sum(0).reshape(-1) for u in units])


def _greedy_order(gram: torch.Tensor) -> list[int]:
    """Remove, one at a time, the unit that least grows ||sum of removed contributions||^2."""
    n = gram.shape[0]
    cross, alive, order = torch.zeros(n, dtype=gram.dtype), torch.ones(n, dtype=torch.bool), []
    diag = gram.diagonal()
    for _ in range(n):
        cost = torch.where(alive, diag + 2 * cross, torch.full_like(diag, math.inf))
        c = int(torch.argmin(cost))
        order.append(c)
        alive[c] = False
        cross += gram[:, c]
    return order


def reconstruction_orders(graph, ctx, groups) -> dict[int, list[int]]:
    """He et al. 2017 / ThiNet-style greedy selection on the consumers' outputs; groups without
    a dense 2-D conv or linear consumer fall back to the l1 order."""
    gm = graph.gm
    want = {p.space for g in groups for p in g.consumers if _dense(_module(gm, p.node))}
    inputs = capture(gm, ctx.calibration_batches(graph), want)
    gen = torch.Generator().manual_seed(ctx.seed)
    orders = {}
    for g in groups:
        gram = torch.zeros(g.size, g.size, dtype=torch.float64)
        used = False
        for p in g.consumers:
            mod = _module(gm, p.node)
            if _dense(mod) and p.space in inputs:
                z = _unit_contributions(mod, inputs[p.space], p.units, gen)
                gram += z @ z.T
                used = True
        orders[g.id] = (_greedy_order(gram) if used else
                        [int(i) for i in np.argsort(l1_scores(gm, g), kind="stable")])
    return orders


def refit_consumers(graph, out, cg: ChannelGroups, removed, ctx) -> dict[str, dict[str, float]]:
    """Least-squares refit of each pruned dense consumer, in graph order: inputs from the pruned
    graph (so earlier errors are compensated), targets from the unpruned graph (He et al. 2017).
    Ridge-regularised towards the current weights, so few samples cannot blow it up."""
    gm = out.gm
    calls = defaultdict(int)
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] += 1
    todo = [n for n in gm.graph.nodes if n.op == "call_module" and calls[n.target] == 1
            and _dense(gm.get_submodule(n.target)) and isinstance(n.args[0], fx.Node)
            and n.args[0].name in removed]
    batches = ctx.calibration_batches(graph)
    targets = capture(graph.gm, batches, {n.name for n in todo})
    gen = torch.Generator().manual_seed(ctx.seed)
    report = {}
    for n in todo:
        mod = gm.get_submodule(n.target)
        x = capture(gm, batches, {n.args[0].name})[n.args[0].name]
        y = targets[n.name][:, _keep(removed.get(n.name, ()), targets[n.name].shape[1])]
        report[n.name] = _refit(mod, x, y, gen)
    return report


def _refit(mod, x, y, gen) -> dict[str, float]:
    a = _rows(mod, x).double()
    a = a.reshape(a.shape[0], -1)
    b = (y.movedim(1, -1).reshape(-1, y.shape[1]) if y.dim() > 2 else y).double()
    if mod.bias is not None:
        b = b - mod.bias.detach().double()
    pick = _subsample(a.shape[0], 8192, gen)
    a, b = a[pick], b[pick]
    w0 = mod.weight.detach().double().reshape(mod.weight.shape[0], -1).T  # (K, O)
    ata = a.T @ a
    lam = 1e-3 * float(ata.diagonal().mean()) + 1e-12
    w = torch.linalg.solve(ata + lam * torch.eye(ata.shape[0], dtype=ata.dtype), a.T @ b + lam * w0)
    err = lambda m: float(torch.linalg.norm(a @ m - b) / (torch.linalg.norm(b) + 1e-12))  # noqa: E731
    before, after = err(w0), err(w)
    if after < before:
        mod.weight = nn.Parameter(w.T.reshape(mod.weight.shape).to(mod.weight.dtype).contiguous())
    return {"rel_err_before": before, "rel_err_after": min(after, before)}


# ------------------------------------------------------------------------- sensitivity
def _macs_of(graph, ctx, plan) -> int:
    if not plan:
        return ctx.analyses.get(Cost, graph).macs
    out, _ = build_pruned(graph, ctx.analyses.get(Channels, graph), plan)
    return ctx.analyses.get(Cost, out).macs


def sensitivity(graph, ctx, groups, orders, keep_fn) -> Sensitivity:
    """Per group: prune only it at each candidate ratio; fidelity = -rel-L2 of the outputs vs
    the unpruned graph, cost = the network's MACs then (toolkit ``measure``)."""
    cg = ctx.analyses.get(Channels, graph)
    batches = ctx.calibration_batches(graph)
    ref = [a for b in batches for a in graph.run(*b)]
    current: dict[str, Any] = {}

    @contextlib.contextmanager
    def pruned(plan):
        current["graph"], _ = build_pruned(graph, cg, plan)
        try:
            yield
        finally:
            current.clear()

    def score() -> float:
        return -compare_outputs(ref, [a for b in batches for a in current["graph"].run(*b)])["rel_l2"]

    candidates = {}
    for g in groups:
        keeps = dict.fromkeys(k for r in CANDIDATE_RATIOS if (k := keep_fn(g.size, r)) < g.size)
        ratio = {keep_fn(g.size, r): r for r in reversed(CANDIDATE_RATIOS)}
        candidates[str(g.id)] = [
            ({"ratio": ratio[k], "keep": k}, lambda: ctx.analyses.get(Cost, current["graph"]).macs,
             1 - k / g.size, functools.partial(pruned, {g.id: orders[g.id][: g.size - k]}))
            for k in keeps]
    return measure(candidates, score, x_label="fraction of the group's channels pruned",
                   y_label="-rel-L2 of the outputs vs unpruned")


# ------------------------------------------------------------------------- physical removal
def removed_spaces(cg: ChannelGroups, plan: dict[int, list[int]]) -> dict[str, list[int]]:
    removed: dict[str, set[int]] = defaultdict(set)
    for gid, units in plan.items():
        for space, idx in cg.groups[gid].removed_indices(units).items():
            removed[space].update(idx)
    return {s: sorted(v) for s, v in removed.items() if v}


def build_pruned(graph, cg: ChannelGroups, plan: dict[int, list[int]]):
    """A pruned copy of ``graph`` and the removed channel indices per space."""
    out = graph.copy()
    removed = removed_spaces(cg, plan)
    _Rewriter(out.gm, cg, removed).run()
    finalize(out.gm)
    return out, removed


def _keep(removed_idx, size: int) -> torch.Tensor:
    gone = set(removed_idx)
    return torch.tensor([i for i in range(size) if i not in gone], dtype=torch.long)


def _param(t: torch.Tensor | None, like) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t.detach().clone(), requires_grad=like.requires_grad)


class _Rewriter:
    """Slices weights and fixes shape arguments node by node (table: ``_REWRITES``)."""

    def __init__(self, gm: fx.GraphModule, cg: ChannelGroups, removed: dict[str, list[int]]):
        self.gm, self.cg, self.removed, self.done = gm, cg, removed, set()

    def rm(self, node) -> list[int]:
        return self.removed.get(node.name, []) if isinstance(node, fx.Node) else []

    def claim(self, node: fx.Node) -> tuple[list[int], list[int]] | None:
        """(removed in-channels, removed out-channels) of a layer node, the first time its
        module is met and only when it loses channels; None otherwise."""
        rin, rout = self.rm(node.args[0]), self.rm(node)
        if node.target in self.done or not (rin or rout):
            return None
        self.done.add(node.target)
        return rin, rout

    def new_size(self, name: str) -> int:
        return self.cg.spaces[name].size - len(self.removed.get(name, ()))

    def run(self) -> None:
        for node in list(self.gm.graph.nodes):
            fn = _REWRITES.get(op_kind(self.gm, node))
            if fn is not None:
                fn(self, node)
        for name, sp in self.cg.spaces.items():
            if sp.const and name in self.removed:
                self._slice_attr(name, sp)

    def _slice_attr(self, name: str, sp) -> None:
        node = next(n for n in self.gm.graph.nodes if n.name == name)
        owner_path, _, attr = node.target.rpartition(".")
        owner = self.gm.get_submodule(owner_path) if owner_path else self.gm
        value = getattr(owner, attr)
        sliced = value.detach().index_select(sp.dim, _keep(self.removed[name], sp.size)).clone()
        if isinstance(value, nn.Parameter):
            setattr(owner, attr, nn.Parameter(sliced, requires_grad=value.requires_grad))
        elif attr in owner._buffers:
            owner._buffers[attr] = sliced
        else:
            setattr(owner, attr, sliced)


def _rw_conv(rw: _Rewriter, node: fx.Node) -> None:
    claimed = rw.claim(node)
    if claimed is None:
        return
    rin, rout = claimed
    mod = rw.gm.get_submodule(node.target)
    transposed = isinstance(mod, nn.modules.conv._ConvTransposeNd)
    cin, cout, g = mod.in_channels, mod.out_channels, mod.groups
    kin, kout = _keep(rin, cin), _keep(rout, cout)
    w = mod.weight.detach()
    if g == 1:
        w = w[kin][:, kout] if transposed else w[kout][:, kin]
    else:  # whole conv groups go: the analysis coupled each group's in and out channels
        gone = {i // (cout // g) for i in rout}
        if gone != {i // (cin // g) for i in rin} or len(rout) != len(gone) * (cout // g):
            raise RuntimeError(f"{node.name}: removal does not follow conv groups")  # analysis bug
        w = w[kin] if transposed else w[kout]
        g -= len(gone)
    mod.weight = _param(w, mod.weight)
    if mod.bias is not None:
        mod.bias = _param(mod.bias[kout], mod.bias)
    mod.in_channels, mod.out_channels, mod.groups = len(kin), len(kout), g


def _rw_linear(rw: _Rewriter, node: fx.Node) -> None:
    claimed = rw.claim(node)
    if claimed is None:
        return
    rin, rout = claimed
    mod = rw.gm.get_submodule(node.target)
    kin, kout = _keep(rin, mod.in_features), _keep(rout, mod.out_features)
    mod.weight = _param(mod.weight.detach()[kout][:, kin], mod.weight)
    if mod.bias is not None:
        mod.bias = _param(mod.bias[kout], mod.bias)
    mod.in_features, mod.out_features = len(kin), len(kout)


def _rw_batchnorm(rw: _Rewriter, node: fx.Node) -> None:
    mod = rw.gm.get_submodule(node.target)
    gone = rw.rm(node)
    if node.target in rw.done or not gone:
        return
    rw.done.add(node.target)
    if isinstance(mod, nn.PReLU):  # per-channel slopes
        keep = _keep(gone, mod.num_parameters)
        mod.weight, mod.num_parameters = _param(mod.weight[keep], mod.weight), len(keep)
        return
    keep = _keep(gone, mod.num_features)
    if mod.weight is not None:
        mod.weight, mod.bias = _param(mod.weight[keep], mod.weight), _param(mod.bias[keep], mod.bias)
    for name in ("running_mean", "running_var"):
        if getattr(mod, name, None) is not None:
            mod._buffers[name] = getattr(mod, name)[keep].clone()
    mod.num_features = len(keep)


def _rw_reshape(rw: _Rewriter, node: fx.Node) -> None:
    """view/reshape with a literal channel size (e.g. ``x.view(-1, 256)``) gets the new size."""
    if node.op == "call_module" or node.name not in rw.removed or node.target in (torch.flatten, "flatten"):
        return
    args, new = list(node.args), rw.new_size(node.name)
    if len(args) == 2 and isinstance(args[1], tuple | list):
        shape = list(args[1])
        if len(shape) > 1 and isinstance(shape[1], int) and shape[1] != -1:
            shape[1] = new
        args[1] = type(args[1])(shape)
    elif len(args) > 2 and isinstance(args[2], int) and args[2] != -1:
        args[2] = new
    node.args = tuple(args)


def _rw_split(rw: _Rewriter, node: fx.Node) -> None:
    """split/chunk on dim 1 becomes ``torch.split`` with each part's surviving channel count."""
    info = rw.cg.splits.get(node.name)
    if info is None or info[1] != 1 or info[0] not in rw.removed:
        return
    x, sizes, gone = node.args[0], info[2], set(rw.removed[info[0]])
    new_sizes, start = [], 0
    for n in sizes:
        new_sizes.append(sum(1 for i in range(start, start + n) if i not in gone))
        start += n
    with rw.gm.graph.inserting_before(node):
        new = rw.gm.graph.call_function(torch.split, (x, new_sizes), {"dim": 1})
    node.replace_all_uses_with(new)
    rw.gm.graph.erase_node(node)


def _rw_getitem(rw: _Rewriter, node: fx.Node) -> None:
    """``x[:, a:b]`` gets the bounds of the surviving channels."""
    src = node.args[0]
    idx = rw.cg.slices.get(node.name)
    if idx is None or len(idx) < 2 or src.name not in rw.removed:
        return
    size = rw.cg.spaces[src.name].size
    first = range(size)[idx[1]].start
    start = sum(1 for k in _keep(rw.removed[src.name], size).tolist() if k < first)
    new = list(idx)
    new[1] = slice(start, start + rw.new_size(node.name))
    node.args = (src, tuple(new))


_REWRITES = {"conv": _rw_conv, "conv_transpose": _rw_conv, "linear": _rw_linear,
             "batchnorm": _rw_batchnorm, "reshape": _rw_reshape, "split": _rw_split,
             "getitem": _rw_getitem}


# ------------------------------------------------------------------------- reporting
_LAYERS = ("conv", "conv_transpose", "linear")


def _channel_stats(graph, cg: ChannelGroups, removed) -> dict[str, Any]:
    out_ch, in_ch = {}, {}
    for n in graph.nodes:
        if op_kind(graph.gm, n) not in _LAYERS:
            continue
        if n.name in removed:
            out_ch[n.name] = [cg.spaces[n.name].size, cg.spaces[n.name].size - len(removed[n.name])]
        src = n.args[0].name if n.args and isinstance(n.args[0], fx.Node) else None
        if src in removed:
            in_ch[n.name] = [cg.spaces[src].size, cg.spaces[src].size - len(removed[src])]
    return {"channels": out_ch, "in_channels": in_ch}


def _removed_by_node(graph, cg: ChannelGroups, removed) -> dict[str, dict[str, list[int]]]:
    """Per conv/linear/batch-norm/constant node: the out- ("out") and in- ("in") channel
    indices it lost, in the unpruned numbering."""
    report: dict[str, dict[str, list[int]]] = {}
    for n in graph.nodes:
        kind = op_kind(graph.gm, n)
        entry = {}
        if kind in (*_LAYERS, "batchnorm") and n.name in removed:
            entry["out"] = removed[n.name]
        if kind in _LAYERS and isinstance(n.args[0], fx.Node) and n.args[0].name in removed:
            entry["in"] = removed[n.args[0].name]
        if n.op == "get_attr" and n.name in removed:
            entry["param"] = removed[n.name]
        if entry:
            report[n.name] = entry
    return report
