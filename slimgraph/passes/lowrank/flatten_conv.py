"""flatten-conv: each 3-D filter as a sum of separable (channel x vertical x horizontal) terms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimgraph.errors import PassConfigError
from slimgraph.passes.base import register_pass
from slimgraph.passes.lowrank.common import LayerPlan, LowRankPass, common_decline, conv2d_geometry


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


class FlattenPlan(LayerPlan):
    method = "flatten-conv"

    def __init__(self, *args, n_iter: int):
        super().__init__(*args)
        self.n_iter = n_iter

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

    def build(self, ranks):
        (r,) = ranks
        w = self.module.weight.detach().double().cpu()
        n, c, kh, kw = w.shape
        a, b, g = separable_fit(w, r, self.n_iter)
        lateral, vertical, horizontal = self.layers(ranks)
        with torch.no_grad():
            lateral.weight.copy_(a.transpose(1, 2).reshape(n * r, c)[:, :, None, None])
            vertical.weight.copy_(b.transpose(1, 2).reshape(n * r, kh)[:, None, :, None])
            horizontal.weight.copy_(g.transpose(1, 2)[:, :, None, :])
            if horizontal.bias is not None:
                horizontal.bias.copy_(self.module.bias.detach())
        return self.factorized([lateral, vertical, horizontal], ranks)


@register_pass
@dataclass(frozen=True)
class FlattenConv(LowRankPass):
    """Flattened convolutions: lateral 1x1 (C -> N*r), vertical Kx1 depthwise, horizontal 1xK.

    Jin, Dundar, Culurciello, "Flattened convolutional neural networks for feedforward
    acceleration", ICLR 2015 workshop (arXiv 1412.5474). The paper trains each 3-D filter
    (C x Kh x Kw) as one rank-1 product of 1-D filters (channel, vertical, horizontal); here a
    trained filter is approximated post hoc by a sum of ``rank`` such products (rank 1 is the
    paper's form), fitted per filter by batched alternating least squares (CP-ALS of each
    filter, started from its strongest exact separable terms). The network becomes: 1x1 conv
    C -> N*r (no bias), Kx1 depthwise conv on N*r channels (stride/padding/dilation along H),
    and a 1xK grouped conv N*r -> N with N groups (along W), which applies each term's
    horizontal filter and sums a filter's r terms in one layer (bias here).
    With rank >= min(Kw min(C, Kh), Kh min(C, Kw)) ("full") the expansion is exact.
    Options: ``rank`` (int terms per filter, default 1; "frac=F", "macs=F", "full"; energy and
    "vbmf" are declined: no rank-revealing unfolding), ``n_iter`` (ALS sweeps), plus the common
    ``target_macs``, ``grid``, ``fidelity``, ``allow_costlier``.
    Requires: shapes, cost. Preserves: nothing.
    Declines (reported): 1x1 convs, grouped/depthwise/transposed convs, Conv1d/Conv3d, non-zero
    padding modes, shared modules, already factorized layers, ranks above full, factorizations
    costing >= the original MACs.
    Exact: no (exact at full rank); fidelity recorded by the pass manager.
    """

    name: ClassVar[str] = "flatten-conv"

    rank: str | int | float = 1
    n_iter: int = 50

    def validate(self) -> None:
        super().validate()
        if self.n_iter < 0:
            raise PassConfigError(f"flatten-conv: option n_iter must be >= 0, got {self.n_iter}")

    def decline(self, gm, node, module, calls):
        reason = common_decline(gm, node, module, calls, self.kinds)
        if reason is None and tuple(module.kernel_size) == (1, 1):
            reason = "1x1 conv: already a channel-only (lateral) filter"
        return reason

    def plan_layer(self, gm, node, module, in_shape, out_shape, macs, am, graph):
        return FlattenPlan(node.name, node.target, module, in_shape, out_shape, macs, n_iter=self.n_iter)
