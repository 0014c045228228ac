"""channel-lowrank: data-driven low-rank approximation of a conv's responses (Zhang et al.).

X. Zhang, J. Zou, K. He, J. Sun, "Accelerating Very Deep Convolutional Networks for
Classification and Detection", TPAMI 2015 (and "Efficient and Accurate Approximations of
Nonlinear Convolutional Networks", CVPR 2015).

A conv with d filters, ``y = W x + b`` (W: d x c x k x k), has responses that lie near a
low-dimensional subspace. With ``M = P Q^T`` of rank d' (P, Q: d x d') and a bias ``b'``,

    y ~= M y + b' = P (Q^T W x + Q^T b) + b'

i.e. a conv with d' filters ``W' = Q^T W`` (bias ``Q^T b``) followed by a 1x1 conv ``P`` (d x d',
bias ``b'``). Solutions implemented here:

linear (default), symmetric: minimize ``sum_i ||(y_i - ybar) - M (y_i - ybar)||^2``: P = Q = the
    top-d' eigenvectors U of the response covariance, ``b' = (I - U U^T) ybar`` (the paper's
    ``y ~= U U^T (y - ybar) + ybar``). At d' = d, U U^T = I and the layer is reproduced exactly.
asymmetric (paper Sec. 3.3): the responses of the *approximated* network's input,
    ``y^_i = W x^_i + b``, are mapped onto the original network's responses ``y_i``:
    ``min ||y_i - M y^_i - b'||^2``, rank(M) <= d'. This is reduced-rank regression (the
    paper's GSVD solution): ``M_ls = Yc^T Y^c (Y^c^T Y^c)^-1``; U = top-d' eigenvectors of the
    fitted values' scatter ``M_ls S_y^y^ M_ls^T``; ``M = U U^T M_ls``, ``b' = ybar - M y^bar``.
    Layers are solved in topological order on the partially approximated graph, so each
    layer compensates the error of the layers before it.
nonlinear (paper Sec. 3.2): ``min sum_i ||r(y_i) - r(M y^_i + b')||^2`` with r = ReLU, relaxed
    with an auxiliary z: ``||r(y_i) - r(z_i)||^2 + lambda ||z_i - (M y^_i + b')||^2`` and solved by
    alternation. (i) M, b' given z: reduced-rank regression of z on y^ (as above); (ii) z given
    M, b': per element, the better of ``z0 = min(0, y')`` and
    ``z1 = max(0, (lambda y' + r(y)) / (1 + lambda))`` with ``y' = M y^ + b'``. We run 25
    iterations at lambda = 0.01 then 25 at lambda = 1 (the paper increases lambda over its
    iterations), start from the linear solution, and keep whichever of the start and the end
    has the lower ReLU loss (the relaxation does not guarantee monotone decrease). It only
    applies when a ReLU is the conv's single user; otherwise the linear loss is used.
refine_steps: RMSProp on the ReLU loss ``||r(y) - r(P Q^T y^ + b')||^2`` over minibatches of the
    sampled responses, starting from the solution above (kept only if it lowers the loss on
    all samples). No whole-network fine-tuning (see the ``finetune`` pass for that).

Responses are sampled per spatial position (up to ``max_samples`` vectors, seeded), as in the
paper; ranks are chosen on the PCA spectrum of the (original) responses (``rank`` as in
``lowrank.common``: energy fraction, fixed int, ``macs=F``, ``vbmf``, ``full``) or by the common
greedy ``target_macs`` selector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from slimgraph.errors import PassConfigError
from slimgraph.passes.base import PassResult, register_pass
from slimgraph.passes.lowrank.common import (
    Decline,
    Factorized,
    LayerPlan,
    LowRankPass,
    conv2d_geometry,
)
from slimgraph.passes.toolkit.capture import stream

MIN_SAMPLES_PER_FILTER = 4  # response vectors per filter needed for a usable covariance
NONLINEAR_SCHEDULE = (0.01,) * 25 + (1.0,) * 25  # lambda per alternating iteration
REFINE_BATCH = 256


# ---------------------------------------------------------------------- response collection
def sampled_responses(gm: fx.GraphModule, name: str, conv: nn.Conv2d, batches, max_samples: int,
                      seed: int) -> torch.Tensor | None:
    """``conv`` applied (in float64) to node ``name``'s input on every batch, sampled at
    ``max_samples`` positions overall: (n, d). Same batches, shapes and seed give the same
    positions, so responses from two graphs line up sample by sample. None if the input is
    missing or does not fit ``conv``."""
    total = sum(len(b[0]) for b in batches)
    weight = conv.weight.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else None
    geo = conv2d_geometry(conv)
    rows: list[torch.Tensor] = []
    fits = [True]

    def visit(_, x: torch.Tensor, j: int) -> None:
        if x.dim() != 4 or x.shape[1] != conv.in_channels:
            fits[0] = False
            return
        y = F.conv2d(x.double(), weight, bias, geo.stride, geo.padding, geo.dilation)
        y = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
        quota = math.ceil(max_samples * len(batches[j][0]) / total)
        if quota < len(y):
            gen = torch.Generator().manual_seed(seed * 100_003 + j)
            y = y[torch.randperm(len(y), generator=gen)[:quota]]
        rows.append(y)

    stream(gm, batches, [name], visit, inputs=True)
    return torch.cat(rows) if rows and fits[0] and len(rows) == len(batches) else None


def _graph_version(gm: fx.GraphModule) -> tuple:
    return tuple((n.name, str(n.target)) for n in gm.graph.nodes if n.op == "call_module")


# ---------------------------------------------------------------------- solvers
# All solvers work on float64 tensors of response vectors, one sample per row (n x d).
@dataclass
class ChannelFactors:
    """``y ~= P (Qt y^) + b``: P (d x r), Qt (r x d), b (d,), float64."""

    P: torch.Tensor  # noqa: N815
    Qt: torch.Tensor  # noqa: N815
    b: torch.Tensor

    def apply(self, y_hat: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b, y_hat @ self.Qt.T, self.P.T)


def _top_eigvecs(scatter: torch.Tensor, rank: int) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((scatter + scatter.T) / 2)
    return vecs[:, torch.argsort(vals, descending=True)[:rank]]


def pca_factors(y: torch.Tensor, rank: int) -> ChannelFactors:
    """Symmetric linear solution: ``y ~= U U^T (y - ybar) + ybar``."""
    mean = y.mean(dim=0)
    yc = y - mean
    u = _top_eigvecs(yc.T @ yc, rank)
    return ChannelFactors(u, u.T.contiguous(), mean - u @ (u.T @ mean))


class ReducedRankRegression:
    """``min ||z - P Qt x - b||^2`` with rank d', for many targets z and one input x.

    The input scatter is inverted once (a tiny ridge keeps dead channels harmless); the fitted
    values' scatter is ``M_ls S_xx M_ls^T``, so each solve costs one n x d x d product.
    """

    def __init__(self, x: torch.Tensor):
        self.x_mean = x.mean(dim=0)
        self.xc = x - self.x_mean
        self.sxx = self.xc.T @ self.xc
        ridge = 1e-10 * max(float(torch.trace(self.sxx)) / len(self.sxx), 1e-30)
        self.sxx_inv = torch.linalg.inv(self.sxx + ridge * torch.eye(len(self.sxx), dtype=x.dtype))

    def solve(self, z: torch.Tensor, rank: int) -> ChannelFactors:
        m_ls = (z.T @ self.xc) @ self.sxx_inv  # d x d, maps x to z (xc has zero column means)
        u = _top_eigvecs(m_ls @ self.sxx @ m_ls.T, rank)
        qt = u.T @ m_ls
        return ChannelFactors(u, qt, z.mean(dim=0) - u @ (qt @ self.x_mean))


def relu_loss(f: ChannelFactors, y: torch.Tensor, y_hat: torch.Tensor, relu: bool) -> float:
    """Mean squared reconstruction error per sample, after r (ReLU or identity)."""
    approx = f.apply(y_hat)
    if relu:
        return float(((y.clamp(min=0) - approx.clamp(min=0)) ** 2).sum(dim=1).mean())
    return float(((y - approx) ** 2).sum(dim=1).mean())


def relaxed_z(ry: torch.Tensor, yp: torch.Tensor, lam: float, ry2: torch.Tensor | None = None
              ) -> torch.Tensor:
    """argmin_z ``(r(y) - r(z))^2 + lam (z - y')^2`` per element (the paper's z-step).

    The paper's candidates are ``z0 = min(0, y')`` and ``z1 = max(0, u)``, u = (lam y' + r(y)) /
    (1 + lam); keep the cheaper. Worked out: where y' >= 0, z1 = u wins (z = 0 is in its
    domain); where y' < 0, z0 = y' costs r(y)^2, and z1 wins only if u > 0 and its cost
    ``lam / (1 + lam) (r(y) - y')^2`` is lower. ``ry2`` (r(y)^2) may be passed precomputed.
    """
    ry2 = ry * ry if ry2 is None else ry2
    u = yp.mul(lam).add_(ry).div_(1 + lam)
    z1_cheaper = (ry.sub(yp).square_().mul_(lam) < ry2 * (1 + lam)).logical_and_(u > 0)
    return torch.where(z1_cheaper.logical_or_(yp >= 0), u, yp)


def nonlinear_factors(y: torch.Tensor, y_hat: torch.Tensor, rank: int, start: ChannelFactors,
                      rrr: ReducedRankRegression) -> ChannelFactors:
    """The paper's alternating solver of the ReLU-aware relaxation (see the module docstring)."""
    ry = y.clamp(min=0)
    ry2 = ry * ry
    f = start
    for lam in NONLINEAR_SCHEDULE:
        f = rrr.solve(relaxed_z(ry, f.apply(y_hat), lam, ry2), rank)
    return f


def refine_factors(f: ChannelFactors, y: torch.Tensor, y_hat: torch.Tensor, relu: bool, steps: int,
                   lr: float, seed: int) -> ChannelFactors:
    """RMSProp on ``||r(y) - r(P Qt y^ + b)||^2`` over minibatches of responses."""
    p, qt, b = (t.clone().requires_grad_(True) for t in (f.P, f.Qt, f.b))
    opt = torch.optim.RMSprop([p, qt, b], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(y), (min(REFINE_BATCH, len(y)),), generator=gen)
        approx = torch.addmm(b, y_hat[idx] @ qt.T, p.T)
        target = y[idx]
        if relu:
            target, approx = target.clamp(min=0), approx.clamp(min=0)
        loss = ((target - approx) ** 2).sum(dim=1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ChannelFactors(p.detach(), qt.detach(), b.detach())


# ---------------------------------------------------------------------- the layer plan
class ChannelPlan(LayerPlan):
    """One conv's plan: its original responses, and how to get the approximated ones."""

    method: ClassVar[str] = "channel-lowrank"

    def __init__(self, node, target, module, in_shape, out_shape, original_macs, *, owner,
                 y: torch.Tensor, relu: bool, teacher: str, gm: fx.GraphModule, batches):
        super().__init__(node, target, module, in_shape, out_shape, original_macs)
        self.owner, self.y, self.relu, self.teacher = owner, y, relu, teacher
        self.gm, self.batches = gm, batches
        self._y_hat: tuple[tuple, torch.Tensor] | None = None
        self._spectrum: np.ndarray | None = None

    @property
    def full_ranks(self) -> tuple[int, ...]:
        return (self.module.out_channels,)

    def layers(self, ranks: tuple[int, ...], device: str | None = None) -> list[nn.Module]:
        (r,) = ranks
        conv, geo = self.module, conv2d_geometry(self.module)
        return [nn.Conv2d(conv.in_channels, r, geo.kernel, geo.stride, geo.padding, geo.dilation,
                          bias=conv.bias is not None, device=device),
                nn.Conv2d(r, conv.out_channels, 1, bias=True, device=device)]

    def spectra(self) -> tuple[np.ndarray, ...]:
        if self._spectrum is None:
            yc = self.y - self.y.mean(dim=0)
            vals = torch.linalg.eigvalsh(yc.T @ yc / len(yc)).flip(0)
            self._spectrum = vals.clamp(min=0).sqrt().numpy()
        return (self._spectrum,)

    def unfoldings(self) -> tuple[np.ndarray, ...]:
        return ((self.y - self.y.mean(dim=0)).T.numpy(),)

    def y_hat(self) -> torch.Tensor:
        """Responses on the approximated graph's input (asymmetric), else the original ones."""
        if not self.owner.asymmetric:
            return self.y
        version = _graph_version(self.gm)
        if self._y_hat is None or self._y_hat[0] != version:
            got = sampled_responses(self.gm, self.node, self.module, self.batches,
                                    self.owner.max_samples, self.owner.seed)
            if got is None or got.shape != self.y.shape:
                raise Decline("cannot collect the approximated network's responses")
            self._y_hat = (version, got)
        return self._y_hat[1]

    def solve(self, rank: int) -> tuple[ChannelFactors, dict[str, Any]]:
        y, y_hat = self.y, self.y_hat()
        asym = y_hat is not y
        rrr = ReducedRankRegression(y_hat) if (asym or self.owner.nonlinear) else None
        f = rrr.solve(y, rank) if asym else pca_factors(y, rank)
        fit: dict[str, Any] = {"rank": rank, "relu": self.relu, "teacher": self.teacher,
                               "linear_loss": relu_loss(f, y, y_hat, self.relu)}
        if self.owner.nonlinear and self.relu:
            g = nonlinear_factors(y, y_hat, rank, f, rrr)
            fit["nonlinear_loss"] = relu_loss(g, y, y_hat, True)
            f = g if fit["nonlinear_loss"] < fit["linear_loss"] else f
        if self.owner.refine_steps:
            before = relu_loss(f, y, y_hat, self.relu)
            g = refine_factors(f, y, y_hat, self.relu, self.owner.refine_steps,
                               self.owner.refine_lr, self.owner.seed)
            fit["refined_loss"] = relu_loss(g, y, y_hat, self.relu)
            f = g if fit["refined_loss"] < before else f
        fit["loss"] = relu_loss(f, y, y_hat, self.relu)
        fit["response_energy"] = float(((y.clamp(min=0) if self.relu else y) ** 2).sum(dim=1).mean())
        return f, fit

    def build(self, ranks: tuple[int, ...]) -> Factorized:
        f, fit = self.solve(ranks[0])
        first, second = self.layers(ranks)
        set_channel_factors(self.module, f, first, second)
        out = self.factorized([first, second], ranks)
        out.fit = {k: (round(v, 8) if isinstance(v, float) else v) for k, v in fit.items()}
        return out


def set_channel_factors(conv: nn.Conv2d, f: ChannelFactors, first: nn.Conv2d, second: nn.Conv2d) -> None:
    """``first`` = d' filters ``Qt W`` (bias ``Qt b``); ``second`` = 1x1 conv ``P`` (bias ``b'``)."""
    d, r = f.P.shape
    w = conv.weight.detach().double()
    qt = f.Qt
    with torch.no_grad():
        first.weight.copy_((qt @ w.reshape(d, -1)).reshape(r, *w.shape[1:]))
        if conv.bias is not None:
            first.bias.copy_(qt @ conv.bias.detach().double())
        second.weight.copy_(f.P.reshape(d, r, 1, 1))
        second.bias.copy_(f.b)


def _relu_follows(gm: fx.GraphModule, node: fx.Node) -> bool:
    if len(node.users) != 1:
        return False
    (user,) = node.users
    if user.op == "call_module":
        return isinstance(gm.get_submodule(user.target), nn.ReLU)
    if user.op == "call_function":
        return user.target in (F.relu, torch.relu, torch.relu_)
    return user.op == "call_method" and user.target in ("relu", "relu_")


# ---------------------------------------------------------------------- the pass
@register_pass
@dataclass(frozen=True)
class ChannelLowRank(LowRankPass):
    """Replace a KxK conv (d filters) by d' filters + a 1x1 conv, fitted to its responses.

    Zhang, Zou, He, Sun (TPAMI 2015 / CVPR 2015); the solvers are in the module docstring.
    Options: ``rank`` (energy of the response PCA spectrum, int, ``macs=F``, ``vbmf``, ``full``),
    ``target_macs`` / ``grid`` / ``fidelity`` (global greedy selection, ``lowrank.common``),
    ``nonlinear`` (ReLU-aware alternating solver), ``asymmetric`` (fit to the original
    network's responses from the approximated network's inputs, layer by layer),
    ``refine_steps`` / ``refine_lr`` (RMSProp on the ReLU loss), ``max_samples`` (response
    vectors per layer), ``seed`` (position sampling, refinement).
    Requires: shapes, cost, calibration batches (seeded random inputs when the user gave none;
    the stats say which). Preserves: nothing.
    Declines (reported): grouped/depthwise/transposed convs, already factorized layers, shared
    modules, fewer than 4 response samples per filter, layers whose factorization would not
    reduce MACs (unless ``allow_costlier``).
    Exact: no; at d' = d (``rank=full,allow_costlier=true``) it reproduces the layer to ~1e-6.
    """

    name: ClassVar[str] = "channel-lowrank"
    kinds: ClassVar[tuple[type, ...]] = (nn.Conv2d,)

    rank: str | int | float = 0.95  # per layer (see fc-svd's rank): energy of the responses by default
    nonlinear: bool = False  # fit through the following ReLU (the paper's nonlinear reconstruction)
    asymmetric: bool = False  # fit the compressed network's inputs to the original's responses
    refine_steps: int = 0  # RMSProp steps refining the factors on the responses (0: closed form only)
    refine_lr: float = 1e-4  # learning rate of the refinement
    max_samples: int = 16384  # response samples kept per layer (memory bound)
    seed: int = 0  # seed of the response sampling

    def validate(self) -> None:
        super().validate()
        if self.refine_steps < 0:
            raise PassConfigError(f"{self.name}: option refine_steps must be >= 0, got {self.refine_steps}")
        if not self.refine_lr > 0:
            raise PassConfigError(f"{self.name}: option refine_lr must be > 0, got {self.refine_lr}")
        if self.max_samples < 1:
            raise PassConfigError(f"{self.name}: option max_samples must be >= 1, got {self.max_samples}")

    def plan_layer(self, gm, node, module, in_shape, out_shape, macs, ctx, graph) -> ChannelPlan:
        batches = ctx.calibration_batches(graph)
        y, teacher = None, "input graph"
        if self.asymmetric and ctx.reference is not None:  # the original network's responses
            y = sampled_responses(ctx.reference.gm, node.name, module, batches, self.max_samples, self.seed)
            teacher = "reference" if y is not None else teacher
        if y is None:
            y = sampled_responses(graph.gm, node.name, module, batches, self.max_samples, self.seed)
        if y is None:
            raise Decline("cannot collect the layer's responses on the calibration data")
        d = module.out_channels
        if len(y) < MIN_SAMPLES_PER_FILTER * d:
            raise Decline(f"only {len(y)} response samples for {d} filters; the covariance needs "
                          f">= {MIN_SAMPLES_PER_FILTER * d} (give more calibration data)")
        return ChannelPlan(node.name, str(node.target), module, in_shape, out_shape, macs, owner=self,
                           y=y, relu=_relu_follows(gm, node), teacher=teacher, gm=gm, batches=batches)

    def run(self, graph, ctx) -> PassResult:
        result = super().run(graph, ctx)
        if result.changed:
            gm = result.graph.gm
            fits = {}
            for n in gm.graph.nodes:
                if n.op == "call_module" and n.name in result.stats.get("ranks", {}):
                    fits[n.name] = getattr(gm.get_submodule(n.target), "fit", None)
            result.stats["fit"] = fits
            result.stats["calibration"] = ctx.calibration_source
        return result
