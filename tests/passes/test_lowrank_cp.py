"""cp (Lebedev et al. 2015): structure, numerics, the instability guard, declines, idempotence."""

import numpy as np
import pytest
import torch

from slimgraph.errors import PassConfigError
from slimgraph.passes import parse_pipeline
from slimgraph.passes.lowrank import cp as cp_module
from slimgraph.passes.lowrank.common import Factorized
from tests.passes import helpers
from tests.passes.helpers import run_pass

X = torch.randn(3, 6, 10, 10, generator=torch.Generator().manual_seed(1))


def rel_l2(a, b, x=X):
    return helpers.rel_l2(a, b, x)


def conv_graph(stride=1, padding=1, dilation=1, bias=True, groups=1, cout=8):
    return helpers.conv_graph(X, cout, 3, stride, padding, dilation, bias, groups)


def test_structure_and_exact_ranks():
    g = conv_graph(stride=2, padding=(1, 2), dilation=(1, 2))
    res = run_pass("cp{rank=5,max_rel_error=1.0}", g)
    assert res.changed and res.stats["ranks"] == {"_0": [5]}
    mod = res.graph.module(next(n for n in res.graph.nodes if n.op == "call_module"))
    assert isinstance(mod, Factorized) and mod.method == "cp"
    assert [tuple(c.weight.shape) for c in mod] == [(5, 6, 1, 1), (5, 1, 3, 1), (5, 1, 1, 3), (8, 5, 1, 1)]
    assert [c.groups for c in mod] == [1, 5, 5, 1]
    assert (mod[1].stride, mod[1].padding, mod[1].dilation) == ((2, 1), (1, 0), (1, 1))
    assert (mod[2].stride, mod[2].padding, mod[2].dilation) == ((1, 2), (0, 2), (1, 2))
    assert res.graph.run(X)[0].shape == g.run(X)[0].shape


@pytest.mark.parametrize("geom", [dict(), dict(stride=2, bias=False), dict(dilation=2, padding=2)])
def test_full_rank_reproduces_outputs(geom):
    g = conv_graph(**geom)
    res = run_pass("cp{rank=full,allow_costlier=true}", g)
    assert res.changed and res.stats["ranks"]["_0"] == [6 * 9]
    assert rel_l2(g, res.graph) < 1e-4


def test_error_finite_and_decreasing_with_rank():
    g = conv_graph()
    errs = [rel_l2(g, run_pass(f"cp{{rank={r},max_rel_error=1.0,allow_costlier=true}}", g).graph)
            for r in (2, 12, 36)]
    assert np.all(np.isfinite(errs)) and errs[0] > errs[1] > errs[2] > 0


def test_inaccurate_or_diverged_fit_is_declined(monkeypatch):
    g = conv_graph()
    res = run_pass("cp{rank=2,max_rel_error=0.01}", g)
    assert not res.changed and res.graph is g
    assert "relative reconstruction error" in res.skipped[0].reason

    def diverged(w, r, n_iter):
        return [np.full((s, r), np.nan) for s in w.shape], float("nan")

    monkeypatch.setattr(cp_module, "cp_factors", diverged)
    res = run_pass("cp{rank=2}", g)
    assert not res.changed and "diverged" in res.skipped[0].reason


@pytest.mark.parametrize("groups,cout,what", [(6, 6, "depthwise"), (2, 8, "grouped")])
def test_grouped_and_depthwise_are_declined(groups, cout, what):
    g = conv_graph(groups=groups, cout=cout)
    res = run_pass("cp{rank=2}", g)
    assert not res.changed and res.graph is g and what in res.skipped[0].reason


def test_second_run_changes_nothing():
    first = run_pass("cp{rank=4,max_rel_error=1.0}", conv_graph())
    second = run_pass("cp{rank=4,max_rel_error=1.0}", first.graph)
    assert first.changed and not second.changed and "already factorized" in second.skipped[0].reason


@pytest.mark.parametrize("spec", ["cp{rank=0}", "cp{max_rel_error=0}", "cp{n_iter=0}", "cp{rank=1.2}"])
def test_bad_options_raise(spec):
    with pytest.raises(PassConfigError):
        parse_pipeline(spec)


def test_rank_above_full_is_declined():
    res = run_pass("cp{rank=60}", conv_graph())  # full = min(6, 8) * 9 = 54
    assert not res.changed and "exceeds the layer's full rank 54" in res.skipped[0].reason
