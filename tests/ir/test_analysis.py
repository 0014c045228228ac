import pytest
import torch
from torch import nn

from slimgraph.ir import Graph
from slimgraph.ir.analysis import AnalysisManager, Cost, Shapes
from slimgraph.ir.analysis.cost import PJ_DRAM_READ_32, PJ_FLOAT_ADD, PJ_FLOAT_MULT, PJ_SRAM_READ_32
from slimgraph.zoo.models import resnet18


def test_shapes_of_every_node():
    g = Graph.from_torch(resnet18(), (torch.randn(1, 3, 224, 224),))
    shapes = AnalysisManager().get(Shapes, g)
    assert shapes["conv1"].shape == (1, 64, 112, 112)
    assert shapes["layer4_1_relu_1"].shape == (1, 512, 7, 7)
    assert shapes["fc"].shape == (1, 1000)


def test_resnet18_macs_and_params_match_the_literature():
    g = Graph.from_torch(resnet18(), (torch.randn(1, 3, 224, 224),))
    cost = AnalysisManager().get(Cost, g)
    conv_linear = sum(c.macs for c in cost.nodes.values() if c.op in ("Conv2d", "Linear"))
    assert conv_linear == 1_814_073_344  # the ResNet-18 figure every counter reports (1.81 GMACs)
    assert cost.params == 11_689_512


def test_costs_are_per_sample_whatever_the_example_batch():
    model = resnet18(width=8, num_classes=10).eval()
    one = AnalysisManager().get(Cost, Graph.from_torch(model, (torch.randn(1, 3, 32, 32),)))
    four = AnalysisManager().get(Cost, Graph.from_torch(model, (torch.randn(4, 3, 32, 32),)))
    assert one.macs == four.macs > 0 and one.params == four.params
    assert one.energy_pj == pytest.approx(four.energy_pj)
    assert [c.act_bytes for c in one.nodes.values()] == [c.act_bytes for c in four.nodes.values()]


def test_cost_per_op_kind_and_energy_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, padding=1, groups=2, bias=False)
            self.tconv = nn.ConvTranspose2d(8, 2, 2, stride=2, bias=False)
            self.fc = nn.Linear(2 * 16 * 16, 5, bias=False)

        def forward(self, x):
            y = self.tconv(self.conv(x))
            return self.fc(torch.flatten(y, 1)) @ torch.ones(5, 3)

    g = Graph.from_torch(Net(), (torch.randn(1, 4, 8, 8),))
    cost = AnalysisManager().get(Cost, g)
    assert cost.nodes["conv"].macs == 8 * 8 * 8 * (4 // 2) * 9
    assert cost.nodes["tconv"].macs == 8 * 8 * 8 * 2 * 4  # each input scatters into Cout*k*k
    assert cost.nodes["fc"].macs == 5 * 512
    assert cost.nodes["matmul"].macs == 3 * 5
    fc = cost.nodes["fc"]
    expected = (fc.macs * (PJ_FLOAT_MULT + PJ_FLOAT_ADD) + 5 * 512 * PJ_DRAM_READ_32
                + (5 + 512) * PJ_SRAM_READ_32)
    assert fc.energy_pj == pytest.approx(expected)


def test_analyses_are_cached_per_graph_and_invalidated():
    g = Graph.from_torch(resnet18(width=8), (torch.randn(1, 3, 32, 32),))
    am = AnalysisManager()
    a = am.get(Cost, g)
    assert am.get(Cost, g) is a
    am.invalidate(g)
    assert am.get(Cost, g) is not a
    other = g.copy()
    am.transfer(g, other, [Shapes])
    assert am.cached(other) == {Shapes}


def test_analysis_keys_are_typed_and_a_wrong_preservation_claim_is_caught():
    import pytest

    from slimgraph.errors import VerifyError

    g = Graph.from_torch(resnet18(width=8), (torch.randn(1, 3, 32, 32),))
    am = AnalysisManager()
    with pytest.raises(TypeError, match="Analysis subclasses"):
        am.get("cost", g)
    am.get(Cost, g)
    pruned = g.copy()
    pruned.gm.fc = torch.nn.Linear(64, 3)  # a different layer: the cost changes
    pruned.gm.recompile()
    am.transfer(g, pruned, [Cost])
    with pytest.raises(VerifyError, match="claims to preserve the cost analysis"):
        am.verify_preserved(pruned, [Cost], "pass 'x'")
