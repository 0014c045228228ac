"""ONNX frontend: numerics against onnxruntime, structure, batch flexibility and user errors."""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import os
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

from slimgraph.errors import ModelLoadError, ShapeError, UnsupportedOpError
from slimgraph.ir import onnx_frontend
from slimgraph.ir.onnx_frontend import OnnxImport, import_onnx

from .onnx_cases import (
    CASES,
    FLOAT,
    INT64,
    assert_close,
    const,
    light_model_dir,
    make_model,
    randn,
    randomized_light,
    run_ort,
    single,
)

LIGHT_MODELS = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50",
                "shufflenet", "squeezenet", "vgg19", "zfnet512"]

def _lrn_spec(x: np.ndarray, size: int, alpha: float, beta: float, bias: float) -> np.ndarray:
    """LRN as the ONNX spec writes it: floor((size-1)/2) channels before, ceil(...) after."""
    before, after = (size - 1) // 2, -(-(size - 1) // 2)
    sq = np.pad(x.astype(np.float64) ** 2, ((0, 0), (before, after), (0, 0), (0, 0)))
    square_sum = sum(sq[:, i:i + x.shape[1]] for i in range(size))
    return x / (bias + alpha / size * square_sum) ** beta


def _lrn_reference(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    attrs = {a.name: helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
    x = feeds["x"]
    return [_lrn_spec(x, attrs["size"], attrs.get("alpha", 1e-4), attrs.get("beta", 0.75),
                      attrs.get("bias", 1.0))]


# onnxruntime implements only odd LRN windows (and onnx.reference's LRN loops over the batch)
NUMPY_REFERENCE = {"lrn_even": _lrn_reference, "lrn_odd": _lrn_reference}


def _outputs(imp: OnnxImport, *inputs: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        out = imp.gm(*(inputs or imp.example_inputs))
    out = out if isinstance(out, tuple) else (out,)
    return [o.numpy() for o in out]


def _feeds(imp: OnnxImport, *inputs: torch.Tensor) -> dict[str, np.ndarray]:
    return {n: t.numpy() for n, t in zip(imp.input_names, inputs or imp.example_inputs,
                                         strict=True)}


def _assert_matches_ort(imp: OnnxImport, model, *inputs: torch.Tensor) -> None:
    expected = run_ort(model, _feeds(imp, *inputs))
    actual = _outputs(imp, *inputs)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert_close(a, e, rel=1e-4)


# --------------------------------------------------------------------------------------------
# Model-zoo graphs shipped with onnx (Caffe2 exports, opset 9)
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _import_light(name: str) -> OnnxImport:
    return import_onnx(os.path.join(light_model_dir(), f"light_{name}.onnx"))


def test_light_alexnet_structure():
    imp = _import_light("bvlc_alexnet")
    mods = dict(imp.gm.named_modules())
    kinds = [type(m) for m in mods.values()]
    assert kinds.count(nn.Conv2d) == 5
    assert kinds.count(nn.Linear) == 3
    assert kinds.count(nn.LocalResponseNorm) == 2
    assert kinds.count(nn.MaxPool2d) == 3
    assert not any(n.target is torch.nn.functional.dropout for n in imp.gm.graph.nodes)
    fc = [m for m in mods.values() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in fc] == [(9216, 4096), (4096, 4096),
                                                             (4096, 1000)]
    # the folded Reshape to (1, 9216) stays batch-flexible
    assert any(n.target is torch.flatten for n in imp.gm.graph.nodes)
    with torch.no_grad():
        assert imp.gm(torch.randn(2, 3, 224, 224)).shape == (2, 1000)


@pytest.mark.parametrize("name", LIGHT_MODELS)
def test_light_model_zoo_original_file(name):
    path = os.path.join(light_model_dir(), f"light_{name}.onnx")
    imp = _import_light(name)
    assert imp.opset == 9 and imp.producer.startswith("onnx-caffe2")
    assert imp.example_inputs[0].shape == (1, 3, 224, 224)
    _assert_matches_ort(imp, path)


# vgg19 and zfnet512 (100M+ random weights, 10-30 s here on memory bandwidth alone) are
# covered by the original-file test above; alexnet has the same big-FC layout.
@pytest.mark.parametrize("name", [m for m in LIGHT_MODELS if m not in ("vgg19", "zfnet512")])
def test_light_model_zoo_random_weights(name):
    model = randomized_light(os.path.join(light_model_dir(), f"light_{name}.onnx"))
    has_softmax = any(n.op_type == "Softmax" for n in model.graph.node)
    imp = import_onnx(model)
    # with a softmax head, the logits before it are compared too
    assert len(imp.output_names) == (2 if has_softmax else 1)
    _assert_matches_ort(imp, model)


# --------------------------------------------------------------------------------------------
# One op at a time, onnx.helper-built, including opset-dependent forms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_case_matches_onnxruntime(case):
    model = CASES[case]()
    imp = import_onnx(model)
    if case in NUMPY_REFERENCE:  # also checked against onnxruntime where it can run
        expected = NUMPY_REFERENCE[case](model, _feeds(imp))
        for a, e in zip(_outputs(imp), expected, strict=True):
            assert_close(a, e, rel=1e-4)
        if case == "lrn_even":
            return
    _assert_matches_ort(imp, model)


@pytest.mark.parametrize("case,module_type", [
    ("conv2d_pads", nn.Conv2d), ("conv1d", nn.Conv1d), ("conv_transpose2d", nn.ConvTranspose2d),
    ("conv_transpose1d", nn.ConvTranspose1d), ("bn2d_opset9", nn.BatchNorm2d),
    ("bn1d_rank2", nn.BatchNorm1d), ("gemm_transb", nn.Linear), ("gemm_alpha_beta", nn.Linear),
    ("matmul_linear_3d", nn.Linear), ("relu", nn.ReLU), ("clip_attr_relu6_opset9", nn.ReLU6),
    ("hard_swish", nn.Hardswish), ("hard_sigmoid_torch", nn.Hardsigmoid),
    ("prelu_channel", nn.PReLU), ("maxpool_pads", nn.MaxPool2d),
    ("avgpool_exclude_pad", nn.AvgPool2d), ("global_avgpool", nn.AdaptiveAvgPool2d),
    ("lrn_odd", nn.LocalResponseNorm), ("layer_norm", nn.LayerNorm),
])
def test_structured_modules(case, module_type):
    imp = import_onnx(CASES[case]())
    found = [m for m in imp.gm.modules() if isinstance(m, module_type)]
    assert len(found) == 1
    for m in imp.gm.modules():
        assert not m.training
        assert all(p.device.type == "cpu" for p in m.parameters(recurse=False))


def test_asymmetric_conv_padding_gets_pad_module():
    imp = import_onnx(CASES["conv2d_asym_stride2"]())
    conv = next(m for m in imp.gm.modules() if isinstance(m, nn.Conv2d))
    pad = next(m for m in imp.gm.modules() if isinstance(m, nn.ConstantPad2d))
    assert conv.padding == (0, 1)  # the symmetric part stays in the conv
    assert pad.padding == (0, 0, 0, 2)  # (left, right, top, bottom) extra
    assert conv.stride == (2, 2)


def test_gemm_folds_alpha_beta_into_linear():
    imp = import_onnx(CASES["gemm_alpha_beta"]())
    (linear,) = [m for m in imp.gm.modules() if isinstance(m, nn.Linear)]
    model = CASES["gemm_alpha_beta"]()
    w = numpy_helper.to_array(model.graph.initializer[0])
    c = numpy_helper.to_array(model.graph.initializer[1])
    np.testing.assert_allclose(linear.weight.detach().numpy(), 0.5 * w.T, rtol=1e-6)
    np.testing.assert_allclose(linear.bias.detach().numpy(), 2.0 * c.reshape(-1), rtol=1e-6)


def test_batchnorm_module_holds_running_stats():
    model = CASES["bn2d_opset9"]()
    imp = import_onnx(model)
    (bn,) = [m for m in imp.gm.modules() if isinstance(m, nn.BatchNorm2d)]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(bn.weight.detach().numpy(), inits["s"])
    np.testing.assert_array_equal(bn.running_mean.numpy(), inits["m"])
    np.testing.assert_array_equal(bn.running_var.numpy(), inits["v"])
    assert bn.eps == pytest.approx(1e-3) and not bn.training


def test_folded_shape_chain_becomes_flatten():
    imp = import_onnx(CASES["shape_gather_reshape_opset13"]())
    targets = [n.target for n in imp.gm.graph.nodes if n.op == "call_function"]
    assert targets == [torch.flatten]


# --------------------------------------------------------------------------------------------
# Models exported by torch.onnx at several opsets
# --------------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """Conv/BN/ReLU, depthwise + hardswish, SE-style gating, upsample, concat, head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 12, 1)
        self.se = nn.Linear(12, 12)
        self.up = nn.ConvTranspose2d(12, 4, 2, stride=2)
        self.conv1d = nn.Conv1d(12, 6, 3, padding=1)
        self.fc = nn.Linear(12 + 4 + 6, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, 2)
        y = F.hardswish(self.dw(x))
        y = self.pw(y)
        gate = torch.sigmoid(self.se(y.mean(dim=(2, 3))))
        y = y * gate.view(y.size(0), -1, 1, 1)
        up = self.up(F.interpolate(y, scale_factor=2.0, mode="nearest"))
        seq = self.conv1d(y.flatten(2))
        pooled = torch.cat([F.adaptive_avg_pool2d(y, 1).view(y.size(0), -1),
                            F.adaptive_avg_pool2d(up, 1).view(y.size(0), -1),
                            seq.amax(dim=2)], dim=1)
        return torch.softmax(self.fc(torch.clamp(pooled, -1.0, 6.0)), dim=-1)


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = SmallCNN()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _export(model: nn.Module, opset: int, dynamic_batch: bool = False) -> onnx.ModelProto:
    buf = io.BytesIO()
    axes = {"x": {0: "N"}, "y": {0: "N"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), buf, dynamo=False,
                          opset_version=opset, input_names=["x"], output_names=["y"],
                          dynamic_axes=axes)
    return onnx.load_from_string(buf.getvalue())


@pytest.mark.parametrize("opset", [9, 11, 13, 17, 21])
def test_torch_exported_model(opset):
    torch_model = _small_cnn()
    model = _export(torch_model, opset)
    imp = import_onnx(model)
    assert imp.opset == opset and imp.producer.startswith("pytorch")
    _assert_matches_ort(imp, model)
    with torch.no_grad():
        ref = torch_model(imp.example_inputs[0]).numpy()
    assert_close(_outputs(imp)[0], ref, rel=1e-4)


@pytest.mark.parametrize("which", ["digits_cnn", "resnet18"])
def test_repo_models_exported_with_dynamic_batch(which):
    from slimgraph.zoo.models import DigitsCNN, resnet18

    torch.manual_seed(0)
    torch_model = (DigitsCNN() if which == "digits_cnn" else resnet18(num_classes=10, width=16))
    torch_model.eval()
    shape = (1, 1, 16, 16) if which == "digits_cnn" else (1, 3, 64, 64)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch_model, (torch.randn(shape),), buf, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "N"}})
    model = onnx.load_from_string(buf.getvalue())
    imp = import_onnx(model, input_shapes={"x": shape})
    batch3 = torch.randn((3, *shape[1:]), generator=torch.Generator().manual_seed(3))
    for inputs in ((), (batch3,)):
        _assert_matches_ort(imp, model, *inputs)
        with torch.no_grad():
            expected = torch_model(*(inputs or imp.example_inputs)).numpy()
        assert_close(_outputs(imp, *inputs)[0], expected, rel=1e-4)


