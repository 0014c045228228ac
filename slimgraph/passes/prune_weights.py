"""prune-weights: unstructured weight pruning (magnitude, OBD, OBS, dynamic network surgery).

Methods (``method``):

- ``magnitude`` (Han et al. 2015): prune the weights of smallest |w|.
- ``obd``, Optimal Brain Damage (LeCun, Denker and Solla 1990), layer-wise. For a layer
  y = W x with inputs X (d x n; for a conv, the im2col patches of its input, d = C_in/groups*k*k,
  one column per sample and output position), the squared error of its own output,
  E(W') = 1/n * sum_i ||(W' - W) x_i||^2 = sum_r dw_r^T (X X^T / n) dw_r,
  is exactly quadratic in each row's change dw_r with zero gradient at W' = W, and its Hessian
  with respect to a row is H = 2 X X^T / n (the same for every row of a group). OBD keeps only
  the diagonal, h_qq = 2/n sum_i x_iq^2, and ranks by the saliency s_q = 1/2 h_qq w_q^2 =
  mean(x_q^2) w_q^2: the exact error increase of deleting w_q alone. Only the diagonal is
  accumulated, so any layer size fits in memory. With inputs of equal second moment per column
  (an identity-like Hessian) OBD is magnitude pruning.
- ``obs``, Optimal Brain Surgeon (Hassibi and Stork 1993), with the same layer-wise H, dampened
  H + damp * mean(diag H) * I. Deleting w_q and re-fitting the rest costs
  L_q = w_q^2 / (2 [H^-1]_qq) with the update dw = -(w_q / [H^-1]_qq) H^-1 e_q. Many deletions
  per row are done by the sequential elimination of SparseGPT (Frantar and Alistarh 2023, the
  OBC framework of Frantar et al. 2022): columns are visited left to right in blocks of 128;
  a block's pruned set is chosen once from w_q^2 / U_qq^2 (U = upper Cholesky factor of H^-1,
  whose diagonal gives [H_F^-1]_qq over the columns F not yet eliminated), then each column's
  pruned weights are removed with the OBS update restricted to the later columns (a row of U)
  and the accumulated error is pushed into the later blocks. Unlike SparseGPT's fixed per-row
  sparsity, the block's count is chosen across all rows, so each layer's count is exact.
  Layers whose input dimension d exceeds ``obs_max_dim`` are declined (H is d x d).
- ``dns``, dynamic network surgery (Guo, Yao and Chen 2016): pruning and splicing during
  training. Dense weights W are kept aside; the forward pass uses W * T; gradients update the
  dense W straight through the mask; after every step T is recomputed with two thresholds
  a < b: |W| < a -> pruned, |W| >= b -> kept (spliced back if it was pruned), in between ->
  unchanged. We set a = 0.9 q and b = 1.1 q with q the |W| quantile at the layer's target
  sparsity (the paper derives a, b from the weights' mean and std), and snap to the exact
  target count by |W| after the last step. Needs ``retrain_steps >= 1``.

Schedule: ``iterations`` > 1 ramps the sparsity as s_i = s (1 - (1 - i/T)^3) (Zhu and Gupta
2017) with ``retrain_steps`` of training after each step (Han et al. 2015's prune-retrain loop).
Training: Adam at ``lr`` on the calibration batches, the graph in eval mode (batch-norm
statistics frozen, dropout off); the loss is cross-entropy when ``ctx.labels`` come with the
user's calibration batches, else the mean squared error to the outputs of ``ctx.reference``
(logit matching, Ba and Caruana 2014; the input graph when no reference is set). Masks are
re-applied after each optimizer step. ``dsd`` (Han et al. 2017): after the sparse phase the
masks are released and the dense network trains ``retrain_steps`` more steps at lr/10; the
result is dense (no masks, sparsity 0).

Scope: ``layer`` prunes round(s * n) weights of each layer; ``global`` ranks all weights
together (|w| for magnitude; for obd/obs the saliency divided by the layer's total OBD saliency
sum_q 1/2 h_qq w_q^2, i.e. the relative increase of that layer's output error) and prunes the
globally smallest, which gives each layer its count; obs takes the counts from the OBD ranking
(single-weight OBS saliencies over-prune layers with correlated inputs) and then prunes each
layer with OBS updates. Every layer keeps at least 1 % of its
weights (at least one); capped layers are reported in ``stats["capped"]``.

Report: per-layer sparsity, sparse (CSR) and dense weight bytes, and, unless
``sensitivity=false``, a per-layer sensitivity chart (each layer alone magnitude-pruned at
``SENSITIVITY_GRID``, rel-L2 of the outputs on one calibration batch).

Masks: see ``slimgraph.passes.masks`` (masked weight in ``weight`` + bool buffer
``weight_mask``). Already pruned weights stay pruned; a layer already at its target count is
left alone, so a second run with the same options changes nothing (not with ``dsd``, whose
output is dense again).

Requires: calibration batches (obd/obs statistics, training), cost (for ``macs_effective``).
Preserves: shapes. Declines (reported): layers below ``min_params`` weights, functional
conv/linear ops with weights as graph attributes, and for obd/obs layers whose inputs cannot
be unfolded (Conv3d, transposed convs, string padding, non-zero padding modes), and for obs
layers with an input dimension above ``obs_max_dim``.
Exact: no. Sparse size is reported as CSR with 32-bit values and 8-bit relative column indices
(Deep Compression) and as plain CSR with 32-bit indices.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import itertools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import fx, nn

from slimgraph.errors import PassConfigError
from slimgraph.ir.analysis import Analysis, Cost, Shapes
from slimgraph.passes.base import Pass, PassResult, Skip, register_pass
from slimgraph.passes.masks import (
    apply_masks,
    csr_bytes,
    get_mask,
    masked_gradients,
    relative_csr_bytes,
    remove_mask,
    set_mask,
)
from slimgraph.passes.toolkit.capture import patches, stream
from slimgraph.passes.toolkit.sensitivity import measure
from slimgraph.passes.toolkit.train import Hooks, Objective, teacher_outputs, train
from slimgraph.schema import SensitivityCurves

METHODS = ("magnitude", "obd", "obs", "dns")
SCOPES = ("layer", "global")
NOTE = ("unstructured sparsity gives no speed on dense kernels: MACs and latency are unchanged "
        "unless a sparse kernel is used")
MIN_KEEP_FRACTION = 0.01  # a layer keeps at least 1 % of its weights (and at least one)
OBS_BLOCK = 128
DNS_MARGIN = 0.1  # a = (1 - m) q, b = (1 + m) q
_FUNCTIONAL = {F.conv1d, F.conv2d, F.conv3d, F.linear, torch.conv1d, torch.conv2d,
               torch.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}


# ----------------------------------------------------------------------------- layers
@dataclass
class _Layer:
    name: str  # module path
    node: str  # first node that calls it
    module: nn.Module

    @property
    def numel(self) -> int:
        return self.module.weight.numel()

    def pruned(self) -> int:
        mask = get_mask(self.module)
        return 0 if mask is None else int((~mask.bool()).sum())

    def groups(self) -> int:
        return getattr(self.module, "groups", 1)

    def matrix(self) -> torch.Tensor:
        """The weight as (out, d): one row per output unit, columns in im2col order."""
        return self.module.weight.detach().reshape(self.module.weight.shape[0], -1)

    def keep(self) -> torch.Tensor:
        mask = get_mask(self.module)
        w = self.module.weight
        return torch.ones_like(w, dtype=torch.bool) if mask is None else mask.bool().clone()


def _patch_reason(mod: nn.Module) -> str | None:
    """Why OBD/OBS cannot unfold this layer's inputs (None when it can)."""
    if isinstance(mod, nn.Linear):
        return None
    if not isinstance(mod, nn.Conv1d | nn.Conv2d):
        return f"{type(mod).__name__}: OBD/OBS handle Linear, Conv1d and Conv2d inputs only"
    if isinstance(mod.padding, str):
        return f"padding={mod.padding!r} is not unfolded; OBD/OBS need numeric padding"
    if mod.padding_mode != "zeros":
        return f"padding_mode={mod.padding_mode!r}; OBD/OBS unfold zero padding only"
    return None


