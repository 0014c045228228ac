"""Fuzz case, fixed (kept as a regression test): paths on pt2 after import.

Found by tools/fuzz.py (seed 1069), shrunk from 3 to 1 records:
    path pt2, pass import, invariant paths (a pass gives the same MACs, removes as many parameters, and gives the same outputs (rel-L2 1e-4; 5e-2 after training) on every path)
    paths: imported MACs fx 54 vs pt2 27

Diagnosis: An example batch of 2: Graph.from_exported_program slices the example inputs to batch 1
("costs are per sample") but Graph.from_torch and from_onnx keep the example batch, so the cost
analysis gives the pt2 import half the MACs of fx/onnx for the same model. Probably
slimgraph/ir/graph.py (one rule for example batches in every frontend).

Fixed: the cost analysis counts per sample (MACs and activations divided by the example
batch), so every frontend reports the same MACs whatever example batch it keeps.

Re-run the original graph: .venv/bin/python tools/fuzz.py --graphs 1 --seed 1069
"""

import torch
import torch.nn.functional as F  # noqa: F401
from torch import nn

from tools.fuzz import run_model


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 1, 1, bias=False)

    def forward(self, x):
        x2 = self.conv1(x)
        return x2


def init_weights(model, seed):
    """Seeded weights, random batch-norm statistics, PReLU slopes and per-channel scales."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.conv._ConvNd | nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight[0].numel() ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) - 0.5)
            elif isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        for p in model._parameters.values():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model.eval()


def make_model(seed=1069):
    torch.manual_seed(seed)
    model = init_weights(Net(), seed)
    x = torch.randn((2, 3, 3, 3), generator=torch.Generator().manual_seed(seed))
    return model, x


def test_import_paths_paths_pt2_s1069(tmp_path):
    model, x = make_model()
    result = run_model(model, x, seed=1069, tmp=tmp_path, paths=['fx', 'pt2'],
                       passes={},
                       compile_targets=[], checks=['paths'])
    found = [f for f in result.findings if f.key() == ('pt2', 'import', 'paths', 'paths')]
    assert not found, found[0].message
