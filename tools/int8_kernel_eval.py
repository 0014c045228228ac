#!/usr/bin/env python3
"""Integer kernels against float ones on this host: one 3x3 conv and one linear layer.

Four builds of each layer, timed interleaved (round robin) in one process, medians reported:

    tvm-fp32   torch.nn layer, MetaSchedule-tuned (the project's fp32 path, NHWC convs)
    tvm-int8   slimgraph::qconv2d / qlinear (u8 activations, s8 per-channel weights),
               tuned with int8.py's rules (the target's dot-product intrinsic)
    ort-fp32   ONNX Runtime Conv / MatMul+Add
    ort-int8   ONNX Runtime QLinearConv / QLinearMatMul (u8 x s8 per-channel, u8 out)

Each build is tuned from an empty database with the same trial budget. The int8 outputs are
checked against slimgraph's PyTorch reference (TVM: bit-exact expected; ONNX Runtime rounds its
own way: its difference in quantization steps is reported). ONNX Runtime's QLinearMatMul has no
bias input, so the linear layer's bias is zero in every build. Weights are quantized to 7 bits
when the target's intrinsic needs it (``int8_capability(...).reduce_range``), else to 8.

    .venv/bin/python tools/int8_kernel_eval.py --trials 64 --json out/bench/int8_kernels.json
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

import slimgraph.ops  # noqa: F401 - registers torch.ops.slimgraph.*
from slimgraph.backends.tvm import build, get_target, host_num_cores
from slimgraph.backends.tvm.intrinsics import int8_capability

ops = torch.ops.slimgraph


# ---------------------------------------------------------------- quantization (per layer)

def _affine(lo: float, hi: float) -> tuple[float, int]:
    """u8 scale and zero point covering [lo, hi] (and 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    return scale, int(np.clip(round(-lo / scale), 0, 255))


class Quantized:
    """Per-tensor u8 activations, per-channel symmetric s8 (or 7-bit) weights of one layer."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor,
                 y: torch.Tensor, wmax: int):
        self.s_x, self.x_zp = _affine(float(x.min()), float(x.max()))
        self.s_y, self.y_zp = _affine(float(y.min()), float(y.max()))
        flat = weight.reshape(weight.shape[0], -1)
        self.s_w = (flat.abs().amax(1).clamp_min(1e-12) / wmax).float()
        shape = (-1,) + (1,) * (weight.dim() - 1)
        self.w = torch.round(weight / self.s_w.view(shape)).clamp(-wmax, wmax).to(torch.int8)
        self.bias = torch.round(bias / (self.s_x * self.s_w)).to(torch.int32)
        self.scale = (self.s_x * self.s_w / self.s_y).float()
        self.x = torch.clamp(torch.round(x / self.s_x) + self.x_zp, 0, 255).to(torch.uint8)


class QConvLayer(torch.nn.Module):
    def __init__(self, q: Quantized, padding: int):
        super().__init__()
        self.q, self.padding = q, padding
        for name in ("w", "bias", "scale"):
            self.register_buffer(name, getattr(q, name))

    def forward(self, x):
        p = self.padding
        return ops.qconv2d(x, self.q.x_zp, self.w, self.bias, self.scale, self.q.y_zp, [1, 1],
                           [p, p], [1, 1], 1, 0, 255)


class QLinearLayer(torch.nn.Module):
    def __init__(self, q: Quantized):
        super().__init__()
        self.q = q
        for name in ("w", "bias", "scale"):
            self.register_buffer(name, getattr(q, name))

    def forward(self, x):
        return ops.qlinear(x, self.q.x_zp, self.w, self.bias, self.scale, self.q.y_zp, 0, 255)


# ---------------------------------------------------------------- ONNX Runtime models

def _session(graph: onnx.GraphProto) -> ort.InferenceSession:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = host_num_cores()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def _init(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def ort_conv_fp32(conv: torch.nn.Conv2d, x_shape, y_shape) -> ort.InferenceSession:
    p = conv.padding[0]
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[p] * 4)
    return _session(helper.make_graph(
        [node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [_init("w", conv.weight.detach().numpy()), _init("b", conv.bias.detach().numpy())]))


def ort_conv_int8(q: Quantized, padding: int, x_shape, y_shape) -> ort.InferenceSession:
    o = q.w.shape[0]
    inputs = ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"]
    node = helper.make_node("QLinearConv", inputs, ["y"], pads=[padding] * 4)
    inits = [_init("xs", np.float32(q.s_x)), _init("xz", np.uint8(q.x_zp)),
             _init("w", q.w.numpy()), _init("ws", q.s_w.numpy()),
             _init("wz", np.zeros(o, np.int8)), _init("ys", np.float32(q.s_y)),
             _init("yz", np.uint8(q.y_zp)), _init("b", q.bias.numpy())]
    return _session(helper.make_graph(
        [node], "qconv", [helper.make_tensor_value_info("x", TensorProto.UINT8, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, y_shape)], inits))


def ort_linear_fp32(lin: torch.nn.Linear, x_shape, y_shape) -> ort.InferenceSession:
    nodes = [helper.make_node("MatMul", ["x", "wt"], ["t"]),
             helper.make_node("Add", ["t", "b"], ["y"])]
    return _session(helper.make_graph(
        nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [_init("wt", lin.weight.detach().numpy().T), _init("b", lin.bias.detach().numpy())]))


def ort_linear_int8(q: Quantized, x_shape, y_shape) -> ort.InferenceSession:
    m = q.w.shape[0]
    inputs = ["x", "xs", "xz", "wt", "ws", "wz", "ys", "yz"]
    node = helper.make_node("QLinearMatMul", inputs, ["y"])
    inits = [_init("xs", np.float32(q.s_x)), _init("xz", np.uint8(q.x_zp)),
             _init("wt", q.w.numpy().T), _init("ws", q.s_w.numpy()),
             _init("wz", np.zeros(m, np.int8)), _init("ys", np.float32(q.s_y)),
             _init("yz", np.uint8(q.y_zp))]
    return _session(helper.make_graph(
        [node], "qlinear", [helper.make_tensor_value_info("x", TensorProto.UINT8, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, y_shape)], inits))


# ---------------------------------------------------------------- builds

def _info(compiled, key: str):
    info = compiled.info  # a dict, or a schema.BuildInfo record
    return info[key] if isinstance(info, dict) else getattr(info, key)


def _instructions(compiled, workdir: Path) -> dict[str, int]:
    """Dot-product instructions in the built library (objdump of the saved artifact)."""
    tool = shutil.which("llvm-objdump") or shutil.which("objdump")
    if tool is None:
        return {}
    lib = compiled.save(workdir / "artifact") / "model.so"
    text = subprocess.run([tool, "-d", str(lib)], capture_output=True, text=True).stdout
    return {i: len(re.findall(rf"\b{i}\b", text)) for i in ("vpdpbusd", "vpmaddubsw")}


def tvm_build(module, inputs, trials: int, workdir: Path, budget_s: float | None):
    start = time.perf_counter()
    compiled = build(module, inputs, "x86", tune_trials=trials, workdir=workdir,
                     time_budget_s=budget_s, progress=False)
    return compiled, {"build_s": round(time.perf_counter() - start, 1),
                      "trials_measured": _info(compiled, "trials_measured"),
                      "tune_time_s": round(_info(compiled, "tune_time_s"), 1)}


def conv_layer(n, c, h, w, o, wmax, rng_seed=0):
    torch.manual_seed(rng_seed)
    conv = torch.nn.Conv2d(c, o, 3, padding=1).eval()
    x = torch.relu(torch.randn(n, c, h, w))  # post-ReLU activations
    with torch.no_grad():
        y = conv(x)
    q = Quantized(conv.weight.detach(), conv.bias.detach(), x, y, wmax)
    return conv, x, y, q


def linear_layer(n, k, m, wmax, rng_seed=1):
    torch.manual_seed(rng_seed)
    lin = torch.nn.Linear(k, m).eval()
    with torch.no_grad():
        lin.bias.zero_()  # QLinearMatMul has no bias
    x = torch.relu(torch.randn(n, k))
    with torch.no_grad():
        y = lin(x)
    return lin, x, y, Quantized(lin.weight.detach(), lin.bias.detach(), x, y, wmax)


# ---------------------------------------------------------------- timing

def interleaved(runs: dict, rounds: int, inner: int, settle_ms: float = 50.0) -> dict[str, float]:
    """Median ms per call of each callable, timed round robin. Each turn first calls its
    callable untimed for ``settle_ms`` (at least twice): the previous runtime's idle threads
    keep spinning on the same cores for a while, and this runtime's own workers must wake up
    (on 2 cores a TVM call right after an ONNX Runtime one took 100x its steady time)."""
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            start, calls = time.perf_counter(), 0
            while calls < 2 or (time.perf_counter() - start) * 1e3 < settle_ms:
                fn()
                calls += 1
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t0) * 1e3 / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def evaluate(name: str, fp32_module, x, q: Quantized, int8_module, ort_fp32, ort_int8, args,
             workdir: Path) -> dict:
    with torch.no_grad():
        ref_int8 = int8_module(q.x).numpy()
    fp32, fp32_meta = tvm_build(fp32_module, (x,), args.trials, workdir / f"{name}-fp32",
                                args.budget)
    int8, int8_meta = tvm_build(int8_module, (q.x,), args.trials, workdir / f"{name}-int8",
                                args.budget)
    xf, xq = x.numpy(), q.x.numpy()
    ort_out = ort_int8.run(None, {"x": xq})[0]
    diff = np.abs(ort_out.astype(np.int32) - ref_int8.astype(np.int32))
    runs = {"tvm-fp32": fp32.bind(xf), "tvm-int8": int8.bind(xq),
            "ort-fp32": lambda: ort_fp32.run(None, {"x": xf}),
            "ort-int8": lambda: ort_int8.run(None, {"x": xq})}
    ms = interleaved(runs, args.rounds, args.inner)
    base = ms["ort-fp32"]
    return {
        "layer": name, "median_ms": {k: round(v, 4) for k, v in ms.items()},
        "vs_ort_fp32": {k: round(v / base, 3) for k, v in ms.items()},
        "tvm_int8_vs_tvm_fp32": round(ms["tvm-int8"] / ms["tvm-fp32"], 3),
        "tvm_int8_vs_ort_int8": round(ms["tvm-int8"] / ms["ort-int8"], 3),
        "tvm_int8_bit_exact": bool(np.array_equal(int8(xq)[0], ref_int8)),
        "tvm_fp32_max_abs_err": float(np.abs(fp32(xf)[0] - fp32_module(x).detach().numpy()).max()),
        "ort_int8_steps_off": {"max": int(diff.max()), "fraction": round(float((diff > 0).mean()), 4)},
        "tvm_fp32_build": fp32_meta, "tvm_int8_build": int8_meta,
        "tvm_int8_instructions": _instructions(int8, workdir / f"{name}-int8"),
    }


# ---------------------------------------------------------------- main

def host_summary() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.MULTILINE)
    flags = set((re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE) or [None, ""])[1].split())
    spec = get_target("x86")
    cap = int8_capability(spec)
    wanted = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
    return {"cpu": model.group(1) if model else "?", "cores": host_num_cores(),
            "llvm_mcpu": spec.mcpu, "flags": [f for f in wanted if f in flags],
            "int8_intrinsic": cap.intrinsic, "int8_path": cap.description,
            "reduce_range": cap.reduce_range}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=64, help="MetaSchedule trials per build")
    ap.add_argument("--budget", type=float, default=None, help="tuning seconds per build")
    ap.add_argument("--conv", default="1,64,56,56,64", help="N,C,H,W,O of the 3x3 conv")
    ap.add_argument("--linear", default="1,512,1000", help="N,K,M of the linear layer")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--inner", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep the tuning databases here (a rerun re-times without re-tuning)")
    args = ap.parse_args(argv)
    torch.set_num_threads(host_num_cores())
    host = host_summary()
    print(json.dumps({"host": host, "trials_per_build": args.trials}), flush=True)
    wmax = 63 if host["reduce_range"] else 127
    rows = []
    with tempfile.TemporaryDirectory(prefix="int8-eval-") as scratch:
        tmp = args.workdir or scratch
        n, c, h, w, o = (int(v) for v in args.conv.split(","))
        conv, x, y, q = conv_layer(n, c, h, w, o, wmax)
        rows.append(evaluate(
            f"conv3x3 {n}x{c}x{h}x{w}->{o}", conv, x, q, QConvLayer(q, 1).eval(),
            ort_conv_fp32(conv, x.shape, y.shape), ort_conv_int8(q, 1, x.shape, y.shape), args,
            Path(tmp) / "conv"))
        print(json.dumps(rows[-1]), flush=True)
        n, k, m = (int(v) for v in args.linear.split(","))
        lin, x, y, q = linear_layer(n, k, m, wmax)
        rows.append(evaluate(
            f"linear {n}x{k}->{m}", lin, x, q, QLinearLayer(q).eval(),
            ort_linear_fp32(lin, x.shape, y.shape), ort_linear_int8(q, x.shape, y.shape), args,
            Path(tmp) / "linear"))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"host": host, "trials": args.trials, "layers": rows},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
