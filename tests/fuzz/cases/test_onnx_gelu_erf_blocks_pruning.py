"""Fuzz case, fixed (kept as a regression test): paths on onnx after prune-channels{target_macs=0.6}.

Found by tools/fuzz.py (seed 14), shrunk from 9 to 1 records:
    path onnx, pass prune-channels{target_macs=0.6}, invariant paths (a pass gives the same MACs, removes as many parameters, and gives the same outputs (rel-L2 1e-4; 5e-2 after training) on every path)
    paths: fx vs onnx: macs_after 66 vs 132, params_removed 67 vs 0

Diagnosis: GELU exports to ONNX (opset 17) as x * (erf(x / sqrt 2) + 1) * 0.5; the ONNX frontend keeps
that decomposition and the channel analysis blocks the group ("op erf is not understood by the
channel analysis"), so prune-channels prunes fc2 on fx but not on onnx. Probably
slimgraph/ir/analysis/channels.py (torch.erf and div by a scalar are element-wise) and/or
slimgraph/ir/onnx_frontend.py (fuse the erf pattern back into GELU).

Re-run the original graph: .venv/bin/python tools/fuzz.py --graphs 1 --seed 14
"""

import torch
import torch.nn.functional as F  # noqa: F401
from torch import nn

from tools.fuzz import run_model


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc2 = nn.Linear(64, 2)
        self.fc5 = nn.Linear(2, 2)

    def forward(self, x):
        x1 = torch.flatten(x, 1)
        x3 = self.fc2(x1)
        x4 = F.gelu(x3)
        x6 = self.fc5(x4)
        return x6


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


def make_model(seed=14):
    torch.manual_seed(seed)
    model = init_weights(Net(), seed)
    x = torch.randn((1, 4, 4, 4), generator=torch.Generator().manual_seed(seed))
    return model, x


def test_prune_channels_paths_paths_onnx_s14(tmp_path):
    model, x = make_model()
    result = run_model(model, x, seed=14, tmp=tmp_path, paths=['fx', 'onnx'],
                       passes={'prune-channels': 'prune-channels{target_macs=0.6}'},
                       compile_targets=[], checks=['paths'])
    found = [f for f in result.findings if f.key() == ('onnx', 'prune-channels', 'paths', 'paths')]
    assert not found, found[0].message
