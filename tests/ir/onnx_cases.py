"""Small ONNX models built with ``onnx.helper`` for the ONNX frontend tests.

Every case is one op (or a short chain) with seeded constant operands as initializers and
float32 graph inputs; ``CASES`` maps a readable case id to a zero-argument builder.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

FLOAT, INT64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
INT64_MAX = 2**63 - 1


def light_model_dir() -> str:
    return os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def const(values, dtype=np.float32) -> np.ndarray:
    return np.asarray(values, dtype=dtype)


def randn(*shape: int, seed: int = 1) -> np.ndarray:
    return rng(seed).standard_normal(shape).astype(np.float32)


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: dict[str, Sequence[int | str] | tuple[Sequence[int | str], int]],
    outputs: dict[str, int] | Sequence[str],
    initializers: dict[str, np.ndarray] | None = None,
    opset: int = 13,
) -> onnx.ModelProto:
    """A model from nodes; inputs: name -> shape list (float32) or (shape list, elem_type)."""
    def value_info(name, spec):
        shape, elem = spec if isinstance(spec, tuple) else (spec, FLOAT)
        return helper.make_tensor_value_info(name, elem, list(shape))

    if not isinstance(outputs, dict):
        outputs = dict.fromkeys(outputs, FLOAT)
    graph = helper.make_graph(
        list(nodes),
        "case",
        [value_info(k, v) for k, v in inputs.items()],
        [helper.make_tensor_value_info(k, t, None) for k, t in outputs.items()],
        [numpy_helper.from_array(v, k) for k, v in (initializers or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7 if opset < 15 else 8 if opset < 19 else 9 if opset < 21 else 10
    return model


def single(op: str, inputs: dict, initializers: dict | None = None, opset: int = 13,
           outputs: dict[str, int] | Sequence[str] = ("y",), **attrs) -> onnx.ModelProto:
    """One node reading the graph inputs then the initializers, in the given order."""
    names = list(inputs) + list(initializers or {})
    node = helper.make_node(op, names, list(outputs), name=f"{op.lower()}_node", **attrs)
    return make_model([node], inputs, outputs, initializers, opset)


def single_ordered(op: str, input_names: Sequence[str], inputs: dict,
                   initializers: dict | None = None, opset: int = 13,
                   outputs: Sequence[str] = ("y",), **attrs) -> onnx.ModelProto:
    """One node with an explicit input list ('' for an omitted optional input)."""
    node = helper.make_node(op, list(input_names), list(outputs), name=f"{op.lower()}_node",
                            **attrs)
    return make_model([node], inputs, list(outputs), initializers, opset)


def run_ort(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    src = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_close(actual: np.ndarray, expected: np.ndarray, rel: float = 1e-4) -> None:
    """Max-abs error relative to the output scale, and rel-L2, both within ``rel``."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.dtype == np.bool_ or np.issubdtype(expected.dtype, np.integer):
        np.testing.assert_array_equal(actual, expected)
        return
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    scale = max(np.abs(e).max(initial=0.0), 1e-6)
    max_err = np.abs(a - e).max(initial=0.0) / scale
    rel_l2 = np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-12)
    assert max_err <= rel and rel_l2 <= rel, f"max-abs/scale {max_err:.3g}, rel-L2 {rel_l2:.3g}"


def randomized_light(path: str, seed: int = 0) -> onnx.ModelProto:
    """A model-zoo 'light' graph with its constant-fill weights replaced by seeded random ones.

    ConstantOfShape fills make every layer uniform; random weights (He-scaled, positive 1-D
    parameters so BatchNorm variances stay valid) make the numeric comparison meaningful.
    The logits feeding the final Softmax become an extra graph output.
    """
    model = onnx.load(path)
    gen = rng(seed)
    shapes = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    kept, weights = [], {}
    for node in model.graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in shapes:
            shape = [int(d) for d in shapes[node.input[0]]]
            if len(shape) >= 2:
                fan_in = max(int(np.prod(shape[1:])), 1)
                limit = np.float32(np.sqrt(6.0 / fan_in))  # He-uniform
                w = (gen.random(shape, dtype=np.float32) * 2 - 1) * limit
            else:
                w = gen.uniform(0.5, 1.5, shape).astype(np.float32)
            weights[node.output[0]] = w
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    used = {i for n in kept for i in n.input}
    inits = [t for t in model.graph.initializer if t.name in used and t.name not in weights]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    model.graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in weights.items())
    keep_inputs = [i for i in model.graph.input if i.name in used]
    del model.graph.input[:]
    model.graph.input.extend(keep_inputs)
    softmax = [n for n in kept if n.op_type == "Softmax"]
    if softmax:
        model.graph.output.append(helper.make_tensor_value_info(softmax[-1].input[0], FLOAT, None))
    return model


