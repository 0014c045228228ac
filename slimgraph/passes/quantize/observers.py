"""Activation calibration: a tensor's values on calibration data -> its uint8 range.

Each ``Observer`` keeps a bounded, seeded random sample of the values it sees (at most
``MAX_SAMPLES`` per tensor, so memory stays small whatever the calibration set) plus the exact
min and max, and picks the clipping range by one of four rules:

``minmax``      [min, max] (Jacob et al. 2018)
``percentile``  [p_low, p_high] of the values (``percentile`` and 100 - it)
``entropy``     TensorRT's KL-divergence calibration (Migacz 2017): the clip threshold t on
                |x| minimizing KL(P || Q) between the histogram clipped at t (outliers folded
                into the last bin) and its quantization to 256 levels
``mse``         the clip ratio of [min, max] minimizing the squared quantization error of the
                sample (Banner et al. 2019 / Choukroun et al. 2019's OCS-free variant)

The range always contains 0 (a zero-padded conv's padding must be exact), and becomes
``scale, zero_point`` for uint8 (asymmetric) or uint8 with zero point 128 (symmetric).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

METHODS = ("minmax", "percentile", "entropy", "mse")
MAX_SAMPLES = 1 << 19
_EPS = 1e-8


@dataclass(frozen=True)
class QParams:
    """uint8 quantization of one tensor: real = (q - zero_point) * scale."""

    scale: float
    zero_point: int

    def bounds(self) -> tuple[float, float]:
        return (0 - self.zero_point) * self.scale, (255 - self.zero_point) * self.scale


def qparams(lo: float, hi: float, symmetric: bool = False) -> QParams:
    """uint8 parameters covering [lo, hi] (widened to contain 0)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        bound = max(abs(lo), abs(hi), _EPS)
        return QParams(float(np.float32(bound / 127.0)), 128)
    if hi - lo < _EPS:
        hi = lo + _EPS
    scale = float(np.float32((hi - lo) / 255.0))
    zp = int(np.clip(round(-lo / scale), 0, 255))
    return QParams(scale, zp)


class Observer:
    """Collects a tensor's values over calibration batches: the exact min and max, and a
    uniform random sample of at most ``MAX_SAMPLES`` values (each value gets a seeded random
    key; the smallest keys are kept, so every value seen is equally likely to be in it)."""

    def __init__(self, seed: int = 0):
        self.lo, self.hi = math.inf, -math.inf
        self._values = np.zeros(0, np.float32)
        self._keys = np.zeros(0)
        self._gen = np.random.default_rng(seed)

    def update(self, x: torch.Tensor) -> None:
        v = x.detach().float().flatten().numpy()
        if not v.size:
            return
        self.lo, self.hi = min(self.lo, float(v.min())), max(self.hi, float(v.max()))
        self._values = np.concatenate([self._values, v])
        self._keys = np.concatenate([self._keys, self._gen.random(v.size)])
        if self._values.size > MAX_SAMPLES:
            keep = np.argpartition(self._keys, MAX_SAMPLES)[:MAX_SAMPLES]
            self._values, self._keys = self._values[keep], self._keys[keep]

    def sample(self) -> np.ndarray:
        return self._values if self._values.size else np.zeros(1, np.float32)

    def range(self, method: str, percentile: float = 99.99) -> tuple[float, float]:
        if not math.isfinite(self.lo):
            raise ValueError("the observer saw no values")
        if method == "minmax":
            return self.lo, self.hi
        x = self.sample()
        if method == "percentile":
            return float(np.percentile(x, 100 - percentile)), float(np.percentile(x, percentile))
        if method == "entropy":
            t = kl_threshold(x)
            return max(self.lo, -t), min(self.hi, t)
        if method == "mse":
            return mse_range(x, self.lo, self.hi)
        raise ValueError(f"unknown calibration method {method!r}; expected one of {METHODS}")


def kl_threshold(x: np.ndarray, bins: int = 2048, levels: int = 256) -> float:
    """TensorRT's entropy calibration on |x|: the threshold with the least KL divergence."""
    a = np.abs(x)
    top = float(a.max())
    if top <= 0:
        return _EPS
    hist, edges = np.histogram(a, bins=bins, range=(0.0, top))
    hist = hist.astype(np.float64)
    best, best_kl = top, math.inf
    for i in range(levels, bins + 1, max(1, (bins - levels) // 128)):
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        q = _quantized(hist[:i], levels)
        kl = _kl(p, q)
        if kl < best_kl:
            best, best_kl = float(edges[i]), kl
    return best


def _quantized(p: np.ndarray, levels: int) -> np.ndarray:
    """``p`` merged into ``levels`` bins, each spread back evenly over its nonzero source bins."""
    q = np.zeros_like(p)
    for chunk in np.array_split(np.arange(len(p)), levels):
        nonzero = p[chunk] > 0
        if nonzero.any():
            q[chunk[nonzero]] = p[chunk].sum() / nonzero.sum()
    return q


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    p = p / max(p.sum(), _EPS)
    q = q / max(q.sum(), _EPS)
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], _EPS))))


def mse_range(x: np.ndarray, lo: float, hi: float, steps: int = 64) -> tuple[float, float]:
    """The [c*lo, c*hi] (c in (0, 1]) whose uint8 quantization of ``x`` has the least MSE."""
    best, best_err = (lo, hi), math.inf
    for c in np.linspace(1.0, 1.0 / steps, steps):
        qp = qparams(c * lo, c * hi)
        q = np.clip(np.round(x / qp.scale) + qp.zero_point, 0, 255)
        err = float(np.mean(((q - qp.zero_point) * qp.scale - x) ** 2))
        if err < best_err:
            best, best_err = (c * lo, c * hi), err
    return best


def weight_scales(w: torch.Tensor, bits: int, per_channel: bool, mse: bool = False) -> torch.Tensor:
    """Symmetric scales of a weight (output channels on dim 0) for ``bits``-bit integers in
    [-(2**(bits-1) - 1), 2**(bits-1) - 1]; per output channel or one for all. ``mse`` searches
    the clip per channel for the least squared error (worth it at 4 bits)."""
    qmax = 2 ** (bits - 1) - 1
    flat = w.detach().double().reshape(w.shape[0], -1)
    if not per_channel:
        flat = flat.reshape(1, -1)
    bound = flat.abs().amax(dim=1).clamp_min(_EPS)
    if mse:
        best, err = bound.clone(), torch.full_like(bound, math.inf)
        for c in torch.linspace(1.0, 0.3, 36, dtype=torch.float64):
            s = (bound * c / qmax)[:, None]
            e = ((torch.clamp(torch.round(flat / s), -qmax, qmax) * s - flat) ** 2).mean(dim=1)
            better = e < err
            best, err = torch.where(better, bound * c, best), torch.where(better, e, err)
        bound = best
    scales = (bound / qmax).float()
    return scales.expand(w.shape[0]).contiguous() if not per_channel else scales
