"""flatten-conv: each 3-D filter as a sum of separable (channel x vertical x horizontal) terms.

Two fits of the 1-D filters, per layer:

filter  the weights alone: a rank-r CP of every C x Kh x Kw filter by batched ALS (below),
        minimising ||W_n - W^_n||_F (the default when there is no calibration data).
data    the layer's responses on calibration data (the paper's setting: a flattened layer
        should reproduce the layer's outputs, not its weights). A response is
        y_n(p) = <W_n, x_p> + b_n for the input patch x_p (im2col row, D = C Kh Kw values) at
        position p; with the bias refitted (b^_n = b_n + <W_n - W^_n, mu>, mu the mean patch)
        the mean squared response error of filter n is exactly
        (W_n - W^_n)^T Sigma (W_n - W^_n), Sigma the patch covariance (the uncentered second
        moment when the layer has no bias). So the data fit is a CP of each filter in the
        Sigma-weighted norm: alternating least squares over the three 1-D factor sets (each
        step an exact least-squares solve, so the error never rises), started from the filter
        fit, with Sigma estimated from at most ``max_samples`` seeded random positions of the
        calibration inputs. A small ridge (``RIDGE`` x the mean patch variance, in weight
        space) keeps directions the data never excites at their filter-fit values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from slimgraph.errors import PassConfigError
from slimgraph.passes.base import PassResult, register_pass
from slimgraph.passes.lowrank.common import (
    Decline,
    LayerPlan,
    LowRankPass,
    conv2d_geometry,
)
from slimgraph.passes.toolkit.capture import stream

RECONSTRUCT = ("filter", "data", "auto")
RIDGE = 1e-3  # weight-space ridge of the data fit, relative to the mean patch variance
CHUNK_ELEMENTS = 1 << 23  # float64 elements of one ALS intermediate (64 MiB): filters per chunk
# Work budget of one layer's data fit: a sweep costs ~N D^2 r (r + 2) multiply-adds (about 3e9 a
# second on one core, so ~10 s), and the sweeps are cut to fit. Collecting the patch moments
# costs max_samples x D^2 once per layer.
DATA_FIT_FLOPS = 3e10


def exact_terms(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact separable expansion of every filter of W (N, C, Kh, Kw), float64.

    Slicing a C x Kh x Kw filter along Kw gives Kw matrices C x Kh; the SVD of each gives
    min(C, Kh) rank-1 terms alpha (x) beta (x) e_j. (Or the same along Kh, whichever is fewer
    terms.) Returns (alpha (N, T, C), beta (N, T, Kh), gamma (N, T, Kw), strength (N, T)).
    """
    n, c, kh, kw = w.shape
    if kw * min(c, kh) <= kh * min(c, kw):
        u, s, vt = torch.linalg.svd(w.permute(0, 3, 1, 2), full_matrices=False)  # (N, Kw, C, q)
        q = s.shape[-1]
        alpha = (u * s[..., None, :]).permute(0, 1, 3, 2).reshape(n, kw * q, c)
        beta = vt.reshape(n, kw * q, kh)
        gamma = torch.eye(kw, dtype=w.dtype)[:, None, :].expand(kw, q, kw).reshape(1, kw * q, kw).expand(n, -1, -1)
        return alpha, beta, gamma.clone(), s.reshape(n, kw * q)
    u, s, vt = torch.linalg.svd(w.permute(0, 2, 1, 3), full_matrices=False)  # (N, Kh, C, q)
    q = s.shape[-1]
    alpha = (u * s[..., None, :]).permute(0, 1, 3, 2).reshape(n, kh * q, c)
    gamma = vt.reshape(n, kh * q, kw)
    beta = torch.eye(kh, dtype=w.dtype)[:, None, :].expand(kh, q, kh).reshape(1, kh * q, kh).expand(n, -1, -1)
    return alpha, beta.clone(), gamma, s.reshape(n, kh * q)