def test_module_names_follow_onnx_node_names():
    model = _export(_small_cnn(), 13)
    imp = import_onnx(model)
    names = {n for n, m in imp.gm.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)}
    # torch's exporter names nodes /scope/Op: the layer keeps its module's name (as on fx)
    assert {"conv1", "dw", "pw", "se", "fc"} <= names
    assert all(n.isidentifier() for n, _ in imp.gm.named_modules() if n)


def test_layer_names_are_module_paths_for_nested_scopes():
    from slimgraph.ir.onnx_frontend import _layer_name

    assert _layer_name("/features/features.1/conv/conv.0/conv.0.0/Conv") == "features.1.conv.0.0"
    assert _layer_name("/layer1/layer1.0/conv1/Conv") == "layer1.0.conv1"
    assert _layer_name("conv2d_7") == "conv2d_7" and _layer_name("/Relu") == "/Relu"


def test_dynamic_batch_runs_at_other_batch_sizes():
    torch_model = _small_cnn()
    model = _export(torch_model, 13, dynamic_batch=True)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    imp = import_onnx(model, input_shapes={"x": (1, 3, 32, 32)})
    assert imp.example_inputs[0].shape == (1, 3, 32, 32)
    _assert_matches_ort(imp, model)
    batch4 = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    _assert_matches_ort(imp, model, batch4)


