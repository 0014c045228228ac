#!/usr/bin/env bash
# Re-creates every measured number in the README, one job after the other (they time things:
# never run two at once). Hours on a 2-core machine (the 1,000-graph fuzz run alone takes about
# three; the rest about 90 minutes). Results go to out/bench/.
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
# 6. quantization: digits accuracy per configuration, ResNet-18 int8 vs fp32 vs ONNX Runtime,
#    one int8 conv and linear per engine
$PY tools/quant_eval.py digits --json out/bench/quant_digits.json --compiled-trials 64
$PY tools/quant_eval.py resnet --trials 400 --batches 1 8 --workdir out/quant_work \
    --json out/bench/quant_resnet.json
$PY tools/int8_kernel_eval.py --trials 128
# 7. real models: the onnx package's backend test data, default options, the fuzzer's long run
$PY tools/onnx_backend_eval.py
$PY tools/defaults_eval.py
$PY tools/fuzz.py --graphs 1000 --seed 20000 --compile-every 25 --json out/bench/fuzz.json
