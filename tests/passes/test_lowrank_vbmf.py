"""EVBMF (Nakajima et al. 2013): rank recovery, noise variance, pure noise, the closed form."""

import numpy as np
import pytest

from slimgraph.passes.lowrank.vbmf import TAU_CONSTANT, evbmf, vbmf_rank


def _low_rank_plus_noise(L, M, rank, sigma, seed=0):
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=(L, rank)) @ rng.normal(size=(rank, M))
    return signal + sigma * rng.normal(size=(L, M))


@pytest.mark.parametrize("L,M,rank,sigma", [(50, 80, 5, 0.1), (64, 288, 8, 0.05), (200, 30, 3, 0.3),
                                            (100, 100, 10, 1.0)])
def test_recovers_true_rank_and_noise_variance(L, M, rank, sigma):
    res = evbmf(_low_rank_plus_noise(L, M, rank, sigma))
    assert res.rank == rank
    assert res.sigma2 == pytest.approx(sigma**2, rel=0.1)


@pytest.mark.parametrize("L,M", [(40, 60), (64, 288), (120, 20)])
def test_pure_noise_gives_rank_zero(L, M):
    noise = 0.3 * np.random.default_rng(1).normal(size=(L, M))
    res = evbmf(noise)
    assert res.rank == 0 and vbmf_rank(noise) == 0
    assert res.sigma2 == pytest.approx(0.09, rel=0.15)


def test_closed_form_threshold_and_shrinkage_with_known_noise():
    Y = _low_rank_plus_noise(30, 60, 4, 0.2, seed=2)
    res = evbmf(Y, sigma2=0.04)
    L, M = 30, 60
    alpha = L / M
    tau = TAU_CONSTANT * np.sqrt(alpha)
    assert res.threshold == pytest.approx(np.sqrt(M * 0.04 * (1 + tau) * (1 + alpha / tau)))
    s = np.linalg.svd(Y, compute_uv=False)
    assert res.rank == int(np.sum(s > res.threshold)) == 4
    # VB shrinks every kept component: 0 < estimate < observed singular value
    assert np.all(res.estimates > 0) and np.all(res.estimates < s[:4])
    q = (L + M) * 0.04 / s[0] ** 2
    expected = s[0] / 2 * (1 - q + np.sqrt((1 - q) ** 2 - 4 * L * M * 0.04**2 / s[0] ** 4))
    assert res.estimates[0] == pytest.approx(expected)


def test_transpose_invariant_and_zero_matrix():
    Y = _low_rank_plus_noise(20, 70, 3, 0.1, seed=3)
    assert evbmf(Y).rank == evbmf(Y.T).rank == 3
    assert evbmf(np.zeros((5, 7))).rank == 0
    with pytest.raises(ValueError):
        evbmf(np.zeros((0, 3)))
