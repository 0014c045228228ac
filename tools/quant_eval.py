#!/usr/bin/env python3
"""Evidence for quantization: accuracy on the trained digits CNN, latency on a ResNet-18.

    python tools/quant_eval.py digits --json out/bench/quant_digits.json
    python tools/quant_eval.py resnet --trials 400 --batches 1 8 --json out/bench/quant_resnet.json

``digits``: test accuracy (360 held-out images) and weight size of the trained DigitsCNN in
float32, int8 post-training quantization with each calibration method, 4-bit weights, 2-bit
weights without and with quantization-aware training, and fixed point (Lin et al. 2016) at
several size budgets with the bits it chose per layer. Accuracies come from the quantized graph
run with slimgraph's integer reference ops, which the compiled kernels match bit for bit (the
``compiled`` row checks that for int8 with a tuned x86 build).

``resnet``: the ResNet-18-style model (3x224x224, random weights: latency and fidelity, never
accuracy) at each batch size: slimgraph fp32 (fold-bn, tuned), slimgraph int8 (fold-bn,
quantize, tuned with the same trial budget), ONNX Runtime fp32, and ONNX Runtime int8 (QDQ,
uint8 activations x int8 per-channel weights, ``quantize_static`` with the same calibration),
timed interleaved in one process (round robin; each turn a pause, one call timed alone, then
``--inner`` calls timed together), medians reported: the latency of a warmed-up loop, and the
first call after the pause (``first_call_ms``). ``--baseline-workdir`` adds an engine: the int8
model built without tuning from an earlier run's databases (an A/B of a scheduling change).
Fidelity of each int8 engine: top-1 agreement and cosine against slimgraph fp32 on 64 random
inputs. The host CPU and which int8 instruction path the build took are in the output, and the
int8 build's slowest kernels (``--kernels``, from ``CompiledModel.profile``): where its time goes.
``--float-adds`` adds an engine: the int8 model with its residual adds in float
(``quantize{integer_adds=false}``), built on the same databases and timed in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import slimgraph  # noqa: E402
from slimgraph.ir.analysis import AnalysisManager, Cost  # noqa: E402
from slimgraph.ir.graph import Graph  # noqa: E402
from slimgraph.numerics import compare_outputs  # noqa: E402
from slimgraph.passes import PassManager, parse_pipeline  # noqa: E402
from slimgraph.passes.context import PassContext  # noqa: E402
from slimgraph.zoo.datasets import demo_model, load_digits_split  # noqa: E402
from slimgraph.zoo.models import resnet18  # noqa: E402

DIGITS_ROWS = [
    ("float32", "cleanup,fold-bn"),
    ("int8, min-max", "cleanup,fold-bn,quantize{calibration=minmax}"),
    ("int8, percentile 99.99", "cleanup,fold-bn,quantize{calibration=percentile}"),
    ("int8, entropy (KL)", "cleanup,fold-bn,quantize{calibration=entropy}"),
    ("int8, MSE", "cleanup,fold-bn,quantize{calibration=mse}"),
    ("4-bit weights, 8-bit activations", "cleanup,fold-bn,quantize{weight_bits=4}"),
    ("2-bit weights (PTQ)", "cleanup,fold-bn,quantize{weight_bits=2}"),
    ("2-bit weights + QAT (5 epochs)", "cleanup,fold-bn,quantize{weight_bits=2,qat=true},"
                                       "finetune{epochs=5},quantize{weight_bits=2}"),
]
FIXED_POINT_BUDGETS = (8, 6, 4, 3, 2)


def host() -> dict:
    flags = ""
    try:
        flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        pass
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines()
                  if line.startswith("Model name")), platform.processor())
    keep = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
    have = [f for f in keep if f" {f} " in f" {flags} "]
    from slimgraph.backends.tvm import get_target
    from slimgraph.backends.tvm.intrinsics import int8_capability

    return {"cpu": model, "flags": have, "llvm_target": get_target("x86").tvm_target,
            "int8_path": int8_capability(get_target("x86")).description,
            "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------- digits
def _digits_setup():
    model, (x,) = demo_model()
    graph = Graph.from_torch(model, (x,))
    split = load_digits_split()
    calib = [(b,) for b in split["x_train"].split(64)]
    return graph, calib, split["x_test"], split["y_test"].numpy()


def digits(args) -> dict:
    graph, calib, xt, yt = _digits_setup()
    am = AnalysisManager()
    rows = []
    for label, spec in DIGITS_ROWS:
        out, records = PassManager(parse_pipeline(spec)).run(graph, PassContext(calib, reference=graph))
        acc = float((out.run(xt)[0].argmax(1) == yt).mean())
        rows.append({"config": label, "pipeline": spec, "test_accuracy": round(acc, 4),
                     "weight_bytes": am.get(Cost, out).weight_bytes})
        print(f"{label:<36} acc {acc:.4f}  weights {rows[-1]['weight_bytes']:,} B", flush=True)
    fixed = []
    for budget in FIXED_POINT_BUDGETS:
        spec = f"cleanup,fold-bn,fixed-point{{budget={budget}}}"
        out, records = PassManager(parse_pipeline(spec)).run(graph, PassContext(calib, reference=graph))
        st = records[-1].stats
        acc = float((out.run(xt)[0].argmax(1) == yt).mean())
        fixed.append({"budget_bits": budget, "bits_per_layer": st["bits_per_layer"],
                      "average_bits": st["average_bits"], "weight_sqnr_db": st["weight_sqnr_db"],
                      "weight_bytes": am.get(Cost, out).weight_bytes, "test_accuracy": round(acc, 4)})
        print(f"fixed-point budget {budget}: {st['bits_per_layer']} avg {st['average_bits']} "
              f"acc {acc:.4f}", flush=True)
    result = {"host": host(), "rows": rows, "fixed_point": fixed}
    if args.compiled_trials:
        result["compiled"] = _compiled_check(graph, calib, xt, yt, args)
    return result


def _compiled_check(graph, calib, xt, yt, args) -> dict:
    """int8 accuracy from a tuned x86 artifact (one image at a time)."""
    res = slimgraph.optimize(graph, "x86", pipeline="cleanup,fold-bn,quantize",
                             calibration=torch.cat([b[0] for b in calib]), tune_trials=args.compiled_trials,
                             workdir=args.workdir, benchmark=False, progress=False)
    x = xt.numpy()
    pred = np.concatenate([res.compiled(x[i:i + 1])[0] for i in range(len(x))]).argmax(1)
    same = np.array_equal(pred, res.graph.run(xt)[0].argmax(1))
    print(f"compiled int8: acc {(pred == yt).mean():.4f}, identical predictions to the graph: {same}")
    return {"test_accuracy": round(float((pred == yt).mean()), 4), "matches_graph": bool(same),
            "schedules": res.compiled.info.schedules}


# ------------------------------------------------------------------------- resnet
def _ort_int8(fp32_path: Path, out_path: Path, calib: np.ndarray, name: str) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{name: calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(fp32_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out_path


def _timed(fn, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) * 1e3 / inner


def interleaved(engines: dict, rounds: int, inner: int, pause_s: float = 0.2
                ) -> tuple[dict[str, float], dict[str, float]]:
    """Median ms per call of each engine, timed round robin, and the median of each turn's
    first call. Each turn: a pause (so the previous engine's idle threads stop spinning on the
    cores), one call timed on its own (the first call after the pause: caches hold the other
    engine's data and this engine's workers are asleep), then ``inner`` calls timed together
    (the latency reported, as a warmed-up timing loop sees it)."""
    for fn in engines.values():  # warm up
        fn()
    times: dict[str, list[float]] = {k: [] for k in engines}
    first: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(rounds):
        for name, fn in engines.items():
            time.sleep(pause_s)
            first[name].append(_timed(fn, 1))
            times[name].append(_timed(fn, inner))
    return ({k: round(statistics.median(v), 4) for k, v in times.items()},
            {k: round(statistics.median(v), 4) for k, v in first.items()})


def resnet_batch(batch: int, args) -> dict:
    import onnxruntime as ort

    torch.manual_seed(0)
    model = resnet18()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 224, 224, generator=gen)
    calib = torch.randn(32, 3, 224, 224, generator=gen)
    probe = torch.randn(64, 3, 224, 224, generator=gen)
    graph = Graph.from_torch(model, (x,))
    work = Path(args.workdir) / f"b{batch}"
    t0 = time.perf_counter()
    fp32 = slimgraph.optimize(graph, "x86", pipeline="cleanup,fold-bn", tune_trials=args.trials,
                              workdir=work / "fp32", benchmark=False, progress=args.progress)
    t1 = time.perf_counter()

    def int8_build(quantize: str, database: Path | None = None):
        return slimgraph.optimize(graph, "x86", pipeline=f"cleanup,fold-bn,{quantize}",
                                  calibration=calib,
                                  tune_trials=0 if database else args.int8_trials or args.trials,
                                  workdir=work / "int8", database=database, benchmark=False,
                                  progress=args.progress)

    int8 = int8_build("quantize")
    t2 = time.perf_counter()
    # the same int8 model with its residual adds in float, on the same databases
    float_adds = int8_build("quantize{integer_adds=false}") if args.float_adds else None
    # the same int8 model on another run's databases, as they are (no tuning)
    baseline = None
    if args.baseline_workdir:
        from slimgraph.backends.tvm import get_target
        from slimgraph.backends.tvm.tune import tuning_dir

        baseline = int8_build("quantize", tuning_dir(
            get_target("x86"), Path(args.baseline_workdir) / f"b{batch}" / "int8"))
    with tempfile.TemporaryDirectory() as tmp:
        onnx_fp32 = graph.to_onnx(Path(tmp) / "fp32.onnx")
        name = graph.input_names[0]
        onnx_int8 = _ort_int8(onnx_fp32, Path(tmp) / "int8.onnx", calib.numpy(), name)
        opts = ort.SessionOptions()
        sess = {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
                for k, p in (("ort_fp32", onnx_fp32), ("ort_int8", onnx_int8))}
        xn = x.numpy()
        engines = {"slimgraph_int8": lambda: int8.compiled(xn),
                   "slimgraph_fp32": lambda: fp32.compiled(xn),
                   "ort_fp32": lambda: sess["ort_fp32"].run(None, {name: xn}),
                   "ort_int8": lambda: sess["ort_int8"].run(None, {name: xn})}
        if float_adds is not None:
            engines["slimgraph_int8_float_adds"] = lambda: float_adds.compiled(xn)
        if baseline is not None:
            engines["slimgraph_int8_baseline"] = lambda: baseline.compiled(xn)
        latency, first_call = interleaved(engines, args.rounds, args.inner)
        fidelity = _fidelity(probe, batch, fp32, int8, sess, name, float_adds)
        kernels = [k.to_dict() for k in int8.compiled.profile(inputs=[xn])[:args.kernels]]
    ratios = {f"ort_fp32/{k}": round(latency["ort_fp32"] / latency[k], 3) for k in latency}
    return {"batch": batch, "trials_fp32": args.trials, "trials_int8": args.int8_trials or args.trials,
            "tune_fp32_s": round(t1 - t0),
            "tune_int8_s": round(t2 - t1), "latency_ms": latency, "speedup_vs_ort_fp32": ratios,
            "first_call_ms": first_call,
            "first_call_speedup_vs_ort_fp32": {
                f"ort_fp32/{k}": round(first_call["ort_fp32"] / first_call[k], 3)
                for k in first_call},
            "fidelity_vs_slimgraph_fp32": fidelity,
            "int8_schedules": int8.compiled.info.schedules,
            "baseline_schedules": baseline.compiled.info.schedules if baseline else None,
            "int8_untuned_kernels": len(int8.compiled.info.untuned_tasks),
            "int8_slowest_kernels": kernels,
            "fp32_untuned_kernels": len(fp32.compiled.info.untuned_tasks)}


def _fidelity(probe, batch, fp32, int8, sess, name, float_adds=None) -> dict:
    def run(fn):
        return np.concatenate([fn(probe[i:i + batch].numpy())[0] for i in range(0, len(probe), batch)])

    ref = run(lambda a: fp32.compiled(a))
    out = {}
    engines = [("slimgraph_int8", lambda a: int8.compiled(a)),
               ("ort_int8", lambda a: sess["ort_int8"].run(None, {name: a}))]
    if float_adds is not None:
        engines.append(("slimgraph_int8_float_adds", lambda a: float_adds.compiled(a)))
    for label, fn in engines:
        m = compare_outputs([ref], [run(fn)])
        out[label] = {"top1_agreement": m["top1_agreement"], "cosine": round(m["cosine"], 6)}
    return out


def resnet(args) -> dict:
    result = {"host": host(), "batches": []}
    for batch in args.batches:
        row = resnet_batch(batch, args)
        print(json.dumps(row, indent=1), flush=True)
        result["batches"].append(row)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("digits", "resnet"))
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--trials", type=int, default=400, help="tuning trials per build (resnet)")
    p.add_argument("--int8-trials", type=int, default=0,
                   help="the int8 builds' budget (resnet; default: --trials)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes (resnet)")
    p.add_argument("--baseline-workdir", type=Path,
                   help="also time the int8 model built, without tuning, from this workdir's "
                        "databases (an earlier run's; resnet)")
    p.add_argument("--rounds", type=int, default=15, help="timing rounds (resnet)")
    p.add_argument("--inner", type=int, default=5, help="calls per engine per round (resnet)")
    p.add_argument("--workdir", default="out/quant_eval", help="tuning databases")
    p.add_argument("--float-adds", action="store_true",
                   help="also time the int8 model with its residual adds in float (resnet)")
    p.add_argument("--kernels", type=int, default=12,
                   help="the int8 build's slowest kernels to record (resnet; CompiledModel.profile)")
    p.add_argument("--compiled-trials", type=int, default=0,
                   help="digits: also check a tuned int8 x86 artifact's accuracy")
    p.add_argument("--progress", action="store_true", help="tuning progress bars")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = digits(args) if args.what == "digits" else resnet(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
