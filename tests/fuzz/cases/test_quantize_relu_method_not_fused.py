"""Fuzz case, fixed (kept as a regression test): paths on pt2 after quantize{per_channel=false}.

Found by tools/fuzz.py (seed 1148), shrunk from 5 to 1 records:
    path pt2, pass quantize{per_channel=false}, invariant paths (a pass gives the same MACs, removes as many parameters, and gives the same outputs (rel-L2 1e-4; 5e-2 after training) on every path)
    paths: fx vs pt2 outputs: rel-L2 0.00867

Diagnosis: fx traces x.relu() as call_method 'relu'; pt2 gives torch.relu. quantize fuses torch.relu into
the preceding qlinear (output zero point 0) but not the method form, which stays a float relu
between dequantize/quantize, so fx and pt2 quantize differently (rel-L2 0.009). Probably
slimgraph/passes/quantize/convert.py (match method-form activations) or cleanup (canonicalize
x.relu() to torch.relu as the canonical form requires).

Re-run the original graph: .venv/bin/python tools/fuzz.py --graphs 1 --seed 1148
"""

import torch
import torch.nn.functional as F  # noqa: F401
from torch import nn

from tools.fuzz import run_model


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc2 = nn.Linear(36, 2)
        self.fc5 = nn.Linear(2, 2)

    def forward(self, x):
        x1 = x.view(x.size(0), -1)
        x3 = self.fc2(x1)
        x4 = x3.relu()
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


def make_model(seed=1148):
    torch.manual_seed(seed)
    model = init_weights(Net(), seed)
    x = torch.randn((1, 3, 3, 4), generator=torch.Generator().manual_seed(seed))
    return model, x


def test_quantize_paths_paths_pt2_s1148(tmp_path):
    model, x = make_model()
    result = run_model(model, x, seed=1148, tmp=tmp_path, paths=['fx', 'pt2'],
                       passes={'quantize': 'quantize{per_channel=false}'},
                       compile_targets=[], checks=['paths'])
    found = [f for f in result.findings if f.key() == ('pt2', 'quantize', 'paths', 'paths')]
    assert not found, found[0].message