# --------------------------------------------------------------------------------------------
# Per-op cases
# --------------------------------------------------------------------------------------------

X4 = {"x": [1, 4, 8, 8]}
X3 = {"x": [2, 4, 16]}


def _conv_cases() -> dict[str, Callable[[], onnx.ModelProto]]:
    w = randn(6, 4, 3, 3, seed=2)
    bias = randn(6, seed=3)
    return {
        "conv2d_pads": lambda: single("Conv", X4, {"w": w, "b": bias}, pads=[1, 1, 1, 1]),
        "conv2d_asym_stride2": lambda: single("Conv", X4, {"w": w, "b": bias},
                                              pads=[0, 1, 2, 1], strides=[2, 2]),
        "conv2d_same_upper": lambda: single("Conv", X4, {"w": w}, auto_pad="SAME_UPPER",
                                            strides=[2, 2]),
        "conv2d_same_lower": lambda: single("Conv", X4, {"w": w}, auto_pad="SAME_LOWER",
                                            strides=[2, 2]),
        "conv2d_valid": lambda: single("Conv", X4, {"w": w}, auto_pad="VALID", opset=9),
        "conv2d_group_dilation": lambda: single("Conv", X4, {"w": randn(6, 2, 3, 3, seed=4)},
                                                group=2, dilations=[2, 2], pads=[2, 2, 2, 2]),
        "conv2d_depthwise": lambda: single("Conv", X4, {"w": randn(4, 1, 3, 3, seed=5)},
                                           group=4, pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        "conv2d_weight_input": lambda: single("Conv", {"x": [1, 4, 8, 8], "w": [6, 4, 3, 3]},
                                              pads=[1, 0, 1, 0]),
        "conv1d": lambda: single("Conv", X3, {"w": randn(5, 4, 3, seed=6),
                                              "b": randn(5, seed=7)}, pads=[1, 1], strides=[2]),
        "conv1d_asym": lambda: single("Conv", X3, {"w": randn(5, 4, 3, seed=6)}, pads=[2, 0]),
        "conv_transpose2d": lambda: single(
            "ConvTranspose", {"x": [1, 4, 5, 5]}, {"w": randn(4, 3, 3, 3, seed=8),
                                                   "b": randn(3, seed=9)},
            strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]),
        "conv_transpose2d_asym": lambda: single(
            "ConvTranspose", {"x": [1, 4, 5, 5]}, {"w": randn(4, 3, 3, 3, seed=8)},
            strides=[2, 2], pads=[0, 1, 2, 0]),
        "conv_transpose2d_output_shape": lambda: single(
            "ConvTranspose", {"x": [1, 4, 5, 5]}, {"w": randn(4, 3, 3, 3, seed=8)},
            strides=[2, 2], output_shape=[10, 10]),
        "conv_transpose2d_same_upper": lambda: single(
            "ConvTranspose", {"x": [1, 4, 5, 5]}, {"w": randn(4, 3, 3, 3, seed=8)},
            strides=[2, 2], auto_pad="SAME_UPPER"),
        "conv_transpose2d_group_dilation": lambda: single(
            "ConvTranspose", {"x": [1, 4, 5, 5]}, {"w": randn(4, 2, 3, 3, seed=8)},
            group=2, dilations=[2, 2], pads=[1, 1, 1, 1]),
        "conv_transpose2d_asym_output_padding": lambda: single(
            "ConvTranspose", {"x": [1, 4, 5, 5]}, {"w": randn(4, 3, 3, 3, seed=8)},
            strides=[2, 2], pads=[1, 0, 0, 1], output_padding=[1, 1]),
        "conv_transpose2d_output_shape_beyond_full": lambda: single(
            "ConvTranspose", {"x": [1, 4, 5, 5]}, {"w": randn(4, 3, 3, 3, seed=8)},
            strides=[2, 2], output_shape=[12, 12]),
        "conv3d": lambda: single("Conv", {"x": [1, 2, 5, 6, 7]},
                                 {"w": randn(3, 2, 3, 3, 3, seed=2)}, pads=[1, 0, 1, 1, 0, 1]),
        "conv_transpose1d": lambda: single(
            "ConvTranspose", {"x": [1, 4, 7]}, {"w": randn(4, 2, 4, seed=10),
                                                "b": randn(4, seed=11)},
            strides=[2], pads=[1, 1], group=2),
    }


