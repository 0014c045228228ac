"""ResNet-18 (batch 1, 224x224) on this CPU: TVM untuned vs TVM tuned vs ONNX Runtime vs PyTorch.

Builds untuned and tuned (MetaSchedule, ``--trials`` in total) in one process, then measures
all four engines back to back on the same input, interleaved in rounds so that load from other
processes hits them alike; prints a table with ratios and writes JSON.

    .venv/bin/python tools/bench_tvm_tuning.py --trials 600 --workdir out/bench_tvm

The tuning database goes to ``<workdir>/tuning/<target>/``; ``--fresh`` empties it first so the
tuning time is that of a cold start (otherwise trials already there count toward the budget).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from slimgraph.backends.tvm import build, get_target, host_num_cores, tuning_dir
from slimgraph.zoo.models import resnet18


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=600, help="MetaSchedule trials in total")
    p.add_argument("--workdir", type=Path, default=Path("out/bench_tvm"))
    p.add_argument("--target", default="x86")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds of tuning at most (checked between batches)")
    p.add_argument("--fresh", action="store_true", help="empty the tuning database first")
    p.add_argument("--repeat", type=int, default=30, help="timed runs per fast engine")
    p.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds")
    p.add_argument("--untuned-repeat", type=int, default=3, help="timed runs of untuned TVM")
    p.add_argument("--json", type=Path, default=None, help="default: <workdir>/bench.json")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def time_calls(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return out


def summarize(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times), "mean_ms": statistics.fmean(times),
            "min_ms": min(times), "runs": len(times)}


def onnx_session(model: torch.nn.Module, x: torch.Tensor, path: Path, threads: int):
    import onnxruntime as ort

    torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / max(np.abs(ref).max(), 1e-30))


def main(argv=None) -> int:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    cores = host_num_cores()
    torch.set_num_threads(cores)
    spec = get_target(args.target)
    model = resnet18()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(x).numpy()
    db_dir = tuning_dir(spec, args.workdir)
    if args.fresh:
        shutil.rmtree(db_dir, ignore_errors=True)
    load_before = os.getloadavg()

    print(f"[bench] target {spec.name} {spec.tvm_target}; {cores} cores; "
          f"load avg {load_before[0]:.2f}", flush=True)
    t0 = time.perf_counter()
    untuned = build(model, (x,), spec, tune_trials=0)
    untuned_build_s = time.perf_counter() - t0
    print(f"[bench] untuned build {untuned_build_s:.1f} s", flush=True)

    t0 = time.perf_counter()
    tuned = build(model, (x,), spec, tune_trials=args.trials, workdir=args.workdir,
                  time_budget_s=args.time_budget, progress=not args.no_progress)
    tuned_total_s = time.perf_counter() - t0
    info = tuned.info
    print(f"[bench] tuned build {tuned_total_s:.1f} s (tuning {info['tune_time_s']:.1f} s, "
          f"{info['trials_measured']} trials measured, stopped by {info.get('stopped_by')})",
          flush=True)

    session = onnx_session(model, x, args.workdir / "resnet18.onnx", cores)
    x_np = x.numpy()
    errors = {
        "tvm_untuned": rel_err(untuned(x_np)[0], ref),
        "tvm_tuned": rel_err(tuned(x_np)[0], ref),
        "onnxruntime": rel_err(session.run(None, {"x": x_np})[0], ref),
    }

    # Warm up, then interleave rounds so load from other processes hits all engines alike.
    engines = {
        "tvm_tuned": tuned.bind(x_np),
        "onnxruntime": lambda: session.run(None, {"x": x_np}),
        "pytorch": lambda: model(x),
    }
    times: dict[str, list[float]] = {k: [] for k in engines}
    with torch.inference_mode():
        for fn in engines.values():
            time_calls(fn, 3)
        per_round = max(1, args.repeat // args.rounds)
        for _ in range(args.rounds):
            for name, fn in engines.items():
                times[name] += time_calls(fn, per_round)
    untuned_stats = untuned.benchmark(repeat=args.untuned_repeat, warmup=1)
    load_after = os.getloadavg()

    results = {k: summarize(v) for k, v in times.items()}
    results["tvm_untuned"] = {"median_ms": untuned_stats["median_ms"],
                              "mean_ms": untuned_stats["mean_ms"],
                              "min_ms": untuned_stats["min_ms"], "runs": args.untuned_repeat}
    med = {k: v["median_ms"] for k, v in results.items()}
    ratios = {
        "untuned_over_tuned": med["tvm_untuned"] / med["tvm_tuned"],
        "tuned_over_onnxruntime": med["tvm_tuned"] / med["onnxruntime"],
        "tuned_over_pytorch": med["tvm_tuned"] / med["pytorch"],
    }
    report = {
        "model": "resnet18 (slimgraph.zoo.models, random weights), batch 1, 3x224x224, float32",
        "machine": {"cores": cores, "machine": platform.machine(), "python": sys.version.split()[0],
                    "load_avg_before": load_before, "load_avg_after": load_after},
        "target": spec.name, "tvm_target": spec.tvm_target,
        "trials_requested": args.trials, "trials_measured": info.trials_measured,
        "tuning_wall_s": info.tune_time_s, "tuned_build_total_s": tuned_total_s,
        "untuned_build_s": untuned_build_s, "stopped_by": info.get("stopped_by"),
        "tasks": info.get("tasks"), "untuned_tasks": info.get("untuned_tasks"),
        "database": info.get("database"),
        "latency": results, "ratios": ratios, "max_rel_error_vs_pytorch": errors,
        "task_table": info.get("task_table"),
        "caveat": "measured on a shared machine; other processes may have used the CPU",
    }
    out = args.json or args.workdir / "bench.json"
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"\nResNet-18, batch 1, {cores} cores (load avg {load_before[0]:.1f} -> "
          f"{load_after[0]:.1f}; shared machine, numbers are noisy)")
    print(f"{'engine':<14}{'median ms':>11}{'min ms':>9}{'vs tuned':>10}  rel.err")
    for name in ("tvm_untuned", "tvm_tuned", "onnxruntime", "pytorch"):
        r = results[name]
        err = errors.get(name)
        print(f"{name:<14}{r['median_ms']:>11.2f}{r['min_ms']:>9.2f}"
              f"{r['median_ms'] / med['tvm_tuned']:>9.2f}x  "
              f"{'' if err is None else f'{err:.1e}'}")
    print(f"tuning: {info['trials_measured']} trials measured of {args.trials} requested, "
          f"{info['tune_time_s']:.0f} s ({info.get('stopped_by')}); "
          f"tuned is {ratios['untuned_over_tuned']:.1f}x faster than untuned, "
          f"{ratios['tuned_over_onnxruntime']:.2f}x ORT's latency")
    print(f"[bench] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
