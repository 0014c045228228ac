"""`make demo`: compress and compile the repo's trained digits CNN for this machine.

Loads the DigitsCNN trained in the repo on scikit-learn's bundled digits (no downloads), runs
the demo pipeline with the training images as calibration data, tunes the result for the host
x86 CPU with MetaSchedule, measures test accuracy before/after (PyTorch reference and the
compiled TVM artifact) and latency against PyTorch and ONNX Runtime, then writes
``OUT/report.json``, ``OUT/report.html`` and the compiled artifact, and prints a summary.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

import slimgraph
from slimgraph.cli import setup_logging
from slimgraph.passes import available_passes
from slimgraph.zoo.datasets import demo_model, evaluate_accuracy, load_digits_split

# Exact clean-up first, then compression, then distillation from the original model to recover.
FULL_PIPELINE = ",".join([
    "cleanup",                      # dropout is the identity at inference
    "fold-bn",                      # batch norm into the convs (exact)
    # 3x3 convs -> 1x1, core, 1x1 (Kim et al. 2016); Tucker ranks chosen greedily from measured
    # per-layer sensitivity so the whole network keeps 25% of its MACs
    "tucker2{target_macs=0.25}",
    "fc-svd{rank=0.9}",             # the big FC layer as two thin ones (90% of the energy)
    "finetune{epochs=8}",           # knowledge distillation from the original on unlabeled data
])
BASE_PIPELINE = "cleanup,fold-bn"


def default_pipeline() -> str:
    have = set(available_passes())
    needed = {"tucker2", "fc-svd", "finetune"}
    return FULL_PIPELINE if needed <= have else BASE_PIPELINE


def compiled_accuracy(compiled, x: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of a compiled artifact (specialized to batch 1) over a whole split."""
    preds = [int(np.argmax(compiled(x[i:i + 1])[0])) for i in range(len(x))]
    return float(np.mean(np.asarray(preds) == y.numpy()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out")
    ap.add_argument("--pipeline", default=None)
    ap.add_argument("--tune-trials", type=int, default=128)
    ap.add_argument("--workdir", default=".slimgraph-cache", help="tuning database (reused)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    setup_logging("INFO")  # the phase lines the CLI prints (import, each pass, tuning, build)

    model, example = demo_model()
    data = load_digits_split()
    pipeline = args.pipeline or default_pipeline()
    acc_before = evaluate_accuracy(model, data["x_test"], data["y_test"])
    print(f"demo: DigitsCNN (trained in-repo on sklearn digits), test accuracy {acc_before:.2%}")
    print(f"demo: pipeline {pipeline}; tuning {args.tune_trials} trials for x86")

    t0 = time.perf_counter()
    def test_accuracy(graph) -> float:
        return evaluate_accuracy(graph.gm, data["x_test"], data["y_test"])

    result = slimgraph.optimize(model, "x86", pipeline=pipeline, example_inputs=example,
                                calibration=data["x_train"], tune_trials=args.tune_trials,
                                workdir=args.workdir, metrics={"test top-1": test_accuracy})
    acc_graph = test_accuracy(result.graph)
    acc_compiled = compiled_accuracy(result.compiled, data["x_test"], data["y_test"])
    if result.report.data.accuracy is not None:
        result.report.data.accuracy.compiled = acc_compiled
    out = result.save(args.out)
    print(result.report.summary())
    print(f"demo: accuracy {acc_before:.2%} -> {acc_graph:.2%} (optimized graph), "
          f"{acc_compiled:.2%} (compiled TVM artifact)")
    print(f"demo: wrote {out / 'report.json'} and {out / 'report.html'} "
          f"in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
