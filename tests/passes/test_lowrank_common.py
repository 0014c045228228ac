"""lowrank.common: rank options, the greedy selector, MAC accounting, shared declines, targets."""


import numpy as np
import pytest
import torch
from torch import nn

from slimgraph.errors import PassConfigError
from slimgraph.ir import Graph
from slimgraph.ir.analysis import Cost
from slimgraph.passes import available_passes
from slimgraph.passes.context import PassContext
from slimgraph.passes.lowrank.common import (
    RankSpec,
    energy_rank,
    parse_rank,
)
from slimgraph.zoo.models import DigitsCNN
from tests.passes.helpers import run_pass


@pytest.mark.parametrize("value,spec", [
    (3, RankSpec("fixed", 3)), (0.9, RankSpec("energy", 0.9)), (1.0, RankSpec("energy", 1.0)),
    ("vbmf", RankSpec("vbmf")), ("full", RankSpec("full")), ("macs=0.5", RankSpec("macs", 0.5)),
    ("energy=0.8", RankSpec("energy", 0.8)), ("frac=0.25", RankSpec("frac", 0.25)),
])
def test_parse_rank(value, spec):
    assert parse_rank(value) == spec


@pytest.mark.parametrize("value", [0, -1, 0.0, 1.5, -0.2, "macs=0", "macs=2", "energy=x", "svd", True, None])
def test_parse_rank_rejects(value):
    with pytest.raises(PassConfigError):
        parse_rank(value)


def test_energy_rank():
    s = np.array([3.0, 2.0, 1.0, 0.0])  # squared: 9, 4, 1 of 14
    assert [energy_rank(s, f) for f in (0.5, 9 / 14, 0.92, 0.93, 1.0)] == [1, 1, 2, 3, 3]


def test_all_passes_registered():
    assert {"fc-svd", "spatial-svd", "tucker2", "cp", "flatten-conv"} <= set(available_passes())


@pytest.mark.parametrize("spec", ["tucker2{rank=3}", "spatial-svd{rank=3}", "cp{rank=4,max_rel_error=1.0}",
                                  "flatten-conv{rank=2}", "fc-svd{rank=2}"])
def test_plan_macs_match_the_cost_analysis(spec):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 16, 3, stride=2, padding=1), nn.Conv2d(16, 16, 1), nn.ReLU(),
                          nn.Conv2d(16, 16, (3, 5), padding=(2, 1), dilation=(2, 1)))
    g = Graph.from_torch(model, (torch.randn(2, 4, 11, 11),))
    am = PassContext()
    res = run_pass(spec, g, am)
    assert res.changed
    before, after = am.analyses.get(Cost, g).macs, am.analyses.get(Cost, res.graph).macs
    assert before - after == res.stats["macs_saved"] > 0
    assert torch.isfinite(torch.from_numpy(res.graph.run(torch.randn(2, 4, 11, 11))[0])).all()


def test_shared_and_transposed_layers_are_declined():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.up = nn.ConvTranspose2d(8, 8, 3)

        def forward(self, x):
            return self.up(self.conv(self.conv(x)))

    g = Graph.from_torch(Shared(), (torch.randn(1, 8, 6, 6),))
    for spec in ("tucker2{rank=2}", "spatial-svd{rank=2}", "cp{rank=2}", "flatten-conv"):
        res = run_pass(spec, g)
        reasons = " | ".join(s.reason for s in res.skipped)
        assert not res.changed and "called at 2 places" in reasons and "transposed" in reasons


def test_tucker2_global_target_on_digits_cnn():
    torch.manual_seed(0)
    g = Graph.from_torch(DigitsCNN(width=16), (torch.randn(1, 1, 16, 16),))
    g = run_pass("fold-bn", g).graph
    batches = [(torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(2)),)]
    am = PassContext(batches, reference=g)
    res = run_pass("tucker2{target_macs=0.5}", g, am)
    before, after = am.analyses.get(Cost, g).macs, am.analyses.get(Cost, res.graph).macs
    assert res.changed and res.stats["target_met"] and after <= 0.5 * before
    sens = res.sensitivity.curves
    assert set(res.stats["ranks"]) <= set(sens)
    for curve in sens.values():
        fracs = [x for x, _ in curve]
        assert fracs == sorted(fracs) and fracs[-1] == 1.0 and curve[-1][1] == pytest.approx(1.0)
        assert all(np.isfinite(f) for _, f in curve)
