#!/usr/bin/env python3
"""NHWC against NCHW convolutions on x86, at the same tuning budget, in one process.

The model is ResNet-18's four 3x3 conv stages (64->64 at 56x56, then stride-2 convs to 128, 256
and 512 channels) with ReLUs, random weights, batch 1. Each layout is tuned from a cold
database with the same trial budget, built, checked against PyTorch, and timed back to back
with PyTorch eager.

    .venv/bin/python tools/layout_eval.py --trials 160 --json out/bench/layout.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from slimgraph.backends.reference import time_callable, torch_latency
from slimgraph.backends.tvm import build


class ConvStages(torch.nn.Module):
    def __init__(self):
        super().__init__()
        conv = torch.nn.Conv2d
        self.convs = torch.nn.ModuleList([
            conv(64, 64, 3, padding=1), conv(64, 128, 3, stride=2, padding=1),
            conv(128, 256, 3, stride=2, padding=1), conv(256, 512, 3, stride=2, padding=1)])

    def forward(self, x):
        for c in self.convs:
            x = torch.relu(c(x))
        return x


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=160)
    ap.add_argument("--json", type=Path, default=Path("out/bench/layout.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    net, x = ConvStages().eval(), torch.randn(1, 64, 56, 56)
    with torch.no_grad():
        ref = net(x).numpy()
    rows = []
    for layout in ("NCHW", "NHWC"):
        with tempfile.TemporaryDirectory() as db:
            compiled = build(net, (x,), "x86", tune_trials=args.trials, database=db,
                             conv_layout=layout, progress=False)
        err = float(np.abs(compiled(x.numpy())[0] - ref).max())
        ms = time_callable(compiled.bind(x.numpy()), repeat=50, warmup=5)["median_ms"]
        rows.append({"layout": layout, "trials": compiled.info.trials_measured,
                     "tune_time_s": round(compiled.info.tune_time_s, 1),
                     "slimgraph_ms": round(ms, 3),
                     "pytorch_ms": round(torch_latency(net, (x,), repeat=50,
                                                       warmup=5)["median_ms"], 3),
                     "max_abs_err": err})
        print(json.dumps(rows[-1]), flush=True)
    nchw, nhwc = rows
    print(f"NCHW takes {nchw['slimgraph_ms'] / nhwc['slimgraph_ms']:.2f}x NHWC's time "
          f"({nhwc['slimgraph_ms']} vs {nchw['slimgraph_ms']} ms; PyTorch "
          f"{nhwc['pytorch_ms']} / {nchw['pytorch_ms']} ms)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