def test_torch_export_and_deepcopy():
    imp = import_onnx(_export(_small_cnn(), 13))
    exported = torch.export.export(imp.gm, imp.example_inputs)
    with torch.no_grad():
        assert_close(exported.module()(*imp.example_inputs).numpy(), _outputs(imp)[0],
                     rel=1e-5)
    clone = copy.deepcopy(imp.gm)
    with torch.no_grad():
        np.testing.assert_array_equal(clone(*imp.example_inputs).numpy(), _outputs(imp)[0])


REQUIRED_OPS = {
    "Conv", "ConvTranspose", "BatchNormalization", "Gemm", "MatMul", "Relu", "Clip", "Sigmoid",
    "HardSigmoid", "HardSwish", "LRN", "Dropout", "Add", "Sum", "Mul", "Sub", "Div", "Pow",
    "Sqrt", "Exp", "Max", "Min", "Concat", "Split", "Resize", "Pad", "Reshape", "Flatten",
    "Transpose", "Squeeze", "Unsqueeze", "Slice", "Gather", "Shape", "ConstantOfShape",
    "Identity", "Constant", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
    "ReduceMean", "Softmax",
}


def test_cases_cover_every_required_and_supported_op():
    covered = {n.op_type for build in CASES.values() for n in build().graph.node}
    assert REQUIRED_OPS <= covered
    assert REQUIRED_OPS <= set(onnx_frontend.SUPPORTED_OPS)
    assert set(onnx_frontend.SUPPORTED_OPS) - covered == {"Range", "Size", "CastLike"}


