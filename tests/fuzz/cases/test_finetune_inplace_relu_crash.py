"""Fuzz case, fixed (kept as a regression test): crash on fx after finetune{epochs=1}.

Found by tools/fuzz.py (seed 1167), shrunk from 17 to 3 records:
    path fx, pass finetune{epochs=1}, invariant crash (an exception that is not a SlimgraphError (stage/type in `kind`))
    pass/RuntimeError: PassError: pass 'finetune' failed (first pass): RuntimeError: one of the variables needed
    for gradient computation has been modified by an inplace operation: [torch.FloatTensor [16,
    1, 4, 4]], which is output 0 of Relu, is at version 1; expected version 0 instead. Hint:
    enable anomaly detection to find the operation that failed to compute its gradient, with
    torch.autograd.set_detect_anomaly(True, check_nan=False).
Raised at: slimgraph/passes/toolkit/train.py:141 in train

Diagnosis: ReLU followed by ReLU(inplace=True): fx keeps the in-place call, and finetune's backward fails
with a raw RuntimeError ("modified by an inplace operation"). pt2/onnx are functional and train.
Probably slimgraph/passes/finetune.py / toolkit/train.py (make in-place ops out-of-place in the
training copy, or cleanup canonicalizes inplace=True away) -- at least a SlimgraphError.

Re-run the original graph: .venv/bin/python tools/fuzz.py --graphs 1 --seed 1167
"""

import torch
import torch.nn.functional as F  # noqa: F401
from torch import nn

from tools.fuzz import run_model


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, 1, bias=False)
        self.act3 = nn.ReLU()
        self.act5 = nn.ReLU(inplace=True)

    def forward(self, x):
        x2 = self.conv1(x)
        x4 = self.act3(x2)
        x6 = self.act5(x4)
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


def make_model(seed=1167):
    torch.manual_seed(seed)
    model = init_weights(Net(), seed)
    x = torch.randn((1, 1, 4, 4), generator=torch.Generator().manual_seed(seed))
    return model, x


def test_finetune_crash_pass_runtimeerror_fx_s1167(tmp_path):
    model, x = make_model()
    result = run_model(model, x, seed=1167, tmp=tmp_path, paths=['fx'],
                       passes={'finetune': 'finetune{epochs=1}'},
                       compile_targets=[], checks=['skipped'])
    found = [f for f in result.findings if f.key() == ('fx', 'finetune', 'crash', 'pass/RuntimeError')]
    assert not found, found[0].message
