"""Fuzz case: paths on onnx after prune-channels{ratio=0.25}.

Found by tools/fuzz.py (seed 2037), shrunk from 5 to 4 records:
    path onnx, pass prune-channels{ratio=0.25}, invariant paths (a pass gives the same MACs, removes as many parameters, and gives the same outputs (rel-L2 1e-4; 5e-2 after training) on every path)
    paths: fx vs onnx: macs_after 168 vs 168, params_removed 25 vs 27

Diagnosis: BatchNorm2d(affine=False) exports to ONNX as a BatchNormalization with constant
scale 1 and bias 0; the ONNX frontend imports an affine BatchNorm2d (8 parameters here, 0 on fx),
so prune-channels removes 2 more parameters on onnx than on fx for the same channels (MACs agree).
Minor: parameter accounting only. Fixed: the ONNX frontend imports a BatchNormalization with
scale 1 and bias 0 as affine=False (found with --off shared,pm; also behind 11 prune-channels
findings of the long fuzz runs, seeds 20006-20896). A regression test now.

Re-run the original graph (with --off shared,pm): .venv/bin/python tools/fuzz.py --graphs 1 --seed 2037 --off shared,pm
"""

import torch
import torch.nn.functional as F  # noqa: F401
from torch import nn

from tools.fuzz import run_model


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 1, bias=False)
        self.se3 = nn.Conv2d(4, 1, 1)
        self.se4 = nn.Conv2d(1, 4, 1)
        self.bn8 = nn.BatchNorm2d(4, affine=False)
        self.fc11 = nn.Linear(36, 2)

    def forward(self, x):
        x2 = self.conv1(x)
        x5 = x2.mean((2, 3), keepdim=True)
        x6 = F.hardsigmoid(self.se4(F.relu(self.se3(x5))))
        x7 = x2 * x6
        x9 = self.bn8(x7)
        x10 = torch.flatten(x9, 1)
        x12 = self.fc11(x10)
        return x12


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


def make_model(seed=2037):
    torch.manual_seed(seed)
    model = init_weights(Net(), seed)
    x = torch.randn((1, 4, 3, 3), generator=torch.Generator().manual_seed(seed))
    return model, x


def test_prune_channels_paths_paths_onnx_s2037(tmp_path):
    model, x = make_model()
    result = run_model(model, x, seed=2037, tmp=tmp_path, paths=['fx', 'onnx'],
                       passes={'prune-channels': 'prune-channels{ratio=0.25}'},
                       compile_targets=[], checks=['paths'])
    found = [f for f in result.findings if f.key() == ('onnx', 'prune-channels', 'paths', 'paths')]
    assert not found, found[0].message
