import numpy as np
import pytest
import torch
from torch import nn

from slimgraph.errors import PassConfigError
from slimgraph.ir import Graph
from slimgraph.ir.analysis import AnalysisManager, Cost
from slimgraph.passes import PassManager, parse_pipeline
from slimgraph.passes.context import PassContext
from slimgraph.passes.lowrank.channel_lowrank import (
    ReducedRankRegression,
    pca_factors,
    relaxed_z,
)
from slimgraph.passes.lowrank.common import Factorized
from tests.passes.helpers import run_pass


def chain(seed: int = 0, bn: bool = False) -> nn.Module:
    """conv-relu x3 (16 filters) + a linear head; optional batch norm after each conv."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    c = 3
    for _ in range(3):
        layers += [nn.Conv2d(c, 16, 3, padding=1)]
        if bn:
            layers += [nn.BatchNorm2d(16)]
        layers += [nn.ReLU()]
        c = 16
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def inputs(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def calib(n: int = 64, seed: int = 1) -> list[tuple[torch.Tensor]]:
    x = inputs(n, seed)
    return [(x[i:i + 16],) for i in range(0, n, 16)]


def rel_err(a: Graph, b: Graph, x: torch.Tensor) -> float:
    ra, rb = a.run(x)[0], b.run(x)[0]
    return float(np.linalg.norm(ra - rb) / np.linalg.norm(ra))


@pytest.fixture(scope="module")
def graph() -> Graph:
    return Graph.from_torch(chain(), (inputs(1, 0),))


def am_for(graph: Graph, **kw) -> PassContext:
    return PassContext(calib(**kw), reference=graph)


def test_structure_d_prime_filters_then_1x1(graph):
    result = run_pass("channel-lowrank{rank=4}", graph, am_for(graph))
    assert result.changed and result.stats["layers_factorized"] == 3
    for node in ("_0", "_2", "_4"):
        mod = result.graph.gm.get_submodule(next(n.target for n in result.graph.nodes if n.name == node))
        assert isinstance(mod, Factorized) and mod.method == "channel-lowrank"
        first, second = mod
        assert first.out_channels == 4 and first.kernel_size == (3, 3) and first.padding == (1, 1)
        assert second.in_channels == 4 and second.out_channels == 16 and second.kernel_size == (1, 1)
        assert second.bias is not None
    cost = AnalysisManager().get(Cost, result.graph).macs
    assert cost < AnalysisManager().get(Cost, graph).macs
    # the input graph is left alone
    assert all(not isinstance(graph.module(n), Factorized) for n in graph.nodes if n.op == "call_module")


def test_full_rank_reproduces_outputs(graph):
    result = run_pass("channel-lowrank{rank=full,allow_costlier=true}", graph, am_for(graph))
    assert result.stats["ranks"] == {"_0": [16], "_2": [16], "_4": [16]}
    x = inputs(32, 7)
    ra, rb = graph.run(x)[0], result.graph.run(x)[0]
    assert np.abs(ra - rb).max() <= 1e-4 * np.abs(ra).max()


def test_error_decreases_with_rank(graph):
    x = inputs(64, 5)
    errs = [rel_err(graph, run_pass(f"channel-lowrank{{rank={r}}}", graph, am_for(graph)).graph, x)
            for r in (2, 5, 9)]
    assert errs[0] > errs[1] > errs[2] > 0


def test_linear_solution_is_pca_and_rrr_matches_it_symmetrically():
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(500, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 6, generator=gen,
                                                                            dtype=torch.float64)
    f = pca_factors(y, 3)
    g = ReducedRankRegression(y).solve(y, 3)
    assert torch.allclose(f.apply(y), g.apply(y), atol=1e-8)
    full = pca_factors(y, 6)
    assert torch.allclose(full.apply(y), y, atol=1e-10)


def test_relaxed_z_step_is_the_elementwise_minimizer():
    gen = torch.Generator().manual_seed(0)
    ry = torch.randn(400, generator=gen, dtype=torch.float64).clamp(min=0)
    yp = 2 * torch.randn(400, generator=gen, dtype=torch.float64)
    grid = torch.linspace(-8, 8, 16001, dtype=torch.float64)
    for lam in (0.01, 1.0):
        z = relaxed_z(ry, yp, lam)
        cost = (ry - z.clamp(min=0)) ** 2 + lam * (z - yp) ** 2
        brute = ((ry[:, None] - grid.clamp(min=0)) ** 2 + lam * (grid - yp[:, None]) ** 2).min(dim=1).values
        assert torch.all(cost <= brute + 1e-6)


def test_nonlinear_lowers_relu_reconstruction_error(graph):
    lin = run_pass("channel-lowrank{rank=3}", graph, am_for(graph))
    nl = run_pass("channel-lowrank{rank=3,nonlinear=true}", graph, am_for(graph))
    for fit in nl.stats["fit"].values():
        assert fit["relu"] is True
        assert fit["loss"] <= fit["linear_loss"]
    fits = list(nl.stats["fit"].values())
    assert sum(f["loss"] for f in fits) < 0.95 * sum(f["linear_loss"] for f in fits)
    x = inputs(64, 5)
    assert rel_err(graph, nl.graph, x) < 1.1 * rel_err(graph, lin.graph, x)


def test_asymmetric_reduces_whole_network_error_on_a_chain(graph):
    x = inputs(128, 9)
    sym = run_pass("channel-lowrank{rank=3}", graph, am_for(graph, n=128))
    asym = run_pass("channel-lowrank{rank=3,asymmetric=true}", graph, am_for(graph, n=128))
    assert all(f["teacher"] == "reference" for f in asym.stats["fit"].values())
    e_sym, e_asym = rel_err(graph, sym.graph, x), rel_err(graph, asym.graph, x)
    assert e_asym < 0.95 * e_sym


def test_asymmetric_after_fold_bn_uses_the_bn_reference_and_refines():
    g = Graph.from_torch(chain(bn=True), (inputs(1, 0),))
    am = PassContext(calib(), reference=g)
    out, records = PassManager(parse_pipeline(
        "fold-bn,channel-lowrank{rank=4,asymmetric=true,nonlinear=true,refine_steps=30}")).run(g, am)
    stats = records[-1].stats
    assert stats["layers_factorized"] == 3 and stats["calibration"] == "user"
    for fit in stats["fit"].values():
        assert fit["teacher"] == "reference" and "refined_loss" in fit
        assert fit["loss"] <= fit["linear_loss"]
    assert rel_err(g, out, inputs(32, 3)) < 0.5


def test_declines_grouped_depthwise_and_transposed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
                          nn.ConvTranspose2d(16, 8, 2, stride=2)).eval()
    g = Graph.from_torch(model, (inputs(1, 0),))
    result = run_pass("channel-lowrank{rank=2}", g, am_for(g))
    reasons = {s.node: s.reason for s in result.skipped}
    assert "grouped" in reasons["_2"] and "depthwise" in reasons["_4"]
    assert "transposed" in reasons["_6"]
    assert list(result.stats["ranks"]) == ["_0"]


def test_declines_too_few_samples_and_costlier_factorizations(graph):
    few = run_pass("channel-lowrank{rank=2,max_samples=40}", graph, am_for(graph))
    assert not few.changed
    assert all("response samples" in s.reason for s in few.skipped) and len(few.skipped) == 3
    costly = run_pass("channel-lowrank{rank=15}", graph, am_for(graph))
    assert not costly.changed
    assert all("MACs >= original" in s.reason for s in costly.skipped)


def test_idempotent(graph):
    once = run_pass("channel-lowrank{rank=4}", graph, am_for(graph))
    twice = run_pass("channel-lowrank{rank=4}", once.graph, am_for(graph))
    assert not twice.changed and twice.graph is once.graph
    assert all("already factorized" in s.reason for s in twice.skipped)


def test_global_mac_target(graph):
    am = am_for(graph)
    result = run_pass("channel-lowrank{target_macs=0.6}", graph, am)
    total = am.analyses.get(Cost, graph).macs
    assert result.stats["target_met"]
    assert am.analyses.get(Cost, result.graph).macs <= 0.6 * total
    assert set(result.sensitivity.curves) == {"_0", "_2", "_4"}


@pytest.mark.parametrize("spec", [
    "channel-lowrank{rank=0}", "channel-lowrank{rank=bogus}", "channel-lowrank{rank=1.5}",
    "channel-lowrank{refine_steps=-1}", "channel-lowrank{max_samples=0}",
    "channel-lowrank{refine_lr=0}", "channel-lowrank{target_macs=1.5}",
    "channel-lowrank{nonlinear=3}", "channel-lowrank{sigma=1}"])
def test_config_errors(spec):
    with pytest.raises(PassConfigError):
        parse_pipeline(spec)