def test_range_size_castlike_fold_to_constants():
    nodes = [helper.make_node("Size", ["x"], ["n"]),
             helper.make_node("Range", ["zero", "n", "one"], ["r"]),
             helper.make_node("CastLike", ["r", "x"], ["rf"]),
             helper.make_node("Reshape", ["rf", "shape"], ["rs"]),
             helper.make_node("Add", ["x", "rs"], ["y"])]
    model = make_model(nodes, {"x": [2, 3]}, ["y"], {
        "zero": const(0, np.int64), "one": const(1, np.int64), "shape": const([2, 3], np.int64)},
        opset=15)
    imp = import_onnx(model)
    _assert_matches_ort(imp, model)
    assert [n.target for n in imp.gm.graph.nodes if n.op == "call_function"] == [torch.add]


def test_onnx_provenance_in_node_meta():
    imp = import_onnx(CASES["conv2d_asym_stride2"]())
    convs = [n for n in imp.gm.graph.nodes if n.op == "call_module"]
    assert {n.meta["onnx_node"] for n in convs} == {"conv_node"}
    assert {n.meta["onnx_op"] for n in convs} == {"Conv"}


def test_torch_export_of_emitted_op_forms():
    for case in ("resize_linear_asymmetric", "resize_cubic", "resize_nearest_prefer_ceil_down",
                 "avgpool_asym_exclude", "maxpool_ceil_pads", "slice_negative_step",
                 "split_input_opset13", "gather_embedding", "gather_2d_indices",
                 "softmax_opset11_axis1_3d", "lrn_even", "conv_transpose2d_asym",
                 "pad_reflect_opset9", "clip_inputs_max_only", "expand", "dropout_opset9"):
        imp = import_onnx(CASES[case]())
        exported = torch.export.export(imp.gm, imp.example_inputs)
        out = exported.module()(*imp.example_inputs)
        out = out if isinstance(out, tuple) else (out,)
        for a, e in zip(out, _outputs(imp), strict=True):
            np.testing.assert_allclose(a.detach().numpy(), e, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Folding: never touches the user's model, falls back when it fails
# --------------------------------------------------------------------------------------------


def _dynamic_chain_model() -> onnx.ModelProto:
    model = CASES["shape_gather_reshape_opset13"]()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    return model


def test_user_model_proto_is_unchanged():
    model = _dynamic_chain_model()
    before = model.SerializeToString()
    imp = import_onnx(model, input_shapes={"x": (2, 3, 4, 5)})
    assert model.SerializeToString() == before
    _assert_matches_ort(imp, model)


def test_user_file_is_unchanged(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(_dynamic_chain_model(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    import_onnx(str(path), input_shapes={"x": (2, 3, 4, 5)})
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert sorted(os.listdir(tmp_path)) == ["model.onnx"]


def test_folding_failure_falls_back_to_unfolded_graph(monkeypatch):
    import onnx_graphsurgeon as gs

    def broken(self, *args, **kwargs):
        raise RuntimeError("folding exploded")

    monkeypatch.setattr(gs.Graph, "fold_constants", broken)
    model = CASES["constant_of_shape"]()
    imp = import_onnx(model)
    _assert_matches_ort(imp, model)


def test_external_data(tmp_path):
    model = single("MatMul", {"x": [3, 64]}, {"w": randn(64, 32, seed=3)})
    path = tmp_path / "ext.onnx"
    onnx.save(copy.deepcopy(model), path, save_as_external_data=True, location="ext.data",
              size_threshold=0)
    assert (tmp_path / "ext.data").exists()
    imp = import_onnx(path)
    _assert_matches_ort(imp, model)

    unloaded = onnx.load(path, load_external_data=False)
    with pytest.raises(ModelLoadError, match="external data"):
        import_onnx(unloaded)

    os.remove(tmp_path / "ext.data")
    with pytest.raises(ModelLoadError, match="external data") as info:
        import_onnx(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------------------------
# User errors
# --------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.onnx"
    with pytest.raises(ModelLoadError, match="not found") as info:
        import_onnx(path)
    assert str(path) in str(info.value)


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(b"\x08\x07garbage\xff\xfe\x00\x01" * 8)
    with pytest.raises(ModelLoadError) as info:
        import_onnx(str(path))
    assert str(path) in str(info.value)


def test_not_a_model_argument():
    with pytest.raises(ModelLoadError, match="ModelProto"):
        import_onnx(42)


def test_all_unsupported_ops_in_one_error_before_conversion(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("conversion started")

    monkeypatch.setattr(onnx_frontend, "_convert", never)
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="ok_relu"),
        helper.make_node("NonZero", ["r"], ["nz"], name="first_bad"),
        helper.make_node("Unique", ["x"], ["u"], name="second_bad"),
        helper.make_node("Resize", ["x", "roi", "sc"], ["rs"], name="bad_mode",
                         coordinate_transformation_mode="tf_crop_and_resize"),
    ]
    model = make_model(nodes, {"x": [4, 4]}, {"nz": INT64, "u": FLOAT, "rs": FLOAT},
                       {"roi": const([0, 0, 1, 1]), "sc": const([1.0, 1.0])})
    with pytest.raises(UnsupportedOpError) as info:
        import_onnx(model)
    message = str(info.value)
    for word in ("NonZero", "first_bad", "Unique", "second_bad", "Resize", "bad_mode",
                 "tf_crop_and_resize"):
        assert word in message
    assert set(info.value.ops) == {"NonZero", "Unique", "Resize"}
    assert "Relu" not in info.value.ops


def test_unsupported_op_on_constants_folds_away():
    nodes = [helper.make_node("NonZero", ["c"], ["nz"], name="nonzero_on_constants"),
             helper.make_node("Cast", ["nz"], ["nzf"], to=FLOAT),
             helper.make_node("ReduceSum", ["nzf"], ["total"], keepdims=0),
             helper.make_node("Add", ["x", "total"], ["y"])]
    model = make_model(nodes, {"x": [2, 3]}, ["y"], {"c": const([0.0, 3.0, 0.0, 5.0])})
    imp = import_onnx(model)
    _assert_matches_ort(imp, model)


def test_unsupported_ops_reported_before_shape_errors():
    model = make_model([helper.make_node("NonZero", ["x"], ["y"], name="nz")],
                       {"x": ["N", 3]}, {"y": INT64})
    with pytest.raises(UnsupportedOpError, match="NonZero"):
        import_onnx(model)


def test_custom_domain_op_is_unsupported():
    node = helper.make_node("FusedConv", ["x"], ["y"], name="fc", domain="com.microsoft")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                    helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(UnsupportedOpError, match="com.microsoft.FusedConv"):
        import_onnx(model)


def test_data_dependent_shape_is_unsupported():
    nodes = [helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
             helper.make_node("Cast", ["m"], ["mi"], to=INT64),
             helper.make_node("Reshape", ["mi", "one"], ["s"]),
             helper.make_node("ConstantOfShape", ["s"], ["y"], name="data_shape")]
    model = make_model(nodes, {"x": [3]}, ["y"], {"one": const([1], np.int64)})
    with pytest.raises(UnsupportedOpError, match="data_shape"):
        import_onnx(model)


def test_dynamic_batch_dim_is_imported_as_one():
    imp = import_onnx(_dynamic_chain_model())
    assert imp.example_inputs[0].shape == (1, 3, 4, 5) and imp.batch_defaulted == ("x",)


def test_dynamic_non_batch_dim_without_input_shapes():
    model = _dynamic_chain_model()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "height"
    with pytest.raises(ShapeError) as info:
        import_onnx(model)
    message = str(info.value)
    assert "'x'" in message and "dim 2" in message and "'height'" in message
    assert "--input-shape x=1,3,1,5" in message and "input_shapes={'x': (1, 3, 1, 5)}" in message


@pytest.mark.parametrize("dim", [0, -1])
def test_numeric_dynamic_dims(dim):
    model = _dynamic_chain_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = dim
    assert import_onnx(model).batch_defaulted == ("x",)
    imp = import_onnx(model, input_shapes={"x": [3, 3, 4, 5]})
    assert imp.example_inputs[0].shape == (3, 3, 4, 5) and not imp.batch_defaulted


def test_unknown_input_name():
    with pytest.raises(ShapeError, match="'image'") as info:
        import_onnx(_dynamic_chain_model(), input_shapes={"x": (1, 3, 4, 5), "image": (1, 3)})
    assert "'x'" in str(info.value)


def test_contradicting_static_dim():
    with pytest.raises(ShapeError, match="dim 1 = 3"):
        import_onnx(_dynamic_chain_model(), input_shapes={"x": (1, 4, 4, 5)})


def test_wrong_rank_and_bad_values():
    with pytest.raises(ShapeError, match="rank"):
        import_onnx(_dynamic_chain_model(), input_shapes={"x": (1, 3, 4)})
    with pytest.raises(ShapeError, match="non-positive"):
        import_onnx(_dynamic_chain_model(), input_shapes={"x": (0, 3, 4, 5)})


# --------------------------------------------------------------------------------------------
# Old opsets: upgraded with onnx.version_converter on a private copy
# --------------------------------------------------------------------------------------------

_OPSET6_INITS = {"b": randn(3, seed=2), "scale": randn(3, seed=3), "bias": randn(3, seed=4),
                 "mean": randn(3, seed=5), "var": np.abs(randn(3, seed=6)) + 0.5,
                 "slope": randn(3, seed=7), "m": randn(4, seed=8),
                 "w": randn(4, 3 * 4 * 5, seed=9), "c": randn(4, seed=10)}


def _opset6_model() -> onnx.ModelProto:
    """Opset-6 forms the upgrade must translate: legacy broadcast with an inner axis, BatchNorm's
    is_test/consumed_inputs, a per-channel PRelu slope of shape (C,), Gemm's broadcast."""
    nodes = [
        helper.make_node("Add", ["x", "b"], ["t"], broadcast=1, axis=1),
        helper.make_node("BatchNormalization", ["t", "scale", "bias", "mean", "var"], ["u"],
                         is_test=1, epsilon=1e-3, consumed_inputs=[0, 0, 0, 1, 1]),
        helper.make_node("PRelu", ["u", "slope"], ["v"]),
        helper.make_node("Mul", ["v", "m"], ["p"], broadcast=1, axis=2),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w", "c"], ["y"], transB=1, broadcast=1),
    ]
    return make_model(nodes, {"x": [2, 3, 4, 5]}, ["y"], _OPSET6_INITS, opset=6)


def _opset6_reference(x: np.ndarray) -> np.ndarray:
    k = {name: v.astype(np.float64) for name, v in _OPSET6_INITS.items()}
    per_channel = {name: v.reshape(1, 3, 1, 1) for name, v in k.items() if v.shape == (3,)}
    t = x + per_channel["b"]
    u = ((t - per_channel["mean"]) / np.sqrt(per_channel["var"] + 1e-3) * per_channel["scale"]
         + per_channel["bias"])
    v = np.where(u < 0, u * per_channel["slope"], u)  # opset 6: the slope is per channel
    p = v * k["m"].reshape(1, 1, 4, 1)  # broadcast at axis 2: along H
    return p.reshape(2, -1) @ k["w"].T + k["c"]


def test_opset6_model_is_upgraded_and_matches_numpy():
    imp = import_onnx(_opset6_model())
    assert (imp.opset, imp.upgraded_from) == (9, 6)
    x = randn(2, 3, 4, 5, seed=11)
    assert_close(_outputs(imp, torch.from_numpy(x))[0], _opset6_reference(x), rel=1e-5)
    assert [m.num_parameters for m in imp.gm.modules() if isinstance(m, nn.PReLU)] == [3]
    assert len([m for m in imp.gm.modules() if isinstance(m, nn.BatchNorm2d)]) == 1


@pytest.mark.parametrize("opset", [1, 3, 5, 6])
def test_every_old_opset_is_upgraded(opset):
    nodes = [helper.make_node("Add", ["x", "b"], ["t"], broadcast=1, axis=1),
             helper.make_node("Relu", ["t"], ["y"])]
    b = randn(3, seed=2)
    imp = import_onnx(make_model(nodes, {"x": [2, 3, 4]}, ["y"], {"b": b}, opset=opset))
    assert (imp.opset, imp.upgraded_from) == (9, opset)
    x = randn(2, 3, 4, seed=3)
    assert_close(_outputs(imp, torch.from_numpy(x))[0], np.maximum(x + b[:, None], 0))


def test_supported_opset_is_not_upgraded():
    for opset in (7, 13):
        imp = import_onnx(single("Relu", {"x": [2, 3]}, opset=opset))
        assert (imp.opset, imp.upgraded_from) == (opset, None)


def test_upgrade_leaves_the_users_model_and_file_unchanged(tmp_path):
    model = _opset6_model()
    before = model.SerializeToString()
    assert import_onnx(model).upgraded_from == 6
    assert model.SerializeToString() == before
    path = tmp_path / "old.onnx"
    onnx.save(model, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert import_onnx(str(path)).upgraded_from == 6
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert sorted(os.listdir(tmp_path)) == ["old.onnx"]


@pytest.mark.parametrize("model,reason", [
    (lambda: single("FooBar", {"x": [2, 3]}, opset=6), "no ONNX schema for op(s) FooBar"),
    (lambda: single("Upsample", {"x": [1, 1, 2, 2]}, opset=1),
     "Upsample in opset 1 needs to have width_scale and height_scale attributes"),
    (lambda: single("BatchNormalization", {"x": [2, 3, 4]},
                    {k: np.ones(3, np.float32) for k in ("scale", "bias", "mean", "var")},
                    opset=6, is_test=1, spatial=0),
     "Attribute spatial must have value 1"),
], ids=["unknown_op", "upsample_v1_without_scales", "batchnorm_spatial0"])
def test_model_the_converter_cannot_upgrade_is_one_clear_error(model, reason):
    with pytest.raises(ModelLoadError) as info:
        import_onnx(model())
    message = str(info.value)
    assert "opset" in message and "cannot upgrade it to opset 9" in message
    assert reason in message
    assert "Assertion" not in message and ".cc:" not in message and ".h:" not in message
    assert info.value.__cause__ is None and info.value.__context__ is None


# --------------------------------------------------------------------------------------------
# PRelu: ONNX's unidirectional broadcasting of the slope
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("x_shape,slope_shape,opset,per_channel", [
    ((5,), (5,), 13, False),
    ((2, 3), (3,), 13, True),
    ((2, 3, 4), (3, 1), 13, True),
    ((2, 3, 4, 5), (3, 1, 1), 13, True),
    ((2, 3, 4, 5), (1,), 13, False),
    ((2, 3, 4), (4,), 13, False),  # right-aligned like numpy: along the last axis
    ((2, 3, 4, 5), (4, 5), 13, False),
    ((2, 3), (3,), 6, True),
    ((2, 3, 4), (3,), 6, True),  # before opset 7 a 1-D slope is per channel (axis 1)
    ((2, 3, 4, 5), (3,), 6, True),
])
def test_prelu_slope_broadcasting_matches_numpy(x_shape, slope_shape, opset, per_channel):
    slope = randn(*slope_shape, seed=2)
    model = single("PRelu", {"x": list(x_shape)}, {"slope": slope}, opset=opset)
    imp = import_onnx(model)
    x = torch.from_numpy(randn(*x_shape, seed=3))
    aligned = slope.reshape(-1, *[1] * (len(x_shape) - 2)) if opset < 7 else slope
    expected = np.where(x.numpy() < 0, x.numpy() * aligned, x.numpy())
    np.testing.assert_allclose(_outputs(imp, x)[0], expected, rtol=1e-6)
    prelus = [m for m in imp.gm.modules() if isinstance(m, nn.PReLU)]
    if per_channel:
        assert [m.num_parameters for m in prelus] == [x_shape[1]]
    if opset >= 7:
        _assert_matches_ort(imp, model, x)


def test_prelu_slope_that_does_not_broadcast_is_unsupported():
    model = single("PRelu", {"x": [2, 3, 4]}, {"slope": randn(3, seed=2)})
    with pytest.raises(UnsupportedOpError, match="not unidirectionally broadcastable"):
        import_onnx(model)


# --------------------------------------------------------------------------------------------
# float64 models stay float64
# --------------------------------------------------------------------------------------------

F32_MAX = float(np.finfo(np.float32).max)


def _float64_model(inits: dict[str, np.ndarray]) -> onnx.ModelProto:
    double = onnx.TensorProto.DOUBLE
    nodes = [helper.make_node("Mul", ["x", "s"], ["t"]),
             helper.make_node("Conv", ["t", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Clip", ["c", "lo", "hi"], ["clipped"]),
             helper.make_node("Flatten", ["r"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fc_b"], ["y"], transB=1)]
    return make_model(nodes, {"x": ([2, 3, 5, 5], double)}, {"y": double, "clipped": double},
                      inits)


def _conv_reference(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    windows = np.lib.stride_tricks.sliding_window_view(
        np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))), (3, 3), axis=(2, 3))
    return np.einsum("ncijkl,ockl->noij", windows, w) + b[None, :, None, None]


def test_float64_model_stays_float64_beyond_float32_range():
    gen = np.random.default_rng(0)
    big = 1e39  # float32 overflows to inf here
    inits = {"s": np.array(big), "w": gen.standard_normal((4, 3, 3, 3)),
             "b": gen.standard_normal(4) * big, "lo": np.array(-F32_MAX), "hi": np.array(F32_MAX),
             "fc": gen.standard_normal((6, 4 * 5 * 5)), "fc_b": gen.standard_normal(6) * big}
    imp = import_onnx(_float64_model(inits))
    assert [x.dtype for x in imp.example_inputs] == [torch.float64]
    tensors = [*imp.gm.parameters(), *imp.gm.buffers()]
    assert {t.dtype for t in tensors if t.is_floating_point()} == {torch.float64}
    x = gen.standard_normal((2, 3, 5, 5))
    y, clipped = _outputs(imp, torch.from_numpy(x))
    c = _conv_reference(x * big, inits["w"], inits["b"])
    expected_y = np.maximum(c, 0).reshape(2, -1) @ inits["fc"].T + inits["fc_b"]
    assert y.dtype == clipped.dtype == np.float64
    assert np.isfinite(y).all() and np.abs(y).max() > 1e39
    assert_close(y, expected_y, rel=1e-12)
    # +-FLT_MAX clip bounds are real bounds in float64 (in float32 they mean "none")
    assert np.abs(c).max() > F32_MAX and np.abs(clipped).max() == F32_MAX
    assert_close(clipped, np.clip(c, -F32_MAX, F32_MAX), rel=1e-12)


def test_split_whose_sizes_do_not_match_the_input_is_one_clear_error():
    """A Split with sizes summing to 36 on 29 channels (what torch's exporter once wrote)."""
    model = single("Split", {"x": [1, 29, 2, 2]}, {"split": const([12, 12, 12], np.int64)},
                   outputs=["a", "b", "c"], axis=1)
    with pytest.raises(ModelLoadError, match=r"split_node.*Split.*inconsistent.*29"):
        import_onnx(model)


def _export_any(model: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), buf, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"])
    return onnx.load_from_string(buf.getvalue())


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("groups, channels, shape, affine", [
    (1, 3, (2, 3, 4, 4), True), (2, 8, (2, 8, 5, 3), True), (4, 8, (1, 8, 6), False),
    (2, 4, (1, 4, 2, 3, 3), True)])
def test_group_norm_decomposition_folds_back_into_group_norm(groups, channels, shape, affine):
    torch.manual_seed(0)
    norm = nn.GroupNorm(groups, channels, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-1, 1)
    x = torch.randn(shape)
    model = _export_any(norm, x)
    assert "InstanceNormalization" in {n.op_type for n in model.graph.node}  # how torch writes it
    imp = import_onnx(model)
    mods = [m for _, m in imp.gm.named_modules() if _]
    assert len(mods) == 1 and isinstance(mods[0], nn.GroupNorm)
    assert (mods[0].num_groups, mods[0].affine, _params(imp.gm)) == (groups, affine, _params(norm))
    assert [n.op for n in imp.gm.graph.nodes] == ["placeholder", "call_module", "output"]
    _assert_matches_ort(imp, model, x)
    with torch.no_grad():
        assert_close(_outputs(imp, x)[0], norm(x).numpy(), rel=1e-5)


class _ChannelMix(nn.Module):
    """A Linear over channels (rank 4: exported as MatMul + Add); ``reuse`` also reads the
    MatMul's result elsewhere, which the exporter cannot write that way, so it uses the output."""

    def __init__(self, affine_bn: bool = True):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.bn = nn.BatchNorm2d(6, affine=affine_bn)

    def forward(self, x):
        return self.bn(self.lin(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


@pytest.mark.parametrize("affine_bn", [True, False])
def test_matmul_add_is_a_linear_with_bias_and_unit_batch_norm_is_not_affine(affine_bn):
    torch.manual_seed(0)
    model = _ChannelMix(affine_bn).eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 1.5)
        if affine_bn:
            model.bn.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 4, 3, 5)
    proto = _export_any(model, x)
    assert {"MatMul", "Add"} <= {n.op_type for n in proto.graph.node}
    imp = import_onnx(proto)
    lin = next(m for m in imp.gm.modules() if isinstance(m, nn.Linear))
    bn = next(m for m in imp.gm.modules() if isinstance(m, nn.BatchNorm2d))
    assert lin.bias is not None and bn.affine == affine_bn
    assert _params(imp.gm) == _params(model)
    assert not any(n.target is torch.add for n in imp.gm.graph.nodes)
    _assert_matches_ort(imp, proto, x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_group_norms_sharing_one_instance_norm_fold_each_in_the_model_dtype(dtype):
    """Two decomposed GroupNorms with the same scale/bias initializers: the frontend shares the
    InstanceNorm module; each still folds (float64 stays float64)."""
    t = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [numpy_helper.from_array(np.array([0, 2, -1], np.int64), "s1"),
             numpy_helper.from_array(np.array([1, 4, 3, 3], np.int64), "s2"),
             numpy_helper.from_array(np.ones(2, dtype), "sc"), numpy_helper.from_array(np.zeros(2, dtype), "bi"),
             numpy_helper.from_array((np.arange(1, 5).reshape(4, 1, 1) / 3).astype(dtype), "g"),
             numpy_helper.from_array((np.arange(4).reshape(4, 1, 1) / 7).astype(dtype), "b")]
    nodes, inp = [], "x"
    for i in range(2):
        nodes += [helper.make_node("Reshape", [inp, "s1"], [f"r{i}"]),
                  helper.make_node("InstanceNormalization", [f"r{i}", "sc", "bi"], [f"n{i}"], epsilon=1e-5),
                  helper.make_node("Reshape", [f"n{i}", "s2"], [f"q{i}"]),
                  helper.make_node("Mul", [f"q{i}", "g"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", "b"], [f"y{i}"])]
        inp = f"y{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", t, [1, 4, 3, 3])],
                              [helper.make_tensor_value_info(inp, t, [1, 4, 3, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    imp = import_onnx(model)
    norms = [m for _, m in imp.gm.named_modules() if _]
    tdtype = torch.from_numpy(np.zeros(1, dtype)).dtype
    assert len(norms) == 2 and all(isinstance(m, nn.GroupNorm) and m.weight.dtype == tdtype for m in norms)
    x = imp.example_inputs[0]
    g, b = (torch.from_numpy(numpy_helper.to_array(i).reshape(-1)) for i in inits[4:])
    want = F.group_norm(F.group_norm(x, 2, g, b, 1e-5), 2, g, b, 1e-5)  # ORT has no float64 InstanceNorm
    assert _outputs(imp)[0].dtype == dtype
    assert_close(_outputs(imp)[0], want.numpy(), rel=1e-6)


def test_matmul_whose_product_is_read_twice_keeps_its_add():
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.arange(6, dtype=np.float32), "b")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["p"]), helper.make_node("Add", ["p", "b"], ["q"]),
             helper.make_node("Mul", ["q", "p"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3, 6])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    imp = import_onnx(model)
    lin = next(m for m in imp.gm.modules() if isinstance(m, nn.Linear))
    assert lin.bias is None and any(n.target is torch.add for n in imp.gm.graph.nodes)
    _assert_matches_ort(imp, model)