def _solve(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """rhs (N, D, R) @ pinv(gram (N, R, R))."""
    return rhs @ torch.linalg.pinv(gram, hermitian=True)


def separable_fit(w: torch.Tensor, r: int, n_iter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-r CP of each filter by batched ALS, started from the r strongest exact terms.

    Returns A (N, C, r), B (N, Kh, r), G (N, Kw, r) with W[n] ~ sum_r A[n,:,r] (x) B[n,:,r] (x) G[n,:,r].
    """
    alpha, beta, gamma, strength = exact_terms(w)
    if r >= strength.shape[1]:
        return alpha.transpose(1, 2), beta.transpose(1, 2), gamma.transpose(1, 2)
    top = strength.argsort(dim=1, descending=True)[:, :r]

    def pick(x):
        return torch.gather(x, 1, top[..., None].expand(-1, -1, x.shape[-1])).transpose(1, 2)

    a, b, g = pick(alpha), pick(beta), pick(gamma)
    for _ in range(n_iter):
        a = _solve((b.mT @ b) * (g.mT @ g), torch.einsum("ncij,nir,njr->ncr", w, b, g))
        b = _solve((a.mT @ a) * (g.mT @ g), torch.einsum("ncij,ncr,njr->nir", w, a, g))
        g = _solve((a.mT @ a) * (b.mT @ b), torch.einsum("ncij,ncr,nir->njr", w, a, b))
    return a, b, g


# ---------------------------------------------------------------------- calibration statistics
@dataclass(frozen=True)
class PatchMoments:
    """First and second moments of a conv's input patches (im2col rows, (c, i, j) order), float64."""

    mean: torch.Tensor  # (D,)
    second: torch.Tensor  # (D, D): E[x x^T]
    count: int

    def weight_metric(self, centered: bool) -> torch.Tensor:
        """Sigma: the covariance (centered, with a refitted bias) or the second moment."""
        return self.second - torch.outer(self.mean, self.mean) if centered else self.second


def sample_patches(x: torch.Tensor, conv: nn.Conv2d, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` input patches (count, C*Kh*Kw) of ``conv`` at uniformly drawn output positions
    of the batch ``x`` (all of them when there are fewer), float64; only the sampled patches
    are materialised."""
    geo = conv2d_geometry(conv)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geo.kernel, geo.stride, geo.padding, geo.dilation
    b, c, h, w = x.shape
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    total = b * oh * ow
    idx = torch.randperm(total, generator=gen)[:count] if count < total else torch.arange(total)
    bi, rest = idx // (oh * ow), idx % (oh * ow)
    rows = (rest // ow * sh)[:, None] + torch.arange(kh) * dh  # (q, Kh)
    cols = (rest % ow * sw)[:, None] + torch.arange(kw) * dw  # (q, Kw)
    xp = F.pad(x.double(), (pw, pw, ph, ph))
    patches = xp[bi[:, None, None, None], torch.arange(c)[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]
    return patches.reshape(len(idx), c * kh * kw)


def patch_moments(graph, ctx, node: str, conv: nn.Conv2d, max_samples: int,
                  seed: int) -> PatchMoments | None:
    """Moments of the patches ``conv`` (called at ``node``) sees when ``graph`` runs on the
    calibration batches: at most ``max_samples`` positions, spread over the batches by size,
    seeded (toolkit ``stream``)."""
    batches = ctx.calibration_batches(graph)
    total = sum(len(b[0]) for b in batches)
    acc: dict[str, Any] = {"sum": 0.0, "outer": 0.0, "n": 0}

    def visit(_, x: torch.Tensor, j: int) -> None:
        quota = math.ceil(max_samples * len(x) / max(total, 1))
        gen = torch.Generator().manual_seed(seed * 100_003 + j)
        p = sample_patches(x, conv, quota, gen)
        acc["sum"] = acc["sum"] + p.sum(dim=0)
        acc["outer"] = acc["outer"] + p.T @ p
        acc["n"] += len(p)

    stream(graph.gm, batches, [node], visit, inputs=True)
    if not acc["n"]:
        return None
    return PatchMoments(acc["sum"] / acc["n"], acc["outer"] / acc["n"], acc["n"])


# ---------------------------------------------------------------------- the data fit


def _grams(sig: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """K^T Sigma K per filter, (n, d_m r, d_m r), for Sigma as (m, a, b, m', a', b') and the
    other two modes' outer products u (n, a, b, r); in whichever contraction order needs the
    smaller intermediate (both touch all of Sigma once per filter)."""
    dm, n, r = sig.shape[0], len(u), u.shape[-1]
    k = sig[0, ..., 0, 0, 0].numel()
    if k * k * r <= dm * dm * k:  # Sigma as (m m', ab a'b') @ (u (x) u): few other-mode entries
        uu = torch.einsum("nkr,nls->klnrs", u.reshape(n, k, r), u.reshape(n, k, r)).reshape(k * k, -1)
        sig2 = sig.permute(0, 3, 1, 2, 4, 5).reshape(dm * dm, k * k)
        return (sig2 @ uu).reshape(dm, dm, n, r, r).permute(2, 0, 3, 1, 4).reshape(n, dm * r, dm * r)
    su = torch.einsum("xabyde,nder->nxabyr", sig, u)
    return torch.einsum("nabr,nxabys->nxrys", u, su).reshape(n, dm * r, dm * r)


def _weighted_mode_step(w_metric: torch.Tensor, t: torch.Tensor, factors: list[torch.Tensor],
                        mode: int) -> torch.Tensor:
    """The least-squares update of factor ``mode`` (N, d_m, r) in the Sigma-weighted norm.

    ``w_metric`` is Sigma as (C, Kh, Kw, C, Kh, Kw); ``t`` = Sigma W as (N, C, Kh, Kw). With
    the other two factors fixed, W^ is linear in this one: W^ = K x; the normal equations are
    (K^T Sigma K) x = K^T Sigma W, one (d_m r)-square system per filter.
    """
    others = [k for k in range(3) if k != mode]
    order = [mode, *others]
    sig = w_metric.permute(*order, *(3 + k for k in order)).contiguous()  # (m, a, b, m', a', b')
    rhs_t = t.permute(0, *(1 + k for k in order))  # (N, m, a, b)
    f1, f2 = factors[others[0]], factors[others[1]]
    n, dm, r = len(t), sig.shape[0], f1.shape[-1]
    k = sig.numel() // (dm * dm)
    per_filter = min(k * k * r * r + dm * dm * r * r, k * dm * dm * r) + (dm * r) ** 2
    chunk = max(1, CHUNK_ELEMENTS // per_filter)
    out = []
    for s in range(0, n, chunk):
        u = torch.einsum("nar,nbr->nabr", f1[s:s + chunk], f2[s:s + chunk])  # (n', a, b, r)
        gram = _grams(sig, u)
        rhs = torch.einsum("nxab,nabr->nxr", rhs_t[s:s + chunk], u).reshape(-1, dm * r, 1)
        jitter = 1e-12 * gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp(min=1e-300)
        gram = gram + jitter[:, None, None] * torch.eye(dm * r, dtype=gram.dtype)
        out.append(torch.linalg.solve(gram, rhs).reshape(-1, dm, r))
    return torch.cat(out)


def _weighted_error(w: torch.Tensor, factors: list[torch.Tensor], metric: torch.Tensor) -> torch.Tensor:
    """Per-filter (W - W^)^T Sigma (W - W^) for ``metric`` Sigma (D, D)."""
    d = (w - torch.einsum("ncr,nir,njr->ncij", *factors)).reshape(len(w), -1)
    return torch.einsum("nd,de,ne->n", d, metric, d)


def _balance(factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Rescale each term's three 1-D filters to equal norms (the product is unchanged)."""
    norms = [f.norm(dim=1, keepdim=True) for f in factors]
    if any(bool((nm == 0).any()) for nm in norms):
        return factors
    geo = (norms[0] * norms[1] * norms[2]) ** (1 / 3)
    return [f * (geo / nm) for f, nm in zip(factors, norms, strict=True)]


def data_sweeps(shape: torch.Size, r: int, n_iter: int) -> int:
    """``n_iter`` cut to the per-layer work budget ``DATA_FIT_FLOPS``."""
    n, c, kh, kw = shape
    return min(n_iter, int(DATA_FIT_FLOPS // (n * (c * kh * kw) ** 2 * r * (r + 2))))


def data_fit(w: torch.Tensor, factors: list[torch.Tensor], metric: torch.Tensor,
             n_iter: int) -> list[torch.Tensor]:
    """``n_iter`` ALS sweeps of the three 1-D factor sets minimising the Sigma-weighted error,
    from ``factors``; the best iterate (per filter) under the ridged metric, never worse than
    the start."""
    n, c, kh, kw = w.shape
    dim = c * kh * kw
    ridged = metric.clone()
    ridged.diagonal().add_(RIDGE * float(metric.diagonal().mean().clamp(min=1e-30)))
    sig = ridged.reshape(c, kh, kw, c, kh, kw)
    t = (w.reshape(n, dim) @ ridged).reshape(n, c, kh, kw)
    best, best_err = [f.clone() for f in factors], _weighted_error(w, factors, ridged)
    current = list(factors)
    for _ in range(n_iter):
        for mode in range(3):
            current[mode] = _weighted_mode_step(sig, t, current, mode)
        current = _balance(current)
        err = _weighted_error(w, current, ridged)
        better = err < best_err
        best = [torch.where(better[:, None, None], cur, b) for cur, b in zip(current, best, strict=True)]
        best_err = torch.minimum(err, best_err)
    return best


# ---------------------------------------------------------------------- the layer plan
class FlattenPlan(LayerPlan):
    method = "flatten-conv"

    def __init__(self, *args, n_iter: int, owner: FlattenConv | None = None, calibration=None):
        """``calibration``: (graph, ctx) to take the layer's input patches from (data fit), or None."""
        super().__init__(*args)
        self.n_iter, self.owner, self.calibration = n_iter, owner, calibration
        self._moments: PatchMoments | None = None

    def moments(self) -> PatchMoments | None:
        """The layer's input-patch moments on the calibration batches (collected once, on demand)."""
        if self.calibration is not None and self._moments is None:
            graph, ctx = self.calibration
            self._moments = patch_moments(graph, ctx, self.node, self.module, self.owner.max_samples,
                                          self.owner.seed)
            if self._moments is None:
                raise Decline("data reconstruction: the layer saw no calibration input")
        return self._moments

    @property
    def full_ranks(self) -> tuple[int, ...]:
        _, c, kh, kw = self.module.weight.shape
        return (min(kw * min(c, kh), kh * min(c, kw)),)

    def layers(self, ranks, device=None) -> list[nn.Module]:
        (r,), m = ranks, self.module
        n = m.out_channels
        g = conv2d_geometry(m)
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = g.kernel, g.stride, g.padding, g.dilation
        return [nn.Conv2d(m.in_channels, n * r, 1, bias=False, device=device),
                nn.Conv2d(n * r, n * r, (kh, 1), (sh, 1), (ph, 0), (dh, 1), groups=n * r, bias=False,
                          device=device),
                nn.Conv2d(n * r, n, (1, kw), (1, sw), (0, pw), (1, dw), groups=n,
                          bias=m.bias is not None, device=device)]

    def fit(self, r: int) -> tuple[list[torch.Tensor], torch.Tensor | None, dict[str, Any]]:
        """Factors A, B, G, the bias and a record of the fit (which one, response errors)."""
        w = self.module.weight.detach().double().cpu()
        bias = self.module.bias.detach().double().cpu() if self.module.bias is not None else None
        factors = list(separable_fit(w, r, self.n_iter))
        record: dict[str, Any] = {"reconstruct": "filter"}
        moments = self.moments()
        if moments is None:
            return factors, bias, record
        metric = moments.weight_metric(centered=bias is not None)
        flat = w.reshape(len(w), -1)
        energy = max(float(torch.einsum("nd,de,ne->", flat, metric, flat)), 1e-300)

        def response_error(fs) -> float:  # relative RMS response error on the calibration patches
            return round(math.sqrt(max(float(_weighted_error(w, fs, metric).sum()), 0.0) / energy), 6)

        record.update(samples=moments.count, filter_response_error=response_error(factors))
        if r >= self.full_ranks[0] or (self.owner.reconstruct == "auto"
                                       and record["filter_response_error"] <= self.owner.tolerance):
            return factors, bias, record
        sweeps = data_sweeps(w.shape, r, self.owner.data_iter)
        factors = data_fit(w, factors, metric, sweeps)
        record.update(reconstruct="data", data_sweeps=sweeps, data_response_error=response_error(factors))
        if bias is not None:  # the response error's mean goes into the bias
            approx = torch.einsum("ncr,nir,njr->ncij", *factors)
            bias = bias + (w - approx).reshape(len(w), -1) @ moments.mean
        return factors, bias, record

    def build(self, ranks):
        (r,) = ranks
        n, c, kh, kw = self.module.weight.shape
        (a, b, g), bias, record = self.fit(r)
        lateral, vertical, horizontal = self.layers(ranks)
        with torch.no_grad():
            lateral.weight.copy_(a.transpose(1, 2).reshape(n * r, c)[:, :, None, None])
            vertical.weight.copy_(b.transpose(1, 2).reshape(n * r, kh)[:, None, :, None])
            horizontal.weight.copy_(g.transpose(1, 2)[:, :, None, :])
            if horizontal.bias is not None:
                horizontal.bias.copy_(bias)
        out = self.factorized([lateral, vertical, horizontal], ranks)
        out.fit = record
        return out


@register_pass
@dataclass(frozen=True)
class FlattenConv(LowRankPass):
    """Flattened convolutions: lateral 1x1 (C -> N*r), vertical Kx1 depthwise, horizontal 1xK.

    Jin, Dundar, Culurciello, "Flattened convolutional neural networks for feedforward
    acceleration", ICLR 2015 workshop (arXiv 1412.5474). The paper trains each 3-D filter
    (C x Kh x Kw) as one rank-1 product of 1-D filters (channel, vertical, horizontal); here a
    trained filter is approximated post hoc by a sum of ``rank`` such products (rank 1 is the
    paper's form). The network becomes: 1x1 conv C -> N*r (no bias), Kx1 depthwise conv on N*r
    channels (stride/padding/dilation along H), and a 1xK grouped conv N*r -> N with N groups
    (along W), which applies each term's horizontal filter and sums a filter's r terms in one
    layer (bias here). With rank >= min(Kw min(C, Kh), Kh min(C, Kw)) ("full") the expansion is
    exact. The 1-D filters are fitted to the weights (CP-ALS of each filter, started from its
    strongest exact separable terms) and then, with ``reconstruct``, to the layer's responses
    on calibration data (see the module docstring):
    ``reconstruct="filter"`` weights only; ``"data"`` always refit on the calibration batches
    (seeded random inputs if the user gave none); ``"auto"`` (default) refit when the user gave
    calibration data and the filter fit's relative response error exceeds ``tolerance``.
    Options: ``rank`` (int terms per filter, default 2; "frac=F", "macs=F", "full"; energy and
    "vbmf" are declined: no rank-revealing unfolding), ``n_iter`` (filter ALS sweeps),
    ``reconstruct``, ``data_iter`` (data ALS sweeps), ``max_samples`` (patch positions per
    layer), ``tolerance``, ``seed`` (position sampling), plus the common ``target_macs``,
    ``grid``, ``fidelity``, ``allow_costlier``. ``stats["fit"]`` says per layer which fit was
    used and its relative response error on the calibration patches. Bounded: at most
    ``max_samples`` patches per layer, and the data sweeps are cut to a per-layer work budget
    (``DATA_FIT_FLOPS``, ~10 s on one core; ``stats["fit"][layer]["data_sweeps"]`` says how
    many ran; with none, only the bias is refitted). On the trained digits CNN the default
    (rank 2, data fit) keeps 99.7% top-1 agreement at 0.28x MACs; the filter fit alone keeps
    89% at rank 2 and 25% at rank 1 (tools/defaults_eval.py).
    Requires: shapes, cost (and calibration batches for the data fit). Preserves: nothing.
    Declines (reported): 1x1 convs, grouped/depthwise/transposed convs, Conv1d/Conv3d, non-zero
    padding modes, shared modules, already factorized layers, ranks above full, factorizations
    costing >= the original MACs.
    Exact: no (exact at full rank); fidelity recorded by the pass manager.
    """

    name: ClassVar[str] = "flatten-conv"
    pointwise_decline: ClassVar[str | None] = "already a channel-only (lateral) filter"

    rank: str | int | float = 2  # separable terms per filter (see fc-svd's rank)
    n_iter: int = 50  # ALS iterations of the weight-only fit
    reconstruct: str = "auto"  # filter (weights), data (the layer's responses) or auto (data when the user gave calibration and the weight fit is poor)
    data_iter: int = 20  # ALS sweeps of the data fit
    max_samples: int = 16384  # input patches sampled per layer for the data fit
    tolerance: float = 0.02  # auto: response error of the weight fit above which the data fit runs
    seed: int = 0  # seed of the patch sampling

    def validate(self) -> None:
        super().validate()
        checks = [
            (self.n_iter >= 0, f"n_iter must be >= 0, got {self.n_iter}"),
            (self.reconstruct in RECONSTRUCT, f"reconstruct must be one of {', '.join(RECONSTRUCT)}, "
                                              f"got {self.reconstruct!r}"),
            (self.data_iter >= 0, f"data_iter must be >= 0, got {self.data_iter}"),
            (self.max_samples >= 1, f"max_samples must be >= 1, got {self.max_samples}"),
            (self.tolerance >= 0, f"tolerance must be >= 0, got {self.tolerance}"),
        ]
        for ok, message in checks:
            if not ok:
                raise PassConfigError(f"flatten-conv: option {message}")

    def uses_data(self, ctx) -> bool:
        return self.reconstruct == "data" or (self.reconstruct == "auto" and ctx.calibration is not None)

    def plan_layer(self, gm, node, module, in_shape, out_shape, macs, ctx, graph):
        return FlattenPlan(node.name, node.target, module, in_shape, out_shape, macs, n_iter=self.n_iter,
                           owner=self, calibration=(graph, ctx) if self.uses_data(ctx) else None)

    def run(self, graph, ctx) -> PassResult:
        result = super().run(graph, ctx)
        if result.changed:
            gm = result.graph.gm
            result.stats["fit"] = {n.name: getattr(gm.get_submodule(n.target), "fit", None)
                                   for n in gm.graph.nodes if n.name in result.stats.get("ranks", {})}
            result.stats["calibration"] = ctx.calibration_source if self.uses_data(ctx) else None
        return result