def _input_dim(mod: nn.Module) -> int:
    if isinstance(mod, nn.Linear):
        return mod.in_features
    return mod.weight[0].numel()


def _candidate_modules(gm: fx.GraphModule, pattern: str) -> tuple[dict[str, _Layer], list[Skip]]:
    found: dict[str, _Layer] = {}
    skipped = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if (isinstance(mod, nn.Linear | nn.modules.conv._ConvNd) and mod.weight is not None
                    and fnmatch.fnmatchcase(node.target, pattern) and node.target not in found):
                found[node.target] = _Layer(node.target, node.name, mod)
        elif node.op == "call_function" and node.target in _FUNCTIONAL and len(node.args) > 1:
            w = node.args[1]
            if isinstance(w, fx.Node) and w.op == "get_attr" and fnmatch.fnmatchcase(w.target, pattern):
                skipped.append(Skip(node.name, "functional conv/linear with its weight as a graph "
                                    "attribute; prune-weights handles Conv/Linear modules"))
    return found, skipped


# ----------------------------------------------------------------------------- statistics
@dataclass
class _Stats:
    """Input statistics of one layer, per group: sum x^2 (g, d) and optionally sum x x^T."""

    sq: torch.Tensor
    xxt: torch.Tensor | None
    n: int = 0

    def hdiag(self) -> torch.Tensor:  # (g, d): h_qq = 2/n sum x_q^2
        return 2.0 * self.sq / max(self.n, 1)

    def hessian(self, damp: float) -> torch.Tensor:  # (g, d, d), dampened
        h = 2.0 * self.xxt / max(self.n, 1)
        diag = h.diagonal(dim1=1, dim2=2)
        dead = diag <= 0
        diag[dead] = 1.0  # inputs that are always zero: any weight there is free to prune
        mean = diag.mean(dim=1, keepdim=True)
        diag += damp * mean
        return h


