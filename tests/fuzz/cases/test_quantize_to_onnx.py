"""Fuzz case, fixed (kept as a regression test): onnx on fx after quantize.

Found by tools/fuzz.py (seed 0), shrunk from 6 to 1 records:
    path fx, pass quantize, invariant onnx (Graph.to_onnx + onnxruntime == Graph.run (rel-L2 1e-4))
    onnx: to_onnx failed: SlimgraphError: ONNX export of Net failed: ONNX export failed on an operator
    with unrecognized namespace slimgraph::quantize_u8. If you are trying to export a custom
    operator, make sure you registered it with the right domain and version.
Raised at: slimgraph/ir/graph.py:340 in to_onnx

Diagnosis: Graph.to_onnx of a quantized graph fails: slimgraph::quantize_u8 / qconv2d / qlinear /
dequantize_u8 have no ONNX symbolic (they are documented as ONNX QuantizeLinear / DequantizeLinear
semantics). Every quantize output on every path fails the to_onnx invariant. Probably
slimgraph/ops/quantized.py (register ONNX symbolics: QuantizeLinear, QLinearConv/ConvInteger,
DequantizeLinear) or slimgraph/ir/graph.py to_onnx. Note also: the cost analysis reports 0 MACs
for quantized graphs (slimgraph/ir/analysis/cost.py does not count the integer ops).

Re-run the original graph: .venv/bin/python tools/fuzz.py --graphs 1 --seed 0
"""

import torch
import torch.nn.functional as F  # noqa: F401
from torch import nn

from tools.fuzz import run_model


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, 1, bias=False)

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


def make_model(seed=0):
    torch.manual_seed(seed)
    model = init_weights(Net(), seed)
    x = torch.randn((1, 1, 3, 4), generator=torch.Generator().manual_seed(seed))
    return model, x


def test_quantize_onnx_onnx_fx_s0(tmp_path):
    model, x = make_model()
    result = run_model(model, x, seed=0, tmp=tmp_path, paths=['fx'],
                       passes={'quantize': 'quantize'},
                       compile_targets=[], checks=['onnx'])
    found = [f for f in result.findings if f.key() == ('fx', 'quantize', 'onnx', 'onnx')]
    assert not found, found[0].message
