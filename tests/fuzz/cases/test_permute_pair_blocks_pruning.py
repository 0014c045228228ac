"""Fuzz case, fixed (kept as a regression test): paths on onnx after prune-channels{target_macs=0.6}.

Found by tools/fuzz.py (seed 1073), shrunk from 4 to 3 records:
    path onnx, pass prune-channels{target_macs=0.6}, invariant paths (a pass gives the same MACs, removes as many parameters, and gives the same outputs (rel-L2 1e-4; 5e-2 after training) on every path)
    paths: fx vs onnx: macs_after 87 vs 29, params_removed 0 vs 10

Diagnosis: x.permute(0, 2, 3, 1).permute(0, 3, 1, 2) is the identity; the ONNX exporter drops it, slimgraph
keeps it on fx/pt2 and the channel analysis blocks the group through the permutes, so
prune-channels prunes conv1 on onnx only. Probably slimgraph/passes/cleanup.py (cancel inverse
permute pairs) or slimgraph/ir/analysis/channels.py (follow channels through permute).

Re-run the original graph: .venv/bin/python tools/fuzz.py --graphs 1 --seed 1073
"""

import torch
import torch.nn.functional as F  # noqa: F401
from torch import nn

from tools.fuzz import run_model


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 1, bias=False)
        self.fc6 = nn.Linear(3, 2)

    def forward(self, x):
        x2 = self.conv1(x)
        x3 = x2.permute(0, 2, 3, 1)
        x4 = x3.permute(0, 3, 1, 2)
        x5 = F.adaptive_avg_pool2d(x4, 1).flatten(1)
        x7 = self.fc6(x5)
        return x7


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


def make_model(seed=1073):
    torch.manual_seed(seed)
    model = init_weights(Net(), seed)
    x = torch.randn((1, 3, 3, 3), generator=torch.Generator().manual_seed(seed))
    return model, x


def test_prune_channels_paths_paths_onnx_s1073(tmp_path):
    model, x = make_model()
    result = run_model(model, x, seed=1073, tmp=tmp_path, paths=['fx', 'onnx'],
                       passes={'prune-channels': 'prune-channels{target_macs=0.6}'},
                       compile_targets=[], checks=['paths'])
    found = [f for f in result.findings if f.key() == ('onnx', 'prune-channels', 'paths', 'paths')]
    assert not found, found[0].message
