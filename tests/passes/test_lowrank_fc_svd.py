"""fc-svd (Denton et al. 2014; Xue et al. 2013): structure, numerics, declines, idempotence."""

import numpy as np
import pytest
import torch
from torch import nn

from slimgraph.errors import PassConfigError
from slimgraph.ir import Graph
from slimgraph.ir.analysis import Cost
from slimgraph.passes import parse_pipeline
from slimgraph.passes.context import PassContext
from slimgraph.passes.lowrank.common import Factorized
from tests.passes import helpers
from tests.passes.helpers import module_types, run_pass

X = torch.randn(4, 6, 8, 8, generator=torch.Generator().manual_seed(1))


def rel_l2(a, b, x=X):
    return helpers.rel_l2(a, b, x)


def mlp_graph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 16, 1, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 5 * 5, 64), nn.ReLU(), nn.Linear(64, 40))
    return Graph.from_torch(model, (X[:1],))


def test_structure_and_exact_ranks():
    g = mlp_graph()
    res = run_pass("fc-svd{rank=3}", g)
    assert res.changed and res.stats["ranks"] == {"_0": [3], "_3": [3], "_5": [3]}
    mods = {n.name: res.graph.module(n) for n in res.graph.nodes if n.op == "call_module"}
    conv, fc1 = mods["_0"], mods["_3"]
    assert isinstance(conv, Factorized) and conv.method == "fc-svd"
    assert [tuple(c.weight.shape) for c in conv] == [(3, 6, 1, 1), (16, 3, 1, 1)]
    assert conv[0].stride == (2, 2) and conv[0].padding == (1, 1) and conv[1].padding == (0, 0)
    assert [type(m).__name__ for m in fc1] == ["Linear", "Linear"]
    assert (fc1[0].in_features, fc1[0].out_features, fc1[0].bias) == (400, 3, None)
    assert (fc1[1].in_features, fc1[1].out_features) == (3, 64) and fc1[1].bias is not None
    assert "Factorized" in module_types(res.graph)


def test_full_rank_reproduces_outputs():
    g = mlp_graph()
    res = run_pass("fc-svd{rank=full,allow_costlier=true}", g)
    assert res.changed and rel_l2(g, res.graph) < 1e-4


def test_error_decreases_with_rank():
    g = mlp_graph()
    errs = [rel_l2(g, run_pass(f"fc-svd{{rank={r},allow_costlier=true}}", g).graph) for r in (1, 4, 12)]
    assert np.all(np.isfinite(errs)) and errs[0] > errs[1] > errs[2] > 0


def test_declines_grouped_kxk_and_costlier():
    torch.manual_seed(0)
    g = Graph.from_torch(nn.Sequential(nn.Conv2d(6, 12, 1, groups=3), nn.Conv2d(12, 12, 3),
                                       nn.Flatten(), nn.Linear(432, 4)), (X[:1],))
    res = run_pass("fc-svd{rank=0.99}", g)
    assert not res.changed and res.graph is g
    reasons = {s.node: s.reason for s in res.skipped}
    assert "grouped conv" in reasons["_0"] and "fc-svd factors Linear and 1x1" in reasons["_1"]
    assert "factorized cost" in reasons["_3"] and ">= original" in reasons["_3"]


def test_second_run_changes_nothing():
    first = run_pass("fc-svd{rank=4}", mlp_graph())
    second = run_pass("fc-svd{rank=4}", first.graph)
    assert not second.changed and all("already factorized" in s.reason for s in second.skipped)


@pytest.mark.parametrize("spec", ["fc-svd{rank=0}", "fc-svd{rank=1.01}", "fc-svd{rank=-0.5}",
                                  "fc-svd{grid=[0.5,2]}", "fc-svd{fidelity=mse}", "fc-svd{rank=macs=1.5}"])
def test_bad_options_raise(spec):
    with pytest.raises(PassConfigError):
        parse_pipeline(spec)


def test_rank_above_full_is_declined_per_layer():
    res = run_pass("fc-svd{rank=20}", mlp_graph())  # conv full rank 6, fc2 full rank 40
    reasons = {s.node: s.reason for s in res.skipped}
    assert "exceeds the layer's full rank 6" in reasons["_0"]
    assert res.stats["ranks"] == {"_3": [20], "_5": [20]}


def test_global_target_meets_macs_and_records_sensitivity():
    g = mlp_graph()
    batches = [(torch.randn(8, 6, 8, 8, generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    am = PassContext(batches, reference=g)
    res = run_pass("fc-svd{target_macs=0.6}", g, am)
    before, after = am.analyses.get(Cost, g).macs, am.analyses.get(Cost, res.graph).macs
    assert res.changed and res.stats["target_met"] and after <= 0.6 * before
    assert res.stats["selected_macs"] == after
    sens = res.sensitivity.curves
    assert set(sens) == {"_0", "_3", "_5"}
    for curve in sens.values():
        assert curve[-1] == [1.0, pytest.approx(1.0)] and all(-1.0 <= f <= 1.0 + 1e-9 for _, f in curve)
    assert res.sensitivity.x == "rank fraction"