def _norm_dense_cases() -> dict[str, Callable[[], onnx.ModelProto]]:
    c = 4
    bn = {"s": randn(c, seed=2), "bb": randn(c, seed=3), "m": randn(c, seed=4),
          "v": np.abs(randn(c, seed=5)) + 0.5}
    return {
        "bn2d_opset9": lambda: single("BatchNormalization", X4, bn, opset=9, epsilon=1e-3),
        "bn2d_opset7_spatial": lambda: single("BatchNormalization", X4, bn, opset=7, spatial=1),
        "bn2d_opset15": lambda: single("BatchNormalization", X4, bn, opset=15),
        "bn1d_rank2": lambda: single("BatchNormalization", {"x": [3, c]}, bn, opset=14),
        "bn1d_rank3": lambda: single("BatchNormalization", {"x": [2, c, 9]}, bn),
        "instance_norm": lambda: single("InstanceNormalization", X4,
                                        {"s": randn(c, seed=6), "bb": randn(c, seed=7)}),
        "layer_norm": lambda: single("LayerNormalization", {"x": [2, 5, 8]},
                                     {"s": randn(8, seed=6), "bb": randn(8, seed=7)},
                                     opset=17, epsilon=1e-5),
        "gemm_transb": lambda: single("Gemm", {"x": [3, 8]}, {"w": randn(5, 8, seed=2),
                                                              "c": randn(5, seed=3)},
                                      transB=1, opset=9),
        "gemm_alpha_beta": lambda: single("Gemm", {"x": [3, 8]}, {"w": randn(8, 5, seed=2),
                                                                  "c": randn(1, 5, seed=3)},
                                          alpha=0.5, beta=2.0),
        "gemm_transa_fullc": lambda: single("Gemm", {"x": [8, 3]}, {"w": randn(5, 8, seed=2),
                                                                    "c": randn(3, 5, seed=3)},
                                            transA=1, transB=1, beta=0.25),
        "gemm_no_c": lambda: single("Gemm", {"x": [3, 8]}, {"w": randn(8, 5, seed=2)},
                                    opset=11),
        "gemm_b_input": lambda: single("Gemm", {"x": [3, 8], "w": [5, 8]},
                                       {"c": randn(5, seed=3)}, transB=1, alpha=1.5),
        "matmul_linear_2d": lambda: single("MatMul", {"x": [3, 8]}, {"w": randn(8, 5, seed=2)}),
        "matmul_linear_3d": lambda: single("MatMul", {"x": [2, 3, 8]},
                                           {"w": randn(8, 5, seed=2)}),
        "matmul_inputs": lambda: single("MatMul", {"x": [2, 3, 8], "w": [2, 8, 4]}),
    }


def _activation_cases() -> dict[str, Callable[[], onnx.ModelProto]]:
    s = {"x": [2, 3, 4, 5]}
    out = {
        "relu": lambda: single("Relu", s),
        "sigmoid": lambda: single("Sigmoid", s),
        "tanh": lambda: single("Tanh", s),
        "leaky_relu": lambda: single("LeakyRelu", s, alpha=0.1),
        "elu": lambda: single("Elu", s, alpha=0.7),
        "selu": lambda: single("Selu", s),
        "softplus": lambda: single("Softplus", s),
        "softsign": lambda: single("Softsign", s),
        "mish": lambda: single("Mish", s, opset=18),
        "gelu_opset20": lambda: single("Gelu", s, opset=20),
        "gelu_tanh_opset20": lambda: single("Gelu", s, opset=20, approximate="tanh"),
        "hard_sigmoid_default": lambda: single("HardSigmoid", s),
        "hard_sigmoid_torch": lambda: single("HardSigmoid", s, alpha=1 / 6, beta=0.5),
        "hard_swish": lambda: single("HardSwish", s, opset=14),
        "prelu_channel": lambda: single("PRelu", s, {"slope": randn(3, 1, 1, seed=2)}),
        "prelu_scalar": lambda: single("PRelu", s, {"slope": const([0.2])}),
        "prelu_elementwise": lambda: single("PRelu", s, {"slope": randn(4, 5, seed=2)}),
        "prelu_rank2_channel": lambda: single("PRelu", {"x": [2, 3]},
                                              {"slope": randn(3, seed=2)}),
        "prelu_rank3_channel": lambda: single("PRelu", {"x": [2, 3, 4]},
                                              {"slope": randn(3, 1, seed=2)}),
        "prelu_rank3_last_axis": lambda: single("PRelu", {"x": [2, 3, 4]},
                                                {"slope": randn(4, seed=2)}),
        "clip_attr_relu6_opset9": lambda: single("Clip", s, opset=9, min=0.0, max=6.0),
        "clip_attr_opset9": lambda: single("Clip", s, opset=9, min=-0.5, max=0.7),
        "clip_attr_min_only_opset9": lambda: single("Clip", s, opset=9, min=0.1),
        "clip_inputs_opset11_min": lambda: single("Clip", s, {"lo": const(-0.2)}, opset=11),
        "clip_inputs_opset13": lambda: single("Clip", s, {"lo": const(0.0), "hi": const(6.0)}),
        "clip_inputs_max_only": lambda: single_ordered("Clip", ["x", "", "hi"], s,
                                                       {"hi": const(0.3)}),
        "clip_no_bounds": lambda: single("Clip", s),
        "lrn_odd": lambda: single("LRN", {"x": [1, 7, 4, 4]}, size=5, alpha=1e-2, beta=0.75,
                                  bias=2.0),
        "lrn_even": lambda: single("LRN", {"x": [1, 7, 4, 4]}, size=4, alpha=1e-2),
        "dropout_opset9": lambda: single("Dropout", s, opset=9, ratio=0.5),
        "dropout_opset12_ratio": lambda: single("Dropout", s, {"r": const(0.3)}, opset=12),
        "softmax_opset11_axis1_3d": lambda: single("Softmax", {"x": [2, 3, 4]}, opset=11,
                                                   axis=1),
        "softmax_opset13_axis1_3d": lambda: single("Softmax", {"x": [2, 3, 4]}, axis=1),
        "softmax_opset9_default_4d": lambda: single("Softmax", s, opset=9),
        "softmax_opset13_default": lambda: single("Softmax", s),
        "log_softmax_opset11_axis1_3d": lambda: single("LogSoftmax", {"x": [2, 3, 4]},
                                                       opset=11, axis=1),
    }
    for op in ("Sqrt", "Log", "Reciprocal"):  # on a positive input
        out[op.lower()] = _positive_unary(op)
    for op in ("Exp", "Neg", "Abs", "Erf", "Floor", "Ceil", "Sin", "Cos", "Sign", "Identity"):
        out[op.lower()] = (lambda o: lambda: single(o, s))(op)
    return out


