import numpy as np
import pytest
import torch
from torch import nn

from slimgraph.errors import ModelLoadError, ShapeError, VerifyError
from slimgraph.ir import Graph
from slimgraph.zoo.models import DigitsCNN, resnet18


class DataDependent(nn.Module):
    """Python control flow on a tensor value: fx cannot trace it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        if x.shape[-1] > 4:  # shape-dependent branch: fine for export, not for symbolic_trace
            return y.relu()
        return y


def test_from_torch_traces_and_runs_like_pytorch():
    torch.manual_seed(0)
    m = DigitsCNN().eval()
    x = torch.randn(2, 1, 16, 16)
    g = Graph.from_torch(m, (x,))
    assert g.source == "torch"
    assert any(n.op == "call_module" and n.target.startswith("features") for n in g.nodes)
    np.testing.assert_allclose(g.run(x)[0], m(x).detach().numpy(), rtol=1e-6, atol=1e-6)
    # any batch size the model allows
    assert g.run(torch.randn(5, 1, 16, 16))[0].shape == (5, 10)


def test_from_torch_does_not_share_weights_with_the_user_module():
    m = DigitsCNN().eval()
    g = Graph.from_torch(m, (torch.randn(1, 1, 16, 16),))
    g.gm.get_submodule("features.0").weight.data.zero_()
    assert m.features[0].weight.abs().sum() > 0


def test_from_torch_falls_back_to_export():
    m = DataDependent().eval()
    x = torch.randn(1, 3, 8, 8)
    g = Graph.from_torch(m, (x,))
    assert g.source == "torch.export"
    np.testing.assert_allclose(g.run(x)[0], m(x).detach().numpy(), rtol=1e-6, atol=1e-6)


def test_run_rejects_wrong_input_count_and_shape():
    g = Graph.from_torch(DigitsCNN(), (torch.randn(1, 1, 16, 16),))
    with pytest.raises(ShapeError, match="takes 1 input"):
        g.run(torch.randn(1, 1, 16, 16), torch.randn(1))
    with pytest.raises(ShapeError, match="expected shape"):
        g.run(torch.randn(1, 3, 16, 16))


def test_copy_is_independent():
    g = Graph.from_torch(DigitsCNN(), (torch.randn(1, 1, 16, 16),))
    c = g.copy()
    c.gm.get_submodule("features.0").weight.data.zero_()
    assert g.gm.get_submodule("features.0").weight.abs().sum() > 0


def test_to_onnx_round_trips_through_onnxruntime(tmp_path):
    import onnxruntime as ort

    m = resnet18(width=8, num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    g = Graph.from_torch(m, (x,))
    path = g.to_onnx(tmp_path / "r.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    xb = torch.randn(3, 3, 32, 32)  # dynamic batch
    out = sess.run(None, {g.input_names[0]: xb.numpy()})[0]
    np.testing.assert_allclose(out, g.run(xb)[0], rtol=1e-4, atol=1e-5)
    assert not list(tmp_path.glob("*.tmp"))


def test_verify_catches_broken_graphs():
    g = Graph.from_torch(DigitsCNN(), (torch.randn(1, 1, 16, 16),))
    g.verify()
    bad = g.copy()
    node = next(n for n in bad.nodes if n.op == "call_module")
    node.target = "does_not_exist"
    with pytest.raises(VerifyError, match="does_not_exist"):
        bad.verify()
    nan = g.copy()
    nan.gm.get_submodule("features.0").weight.data.fill_(float("nan"))
    with pytest.raises(VerifyError, match="non-finite"):
        nan.verify()


def test_from_exported_program(tmp_path):
    m = DigitsCNN().eval()
    x = torch.randn(1, 1, 16, 16)
    torch.export.save(torch.export.export(m, (x,)), tmp_path / "m.pt2")
    g = Graph.from_exported_program(tmp_path / "m.pt2")
    assert g.source == "pt2"
    np.testing.assert_allclose(g.run(x)[0], m(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    (tmp_path / "bad.pt2").write_bytes(b"not a zip")
    with pytest.raises(ModelLoadError, match="bad.pt2"):
        Graph.from_exported_program(tmp_path / "bad.pt2")


class PadThenSplit(torch.nn.Module):
    """A channel pad (22 -> 29) then split/chunk by size: torch's exporter alone writes a Split
    whose sizes (12, 12, 12) do not sum to 29."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 22, 1)

    def forward(self, x):
        x = torch.nn.functional.pad(self.conv(x), (0, 0, 0, 0, 0, 7))
        a, b, c = torch.split(x, 12, dim=1)
        d, e = x.chunk(2, 1)
        return torch.cat([a, b, c, d, e], 1)


def test_split_after_a_channel_pad_round_trips_through_onnx(tmp_path):
    import onnxruntime as ort

    model = PadThenSplit().eval()
    x = torch.randn(3, 3, 5, 5)
    g = Graph.from_torch(model, (x[:1],))
    path = g.to_onnx(tmp_path / "split.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {g.input_names[0]: x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    back = Graph.from_onnx(path)
    np.testing.assert_allclose(back.run(x)[0], got, rtol=1e-5, atol=1e-6)
    assert [n.target for n in g.nodes if "split" in str(n.target) or "chunk" in str(n.target)] == [
        torch.split, "chunk"]  # the user's graph is left as it was


class SamePadding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, padding="same", dilation=2)
        self.b = torch.nn.Conv2d(8, 8, 4, padding="same")  # even kernel: asymmetric "same"
        self.c = torch.nn.Conv2d(8, 4, 3, padding="valid")

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_same_padding_becomes_numeric_and_exports_to_onnx(tmp_path):
    import onnxruntime as ort

    model = SamePadding().eval()
    x = torch.randn(2, 3, 9, 9)
    g = Graph.from_torch(model, (x[:1],))
    pads = {n.target: g.gm.get_submodule(n.target).padding for n in g.nodes if n.op == "call_module"}
    assert pads == {"a": (2, 2), "b": (0, 0), "c": (0, 0)}
    assert [n.args[1] for n in g.nodes if n.target is torch.nn.functional.pad] == [(1, 2, 1, 2)]
    np.testing.assert_allclose(g.run(x)[0], model(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    path = g.to_onnx(tmp_path / "same.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {g.input_names[0]: x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel, dilation", [(3, 1), (4, 1), (3, 2), (2, 1)])
@pytest.mark.parametrize("mode", ["circular", "reflect", "replicate"])
def test_same_padding_with_a_padding_mode_becomes_an_explicit_pad(kernel, dilation, mode):
    """The form torch.export and ONNX give it (fx kept the module as it was, so passes declined
    it on fx and rewrote it on .pt2/ONNX; fuzzer seed 20021)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, kernel, padding="same", dilation=dilation,
                                                padding_mode=mode)).eval()
    x = torch.randn(2, 3, 9, 9)
    g = Graph.from_torch(model, (x[:1],))
    (conv,) = [g.gm.get_submodule(n.target) for n in g.nodes if n.op == "call_module"]
    assert conv.padding_mode == "zeros" and not any(conv.padding)
    assert [n.args[2] for n in g.nodes if n.target is torch.nn.functional.pad] == [mode]
    np.testing.assert_allclose(g.run(x)[0], model(x).detach().numpy(), rtol=1e-5, atol=1e-6)
