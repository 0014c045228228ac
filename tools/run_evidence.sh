#!/usr/bin/env bash
# Re-creates every measured number in the README, one job after the other (they time things:
# never run two at once). About 70 minutes on a 2-core machine. Results go to out/bench/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
mkdir -p out/bench
# 0. the CLI's own comparison (make bench): PyTorch, ONNX Runtime, tuned and untuned slimgraph
rm -rf out/bench_cli
make bench
# 1. ResNet-18: untuned vs tuned TVM vs ONNX Runtime vs PyTorch (cold tuning database)
$PY tools/bench_tvm_tuning.py --trials 800 --time-budget 900 --workdir out/bench_tvm --fresh \
    --json out/bench/resnet18_tuning.json --no-progress
# 2. every target, both models (reuses the ResNet-18 tuning database from 1)
$PY tools/targets_eval.py --workdir out/bench_tvm --json out/bench/targets.json
# 3. low-rank passes on the trained digits CNN, with tuned latency
$PY tools/lowrank_eval.py --out out/bench/lowrank.json --latency --tune-trials 128
# 4. weight pruning and channel pruning
$PY tools/prune_eval.py --out out/bench/prune_weights.json --retrain-steps 40
$PY tools/prune_channels_eval.py --out out/bench/prune_channels.json --latency
# 5. NHWC against NCHW convolutions at the same tuning budget
$PY tools/layout_eval.py --trials 160 --json out/bench/layout.json
