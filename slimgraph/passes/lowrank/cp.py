"""cp: CP decomposition of a conv kernel into 1x1, Kx1 depthwise, 1xK depthwise, 1x1 convs."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from tensorly.decomposition._cp import initialize_cp
from torch import nn

from slimgraph.errors import PassConfigError
from slimgraph.passes.base import register_pass
from slimgraph.passes.lowrank.common import (
    Decline,
    LayerPlan,
    LowRankPass,
    conv2d_geometry,
)
from slimgraph.passes.lowrank.tucker2 import unfold


def exact_cp(w: np.ndarray) -> list[np.ndarray]:
    """An exact CP of W (T, S, Kh, Kw) with R = min(S, T) * Kh * Kw terms (one per slice entry)."""
    t, s, kh, kw = w.shape
    eye_h, eye_w = np.eye(kh), np.eye(kw)
    if s <= t:  # term (c, i, j): a_S = e_c, a_h = e_i, a_w = e_j, a_T = W[:, c, i, j]
        idx = np.array([(c, i, j) for c in range(s) for i in range(kh) for j in range(kw)])
        return [w[:, idx[:, 0], idx[:, 1], idx[:, 2]], np.eye(s)[:, idx[:, 0]], eye_h[:, idx[:, 1]], eye_w[:, idx[:, 2]]]
    idx = np.array([(n, i, j) for n in range(t) for i in range(kh) for j in range(kw)])
    return [np.eye(t)[:, idx[:, 0]], w[idx[:, 0], :, idx[:, 1], idx[:, 2]].T, eye_h[:, idx[:, 1]], eye_w[:, idx[:, 2]]]


_MTTKRP = ("tsij,sr,ir,jr->tr", "tsij,tr,ir,jr->sr", "tsij,tr,sr,jr->ir", "tsij,tr,sr,ir->jr")


def cp_als(w: torch.Tensor, factors: list[torch.Tensor], n_iter: int, tol: float = 1e-9) -> list[torch.Tensor]:
    """CP-ALS sweeps on a 4-way tensor (the updates of ``tensorly.parafac``, vectorized with
    einsum; TensorLy's own loop is ~100x slower on conv kernels). Stops when the relative
    error changes by less than ``tol``."""
    norm = torch.linalg.norm(w)
    prev = math.inf
    for _ in range(n_iter):
        for mode in range(4):
            others = [f for k, f in enumerate(factors) if k != mode]
            gram = (others[0].T @ others[0]) * (others[1].T @ others[1]) * (others[2].T @ others[2])
            rhs = torch.einsum(_MTTKRP[mode], w, *others)
            factors[mode] = rhs @ torch.linalg.pinv(gram, hermitian=True)
        err = float(torch.linalg.norm(w - torch.einsum("tr,sr,ir,jr->tsij", *factors)) / norm)
        if not math.isfinite(err) or abs(prev - err) < tol:
            break
        prev = err
    return factors


def cp_factors(w: np.ndarray, r: int, n_iter: int) -> tuple[list[np.ndarray], float]:
    """Rank-r CP of W by ALS from TensorLy's SVD initialization (seed 0); (factors, rel. error).

    Factors are [A_T (T, r), A_S (S, r), A_h (Kh, r), A_w (Kw, r)] with the CP weights folded
    into A_T. The relative error may be non-finite when ALS diverges (low-rank CP is unstable).
    """
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        init = initialize_cp(w, r, init="svd", random_state=0)
    weights, factors = init
    factors = [torch.from_numpy(np.array(f, dtype=np.float64)) for f in factors]
    factors[0] = factors[0] * torch.from_numpy(np.array(weights, dtype=np.float64))[None, :]
    wt = torch.from_numpy(w)
    factors = cp_als(wt, factors, n_iter)
    approx = torch.einsum("tr,sr,ir,jr->tsij", *factors)
    norm = float(torch.linalg.norm(wt))
    err = float(torch.linalg.norm(wt - approx)) / norm if norm > 0 else float(torch.linalg.norm(approx))
    return [f.numpy() for f in factors], err


class CpPlan(LayerPlan):
    method = "cp"

    def __init__(self, *args, n_iter: int, max_rel_error: float):
        super().__init__(*args)
        self.n_iter, self.max_rel_error = n_iter, max_rel_error

    def _weight(self) -> np.ndarray:
        return self.module.weight.detach().double().cpu().numpy()

    @property
    def full_ranks(self) -> tuple[int, ...]:
        t, s, kh, kw = self.module.weight.shape
        return (min(s, t) * kh * kw,)

    def unfoldings(self) -> tuple[np.ndarray, ...]:
        w = self._weight()
        return (unfold(w, 1), unfold(w, 0))

    def from_unfolding_ranks(self, ranks):
        # The CP rank is at least each mode's matrix rank: take the larger channel-mode rank.
        return (min(max(ranks), self.full_ranks[0]),)

    def layers(self, ranks, device=None) -> list[nn.Module]:
        (r,), m = ranks, self.module
        g = conv2d_geometry(m)
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = g.kernel, g.stride, g.padding, g.dilation
        return [nn.Conv2d(m.in_channels, r, 1, bias=False, device=device),
                nn.Conv2d(r, r, (kh, 1), (sh, 1), (ph, 0), (dh, 1), groups=r, bias=False, device=device),
                nn.Conv2d(r, r, (1, kw), (1, sw), (0, pw), (1, dw), groups=r, bias=False, device=device),
                nn.Conv2d(r, m.out_channels, 1, bias=m.bias is not None, device=device)]

    def build(self, ranks):
        (r,) = ranks
        w = self._weight()
        if r >= self.full_ranks[0]:
            factors, err = exact_cp(w), 0.0
        else:
            factors, err = cp_factors(w, r, self.n_iter)
        if not np.isfinite(err) or not all(np.isfinite(f).all() for f in factors):
            raise Decline(f"CP-ALS diverged at rank {r} (non-finite factors)")
        if err > self.max_rel_error:
            raise Decline(f"CP rank {r} relative reconstruction error {err:.3g} > max_rel_error "
                          f"{self.max_rel_error:g} (unstable or too low rank)")
        a_t, a_s, a_h, a_w = (torch.from_numpy(np.ascontiguousarray(f)) for f in factors)
        layers = self.layers(ranks)
        with torch.no_grad():
            layers[0].weight.copy_(a_s.T[:, :, None, None])
            layers[1].weight.copy_(a_h.T[:, None, :, None])
            layers[2].weight.copy_(a_w.T[:, None, None, :])
            layers[3].weight.copy_(a_t[:, :, None, None])
            if layers[3].bias is not None:
                layers[3].bias.copy_(self.module.bias.detach())
        return self.factorized(layers, ranks)


@register_pass
@dataclass(frozen=True)
class Cp(LowRankPass):
    """CP-decomposed convolution: 1x1 (S -> R), Kx1 depthwise, 1xK depthwise, 1x1 (R -> T).

    Lebedev, Ganin, Rakhuba, Oseledets, Lempitsky, "Speeding-up convolutional neural networks
    using fine-tuned CP-decomposition", ICLR 2015. The 4-way kernel is fitted by CP-ALS from
    TensorLy's SVD initialization (seed 0) with the ``parafac`` updates vectorized in torch
    (TensorLy's loop is ~100x slower here; the paper uses NLS, which we do not have). Low-rank
    CP is unstable (degenerate, diverging components), so a layer whose relative
    reconstruction error is non-finite or above ``max_rel_error`` is declined with that error.
    Stride/padding/dilation split between the two depthwise convs as in spatial-svd. At the
    "full" rank min(S, T) * Kh * Kw an exact closed-form CP is used (for tests and analysis).
    Options: ``rank`` (an int, "macs=F", "frac=F", "full"; "vbmf"/energy pick the larger of the
    two channel-mode ranks, a heuristic lower bound of the CP rank; default "macs=0.5"),
    ``n_iter``, ``max_rel_error``, plus the common ``target_macs``, ``grid``, ``fidelity``,
    ``allow_costlier``.
    Requires: shapes, cost. Preserves: nothing.
    Declines (reported): 1x1 convs (use fc-svd), grouped/depthwise/transposed convs,
    Conv1d/Conv3d, non-zero padding modes, shared modules, already factorized layers, ranks
    above the full rank, diverged or inaccurate CP fits, factorizations costing >= the original.
    Exact: no; fidelity recorded by the pass manager.
    """

    name: ClassVar[str] = "cp"
    pointwise_decline: ClassVar[str | None] = "CP adds nothing over an SVD (use fc-svd)"

    rank: str | int | float = "macs=0.5"  # per layer (see fc-svd's rank); default: half the layer's MACs
    n_iter: int = 100  # CP-ALS iterations (TensorLy)
    max_rel_error: float = 0.5  # decline a layer whose CP fit leaves more relative weight error than this

    def validate(self) -> None:
        super().validate()
        if self.n_iter < 1:
            raise PassConfigError(f"cp: option n_iter must be >= 1, got {self.n_iter}")
        if not self.max_rel_error > 0:
            raise PassConfigError(f"cp: option max_rel_error must be > 0, got {self.max_rel_error}")

    def plan_layer(self, gm, node, module, in_shape, out_shape, macs, ctx, graph):
        return CpPlan(node.name, node.target, module, in_shape, out_shape, macs,
                      n_iter=self.n_iter, max_rel_error=self.max_rel_error)
