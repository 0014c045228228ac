"""flatten-conv (Jin et al. 2014): structure, numerics, declines, idempotence."""

import numpy as np
import pytest
import torch
from torch import nn

from slimgraph.errors import PassConfigError
from slimgraph.ir import Graph
from slimgraph.passes import parse_pipeline
from slimgraph.passes.lowrank.common import Factorized
from slimgraph.passes.lowrank.flatten_conv import exact_terms, separable_fit
from tests.passes.helpers import run_pass

X = torch.randn(3, 6, 10, 10, generator=torch.Generator().manual_seed(1))


def rel_l2(a, b, x=X):
    ra, rb = a.run(x)[0], b.run(x)[0]
    return float(np.linalg.norm(ra - rb) / np.linalg.norm(ra))


def conv_graph(k=3, cin=6, stride=1, padding=1, dilation=1, bias=True, groups=1, cout=8):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups=groups, bias=bias)
    return Graph.from_torch(nn.Sequential(conv), (torch.randn(1, cin, 10, 10),))


@pytest.mark.parametrize("shape", [(4, 6, 3, 3), (3, 2, 3, 5), (2, 5, 5, 2)])
def test_exact_terms_and_rank1_fit(shape):
    w = torch.randn(*shape, dtype=torch.float64)
    a, b, g, _ = exact_terms(w)
    assert torch.allclose(torch.einsum("ntc,nti,ntj->ncij", a, b, g), w)
    a, b, g = separable_fit(w, 1, 30)
    assert a.shape == (shape[0], shape[1], 1) and b.shape == (shape[0], shape[2], 1)


def test_structure_and_exact_ranks():
    g = conv_graph(stride=2, padding=(1, 2), dilation=(1, 2))
    res = run_pass("flatten-conv", g)  # rank 1 per filter: the paper's form
    assert res.changed and res.stats["ranks"] == {"_0": [1]}
    mod = res.graph.module(next(n for n in res.graph.nodes if n.op == "call_module"))
    assert isinstance(mod, Factorized) and mod.method == "flatten-conv"
    assert [tuple(c.weight.shape) for c in mod] == [(8, 6, 1, 1), (8, 1, 3, 1), (8, 1, 1, 3)]
    assert [c.groups for c in mod] == [1, 8, 8]
    assert (mod[1].stride, mod[1].padding, mod[1].dilation) == ((2, 1), (1, 0), (1, 1))
    assert (mod[2].stride, mod[2].padding, mod[2].dilation) == ((1, 2), (0, 2), (1, 2))
    two = run_pass("flatten-conv{rank=2}", conv_graph())
    mod = two.graph.module(next(n for n in two.graph.nodes if n.op == "call_module"))
    assert [tuple(c.weight.shape) for c in mod] == [(16, 6, 1, 1), (16, 1, 3, 1), (8, 2, 1, 3)]


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


@pytest.mark.parametrize("spec", ["flatten-conv{rank=0}", "flatten-conv{n_iter=-1}", "flatten-conv{rank=3.5}"])
def test_bad_options_raise(spec):
    with pytest.raises(PassConfigError):
        parse_pipeline(spec)
