"""Per-target evidence table: does each target build, how are its numerics verified, how fast.

For the repo's trained digits CNN and the ResNet-18-style model (batch 1), on every target:

  x86         built (tuned from the database in ``--workdir`` if it has one, else tuned now with
              ``--tune-trials``), run in this process, compared with PyTorch, timed against
              PyTorch and ONNX Runtime back to back in one process.
  arm64       cross-compiled (untuned: no arm64 device here), run by the C++ runner under
              qemu-aarch64, compared with PyTorch. Emulated times are not device times and are
              reported only as such.
  cuda:sm_90  built for the GPU (TVM's default GPU schedules), its kernels compiled to an sm_90
              cubin by NVRTC; this machine has no GPU, so the artifact is run, when a GPU is
              present, by tools/cuda_check.py.

    .venv/bin/python tools/targets_eval.py --workdir out/bench_tvm --json out/bench/targets.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from slimgraph.backends.reference import OrtModel, torch_latency
from slimgraph.backends.tvm import build, device, get_target, nvrtc, tuning_dir
from slimgraph.errors import SlimgraphError
from slimgraph.ir.graph import Graph
from slimgraph.zoo.datasets import demo_model
from slimgraph.zoo.models import resnet18_factory


def rel(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-12))


def x86_row(name, model, x, ref, workdir: Path, trials: int) -> dict:
    spec = get_target("x86")
    db = tuning_dir(spec, workdir)
    have_db = (db / "database_tuning_record.json").is_file()
    t0 = time.perf_counter()
    compiled = build(model, (x,), spec, tune_trials=trials, workdir=workdir, progress=False)
    build_s = time.perf_counter() - t0
    out = compiled(x)[0]
    lat = {"slimgraph": compiled.benchmark(repeat=30, warmup=5)["median_ms"],
           "pytorch": torch_latency(model, (x,), repeat=30, warmup=5)["median_ms"]}
    with tempfile.TemporaryDirectory() as tmp:
        graph = Graph.from_torch(model, (x,))
        ort = OrtModel.from_graph(graph, tmp)
        lat["onnxruntime"] = ort.latency([x.numpy()], repeat=30, warmup=5)["median_ms"]
    return {"model": name, "target": "x86", "builds": True,
            "numerics": f"run here, max rel. error vs PyTorch {rel(out, ref):.1e}",
            "rel_err": rel(out, ref), "latency_ms": lat,
            "schedules": compiled.info.schedules,
            "db_reused": have_db, "build_s": round(build_s, 1)}


def arm64_row(name, model, x, ref, tmp: Path) -> dict:
    row = {"model": name, "target": "arm64", "builds": False}
    try:
        compiled = build(model, (x,), "arm64", tune_trials=0, progress=False)
        art = compiled.save(tmp / f"{name}-arm64")
        row["builds"] = True
        outputs, lat = device.run_with_runner(art, [x], repeat=1, warmup=0, timeout_s=1800)
    except SlimgraphError as err:
        row["numerics"] = f"not verified: {err}"
        return row
    err = rel(outputs[0], ref)
    row.update(numerics=f"C++ runner under qemu-aarch64, max rel. error vs PyTorch {err:.1e}",
               rel_err=err, emulated_ms=lat["median_ms"], schedules="TVM default (untuned)")
    return row


def cuda_row(name, model, x, tmp: Path) -> dict:
    row = {"model": name, "target": "cuda:sm_90", "builds": False}
    try:
        compiled = build(model, (x,), "cuda:sm_90", tune_trials=0, progress=False)
        art = compiled.save(tmp / f"{name}-cuda")
    except SlimgraphError as err:
        row["numerics"] = f"build failed: {err}"
        return row
    kernels = nvrtc.kernel_count(device.cuda_source(art / "model.so"))
    meta = compiled.info.cuda_kernels or {}
    compiled_how = (f"compiled to an {meta['arch']} cubin by {meta['compiler']} "
                    f"({meta['bytes'] / 1024:.0f} KiB)" if meta.get("binary")
                    else "not compiled here (no NVRTC)")
    row.update(builds=True, kernels=kernels, cubin_bytes=meta.get("bytes"),
               numerics=(f"{kernels} CUDA kernels, {compiled_how}; not run (no GPU here: "
                         "tools/cuda_check.py runs it on one)"))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path(".slimgraph-cache"))
    ap.add_argument("--tune-trials", type=int, default=256)
    ap.add_argument("--json", type=Path, default=Path("out/bench/targets.json"))
    ap.add_argument("--skip", default="", help="comma-separated targets to skip")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    skip = set(filter(None, args.skip.split(",")))

    digits, (dx,) = demo_model()
    rn, (rx,) = resnet18_factory()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, x in (("digits-cnn", digits, dx), ("resnet18", rn, rx)):
            model = model.eval()
            with torch.no_grad():
                ref = model(x).numpy()
            if "x86" not in skip:
                rows.append(x86_row(name, model, x, ref, args.workdir, args.tune_trials))
                print(json.dumps(rows[-1]), flush=True)
            if "arm64" not in skip:
                rows.append(arm64_row(name, model, x, ref, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
            if "cuda" not in skip:
                rows.append(cuda_row(name, model, x, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1))
    print(f"\n{'model':<11} {'target':<11} {'builds':<6} numerics / latency")
    for r in rows:
        lat = r.get("latency_ms")
        extra = ""
        if lat:
            extra = (f"; slimgraph {lat['slimgraph']:.3f} ms, PyTorch {lat['pytorch']:.3f} ms, "
                     f"ORT {lat['onnxruntime']:.3f} ms")
        if r.get("emulated_ms"):
            extra = f"; {r['emulated_ms']:.0f} ms emulated"
        print(f"{r['model']:<11} {r['target']:<11} {'yes' if r['builds'] else 'no':<6} "
              f"{r.get('numerics')}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
