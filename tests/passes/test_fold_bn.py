import pytest
import torch
from torch import nn

from slimgraph.ir import Graph
from slimgraph.zoo.models import DigitsCNN, resnet18
from tests.passes.helpers import max_rel_err, module_types, run_pass


def _randomize_bn(model):
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.3)
            if m.affine:
                m.weight.data.copy_(torch.randn(m.num_features, generator=g))
                m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def test_resnet18_structure_and_numerics():
    g = Graph.from_torch(resnet18(), (torch.randn(1, 3, 224, 224),))
    res = run_pass("fold-bn", g)
    assert res.changed and res.stats["bn_folded"] == 20
    assert "BatchNorm2d" in module_types(g) and "BatchNorm2d" not in module_types(res.graph)
    assert all(res.graph.gm.get_submodule(n.target).bias is not None
               for n in res.graph.nodes if n.op == "call_module" and "conv" in n.target)
    assert max_rel_err(g, res.graph, torch.randn(2, 3, 224, 224)) < 1e-5


@pytest.mark.parametrize("layer,bn,x", [
    (nn.Conv1d(3, 6, 3, groups=3), nn.BatchNorm1d(6), torch.randn(4, 3, 10)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6), torch.randn(2, 4, 5, 5)),
    (nn.Linear(7, 5), nn.BatchNorm1d(5), torch.randn(6, 7)),
    (nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8, affine=False), torch.randn(2, 3, 9, 9)),
])
def test_every_foldable_layer_kind_is_exact(layer, bn, x):
    g = Graph.from_torch(_randomize_bn(nn.Sequential(layer, bn)), (x,))
    res = run_pass("fold-bn", g)
    assert res.changed and module_types(res.graph) == [type(layer).__name__]
    assert max_rel_err(g, res.graph, x) < 1e-5


class SharedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y, self.bn2(x.repeat(1, 2, 1, 1)[:, :4, 1:-1, 1:-1])


def test_unsafe_cases_are_declined_and_reported():
    g = Graph.from_torch(_randomize_bn(SharedOutput()), (torch.randn(1, 3, 8, 8),))
    res = run_pass("fold-bn", g)
    assert not res.changed and res.graph is g
    reasons = {s.node: s.reason for s in res.skipped}
    assert "also read by" in reasons["bn"]
    assert "not a conv or linear" in reasons["bn2"]


def test_batch_statistics_bn_is_declined():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    g = Graph.from_torch(m, (torch.randn(2, 3, 8, 8),))
    res = run_pass("fold-bn", g)
    assert not res.changed and "batch statistics" in res.skipped[0].reason


def test_idempotent():
    g = Graph.from_torch(_randomize_bn(DigitsCNN()), (torch.randn(1, 1, 16, 16),))
    once = run_pass("fold-bn", g)
    twice = run_pass("fold-bn", once.graph)
    assert once.changed and not twice.changed and twice.graph is once.graph
