"""flatten-conv (Jin et al. 2014): structure, numerics, declines, idempotence; the data fit."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from slimgraph.errors import PassConfigError
from slimgraph.passes import parse_pipeline
from slimgraph.passes.context import PassContext
from slimgraph.passes.lowrank.common import Factorized
from slimgraph.passes.lowrank.flatten_conv import exact_terms, sample_patches, separable_fit
from tests.passes import helpers
from tests.passes.helpers import run_pass

X = torch.randn(3, 6, 10, 10, generator=torch.Generator().manual_seed(1))


def rel_l2(a, b, x=X):
    return helpers.rel_l2(a, b, x)


def conv_graph(k=3, cin=6, stride=1, padding=1, dilation=1, bias=True, groups=1, cout=8):
    x = X if cin == X.shape[1] else torch.randn(1, cin, 10, 10)
    return helpers.conv_graph(x, cout, k, stride, padding, dilation, bias, groups)


@pytest.mark.parametrize("shape", [(4, 6, 3, 3), (3, 2, 3, 5), (2, 5, 5, 2)])
def test_exact_terms_and_rank1_fit(shape):
    w = torch.randn(*shape, dtype=torch.float64)
    a, b, g, _ = exact_terms(w)
    assert torch.allclose(torch.einsum("ntc,nti,ntj->ncij", a, b, g), w)
    a, b, g = separable_fit(w, 1, 30)
    assert a.shape == (shape[0], shape[1], 1) and b.shape == (shape[0], shape[2], 1)


def test_structure_and_exact_ranks():
    g = conv_graph(stride=2, padding=(1, 2), dilation=(1, 2))
    res = run_pass("flatten-conv{rank=1}", g)  # rank 1 per filter: the paper's form
    assert res.changed and res.stats["ranks"] == {"_0": [1]}
    mod = res.graph.module(next(n for n in res.graph.nodes if n.op == "call_module"))
    assert isinstance(mod, Factorized) and mod.method == "flatten-conv"
    assert [tuple(c.weight.shape) for c in mod] == [(8, 6, 1, 1), (8, 1, 3, 1), (8, 1, 1, 3)]
    assert [c.groups for c in mod] == [1, 8, 8]
    assert (mod[1].stride, mod[1].padding, mod[1].dilation) == ((2, 1), (1, 0), (1, 1))
    assert (mod[2].stride, mod[2].padding, mod[2].dilation) == ((1, 2), (0, 2), (1, 2))
    two = run_pass("flatten-conv", conv_graph())  # default: 2 terms per filter
    mod = two.graph.module(next(n for n in two.graph.nodes if n.op == "call_module"))
    assert [tuple(c.weight.shape) for c in mod] == [(16, 6, 1, 1), (16, 1, 3, 1), (8, 2, 1, 3)]
    assert two.stats["fit"] == {"_0": {"reconstruct": "filter"}}  # no calibration data: weights only


@pytest.mark.parametrize("geom", [dict(), dict(stride=2, bias=False), dict(k=(3, 5), padding=(1, 2)),
                                  dict(cin=2, dilation=2, padding=2)])
def test_full_rank_reproduces_outputs(geom):
    g = conv_graph(**geom)
    res = run_pass("flatten-conv{rank=full,allow_costlier=true}", g)
    x = torch.randn(3, geom.get("cin", 6), 10, 10)
    assert res.changed and rel_l2(g, res.graph, x) < 1e-4


def test_error_finite_and_decreasing_with_rank():
    g = conv_graph()
    errs = [rel_l2(g, run_pass(f"flatten-conv{{rank={r},allow_costlier=true}}", g).graph) for r in (1, 3, 6)]
    assert np.all(np.isfinite(errs)) and errs[0] > errs[1] > errs[2] > 0


@pytest.mark.parametrize("groups,cout,what", [(6, 6, "depthwise"), (2, 8, "grouped")])
def test_grouped_and_depthwise_are_declined(groups, cout, what):
    g = conv_graph(groups=groups, cout=cout)
    res = run_pass("flatten-conv", g)
    assert not res.changed and res.graph is g and what in res.skipped[0].reason


def test_second_run_changes_nothing():
    first = run_pass("flatten-conv", conv_graph())
    second = run_pass("flatten-conv", first.graph)
    assert first.changed and not second.changed and "already factorized" in second.skipped[0].reason


def test_vbmf_is_declined_with_reason():
    res = run_pass("flatten-conv{rank=vbmf}", conv_graph())
    assert not res.changed and "no rank-revealing unfolding" in res.skipped[0].reason


@pytest.mark.parametrize("spec", ["flatten-conv{rank=0}", "flatten-conv{n_iter=-1}", "flatten-conv{rank=3.5}",
                                  "flatten-conv{reconstruct=weights}", "flatten-conv{reconstruct=1}",
                                  "flatten-conv{data_iter=-1}", "flatten-conv{max_samples=0}",
                                  "flatten-conv{tolerance=-0.1}", "flatten-conv{seed=x}"])
def test_bad_options_raise(spec):
    with pytest.raises(PassConfigError):
        parse_pipeline(spec)


# ---------------------------------------------------------------- data reconstruction
def correlated_batches(n=4, size=10, seed=3, cin=6):
    """Inputs with strong channel and spatial correlation (mixed, blurred noise), like features."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cin, cin, generator=gen) + 2 * torch.ones(cin, cin)
    blur = torch.tensor([1.0, 2.0, 1.0])
    blur = (blur[:, None] * blur[None, :] / 16).expand(cin, 1, 3, 3)
    out = []
    for _ in range(n):
        z = torch.einsum("dc,bchw->bdhw", mix, torch.randn(8, cin, size, size, generator=gen))
        out.append((nn.functional.conv2d(z, blur, padding=1, groups=cin),))
    return out


