"""Empirical variational Bayesian matrix factorization (EVBMF): rank and noise estimation.

Implements the global analytic solution of fully observed VBMF with the noise variance
estimated by minimizing the free energy (empirical VB), from

    S. Nakajima, M. Sugiyama, S. D. Babacan, R. Tomioka. "Global analytic solution of
    fully-observed variational Bayesian matrix factorization." JMLR 14 (2013), 1-37;
    S. Nakajima, R. Tomioka, M. Sugiyama, S. D. Babacan. "Condition for perfect
    dimensionality recovery by variational Bayesian PCA." JMLR 16 (2015), 3757-3811.

For ``Y = B A^T + E`` (L x M, L <= M, E Gaussian with variance sigma^2) with singular values
gamma_h, the EVB estimator keeps a component iff

    gamma_h > gamma_EVB = sigma * sqrt(M * (1 + tau) * (1 + alpha / tau)),  alpha = L / M,

with tau ~= 2.5129 sqrt(alpha) (the paper's approximation of the threshold constant), and
shrinks it to

    gamma_hat = gamma_h / 2 * (1 - (L + M) sigma^2 / gamma_h^2
                               + sqrt((1 - (L + M) sigma^2 / gamma_h^2)^2 - 4 L M sigma^4 / gamma_h^4)).

sigma^2 minimizes the (scaled) free energy, with x_h = gamma_h^2 / (M sigma^2),

    F(sigma^2) = sum_{x_h <= x_} (x_h - log x_h)
               + sum_{x_h > x_} (x_h - t(x_h) + log((t(x_h) + 1) / x_h) + alpha log(t(x_h) / alpha + 1))
               + residual / (M sigma^2) + (L - H) log sigma^2,
    t(x) = (x - (1 + alpha) + sqrt((x - (1 + alpha))^2 - 4 alpha)) / 2,   x_ = (1 + tau)(1 + alpha / tau),

over the paper's bracket [max(gamma_{e+1}^2 / (M x_), mean_{h>e} gamma_h^2 / M), ||Y||_F^2 / (L M)].
We search that bracket on a log grid and refine the best cell with bounded Brent (the free
energy is not always unimodal). Tucker-2 rank selection (Kim et al. ICLR 2016) applies this to
the mode-0 and mode-1 unfoldings of a conv kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

TAU_CONSTANT = 2.5129  # tau_ = 2.5129 sqrt(alpha) (Nakajima et al. 2013)


@dataclass(frozen=True)
class VBMFResult:
    rank: int  # number of components the EVB solution keeps
    sigma2: float  # estimated (or given) noise variance
    threshold: float  # singular-value threshold gamma_EVB
    singular_values: np.ndarray  # of Y (descending)
    estimates: np.ndarray  # shrunk singular values of the kept components (length rank)


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    d = x - (1.0 + alpha)
    return 0.5 * (d + np.sqrt(np.maximum(d * d - 4.0 * alpha, 0.0)))


def _free_energy(sigma2: float, L: int, M: int, s: np.ndarray, residual: float, xbar: float) -> float:
    alpha = L / M
    x = s**2 / (M * sigma2)
    big, small = x[x > xbar], x[x <= xbar]
    small = np.maximum(small, 1e-300)
    t = _tau(big, alpha)
    value = (np.sum(small - np.log(small)) + np.sum(big - t) + np.sum(np.log((t + 1.0) / big))
             + alpha * np.sum(np.log(t / alpha + 1.0)))
    return float(value + residual / (M * sigma2) + (L - len(s)) * np.log(sigma2))


def _estimate_sigma2(L: int, M: int, s: np.ndarray, residual: float, xbar: float) -> float:
    H = len(s)
    alpha = L / M
    e_ub = int(min(np.ceil(L / (1.0 + alpha)) - 1, H)) - 1
    upper = (np.sum(s**2) + residual) / (L * M)
    tail = s[e_ub + 1:] if e_ub + 1 < H else s[-1:]
    lower = max(tail[0] ** 2 / (M * xbar), float(np.mean(tail**2)) / M)
    if not upper > 0:
        return 0.0
    lower = min(max(lower, upper * 1e-12), upper)
    if lower >= upper:
        return float(upper)
    grid = np.geomspace(lower, upper, 200)
    values = [_free_energy(g, L, M, s, residual, xbar) for g in grid]
    i = int(np.argmin(values))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    if hi <= lo:
        return float(grid[i])
    res = minimize_scalar(_free_energy, args=(L, M, s, residual, xbar), bounds=(lo, hi),
                          method="bounded", options={"xatol": lo * 1e-6})
    return float(res.x) if res.fun <= values[i] else float(grid[i])


def evbmf(Y: np.ndarray, sigma2: float | None = None) -> VBMFResult:
    """EVBMF of a matrix: the rank VB keeps and the noise variance (estimated unless given)."""
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim != 2 or min(Y.shape) == 0:
        raise ValueError(f"evbmf needs a non-empty matrix, got shape {Y.shape}")
    if Y.shape[0] > Y.shape[1]:
        Y = Y.T
    L, M = Y.shape
    s = np.linalg.svd(Y, compute_uv=False)
    H = L
    residual = 0.0  # all L components are kept in s, so nothing is left over
    alpha = L / M
    tau = TAU_CONSTANT * np.sqrt(alpha)
    xbar = (1.0 + tau) * (1.0 + alpha / tau)
    if sigma2 is None:
        sigma2 = _estimate_sigma2(L, M, s[:H], residual, xbar)
    if sigma2 <= 0:  # an all-zero matrix: nothing to keep
        return VBMFResult(0, 0.0, 0.0, s, np.zeros(0))
    threshold = float(np.sqrt(M * sigma2 * xbar))
    keep = s[s > threshold]
    q = (L + M) * sigma2 / keep**2
    est = keep / 2.0 * (1.0 - q + np.sqrt(np.maximum((1.0 - q) ** 2 - 4.0 * L * M * sigma2**2 / keep**4, 0.0)))
    return VBMFResult(len(keep), float(sigma2), threshold, s, est)


def vbmf_rank(Y: np.ndarray) -> int:
    """The rank EVBMF keeps for ``Y`` (0 when ``Y`` is indistinguishable from noise)."""
    return evbmf(Y).rank