def _positive_unary(op: str) -> Callable[[], onnx.ModelProto]:
    def build() -> onnx.ModelProto:
        nodes = [helper.make_node("Abs", ["x"], ["a"]),
                 helper.make_node("Add", ["a", "one"], ["p"]),
                 helper.make_node(op, ["p"], ["y"])]
        return make_model(nodes, {"x": [2, 3, 4]}, ["y"], {"one": const(0.5)})

    return build


def _elementwise_cases() -> dict[str, Callable[[], onnx.ModelProto]]:
    s = {"x": [2, 3, 4, 5]}
    ch = randn(3, 1, 1, seed=2)
    two = {"x": [2, 3, 4, 5], "z": [4, 5]}
    return {
        "add_broadcast_const": lambda: single("Add", s, {"c": ch}),
        "sub_inputs_broadcast": lambda: single("Sub", two),
        "mul_const_scalar": lambda: single("Mul", s, {"c": const(1.5)}),
        "div_const": lambda: single("Div", s, {"c": np.abs(ch) + 0.5}),
        "pow_const": lambda: single("Pow", s, {"c": const(2.0)}),
        "pow_abs_fractional": lambda: make_model(
            [helper.make_node("Abs", ["x"], ["a"]), helper.make_node("Pow", ["a", "c"], ["y"])],
            s, ["y"], {"c": const(0.5)}),
        "sum3": lambda: single("Sum", {"x": [2, 3, 4], "z": [3, 4]}, {"c": randn(4, seed=3)}),
        "max3": lambda: single("Max", {"x": [2, 3, 4], "z": [3, 4]}, {"c": randn(4, seed=3)}),
        "min2": lambda: single("Min", {"x": [2, 3, 4], "z": [2, 3, 4]}),
        "mean3": lambda: single("Mean", {"x": [2, 3, 4], "z": [3, 4]}, {"c": randn(4, seed=3)}),
        "where_greater": lambda: make_model(
            [helper.make_node("Greater", ["x", "z"], ["g"]),
             helper.make_node("Where", ["g", "x", "c"], ["y"])],
            two, ["y"], {"c": const(-1.0)}),
        "equal_not_cast": lambda: make_model(
            [helper.make_node("Greater", ["x", "c"], ["g"]),
             helper.make_node("Not", ["g"], ["n"]),
             helper.make_node("Cast", ["n"], ["y"], to=FLOAT)], s, ["y"], {"c": const(0.0)}),
        "comparisons_logic": lambda: make_model(
            [helper.make_node("Less", ["x", "z"], ["lt"]),
             helper.make_node("GreaterOrEqual", ["x", "c"], ["ge"]),
             helper.make_node("LessOrEqual", ["z", "c"], ["le"]),
             helper.make_node("Round", ["x"], ["rx"]),
             helper.make_node("Round", ["z"], ["rz"]),
             helper.make_node("Equal", ["rx", "rz"], ["eq"]),
             helper.make_node("And", ["lt", "ge"], ["a"]),
             helper.make_node("Or", ["a", "eq"], ["o"]),
             helper.make_node("Xor", ["o", "le"], ["xo"]),
             helper.make_node("Cast", ["xo"], ["y"], to=FLOAT)],
            two, ["y"], {"c": const(0.25)}),
        "round_half_even": lambda: make_model(  # floor(4x) / 2 has exact .5 ties
            [helper.make_node("Mul", ["x", "c"], ["m"]), helper.make_node("Floor", ["m"], ["f"]),
             helper.make_node("Mul", ["f", "h"], ["t"]), helper.make_node("Round", ["t"], ["y"])],
            s, ["y"], {"c": const(4.0), "h": const(0.5)}),
        "cast_int_roundtrip": lambda: make_model(
            [helper.make_node("Mul", ["x", "c"], ["m"]),
             helper.make_node("Cast", ["m"], ["i"], to=TensorProto.INT32),
             helper.make_node("Cast", ["i"], ["y"], to=FLOAT)], s, ["y"], {"c": const(3.0)},
            opset=9),
        "einsum": lambda: single("Einsum", {"x": [2, 3, 4], "z": [2, 4, 5]},
                                 equation="bij,bjk->bik", opset=12),
    }