def calibrated(g, batches):
    return PassContext(batches, reference=g)


def out_err(a, b, batches):
    """Relative L2 error of b's outputs against a's over all batches."""
    num = sum(float(np.linalg.norm(a.run(x)[0] - b.run(x)[0]) ** 2) for (x,) in batches)
    return math.sqrt(num / sum(float(np.linalg.norm(a.run(x)[0]) ** 2) for (x,) in batches))


def test_sample_patches_are_im2col_rows():
    conv = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 1), dilation=(1, 2))
    x = torch.randn(2, 3, 7, 9, generator=torch.Generator().manual_seed(0))
    cols = nn.functional.unfold(x.double(), (3, 2), dilation=(1, 2), padding=(1, 1), stride=(2, 1))
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    assert torch.equal(sample_patches(x, conv, 10**6, torch.Generator()), rows)
    some = sample_patches(x, conv, 5, torch.Generator().manual_seed(1))
    assert some.shape == (5, 3 * 3 * 2) and all(any(torch.equal(r, q) for q in rows) for r in some)


def test_data_fit_structure_and_record():
    g, batches = conv_graph(), correlated_batches()
    res = run_pass("flatten-conv{rank=1,reconstruct=data,max_samples=500}", g, calibrated(g, batches))
    mod = res.graph.module(next(n for n in res.graph.nodes if n.op == "call_module"))
    assert isinstance(mod, Factorized) and [tuple(c.weight.shape) for c in mod] == [
        (8, 6, 1, 1), (8, 1, 3, 1), (8, 1, 1, 3)]
    fit = res.stats["fit"]["_0"]
    assert fit["reconstruct"] == "data" and fit["data_sweeps"] == 20
    assert 500 <= fit["samples"] < 500 + len(batches)  # the cap, rounded up per batch
    assert 0 <= fit["data_response_error"] < fit["filter_response_error"]
    assert res.stats["calibration"] == "user"
    res.graph.verify()


