"""Fuzz case, fixed (kept as a regression test): paths on onnx after spatial-svd{rank=macs=0.5}.

Found by tools/fuzz.py (seed 1027), shrunk from 10 to 1 records:
    path onnx, pass spatial-svd{rank=macs=0.5}, invariant paths (a pass gives the same MACs, removes as many parameters, and gives the same outputs (rel-L2 1e-4; 5e-2 after training) on every path)
    paths: fx vs onnx: macs_after 2592 vs 1152, params_removed 0 vs 90

Diagnosis: One Conv called twice shares its ONNX initializer (the exporter writes it once), but the
ONNX frontend makes two modules (shared1_Conv, shared1_1_Conv): the sharing is lost, so every
pass compresses the two call sites independently on the onnx path while fx/pt2 see one shared
module. Probably slimgraph/ir/onnx_frontend.py (re-share modules whose initializers and attributes
are equal, as the export frontend does for pt2).

Fixed: the ONNX frontend builds one module for every layer whose initializers and settings are
the same, so a shared layer stays shared on the onnx path (test below is the regression test).

Re-run the original graph: .venv/bin/python tools/fuzz.py --graphs 1 --seed 1027
"""

import torch
import torch.nn.functional as F  # noqa: F401
from torch import nn

from tools.fuzz import run_model


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared1 = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        x2 = self.shared1(x)
        x3 = self.shared1(x2)
        return x3


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


def make_model(seed=1027):
    torch.manual_seed(seed)
    model = init_weights(Net(), seed)
    x = torch.randn((1, 3, 4, 4), generator=torch.Generator().manual_seed(seed))
    return model, x


def test_spatial_svd_paths_paths_onnx_s1027(tmp_path):
    model, x = make_model()
    result = run_model(model, x, seed=1027, tmp=tmp_path, paths=['fx', 'onnx'],
                       passes={'spatial-svd': 'spatial-svd{rank=macs=0.5}'},
                       compile_targets=[], checks=['paths'])
    found = [f for f in result.findings if f.key() == ('onnx', 'spatial-svd', 'paths', 'paths')]
    assert not found, found[0].message