def _shape_cases() -> dict[str, Callable[[], onnx.ModelProto]]:
    s = {"x": [2, 3, 4, 5]}
    i64 = lambda v: const(v, np.int64)  # noqa: E731
    return {
        "concat_with_const": lambda: single("Concat", {"x": [2, 3, 4], "z": [2, 1, 4]},
                                            {"c": randn(2, 2, 4, seed=2)}, axis=1),
        "split_attr_opset11": lambda: single("Split", s, opset=11, axis=1, split=[1, 2],
                                             outputs=["y", "y2"]),
        "split_input_opset13": lambda: single("Split", s, {"sp": i64([3, 2])}, axis=3,
                                              outputs=["y", "y2"]),
        "split_equal_opset13": lambda: single("Split", s, axis=2, outputs=["y", "y2"]),
        "split_num_outputs_opset18": lambda: single("Split", s, opset=18, axis=3, num_outputs=3,
                                                    outputs=["y", "y2", "y3"]),
        "reshape_zero_minus1": lambda: single("Reshape", s, {"sh": i64([0, -1, 5])}),
        "reshape_flatten": lambda: single("Reshape", s, {"sh": i64([2, -1])}, opset=9),
        "flatten_axis1": lambda: single("Flatten", s, axis=1, opset=9),
        "flatten_axis2": lambda: single("Flatten", s, axis=2),
        "flatten_axis0": lambda: single("Flatten", s, axis=0),
        "transpose_perm": lambda: single("Transpose", s, perm=[0, 2, 3, 1]),
        "transpose_default": lambda: single("Transpose", s),
        "squeeze_attr_opset11": lambda: single("Squeeze", {"x": [2, 1, 4, 1]}, opset=11,
                                               axes=[1, -1]),
        "squeeze_input_opset13": lambda: single("Squeeze", {"x": [2, 1, 4, 1]},
                                                {"ax": i64([3])}),
        "squeeze_all_opset13": lambda: single("Squeeze", {"x": [2, 1, 4, 1]}),
        "unsqueeze_attr_opset11": lambda: single("Unsqueeze", {"x": [2, 4]}, opset=11,
                                                 axes=[0, 3]),
        "unsqueeze_input_opset13": lambda: single("Unsqueeze", {"x": [2, 4]},
                                                  {"ax": i64([-1, 1])}),
        "slice_attr_opset9": lambda: single("Slice", s, opset=9, starts=[1, -3], ends=[3, 100],
                                            axes=[1, 3]),
        "slice_steps_opset13": lambda: single(
            "Slice", s, {"st": i64([0, 1]), "en": i64([INT64_MAX, -1]), "ax": i64([2, 3]),
                         "stp": i64([2, 2])}),
        "slice_negative_step": lambda: single(
            "Slice", s, {"st": i64([-1]), "en": i64([-INT64_MAX]), "ax": i64([3]),
                         "stp": i64([-2])}),
        "gather_axis1": lambda: single("Gather", s, {"i": i64([2, 0, -1])}, axis=1),
        "gather_scalar": lambda: single("Gather", s, {"i": i64(1)}, axis=2),
        "gather_2d_indices": lambda: single("Gather", s, {"i": i64([[0, 1], [3, 2]])}, axis=3),
        "gather_embedding": lambda: single_ordered(
            "Gather", ["table", "ids"], {"ids": ([2, 3], INT64)}, {"table": randn(12, 5)}),
        "gather_elements": lambda: single("GatherElements", s, {"i": i64(
            rng(3).integers(0, 4, (2, 3, 4, 5)))}, axis=2),
        "shape_gather_reshape_opset9": lambda: _flatten_chain(9),
        "shape_gather_reshape_opset13": lambda: _flatten_chain(13),
        "shape_start_end_opset15": lambda: make_model(
            [helper.make_node("Shape", ["x"], ["sh"], start=1, end=-2),
             helper.make_node("Cast", ["sh"], ["f"], to=FLOAT),
             helper.make_node("Mul", ["x", "f"], ["y"])],
            {"x": [2, 3, 4, 3]}, ["y"], opset=15),
        "constant_of_shape": lambda: make_model(
            [helper.make_node("Shape", ["x"], ["sh"]),
             helper.make_node("ConstantOfShape", ["sh"], ["f"],
                              value=numpy_helper.from_array(const([2.5]))),
             helper.make_node("Add", ["x", "f"], ["y"])], s, ["y"], opset=9),
        "constant_identity": lambda: make_model(
            [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
                randn(5, seed=4))),
             helper.make_node("Identity", ["c"], ["ci"]),
             helper.make_node("Mul", ["x", "ci"], ["y"])], s, ["y"]),
        "expand": lambda: single("Expand", {"x": [3, 1]}, {"sh": i64([2, 3, 4])}),
        "tile": lambda: single("Tile", {"x": [2, 3]}, {"r": i64([2, 3])}),
        "depth_to_space_dcr": lambda: single("DepthToSpace", {"x": [1, 8, 3, 3]}, blocksize=2),
        "depth_to_space_crd": lambda: single("DepthToSpace", {"x": [1, 8, 3, 3]}, blocksize=2,
                                             mode="CRD"),
        "space_to_depth": lambda: single("SpaceToDepth", {"x": [1, 2, 4, 6]}, blocksize=2),
    }


