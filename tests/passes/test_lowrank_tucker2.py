"""tucker2 (Kim et al. 2016): structure, numerics, declines, idempotence, options."""

import pytest
import torch

from slimgraph.errors import PassConfigError
from slimgraph.ir import Graph
from slimgraph.ir.analysis import AnalysisManager, Cost
from slimgraph.passes import NumericsInstrument, PassManager, parse_pipeline
from slimgraph.passes.context import PassContext
from slimgraph.passes.lowrank.common import Factorized
from slimgraph.zoo.models import DigitsCNN
from tests.passes import helpers
from tests.passes.helpers import max_rel_err, run_pass

X = torch.randn(3, 6, 12, 12, generator=torch.Generator().manual_seed(1))


def rel_l2(a, b, x=X):
    return helpers.rel_l2(a, b, x)


def conv_graph(stride=1, padding=1, dilation=1, bias=True, groups=1, cout=12):
    return helpers.conv_graph(X, cout, 3, stride, padding, dilation, bias, groups)


def test_structure_and_exact_ranks():
    g = conv_graph()
    res = run_pass("tucker2{rank=4}", g)
    assert res.changed and res.stats["ranks"] == {"_0": [4, 4]} and res.stats["layers_factorized"] == 1
    (node,) = [n for n in res.graph.nodes if n.op == "call_module"]
    mod = res.graph.module(node)
    assert isinstance(mod, Factorized) and mod.method == "tucker2" and mod.ranks == (4, 4)
    assert [tuple(c.weight.shape) for c in mod] == [(4, 6, 1, 1), (4, 4, 3, 3), (12, 4, 1, 1)]
    assert [c.bias is not None for c in mod] == [False, False, True]
    assert mod[1].padding == (1, 1) and all(p.requires_grad for p in mod.parameters())
    assert node.name == "_0"  # node keeps its name; only its target moves to "<orig>_lr"
    macs = AnalysisManager().get(Cost, res.graph).macs
    assert macs == 144 * (6 * 4 + 4 * 4 * 9 + 4 * 12) < 144 * 12 * 54


@pytest.mark.parametrize("geom", [dict(), dict(stride=2), dict(padding=0), dict(dilation=2, padding=2),
                                  dict(bias=False), dict(stride=(2, 1), padding=(1, 0))])
def test_full_rank_reproduces_outputs(geom):
    g = conv_graph(**geom)
    res = run_pass("tucker2{rank=full,allow_costlier=true}", g)
    assert res.changed and res.stats["ranks"]["_0"] == [6, 12]
    assert max_rel_err(g, res.graph, X) < 1e-4


def test_error_decreases_with_rank():
    g = conv_graph()
    errs = [rel_l2(g, run_pass(f"tucker2{{rank={r},allow_costlier=true}}", g).graph)
            for r in (1, 3, 5)]
    assert all(torch.isfinite(torch.tensor(errs)))
    assert errs[0] > errs[1] > errs[2] > 0


@pytest.mark.parametrize("groups,what", [(6, "depthwise"), (2, "grouped")])
def test_grouped_and_depthwise_are_declined(groups, what):
    g = conv_graph(groups=groups, cout=6 if groups == 6 else 12)
    res = run_pass("tucker2{rank=2}", g)
    assert not res.changed and res.graph is g
    assert [(s.node, what in s.reason) for s in res.skipped] == [("_0", True)]


def test_second_run_changes_nothing():
    g = conv_graph()
    first = run_pass("tucker2{rank=3}", g)
    second = run_pass("tucker2{rank=3}", first.graph)
    assert not second.changed and second.graph is first.graph
    assert any("already factorized" in s.reason for s in second.skipped)


def test_cost_and_rank_declines():
    g = conv_graph()
    res = run_pass("tucker2{rank=full}", g)
    assert not res.changed and ">= original" in res.skipped[0].reason
    res = run_pass("tucker2{rank=7}", g)  # 7 > 6 input channels
    assert not res.changed and "exceeds the layer's full rank" in res.skipped[0].reason
    noise = run_pass("tucker2{rank=vbmf}", g)  # random weights: VBMF sees only noise
    assert not noise.changed and "VBMF selects rank 0" in noise.skipped[0].reason


@pytest.mark.parametrize("spec", ["tucker2{rank=0}", "tucker2{rank=-2}", "tucker2{rank=1.5}",
                                  "tucker2{rank=0.0}", "tucker2{rank=macs=0}", "tucker2{rank=svd}",
                                  "tucker2{target_macs=1.5}", "tucker2{n_iter=0}", "tucker2{rank=true}"])
def test_bad_options_raise(spec):
    with pytest.raises(PassConfigError):
        parse_pipeline(spec)


def test_energy_and_budget_rules():
    g = conv_graph(cout=16)
    res = run_pass("tucker2{rank=0.5}", g)
    r3, r4 = res.stats["ranks"]["_0"]
    assert 1 <= r3 < 6 and 1 <= r4 < 16
    budget = run_pass("tucker2{rank=macs=0.3}", g)
    am = PassContext()
    assert am.analyses.get(Cost, budget.graph).macs <= 0.3 * am.analyses.get(Cost, g).macs


def test_pass_manager_on_digits_cnn_records_fidelity():
    torch.manual_seed(0)
    g = Graph.from_torch(DigitsCNN(), (torch.randn(1, 1, 16, 16),))
    batches = [(torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(5)),)]
    pm = PassManager(parse_pipeline("fold-bn,tucker2{rank=0.8}"), [NumericsInstrument(g, batches)])
    out, records = pm.run(g, PassContext(batches, reference=g))
    rec = records[1]
    assert rec.name == "tucker2" and rec.changed and not rec.exact
    assert rec.stats["macs_after"] < rec.stats["macs_before"]
    assert 0.0 < rec.numerics.cosine <= 1.0 and rec.numerics.rel_l2 < 1.0
    assert {row.name for row in rec.layers} == set(rec.stats["ranks"])
    assert any(isinstance(m, Factorized) for m in out.gm.modules())
    out.verify()
