"""spatial-svd (Jaderberg et al. 2014, scheme 2): structure, numerics, declines, idempotence."""

import numpy as np
import pytest
import torch
from torch import nn

from slimgraph.errors import PassConfigError
from slimgraph.ir import Graph
from slimgraph.passes import parse_pipeline
from slimgraph.passes.context import PassContext
from slimgraph.passes.lowrank.common import Factorized
from slimgraph.passes.lowrank.spatial_svd import spatial_factors
from tests.passes import helpers
from tests.passes.helpers import run_pass

X = torch.randn(3, 6, 12, 12, generator=torch.Generator().manual_seed(1))


def rel_l2(a, b, x=X):
    return helpers.rel_l2(a, b, x)


def conv_graph(k=3, stride=1, padding=1, dilation=1, bias=True, groups=1, cout=12):
    return helpers.conv_graph(X, cout, k, stride, padding, dilation, bias, groups)


def test_factor_reshape_is_exact():
    w = np.random.default_rng(0).normal(size=(5, 4, 3, 2))
    v, h = spatial_factors(w, min(4 * 3, 5 * 2))
    assert np.allclose(np.einsum("nkj,kci->ncij", h[:, :, 0, :], v[..., 0]), w)


def test_structure_and_split_geometry():
    g = conv_graph(stride=2, padding=(1, 2), dilation=(1, 2))
    res = run_pass("spatial-svd{rank=4}", g)
    assert res.changed and res.stats["ranks"] == {"_0": [4]}
    mod = res.graph.module(next(n for n in res.graph.nodes if n.op == "call_module"))
    assert isinstance(mod, Factorized) and mod.method == "spatial-svd"
    vert, horiz = mod
    assert tuple(vert.weight.shape) == (4, 6, 3, 1) and tuple(horiz.weight.shape) == (12, 4, 1, 3)
    assert (vert.stride, vert.padding, vert.dilation) == ((2, 1), (1, 0), (1, 1))
    assert (horiz.stride, horiz.padding, horiz.dilation) == ((1, 2), (0, 2), (1, 2))
    assert vert.bias is None and horiz.bias is not None
    assert res.graph.run(X)[0].shape == g.run(X)[0].shape


@pytest.mark.parametrize("geom", [dict(), dict(stride=2), dict(padding=0), dict(dilation=2, padding=2),
                                  dict(k=(3, 5), padding=(1, 2), bias=False), dict(k=5, padding=2)])
def test_full_rank_reproduces_outputs(geom):
    g = conv_graph(**geom)
    res = run_pass("spatial-svd{rank=full,allow_costlier=true}", g)
    assert res.changed and rel_l2(g, res.graph) < 1e-4


def test_error_decreases_with_rank_and_data_reconstruction_helps():
    g = conv_graph()
    errs = [rel_l2(g, run_pass(f"spatial-svd{{rank={r}}}", g).graph) for r in (1, 4, 10)]
    assert np.all(np.isfinite(errs)) and errs[0] > errs[1] > errs[2] > 0
    batches = [(torch.randn(8, 6, 12, 12, generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    am = PassContext(batches, reference=g)
    data = run_pass("spatial-svd{rank=4,data_reconstruction=true,refine_steps=30}", g, am)
    calib = [b[0] for b in batches]
    closed = run_pass("spatial-svd{rank=4}", g)
    e_closed = np.mean([rel_l2(g, closed.graph, x) for x in calib])
    e_data = np.mean([rel_l2(g, data.graph, x) for x in calib])
    assert e_data <= e_closed


@pytest.mark.parametrize("groups,cout,what", [(6, 6, "depthwise"), (3, 12, "grouped")])
def test_grouped_and_depthwise_are_declined(groups, cout, what):
    g = conv_graph(groups=groups, cout=cout)
    res = run_pass("spatial-svd{rank=2}", g)
    assert not res.changed and res.graph is g and what in res.skipped[0].reason


def test_one_by_one_and_conv1d_are_declined():
    g = Graph.from_torch(nn.Sequential(nn.Conv2d(6, 8, 1), nn.Flatten(2), nn.Conv1d(8, 8, 3)), (X[:1],))
    res = run_pass("spatial-svd{rank=2}", g)
    assert not res.changed
    reasons = {s.node: s.reason for s in res.skipped}
    assert "already 1-D" in reasons["_0"] and "not a Conv2d" in reasons["_2"]


def test_second_run_changes_nothing():
    first = run_pass("spatial-svd{rank=3}", conv_graph())
    second = run_pass("spatial-svd{rank=3}", first.graph)
    assert not second.changed and "already factorized" in second.skipped[0].reason


@pytest.mark.parametrize("spec", ["spatial-svd{rank=0}", "spatial-svd{rank=2.0}", "spatial-svd{refine_steps=-1}",
                                  "spatial-svd{rank=energy=0}"])
def test_bad_options_raise(spec):
    with pytest.raises(PassConfigError):
        parse_pipeline(spec)


def test_rank_above_full_is_declined_not_fatal():
    res = run_pass("spatial-svd{rank=40}", conv_graph())  # full = min(6*3, 12*3) = 18
    assert not res.changed and "exceeds the layer's full rank 18" in res.skipped[0].reason