def _columns(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's inputs as (groups, d, n) columns (im2col for convs)."""
    rows = x.reshape(-1, x.shape[-1]) if isinstance(mod, nn.Linear) else patches(mod, x)
    return rows.T.reshape(getattr(mod, "groups", 1), -1, rows.shape[0])


def _collect(gm: fx.GraphModule, layers: list[_Layer], batches, full: bool) -> dict[str, _Stats]:
    """Each layer's input statistics on the batches (toolkit.stream: its inputs, no hooks)."""
    stats: dict[str, _Stats] = {}
    by_node = {lay.node: lay for lay in layers}

    def visit(node: str, x: torch.Tensor, _: int) -> None:
        lay = by_node[node]
        cols = _columns(lay.module, x).double()
        st = stats.get(lay.name)
        if st is None:
            g, dim = cols.shape[:2]
            st = stats[lay.name] = _Stats(cols.new_zeros(g, dim),
                                          cols.new_zeros(g, dim, dim) if full else None)
        st.sq += (cols * cols).sum(dim=2)
        if full:
            st.xxt += cols @ cols.transpose(1, 2)
        st.n += cols.shape[2]

    stream(gm, batches, list(by_node), visit, inputs=True)
    return stats


def _per_row(layer: _Layer, per_group: torch.Tensor) -> torch.Tensor:
    """(g, d) group statistics -> (out, d), each output row getting its group's values."""
    rows = layer.module.weight.shape[0]
    return per_group.repeat_interleave(rows // per_group.shape[0], dim=0)


def _scores(layer: _Layer, method: str, st: _Stats | None, damp: float,
            normalize: bool) -> torch.Tensor:
    """Saliency of every weight (weight-shaped, float64); already pruned weights get -inf."""
    w = layer.matrix().double()
    if method in ("magnitude", "dns"):
        score = w.abs()
    else:
        obd = 0.5 * _per_row(layer, st.hdiag()) * w * w
        if method == "obd":
            score = obd
        else:
            hinv = torch.linalg.inv(st.hessian(damp)).diagonal(dim1=1, dim2=2)
            score = w * w / (2.0 * _per_row(layer, hinv))
        if normalize:
            score = score / obd.sum().clamp_min(1e-30)
    score = score.reshape(layer.module.weight.shape)
    return score.masked_fill(~layer.keep(), float("-inf"))


# ----------------------------------------------------------------------------- planning
def _cap(numel: int) -> int:
    return max(0, numel - max(1, math.ceil(MIN_KEEP_FRACTION * numel)))


def _plan(layers: list[_Layer], sparsity: float, scores: dict[str, torch.Tensor] | None
          ) -> tuple[dict[str, int], dict[str, float]]:
    """Pruned count per layer, and the layers whose count was capped (name -> sparsity)."""
    if scores is None:  # layer scope
        want = {lay.name: round(sparsity * lay.numel) for lay in layers}
        counts = {lay.name: min(want[lay.name], _cap(lay.numel)) for lay in layers}
    else:
        total = round(sparsity * sum(lay.numel for lay in layers))
        counts = _allocate(layers, scores, total, capped=True)
        want = _allocate(layers, scores, total, capped=False)
    capped = {lay.name: counts[lay.name] / lay.numel for lay in layers
              if want[lay.name] > counts[lay.name]}
    return counts, capped


def _allocate(layers, scores, total: int, capped: bool) -> dict[str, int]:
    """Take the ``total`` globally smallest scores, at most ``_cap`` from each layer."""
    vals, owner = [], []
    for i, lay in enumerate(layers):
        s = torch.sort(scores[lay.name].flatten()).values
        s = s[: _cap(lay.numel)] if capped else s
        vals.append(s)
        owner.append(torch.full((s.numel(),), i, dtype=torch.long))
    vals, owner = torch.cat(vals), torch.cat(owner)
    order = torch.sort(vals, stable=True).indices[: min(total, vals.numel())]
    counts = torch.bincount(owner[order], minlength=len(layers))
    return {lay.name: int(counts[i]) for i, lay in enumerate(layers)}


def _smallest_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.ones(score.numel(), dtype=torch.bool)
    if k > 0:
        keep[torch.sort(score.flatten(), stable=True).indices[:k]] = False
    return keep.reshape(score.shape)


def _schedule(sparsity: float, iterations: int) -> list[float]:
    return [sparsity * (1.0 - (1.0 - i / iterations) ** 3) for i in range(1, iterations + 1)]


# ----------------------------------------------------------------------------- OBS
def obs_prune(w: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, k: int,
              compensate: bool = True, block: int = OBS_BLOCK,
              dead: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``k`` entries of ``w`` (r x d) with OBS updates (SparseGPT-style elimination).

    ``hessian`` is the dampened d x d layer Hessian, ``keep`` the current mask (its pruned
    entries stay pruned and count towards ``k``). Returns (new weights, new mask).
    ``compensate=False`` picks weights the same way but leaves the others unchanged.
    ``dead`` marks input columns that are always zero: their weights cost nothing to prune.
    """
    w = w.double().clone()
    r, d = w.shape
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(hessian.double()))
    u = torch.linalg.cholesky(hinv, upper=True)
    keep = keep.clone()
    fresh = k - int((~keep).sum())
    free = keep.sum(dim=0)  # prunable entries per column
    cum = torch.cumsum(free, 0).double()
    starts = list(range(0, d, block))
    for i1 in starts:
        i2 = min(i1 + block, d)
        before = cum[i1 - 1].item() if i1 else 0.0
        k_b = round(fresh * cum[i2 - 1].item() / max(cum[-1].item(), 1)) - round(
            fresh * before / max(cum[-1].item(), 1))
        _obs_block(w, u, keep, i1, i2, k_b, compensate, None if dead is None else dead[i1:i2])
    return w, keep


def _obs_block(w, u, keep, i1: int, i2: int, k_new: int, compensate: bool, dead) -> None:
    w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
    sal = (w1 * w1) / u1.diagonal().pow(2)
    if dead is not None:
        sal[:, dead] = 0.0
    pre = ~keep[:, i1:i2]
    sal[pre] = float("-inf")
    sel = _smallest_mask(sal, int(pre.sum()) + max(k_new, 0)).logical_not()
    err = torch.zeros_like(w1)
    for i in range(i2 - i1):
        col = w1[:, i]
        q = col.masked_fill(sel[:, i], 0.0)
        e = (col - q) / u1[i, i]
        if compensate:
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
        w1[:, i] = q
        err[:, i] = e
    w[:, i1:i2] = w1
    keep[:, i1:i2] = ~sel
    if compensate:
        w[:, i2:] -= err @ u[i1:i2, i2:]


def _obs_layer(layer: _Layer, st: _Stats, k: int, damp: float, score: torch.Tensor) -> None:
    """OBS on every group of a layer; the layer's count is split by the global saliency order."""
    g = layer.groups()
    w, keep = layer.matrix().double(), layer.keep().reshape(layer.module.weight.shape[0], -1)
    target = ~_smallest_mask(score, k).reshape(w.shape)
    rows = w.shape[0] // g
    hess = st.hessian(damp)
    new_w, new_keep = w.clone(), keep.clone()
    for j in range(g):
        sl = slice(j * rows, (j + 1) * rows)
        k_j = int(target[sl].sum())
        new_w[sl], new_keep[sl] = obs_prune(w[sl], hess[j], keep[sl], k_j, dead=st.sq[j] == 0)
    weight = layer.module.weight
    with torch.no_grad():
        weight.copy_(new_w.reshape(weight.shape).to(weight.dtype))
    set_mask(layer.module, new_keep.reshape(weight.shape))


# ----------------------------------------------------------------------------- training
@dataclass
class _Data:
    """The calibration batches and what retraining fits on them: the labels, else the
    teacher's (reference graph's) outputs."""

    batches: list[tuple[torch.Tensor, ...]]
    labels: list[torch.Tensor] | None
    teacher: Any  # a Graph whose outputs are the regression targets
    _objective: Objective | None = None

    def inputs(self) -> tuple[torch.Tensor, ...]:
        return tuple(torch.cat([b[i] for b in self.batches]) for i in range(len(self.batches[0])))

    def objective(self) -> Objective:
        if self._objective is None:
            if self.labels is not None:
                self._objective = Objective("supervised", labels=torch.cat(self.labels))
            else:
                chunk = max(len(b[0]) for b in self.batches)
                self._objective = Objective("mse", teacher=teacher_outputs(self.teacher.gm, self.inputs(), chunk))
        return self._objective

    def cycle(self, steps: int):
        """The batches in order, repeated, as sample indices: ``steps`` minibatches."""
        bounds = list(itertools.accumulate(len(b[0]) for b in self.batches))
        ranges = [torch.arange(lo, hi) for lo, hi in zip([0, *bounds[:-1]], bounds, strict=True)]
        return itertools.islice(itertools.cycle(ranges), steps)


class _Surgery:
    """Dynamic network surgery state: dense weights kept aside, masks T with hysteresis."""

    def __init__(self, layers: list[_Layer]):
        self.layers = layers
        self.dense = {lay.name: lay.module.weight.detach().clone() for lay in layers}
        self.keep: dict[str, torch.Tensor] = {}
        self.first: dict[str, torch.Tensor] = {}
        self.thresholds: dict[str, tuple[float, float]] = {}
        for lay in layers:
            remove_mask(lay.module)

    def retarget(self, counts: dict[str, int]) -> None:
        for lay in self.layers:
            mag = self.dense[lay.name].abs().flatten()
            k = counts[lay.name]
            q = torch.sort(mag).values[k - 1].item() if k > 0 else 0.0
            self.thresholds[lay.name] = ((1 - DNS_MARGIN) * q, (1 + DNS_MARGIN) * q)
            if lay.name not in self.keep:
                self.keep[lay.name] = _smallest_mask(self.dense[lay.name].abs(), k)
                self.first[lay.name] = self.keep[lay.name].clone()
        self.load_masked()

    @torch.no_grad()
    def load_masked(self) -> None:
        for lay in self.layers:
            lay.module.weight.copy_(self.dense[lay.name] * self.keep[lay.name])

    @torch.no_grad()
    def load_dense(self) -> None:  # before the optimizer step: update the dense weights
        for lay in self.layers:
            lay.module.weight.copy_(self.dense[lay.name])

    @torch.no_grad()
    def after_step(self) -> None:
        for lay in self.layers:
            dense = self.dense[lay.name] = lay.module.weight.detach().clone()
            a, b = self.thresholds[lay.name]
            mag = dense.abs()
            self.keep[lay.name] = (mag >= b) | (self.keep[lay.name] & (mag >= a))
        self.load_masked()

    def finish(self, counts: dict[str, int]) -> int:
        """Snap to the exact counts by |W|; return how many first-pruned weights came back."""
        revived = 0
        for lay in self.layers:
            keep = _smallest_mask(self.dense[lay.name].abs(), counts[lay.name])
            with torch.no_grad():
                lay.module.weight.copy_(self.dense[lay.name])
            set_mask(lay.module, keep)
            revived += int((~self.first[lay.name] & keep).sum())
        return revived


def _train(gm: nn.Module, data: _Data, steps: int, lr: float,
           surgery: _Surgery | None = None) -> list[float]:
    """``steps`` Adam steps in eval mode (toolkit.train); masks re-applied (or DNS masks
    updated) after every step."""
    params = list(gm.parameters())
    for p in params:
        p.requires_grad_(True)
    hooks = (Hooks(after_backward=surgery.load_dense, after_step=surgery.after_step) if surgery
             else Hooks(after_step=lambda: apply_masks(gm)))
    with masked_gradients(gm):
        return train(gm, data.inputs(), data.objective(), data.cycle(steps),
                     optimizer=torch.optim.Adam(params, lr=lr), hooks=hooks, dropout=False)


@contextlib.contextmanager
def _magnitude_pruned(module: nn.Module, sparsity: float):
    """``module``'s smallest-magnitude weights zeroed for the duration (restored after)."""
    w = module.weight
    saved = w.detach().clone()
    pruned = saved.flatten().clone()
    pruned[saved.abs().flatten().argsort()[: round(sparsity * saved.numel())]] = 0
    with torch.no_grad():
        w.copy_(pruned.view_as(saved))
    try:
        yield
    finally:
        with torch.no_grad():
            w.copy_(saved)


# ----------------------------------------------------------------------------- the pass
SENSITIVITY_GRID = (0.25, 0.5, 0.75, 0.9, 0.95)


@register_pass
@dataclass(frozen=True)
class PruneWeights(Pass):
    """Unstructured weight pruning with masks in the IR (see the module docstring).

    Requires: calibration data (obd, obs, training), cost. Preserves: shapes.
    Declines (reported): layers below ``min_params``, functional conv/linear, layers obd/obs
    cannot unfold, obs layers with input dimension above ``obs_max_dim``.
    Exact: no.
    """

    name: ClassVar[str] = "prune-weights"
    exact: ClassVar[bool] = False
    requires: ClassVar[tuple[type[Analysis], ...]] = (Cost,)
    preserves: ClassVar[tuple[type[Analysis], ...]] = (Shapes,)

    method: str = "magnitude"  # magnitude, obd, obs or dns
    sparsity: float = 0.5  # share of the weights to remove
    scope: str = "layer"  # layer (each layer at the sparsity) or global (one threshold over the network)
    iterations: int = 1  # prune in this many steps (iterative pruning)
    retrain_steps: int = 0  # training steps after each step (0: one-shot)
    lr: float = 1e-3  # learning rate of the retraining
    dsd: bool = False  # dense-sparse-dense: retrain once more without the masks
    layers: str = "*"  # module name pattern of the layers to prune
    min_params: int = 0  # skip layers with fewer weights
    obs_max_dim: int = 4096  # OBS: skip layers whose input dimension (Hessian size) is larger
    damp: float = 0.01  # dampening of the OBD/OBS Hessian, relative to its mean diagonal
    sensitivity: bool = True  # measure the per-layer sensitivity chart for the report

    def validate(self) -> None:
        checks = [
            (self.method in METHODS, f"method={self.method!r} must be one of {', '.join(METHODS)}"),
            (0.0 <= self.sparsity < 1.0, f"sparsity={self.sparsity} must be in [0, 1)"),
            (self.scope in SCOPES, f"scope={self.scope!r} must be one of {', '.join(SCOPES)}"),
            (self.iterations >= 1, f"iterations={self.iterations} must be >= 1"),
            (self.retrain_steps >= 0, f"retrain_steps={self.retrain_steps} must be >= 0"),
            (self.lr > 0, f"lr={self.lr} must be > 0"),
            (self.min_params >= 0, f"min_params={self.min_params} must be >= 0"),
            (self.obs_max_dim >= 1, f"obs_max_dim={self.obs_max_dim} must be >= 1"),
            (self.damp > 0, f"damp={self.damp} must be > 0"),
            (self.method != "dns" or self.retrain_steps >= 1,
             "method=dns prunes and splices during training: it needs retrain_steps >= 1"),
            (not self.dsd or self.retrain_steps >= 1, "dsd=true needs retrain_steps >= 1"),
            (bool(self.layers), "layers must be a non-empty glob"),
        ]
        for ok, message in checks:
            if not ok:
                raise PassConfigError(f"prune-weights: {message}")

    # ------------------------------------------------------------------ run
    def run(self, graph, ctx) -> PassResult:
        out = graph.copy()
        gm = out.gm
        layers, skipped = self._select(gm)
        if not layers:
            return PassResult(graph, False, skipped, stats={"note": NOTE, "layers_pruned": 0})
        data = self._data(graph, ctx)
        counts, capped = self._plan_now(gm, layers, self.sparsity, data)
        if not self.dsd and all(lay.pruned() >= counts[lay.name] for lay in layers):
            stats = self._report(ctx, graph, self._select(graph.gm)[0], capped)
            return PassResult(graph, False, skipped, stats={**stats, "already_pruned": True})
        sens = self._sensitivity(graph, data) if self.sensitivity else None
        info: dict[str, Any] = {}
        if self.method == "dns":
            info = self._surgery(gm, layers, data)
        else:
            for s in _schedule(self.sparsity, self.iterations):
                counts, capped = self._prune_step(gm, layers, s, data)
                if self.retrain_steps:
                    info.setdefault("loss", []).append(_train(gm, data, self.retrain_steps, self.lr)[-1])
        if self.dsd:
            for lay in layers:
                remove_mask(lay.module)
            info["dsd_loss"] = _train(gm, data, self.retrain_steps, self.lr / 10)[-1]
        stats = self._report(ctx, out, layers, capped)
        stats.update(info, schedule=[round(s, 4) for s in _schedule(self.sparsity, self.iterations)],
                     training_data=ctx.calibration_source if self._trains() else None,
                     training_loss=("cross-entropy" if data.labels is not None else "mse-to-reference")
                     if self._trains() else None)
        return PassResult(out, True, skipped, stats=stats, sensitivity=sens)

    def _sensitivity(self, graph, data) -> SensitivityCurves:
        """The report's per-layer chart: rel-L2 of the outputs on the first calibration batch
        when only that layer is magnitude-pruned to each sparsity of ``SENSITIVITY_GRID``
        (one forward pass per point; magnitude for every method, so the curves compare
        layers, not methods)."""
        from slimgraph.numerics import compare_outputs

        probe = graph.copy()
        batch = data.batches[0]
        ref = probe.run(*batch)
        candidates = {lay.name: [(s, 0.0, s, functools.partial(_magnitude_pruned, lay.module, s))
                                 for s in SENSITIVITY_GRID]
                      for lay in self._select(probe.gm)[0]}
        sens = measure(candidates, lambda: compare_outputs(ref, probe.run(*batch))["rel_l2"],
                       x_label="sparsity of that layer alone (magnitude)",
                       y_label="rel-L2 of the outputs vs unpruned")
        return sens.report()

    def _trains(self) -> bool:
        return self.retrain_steps > 0

    def _select(self, gm: fx.GraphModule) -> tuple[list[_Layer], list[Skip]]:
        found, skipped = _candidate_modules(gm, self.layers)
        layers = []
        for lay in found.values():
            reason = None
            if lay.numel < self.min_params:
                reason = f"{lay.name}: {lay.numel} weights < min_params={self.min_params}"
            elif self.method in ("obd", "obs"):
                reason = _patch_reason(lay.module)
            if reason is None and self.method == "obs" and _input_dim(lay.module) > self.obs_max_dim:
                reason = (f"{lay.name}: input dimension {_input_dim(lay.module)} > obs_max_dim="
                          f"{self.obs_max_dim} (OBS inverts a d x d Hessian)")
            if reason:
                skipped.append(Skip(lay.node, reason))
            else:
                layers.append(lay)
        return layers, skipped

    def _data(self, graph, ctx) -> _Data:
        batches = ctx.calibration_batches(graph)
        labels = ctx.labels if ctx.calibration and ctx.labels and len(ctx.labels) == len(batches) else None
        return _Data(batches, labels, ctx.reference if ctx.reference is not None else graph)

    # ------------------------------------------------------------------ pruning
    def _stats_for(self, gm, layers, data) -> dict[str, _Stats] | None:
        if self.method not in ("obd", "obs"):
            return None
        return _collect(gm, layers, data.batches, full=self.method == "obs")

    def _plan_now(self, gm, layers, sparsity, data, stats=None):
        if self.scope == "layer":
            return _plan(layers, sparsity, None)
        stats = stats if stats is not None else self._stats_for(gm, layers, data)
        # OBS allocates with the OBD (diagonal) estimate: single-weight OBS saliencies assume
        # all other weights re-fit, which does not add up over many deletions and ranks layers
        # with strongly correlated inputs (im2col patches) far too low.
        ranking = "obd" if self.method == "obs" else self.method
        scores = {lay.name: _scores(lay, ranking, stats and stats[lay.name], self.damp, True)
                  for lay in layers}
        return _plan(layers, sparsity, scores)

    def _prune_step(self, gm, layers, sparsity, data):
        stats = self._stats_for(gm, layers, data)
        counts, capped = self._plan_now(gm, layers, sparsity, data, stats)
        for lay in layers:
            k = counts[lay.name]
            if lay.pruned() >= k:
                continue
            score = _scores(lay, self.method, stats and stats[lay.name], self.damp, False)
            if self.method == "obs":
                _obs_layer(lay, stats[lay.name], k, self.damp, score)
            else:
                set_mask(lay.module, _smallest_mask(score, k))
        return counts, capped

    def _surgery(self, gm, layers, data) -> dict[str, Any]:
        surgery = _Surgery(layers)
        counts: dict[str, int] = {}
        for s in _schedule(self.sparsity, self.iterations):
            counts, _ = self._plan_dense(surgery, layers, s)
            surgery.retarget(counts)
            _train(gm, data, self.retrain_steps, self.lr, surgery)
        counts, _ = self._plan_dense(surgery, layers, self.sparsity)
        return {"dns_revived": surgery.finish(counts)}

    def _plan_dense(self, surgery: _Surgery, layers, sparsity):
        if self.scope == "layer":
            return _plan(layers, sparsity, None)
        return _plan(layers, sparsity, {k: v.abs().double() for k, v in surgery.dense.items()})

    # ------------------------------------------------------------------ report
    def _report(self, ctx, graph, layers: list[_Layer], capped: dict[str, float]) -> dict[str, Any]:
        per_layer, pruned, total = {}, 0, 0
        dense_b = sparse_b = plain_b = 0
        for lay in layers:
            w = lay.module.weight.detach()
            zeros = lay.pruned()
            per_layer[lay.name] = round(zeros / w.numel(), 6)
            pruned, total = pruned + zeros, total + w.numel()
            dense_b += w.numel() * w.element_size()
            sparse_b += relative_csr_bytes(w)
            plain_b += csr_bytes(w)
        return {
            "method": self.method, "scope": self.scope,
            "sparsity": round(pruned / max(total, 1), 6), "layer_sparsity": per_layer,
            "layers_pruned": sum(1 for v in per_layer.values() if v > 0),
            "capped": {k: round(v, 6) for k, v in capped.items()},
            "dense_weight_bytes": dense_b, "sparse_weight_bytes": sparse_b, "csr_weight_bytes": plain_b,
            "sparse_format": "CSR, 32-bit values + 8-bit relative column indices (filler zeros "
                             "for larger gaps), 32-bit row pointers (Han et al. 2016)",
            "csr_format": "CSR, 32-bit values + 32-bit column indices + 32-bit row pointers",
            "macs_effective": _effective_macs(ctx, graph, per_layer),
            "note": NOTE,
        }


def _effective_macs(ctx, graph, per_layer: dict[str, float]) -> int:
    """Dense MACs minus those of pruned weights (for information; kernels stay dense)."""
    cost = ctx.analyses.get(Cost, graph)
    macs = 0.0
    for node in graph.gm.graph.nodes:
        c = cost.nodes.get(node.name)
        if c is None:
            continue
        frac = per_layer.get(node.target, 0.0) if node.op == "call_module" else 0.0
        macs += c.macs * (1.0 - frac)
    return int(round(macs))
