"""Fuzz case: paths on onnx after fold-bn.

Found by tools/fuzz.py (seed 35), shrunk from 6 to 1 records:
    path onnx, pass fold-bn, invariant paths (a pass gives the same MACs, removes as many parameters, and gives the same outputs (rel-L2 1e-4; 5e-2 after training) on every path)
    paths: after cleanup,fold-bn the layers hold 6 parameters on fx, 2 on onnx

Diagnosis: GroupNorm exports to ONNX as Reshape + InstanceNormalization(per-group scale) + Reshape + Mul +
Add; the ONNX frontend keeps the decomposition, so the canonical nn.GroupNorm module (6 params
here) becomes a 2-parameter InstanceNorm plus loose affine constants on the onnx path.
Fixed: the ONNX frontend folds the pattern back into nn.GroupNorm (``_fold_group_norms``).
A regression test now.

Re-run the original graph: .venv/bin/python tools/fuzz.py --graphs 1 --seed 35
"""

import torch
import torch.nn.functional as F  # noqa: F401
from torch import nn

from tools.fuzz import run_model


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.gn1 = nn.GroupNorm(1, 3)

    def forward(self, x):
        x2 = self.gn1(x)
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


def make_model(seed=35):
    torch.manual_seed(seed)
    model = init_weights(Net(), seed)
    x = torch.randn((1, 3, 4, 4), generator=torch.Generator().manual_seed(seed))
    return model, x


def test_fold_bn_paths_paths_onnx_s35(tmp_path):
    model, x = make_model()
    result = run_model(model, x, seed=35, tmp=tmp_path, paths=['fx', 'onnx'],
                       passes={},
                       compile_targets=[], checks=['paths'])
    found = [f for f in result.findings if f.key() == ('onnx', 'fold-bn', 'paths', 'paths')]
    assert not found, found[0].message