@pytest.mark.parametrize("rank,geom", [(1, dict()), (2, dict()), (1, dict(stride=2, bias=False)),
                                       (2, dict(k=(3, 5), padding=(1, 2), dilation=(2, 1)))])
def test_data_fit_beats_filter_fit_on_outputs(rank, geom):
    g = conv_graph(**geom)
    calib, held_out = correlated_batches(seed=3), correlated_batches(seed=4)
    am = calibrated(g, calib)
    filt = run_pass(f"flatten-conv{{rank={rank},reconstruct=filter,allow_costlier=true}}", g, am)
    data = run_pass(f"flatten-conv{{rank={rank},reconstruct=data,allow_costlier=true}}", g, am)
    e_filter, e_data = out_err(g, filt.graph, calib), out_err(g, data.graph, calib)
    assert e_data < 0.8 * e_filter  # strictly, and by a margin
    assert out_err(g, data.graph, held_out) < out_err(g, filt.graph, held_out)  # generalises


def test_recorded_error_is_the_measured_response_error():
    """With every position sampled, the recorded error is ||y - y^|| / ||y - mean_n(y)||."""
    g, batches = conv_graph(), correlated_batches(n=2)
    res = run_pass("flatten-conv{rank=1,reconstruct=data,max_samples=100000}", g, calibrated(g, batches))
    y = np.concatenate([g.run(x)[0] for (x,) in batches])
    y_hat = np.concatenate([res.graph.run(x)[0] for (x,) in batches])
    centered = y - y.mean(axis=(0, 2, 3), keepdims=True)
    rel = np.linalg.norm(y - y_hat) / np.linalg.norm(centered)
    assert res.stats["fit"]["_0"]["data_response_error"] == pytest.approx(rel, rel=1e-3)


def test_more_sweeps_never_worse_and_full_rank_stays_exact():
    g, batches = conv_graph(), correlated_batches()
    am = calibrated(g, batches)
    errs = [run_pass(f"flatten-conv{{rank=1,reconstruct=data,data_iter={k}}}", g, am)
            .stats["fit"]["_0"]["data_response_error"] for k in (0, 1, 5, 20)]
    assert all(b <= a + 1e-9 for a, b in zip(errs, errs[1:], strict=False))
    full = run_pass("flatten-conv{rank=full,reconstruct=data,allow_costlier=true}", g, am)
    assert full.stats["fit"]["_0"]["reconstruct"] == "filter" and out_err(g, full.graph, batches) < 1e-5


def test_auto_uses_data_only_with_user_calibration_and_a_poor_filter_fit():
    g, batches = conv_graph(), correlated_batches()
    assert run_pass("flatten-conv{rank=1}", g).stats["fit"]["_0"]["reconstruct"] == "filter"
    auto = run_pass("flatten-conv{rank=1}", g, calibrated(g, batches)).stats["fit"]["_0"]
    assert auto["reconstruct"] == "data" and auto["filter_response_error"] > 0.02
    lax = run_pass("flatten-conv{rank=1,tolerance=10}", g, calibrated(g, batches)).stats["fit"]["_0"]
    assert lax["reconstruct"] == "filter" and "filter_response_error" in lax
    forced = run_pass("flatten-conv{rank=1,reconstruct=data}", g)  # seeded random inputs
    assert forced.stats["fit"]["_0"]["reconstruct"] == "data"
    assert forced.stats["calibration"] == "random (seeded)"


def test_data_fit_is_deterministic_and_idempotent():
    g, batches = conv_graph(), correlated_batches()
    spec = "flatten-conv{rank=2,reconstruct=data,max_samples=300}"
    a = run_pass(spec, g, calibrated(g, batches))
    b = run_pass(spec, g, calibrated(g, batches))
    x = batches[0][0]
    assert np.array_equal(a.graph.run(x)[0], b.graph.run(x)[0])
    again = run_pass(spec, a.graph, calibrated(a.graph, batches))
    assert not again.changed and again.graph is a.graph and "already factorized" in again.skipped[0].reason
