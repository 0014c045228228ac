"""The torch.export frontend: canonical form, dynamic batch, fixed batch, and its errors."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimgraph.errors import ModelLoadError, UnsupportedOpError
from slimgraph.ir.export_frontend import export_module, import_exported_program
from slimgraph.ir.graph import Graph
from slimgraph.ir.loading import load_model
from slimgraph.passes.base import parse_pipeline
from slimgraph.passes.manager import PassManager
from slimgraph.schema import Skip


class SamePad(nn.Module):
    """TF-style SAME padding computed from the input's shape: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.ct = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.prelu = nn.PReLU(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.bn2 = nn.BatchNorm2d(16)
        self.ln = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 5)
        for bn in (self.bn, self.bn2):
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        ih = x.size(2)
        pad = max((math.ceil(ih / 2) - 1) * 2 + 3 - ih, 0)
        x = F.pad(x, [pad // 2, pad - pad // 2, pad // 2, pad - pad // 2])
        y = F.relu(self.bn(self.conv(x)))
        z = F.max_pool2d(self.prelu(self.ct(y)), 2)
        y = y + F.hardswish(self.dw(z))
        a, b = y.chunk(2, dim=1)
        y = torch.cat([b, a], 1)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        y = F.relu6(self.bn2(self.pw(y)))
        return self.fc(self.ln(F.adaptive_avg_pool2d(y, 1).flatten(1)))


def same_pad(x, k: int, s: int):
    """TensorFlow's SAME padding for a k x k kernel at stride s, from the input's size."""
    ih, iw = x.size(2), x.size(3)
    ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
    pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


class TfSameNet(nn.Module):
    """A small CNN ported from TensorFlow (SAME padding computed in forward, as timm's
    ``Conv2dSame`` does): torch.fx cannot trace it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, 2), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, 1), nn.BatchNorm2d(32)
        self.c3 = nn.Conv2d(32, 32, 1)
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 10)
        for bn in (self.b1, self.b2):
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(same_pad(x, 3, 2))))
        x = F.relu(self.b2(self.c2(same_pad(x, 3, 1))))
        x = F.relu(self.c3(x)) + x
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


def _model():
    torch.manual_seed(0)
    return SamePad().eval(), (torch.randn(1, 3, 16, 16),)


def _call_modules(g):
    return {n.target: type(g.gm.get_submodule(n.target)).__name__ for n in g.nodes if n.op == "call_module"}


def test_fallback_gives_canonical_form_with_a_dynamic_batch():
    m, x = _model()
    g = Graph.from_torch(m, x)
    assert g.source == "torch.export" and g.fixed_batch is None
    assert "torch.fx could not trace" in g.notes[0]
    assert _call_modules(g) == {"conv": "Conv2d", "bn": "BatchNorm2d", "ct": "ConvTranspose2d",
                                "prelu": "PReLU", "dw": "Conv2d", "pw": "Conv2d", "bn2": "BatchNorm2d",
                                "ln": "LayerNorm", "fc": "Linear"}
    assert not g.untranslated()
    assert not [n for n in g.nodes if isinstance(n.target, torch._ops.OpOverload)]
    xb = torch.randn(5, 3, 16, 16)
    np.testing.assert_allclose(g.run(xb)[0], m(xb).detach().numpy(), rtol=1e-5, atol=1e-6)
    g.verify()


def test_decomposed_core_aten_program_gets_the_same_modules():
    m, x = _model()
    ep, dynamic, _ = export_module(m, x)
    assert dynamic
    imported = import_exported_program(ep.run_decompositions())
    kinds = sorted(type(mod).__name__ for mod in imported.gm.modules() if type(mod) is not nn.Module
                   and not isinstance(mod, torch.fx.GraphModule))
    # PReLU decomposes to where(x > 0, x, w * x) in core ATen: kept as two ATen calls
    assert kinds == sorted(["Conv2d", "BatchNorm2d", "ConvTranspose2d", "Conv2d", "Conv2d",
                            "BatchNorm2d", "LayerNorm", "Linear"])
    assert set(imported.untranslated) <= {"aten.gt", "aten.where"} or not imported.untranslated
    assert hasattr(imported.gm, "fc") and isinstance(imported.gm.fc, nn.Linear)  # addmm -> Linear
    xb = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(imported.gm(xb), m(xb), rtol=1e-5, atol=1e-6)


def test_static_pt2_runs_at_its_batch_in_slices(tmp_path):
    m, x = _model()
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(m, x), path)
    g = load_model(str(path))
    assert g.source == "pt2" and g.fixed_batch == 1
    assert any("static shapes" in note for note in g.notes)
    xb = torch.randn(4, 3, 16, 16)
    np.testing.assert_allclose(g.run(xb)[0], m(xb).detach().numpy(), rtol=1e-5, atol=1e-6)
    assert path.read_bytes() == path.read_bytes()  # readable, untouched


def test_dynamic_pt2_keeps_a_dynamic_batch(tmp_path):
    m, x = _model()
    ep, dynamic, _ = export_module(m, x)
    path = tmp_path / "m.pt2"
    torch.export.save(ep, path)
    before = path.read_bytes()
    g = load_model(str(path))
    assert dynamic and g.fixed_batch is None
    xb = torch.randn(3, 3, 16, 16)
    np.testing.assert_allclose(g.run(xb)[0], m(xb).detach().numpy(), rtol=1e-5, atol=1e-6)
    assert path.read_bytes() == before


class FixesBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x):
        if x.shape[2] > 100:  # data-dependent Python: fx fails, export specializes
            x = x[:, :, :100]
        return self.fc(self.conv(x).reshape(1, -1))  # the batch is fixed at 1


def test_model_that_fixes_its_batch_is_run_one_sample_at_a_time():
    m = FixesBatch().eval()
    g = Graph.from_torch(m, (torch.randn(1, 3, 8, 8),))
    assert g.fixed_batch == 1 and any("batch fixed at 1" in n for n in g.notes)
    xb = torch.randn(3, 3, 8, 8)
    want = torch.cat([m(xb[i:i + 1]) for i in range(3)]).detach().numpy()
    np.testing.assert_allclose(g.run(xb)[0], want, rtol=1e-5, atol=1e-6)
    # data-driven passes get batches the graph can run
    out, records = PassManager(parse_pipeline("prune-weights{sparsity=0.5}")).run(g)
    assert records[0].changed and out.fixed_batch == 1


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError("4-D input")
        return self.conv(torch.relu(self.conv(x))) if x.size(1) == 4 else x


def test_shared_weights_become_one_module_called_twice():
    g = Graph.from_torch(Shared().eval(), (torch.randn(1, 4, 6, 6),))
    calls = [n.target for n in g.nodes if n.op == "call_module"]
    assert calls == ["conv", "conv"]


class Cond(nn.Module):
    def forward(self, x):
        return torch.cond(x.sum() > 0, lambda t: t + 1, lambda t: t - 1, (x,))


def test_control_flow_program_is_one_error_naming_the_op(tmp_path):
    path = tmp_path / "cond.pt2"
    x = torch.randn(2, 3)
    torch.export.save(torch.export.export(Cond(), (x,)), path)
    with pytest.raises(UnsupportedOpError, match="higher_order.cond"):
        load_model(str(path))


class Unexportable(nn.Module):
    def forward(self, x):
        return x * 2 if float(x.sum()) > 0 else x  # data-dependent branch: neither fx nor export


def test_unexportable_module_is_one_clear_error():
    with pytest.raises(ModelLoadError, match="torch.fx tracing failed .* torch.export failed"):
        Graph.from_torch(Unexportable(), (torch.randn(2, 3),))


def test_untranslated_aten_op_is_reported_by_every_pass():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            if x.dim() == 4:
                x = torch.cumsum(self.conv(x), dim=1)  # no canonical form
            return x

    g = Graph.from_torch(Odd().eval(), (torch.randn(1, 3, 4, 4),))
    assert [op for _, op in g.untranslated()] == ["aten.cumsum.default"]
    _, records = PassManager(parse_pipeline("cleanup,fold-bn")).run(g)
    for rec in records:
        assert any("aten.cumsum" in s.reason for s in rec.skipped)


def test_pass_that_finds_nothing_says_so():
    g = Graph.from_torch(nn.Sequential(nn.Conv2d(3, 3, 1)).eval(), (torch.randn(1, 3, 4, 4),))
    _, records = PassManager(parse_pipeline("fold-bn,const-fold")).run(g)
    assert records[0].skipped == [Skip("*", "no batch norm in the graph")]
    assert records[1].skipped == [Skip("*", "no constant subgraph to fold")]


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 3, 1)
        self.drop = nn.Dropout(0.1, inplace=True)

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError("4-D input")
        y = self.c(x)
        z = y * 1
        y.relu_()
        y.add_(z)  # out += identity
        w = y[:, :2]
        w.mul_(2)  # a write through a view reaches y: kept as the ATen call
        return self.drop(y) + z


def test_in_place_ops_become_functional_and_later_readers_see_the_result():
    m = InPlace().eval()
    x = torch.randn(2, 3, 4, 4)
    g = Graph.from_torch(m, (x,))
    assert [op for _, op in g.untranslated()] == ["aten.mul_.Tensor"]
    assert not any("relu_" in str(n.target) or "add_" in str(n.target) for n in g.nodes)
    np.testing.assert_allclose(g.run(x)[0], m(x).detach().numpy(), rtol=1e-6, atol=1e-6)


class WriteThroughAViewNobodyReadsAgain(nn.Module):
    """Channel shuffle then an in-place LeakyReLU on the shuffled view (found by the fuzzer,
    seed 20150): nothing reads the base afterwards, so the functional op is exact, and it
    trains (autograd refuses an in-place write to a tensor it saved)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(6, 6, 1)
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError("4-D input")
        y = torch.tanh(x).view(x.shape[0], 2, 3, 4, 4).transpose(1, 2).reshape(x.shape[0], 6, 4, 4)
        return self.c(y) * self.act(y.view(x.shape[0], 6, 4, 4))


def test_a_write_through_a_view_that_nothing_reads_later_is_functional_and_trains():
    m = WriteThroughAViewNobodyReadsAgain().eval()
    x = torch.randn(2, 6, 4, 4)
    with torch.no_grad():
        want = m(x.clone()).numpy()
    g = Graph.from_torch(m, (x,))
    assert not any(str(n.target).endswith("_.default") for n in g.nodes), g.gm.code
    np.testing.assert_allclose(g.run(x)[0], want, rtol=1e-6, atol=1e-6)
    student = g.to_torch().train()
    student(x)[0].sum().backward()  # no "modified by an inplace operation"