def _flatten_chain(opset: int) -> onnx.ModelProto:
    """x.view(x.size(0), -1) as torch exports it: Shape -> Gather -> Unsqueeze -> Concat."""
    axes = {"axes": [0]} if opset < 13 else {}
    unsq_inputs = ["n"] if opset < 13 else ["n", "ax"]
    nodes = [
        helper.make_node("Shape", ["x"], ["sh"]),
        helper.make_node("Gather", ["sh", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", unsq_inputs, ["nu"], **axes),
        helper.make_node("Concat", ["nu", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    inits = {"zero": const(0, np.int64), "minus1": const([-1], np.int64)}
    if opset >= 13:
        inits["ax"] = const([0], np.int64)
    return make_model(nodes, {"x": [2, 3, 4, 5]}, ["y"], inits, opset)


def _pool_cases() -> dict[str, Callable[[], onnx.ModelProto]]:
    x = {"x": [1, 3, 9, 9]}
    return {
        "maxpool_pads": lambda: single("MaxPool", x, kernel_shape=[3, 3], strides=[2, 2],
                                       pads=[1, 1, 1, 1], opset=9),
        "maxpool_asym": lambda: single("MaxPool", x, kernel_shape=[3, 3], strides=[2, 2],
                                       pads=[0, 1, 2, 0]),
        "maxpool_ceil": lambda: single("MaxPool", {"x": [1, 3, 10, 10]}, kernel_shape=[3, 3],
                                       strides=[2, 2], ceil_mode=1, opset=10),
        "maxpool_ceil_pads": lambda: single("MaxPool", {"x": [1, 3, 10, 10]},
                                            kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1,
                                            pads=[1, 1, 1, 1], opset=12),
        "maxpool_ceil_last_window_in_pad": lambda: single(
            "MaxPool", {"x": [1, 3, 6, 6]}, kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1,
            pads=[0, 0, 1, 1], opset=12),
        "avgpool_ceil_include_pad": lambda: single(
            "AveragePool", {"x": [1, 3, 10, 10]}, kernel_shape=[3, 3], strides=[2, 2],
            ceil_mode=1, pads=[1, 1, 1, 1], count_include_pad=1, opset=12),
        "avgpool_ceil_exclude_pad": lambda: single(
            "AveragePool", {"x": [1, 3, 10, 10]}, kernel_shape=[3, 3], strides=[2, 2],
            ceil_mode=1, pads=[1, 1, 1, 1], opset=12),
        "maxpool_dilation": lambda: single("MaxPool", x, kernel_shape=[2, 2], dilations=[2, 2],
                                           opset=12),
        "maxpool_same_upper": lambda: single("MaxPool", {"x": [1, 3, 8, 8]}, kernel_shape=[3, 3],
                                             strides=[2, 2], auto_pad="SAME_UPPER"),
        "maxpool1d": lambda: single("MaxPool", {"x": [2, 3, 11]}, kernel_shape=[3], strides=[2],
                                    pads=[1, 1]),
        "avgpool_exclude_pad": lambda: single("AveragePool", x, kernel_shape=[3, 3],
                                              strides=[2, 2], pads=[1, 1, 1, 1]),
        "avgpool_include_pad": lambda: single("AveragePool", x, kernel_shape=[3, 3],
                                              strides=[2, 2], pads=[1, 1, 1, 1],
                                              count_include_pad=1),
        "avgpool_asym_exclude": lambda: single("AveragePool", x, kernel_shape=[3, 3],
                                               strides=[2, 2], pads=[0, 1, 2, 0]),
        "avgpool_asym_include": lambda: single("AveragePool", x, kernel_shape=[3, 3],
                                               pads=[0, 1, 1, 0], count_include_pad=1),
        "avgpool_ceil": lambda: single("AveragePool", {"x": [1, 3, 10, 10]},
                                       kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
        "avgpool_same_upper": lambda: single("AveragePool", {"x": [1, 3, 8, 8]},
                                             kernel_shape=[3, 3], strides=[2, 2],
                                             auto_pad="SAME_UPPER"),
        "avgpool1d": lambda: single("AveragePool", {"x": [2, 3, 11]}, kernel_shape=[3],
                                    strides=[2], pads=[1, 1]),
        "global_avgpool": lambda: single("GlobalAveragePool", x),
        "global_maxpool": lambda: single("GlobalMaxPool", x),
        "global_avgpool1d": lambda: single("GlobalAveragePool", {"x": [2, 3, 11]}),
        "reduce_mean_attr": lambda: single("ReduceMean", x, axes=[2, 3], keepdims=1),
        "reduce_mean_input_opset18": lambda: single("ReduceMean", x,
                                                    {"ax": const([-1, 1], np.int64)},
                                                    keepdims=0, opset=18),
        "reduce_mean_all": lambda: single("ReduceMean", x, keepdims=0),
        "reduce_sum_input_opset13": lambda: single("ReduceSum", x, {"ax": const([1], np.int64)}),
        "reduce_max_opset18": lambda: single("ReduceMax", x, {"ax": const([2], np.int64)},
                                             opset=18),
        "reduce_min_attr": lambda: single("ReduceMin", x, axes=[3], keepdims=0),
        "reduce_prod_attr": lambda: single("ReduceProd", {"x": [2, 3, 4]}, axes=[0, 2]),
        "reduce_l2": lambda: single("ReduceL2", x, axes=[1]),
        "reduce_l1": lambda: single("ReduceL1", x, axes=[2, 3], keepdims=0),
        "reduce_sum_square": lambda: single("ReduceSumSquare", x, axes=[1]),
        "reduce_log_sum_exp": lambda: single("ReduceLogSumExp", x, axes=[1]),
        "argmax": lambda: single("ArgMax", x, axis=1, outputs={"y": INT64}),
        "argmin": lambda: single("ArgMin", x, axis=-1, keepdims=0, outputs={"y": INT64}),
    }


def _pad_resize_cases() -> dict[str, Callable[[], onnx.ModelProto]]:
    x = {"x": [1, 2, 5, 6]}
    i64 = lambda v: const(v, np.int64)  # noqa: E731
    empty = np.zeros(0, np.float32)

    def resize(opset, scales=None, sizes=None, **attrs):
        if opset == 10:
            return single("Resize", x, {"sc": const(scales)}, opset=10, **attrs)
        names = ["x", "", "sc" if scales is not None else "", "sz" if sizes is not None else ""]
        inits = {}
        if scales is not None:
            inits["sc"] = const(scales)
        if sizes is not None:
            inits["sz"] = i64(sizes)
        if opset < 13 and "" in names[1:3]:  # roi and scales were required before 13
            names[1] = "roi"
            inits["roi"] = empty
            if names[2] == "":
                names[2], inits["sc"] = "sc", empty
        return single_ordered("Resize", _trim(names), x, inits, opset=opset, **attrs)

    return {
        "pad_constant_opset9": lambda: single("Pad", x, opset=9, pads=[0, 0, 1, 2, 0, 0, 2, 1],
                                              value=1.5),
        "pad_reflect_opset9": lambda: single("Pad", x, opset=9, pads=[0, 0, 1, 2, 0, 0, 2, 1],
                                             mode="reflect"),
        "pad_edge_opset13": lambda: single("Pad", x, {"p": i64([0, 0, 1, 2, 0, 0, 2, 1])},
                                           mode="edge"),
        "pad_constant_value_opset13": lambda: single(
            "Pad", x, {"p": i64([0, 1, 0, 0, 0, 0, 0, 3]), "v": const(-2.0)}),
        "pad_negative_opset11": lambda: single("Pad", x, {"p": i64([0, 0, -1, 1, 0, 0, 1, -2])},
                                               opset=11),
        "pad_axes_opset18": lambda: single("Pad", x, {"p": i64([1, 2, 3, 0]), "v": const(0.5),
                                                      "ax": i64([1, 3])}, opset=18),
        "pad_wrap_opset19": lambda: single("Pad", x, {"p": i64([0, 0, 1, 2, 0, 0, 2, 1])},
                                           opset=19, mode="wrap"),
        "resize_nearest_opset10": lambda: resize(10, [1, 1, 2, 2]),
        "resize_nearest_opset10_down": lambda: resize(10, [1, 1, 0.5, 0.5]),
        "upsample_nearest_opset9": lambda: single("Upsample", x, {"sc": const([1, 1, 2, 3])},
                                                  opset=9),
        "upsample_linear_opset9": lambda: single("Upsample", x, {"sc": const([1, 1, 2, 2])},
                                                 opset=9, mode="linear"),
        "upsample_nearest_opset7_attr": lambda: single("Upsample", x, opset=7,
                                                       scales=[1.0, 1.0, 2.0, 2.0]),
        "resize_nearest_asym_floor_opset11": lambda: resize(
            11, [1, 1, 2, 2], coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        "resize_nearest_default_opset13": lambda: resize(13, [1, 1, 2, 2]),
        "resize_nearest_half_pixel_down": lambda: resize(13, [1, 1, 0.5, 0.5]),
        "resize_nearest_prefer_ceil_down": lambda: resize(13, [1, 1, 0.5, 0.5],
                                                          nearest_mode="round_prefer_ceil"),
        "resize_nearest_asym_up_3x": lambda: resize(
            13, [1, 1, 3, 3], coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        "resize_nearest_align_corners": lambda: resize(
            13, sizes=[1, 2, 9, 11], coordinate_transformation_mode="align_corners"),
        "resize_nearest_sizes_odd": lambda: resize(13, sizes=[1, 2, 7, 10],
                                                   coordinate_transformation_mode=(
                                                       "pytorch_half_pixel")),
        "resize_nearest_ceil_tf": lambda: resize(11, [1, 1, 1.5, 1.5], nearest_mode="ceil",
                                                 coordinate_transformation_mode=(
                                                     "tf_half_pixel_for_nn")),
        "resize_linear_half_pixel": lambda: resize(13, [1, 1, 2, 2], mode="linear"),
        "resize_linear_align_corners_sizes": lambda: resize(
            13, sizes=[1, 2, 9, 13], mode="linear", coordinate_transformation_mode="align_corners"),
        "resize_linear_asymmetric": lambda: resize(13, [1, 1, 2, 2], mode="linear",
                                                   coordinate_transformation_mode="asymmetric"),
        "resize_linear_pytorch_half_pixel_down": lambda: resize(
            13, [1, 1, 0.6, 0.5], mode="linear",
            coordinate_transformation_mode="pytorch_half_pixel"),
        "resize_linear_opset10": lambda: resize(10, [1, 1, 2, 2], mode="linear"),
        "resize_cubic": lambda: resize(13, [1, 1, 2, 2], mode="cubic"),
        "resize_cubic_exclude_outside": lambda: resize(13, [1, 1, 1.5, 2], mode="cubic",
                                                       exclude_outside=1, cubic_coeff_a=-0.5,
                                                       coordinate_transformation_mode=(
                                                           "asymmetric")),
        "resize_linear_half_pixel_symmetric_opset19": lambda: resize(
            19, [1, 1, 1.7, 2.3], mode="linear",
            coordinate_transformation_mode="half_pixel_symmetric"),
        "resize_axes_opset18": lambda: single_ordered(
            "Resize", ["x", "", "sc"], x, {"sc": const([2.0, 3.0])}, opset=18, axes=[2, 3],
            mode="linear"),
    }


def _trim(names: list[str]) -> list[str]:
    while names and names[-1] == "":
        names.pop()
    return names


def all_cases() -> dict[str, Callable[[], onnx.ModelProto]]:
    cases: dict[str, Callable[[], onnx.ModelProto]] = {}
    for group in (_conv_cases, _norm_dense_cases, _activation_cases, _elementwise_cases,
                  _shape_cases, _pool_cases, _pad_resize_cases):
        for key, build in group().items():
            if key in cases:
                raise ValueError(f"duplicate case {key}")
            cases[key] = build
    return cases


CASES = all_cases()
