"""Channel pruning: accuracy vs ratio per criterion, with and without recovery, MACs and tuned
x86 latency before/after from one run.

    .venv/bin/python tools/prune_channels_eval.py --out out/bench/prune_channels.json

Models and metrics are those of tools/prune_eval.py: the trained digits CNN (test accuracy) and
a width-16 ResNet-18 with seeded random weights on 3x32x32 (top-1 agreement with the original;
no accuracy claim). Pipeline per cell: ``cleanup,prune-channels{criterion=C,ratio=R},fold-bn``
(batch norm is kept until after pruning so that the ``bn_scale`` criterion can read it);
"recovered" appends ``finetune{mode=distill}`` (distillation from the unpruned model on the
unlabeled calibration inputs). The ``target_macs`` row lets the pass choose per-group ratios
from measured sensitivity. ``--latency`` compiles the unpruned and the ratio-0.5 L1 graph with
MetaSchedule (``--tune-trials`` each, one tuning database) and times both at batch 1 in this
process. Prints a markdown table; ``--out`` gets all numbers as JSON.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prune_eval import SETUPS, run_and_write  # noqa: E402

from slimgraph.ir.analysis import Cost  # noqa: E402
from slimgraph.passes import PassManager, parse_pipeline  # noqa: E402
from slimgraph.passes.context import PassContext  # noqa: E402

CRITERIA = ["l1", "bn_scale", "taylor", "reconstruction"]


def run(graph, calib, metric, spec: str) -> tuple[dict, object]:
    am = PassContext(calib, reference=graph)
    t0 = time.perf_counter()
    out, records = PassManager(parse_pipeline(spec)).run(graph, am)
    prune = next(r for r in records if r.name == "prune-channels")
    cost = am.analyses.get(Cost, out)
    return {"spec": spec, **metric(out.gm), "macs": cost.macs, "params": cost.params,
            "skipped": len(prune.skipped), "wall_s": round(time.perf_counter() - t0, 2)}, out


def latency(graph, workdir: Path, trials: int) -> float:
    from slimgraph.backends.tvm import build

    compiled = build(graph.to_torch(), graph.example_inputs, "x86", tune_trials=trials,
                     workdir=workdir, progress=False)
    return compiled.benchmark(repeat=30, warmup=5)["median_ms"]


def evaluate(args) -> dict:
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "models": {}}
    for name in args.models:
        graph, calib, metric, metric_name = SETUPS[name](args.calib, args.batch)
        dense, dense_graph = _dense(graph, calib, metric)
        rows = []
        configs = [(c, f"ratio={r}") for c in CRITERIA for r in args.ratios]
        configs.append(("l1", f"target_macs={args.target_macs}"))
        for criterion, amount in configs:
            base = f"cleanup,prune-channels{{criterion={criterion},{amount}}},fold-bn"
            one, _ = run(graph, calib, metric, base)
            rec, _ = run(graph, calib, metric,
                         f"{base},finetune{{mode=distill,epochs={args.epochs}}}")
            rows.append({"criterion": criterion, "amount": amount, "one_shot": one,
                         "recovered": rec})
            print(f"[{name}] {criterion} {amount}: MACs {one['macs'] / dense['macs']:.2f}x, "
                  f"{one['metric']:.4f} -> {rec['metric']:.4f}", file=sys.stderr, flush=True)
        entry = {"metric": metric_name, "dense": dense, "rows": rows}
        if args.latency:
            _, pruned = run(graph, calib, metric, "cleanup,prune-channels{ratio=0.5},fold-bn")
            with tempfile.TemporaryDirectory() as tmp:
                entry["latency_ms"] = {"dense": latency(dense_graph, Path(tmp), args.tune_trials),
                                       "l1_ratio_0.5": latency(pruned, Path(tmp),
                                                               args.tune_trials)}
        results["models"][name] = entry
    return results


def _dense(graph, calib, metric):
    am = PassContext(calib, reference=graph)
    out, _ = PassManager(parse_pipeline("cleanup,fold-bn")).run(graph, am)
    cost = am.analyses.get(Cost, out)
    return {**metric(out.gm), "macs": cost.macs, "params": cost.params}, out


def markdown(results: dict) -> str:
    lines = []
    for name, res in results["models"].items():
        d = res["dense"]
        lines += [f"### {name}: {res['metric']} (unpruned: {d['metric']:.4f}, "
                  f"{d['macs'] / 1e6:.2f} M MACs)", "",
                  "cells: metric (rel-L2 of the logits vs the unpruned model)", "",
                  "| criterion | amount | MACs kept | params kept | one-shot | recovered |",
                  "|---|---|---|---|---|---|"]
        for r in res["rows"]:
            o, c = r["one_shot"], r["recovered"]
            lines.append(f"| {r['criterion']} | {r['amount']} | {o['macs'] / d['macs']:.2f}x | "
                         f"{o['params'] / d['params']:.2f}x | {o['metric']:.4f} "
                         f"({o['rel_l2']:.3f}) | {c['metric']:.4f} ({c['rel_l2']:.3f}) |")
        if "latency_ms" in res:
            lat = res["latency_ms"]
            lines.append(f"\ntuned x86 latency (batch 1): unpruned {lat['dense']:.3f} ms, "
                         f"l1 ratio 0.5 {lat['l1_ratio_0.5']:.3f} ms "
                         f"({lat['dense'] / lat['l1_ratio_0.5']:.2f}x faster)")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    p.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5])
    p.add_argument("--target-macs", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--latency", action="store_true")
    p.add_argument("--tune-trials", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    return run_and_write(p.parse_args(argv), evaluate, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
