"""Accuracy vs sparsity of the prune-weights methods, with and without recovery training.

    .venv/bin/python tools/prune_eval.py --out prune_eval.json
    .venv/bin/python tools/prune_eval.py --out quick.json --models digits --sparsities 0.7

Models:
- ``digits``: the trained demo ``DigitsCNN`` (``slimgraph.zoo.datasets.demo_model()``); metric: top-1
  accuracy on the digits test split (360 images). Calibration / training data: the first
  ``--calib`` train images, no labels (recovery distils from the original model's outputs).
- ``resnet18``: ``resnet18(width=16, num_classes=10)`` with seeded random weights on 3x32x32
  inputs; metric: top-1 agreement with the original on 512 seeded random inputs. Calibration:
  seeded random inputs. Random weights: no accuracy claim, only fidelity to the original.

Pipeline per cell: ``fold-bn,prune-weights{...}`` (batch norm folded first, as deployed).
"one-shot" = ``iterations=1, retrain_steps=0``; "recovered" = ``iterations=--iterations`` with
``--retrain-steps`` Adam steps after each pruning step (DNS trains by definition: its one-shot
cell is empty). Prints a markdown table and writes all numbers as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from slimgraph.ir.graph import Graph  # noqa: E402
from slimgraph.passes import PassManager, parse_pipeline  # noqa: E402
from slimgraph.passes.context import PassContext  # noqa: E402


def digits_setup(n_calib: int, batch: int):
    from slimgraph.zoo.datasets import calibration_set, demo_model, load_digits_split

    model, example = demo_model()
    data = load_digits_split()
    calib = [(x,) for x in calibration_set(n_calib).split(batch)]
    x, y = data["x_test"], data["y_test"]

    graph = Graph.from_torch(model, example, name="digits_cnn")
    with torch.no_grad():
        ref = graph.gm(x)

    def metric(gm) -> dict:
        with torch.no_grad():
            out = gm(x)
        return {"metric": round((out.argmax(1) == y).float().mean().item(), 4), "rel_l2": _rel_l2(out, ref)}

    return graph, calib, metric, "test accuracy"


def resnet_setup(n_calib: int, batch: int):
    from slimgraph.zoo.models import resnet18

    gen = torch.Generator().manual_seed(0)
    graph = Graph.from_torch(resnet18(num_classes=10, width=16), (torch.randn(1, 3, 32, 32, generator=gen),),
                             name="resnet18_w16")
    calib = [(torch.randn(batch, 3, 32, 32, generator=gen),) for _ in range(max(1, n_calib // batch))]
    x_eval = torch.randn(512, 3, 32, 32, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        ref = graph.gm(x_eval)

    def metric(gm) -> dict:
        with torch.no_grad():
            out = gm(x_eval)
        agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
        return {"metric": round(agree, 4), "rel_l2": _rel_l2(out, ref)}

    majority = torch.bincount(ref.argmax(1)).max().item() / len(ref)
    return graph, calib, metric, (f"top-1 agreement with the original on random inputs (a constant "
                                  f"predictor scores {majority:.4f}: read rel-L2)")


def _rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    return round(((out - ref).norm() / ref.norm()).item(), 5)


SETUPS = {"digits": digits_setup, "resnet18": resnet_setup}


def run_cell(graph, calib, metric, spec: str) -> dict:
    am = PassContext(calib, reference=graph)
    t0 = time.perf_counter()
    out, records = PassManager(parse_pipeline(spec)).run(graph, am)
    stats = records[-1].stats
    return {"spec": spec, **metric(out.gm), "sparsity": stats.get("sparsity"),
            "sparse_weight_bytes": stats.get("sparse_weight_bytes"),
            "dense_weight_bytes": stats.get("dense_weight_bytes"),
            "skipped": [s.to_dict() for s in records[-1].skipped], "wall_s": round(time.perf_counter() - t0, 2)}


def evaluate(args) -> dict:
    results = {"args": vars(args), "models": {}}
    for name in args.models:
        graph, calib, metric, metric_name = SETUPS[name](args.calib, args.batch)
        rows = []
        base = run_cell(graph, calib, metric, "fold-bn")["metric"]
        for method in args.methods:
            for s in args.sparsities:
                common = f"method={method},sparsity={s},scope={args.scope},lr={args.lr}"
                row = {"method": method, "sparsity": s}
                if method != "dns":
                    row["one_shot"] = run_cell(graph, calib, metric, f"fold-bn,prune-weights{{{common}}}")
                row["recovered"] = run_cell(
                    graph, calib, metric, f"fold-bn,prune-weights{{{common},iterations="
                    f"{args.iterations},retrain_steps={args.retrain_steps}}}")
                rows.append(row)
                print(f"[{name}] {method} s={s}: one-shot {_cell(row.get('one_shot'))} "
                      f"recovered {_cell(row['recovered'])}", file=sys.stderr, flush=True)
        results["models"][name] = {"metric": metric_name, "dense": base, "rows": rows}
    return results


def _cell(c: dict | None) -> str:
    return "-" if not c else f"{c['metric']:.4f} ({c['rel_l2']:.3f})"


def markdown(results: dict) -> str:
    args = results["args"]
    lines = []
    for name, res in results["models"].items():
        sps = sorted({r["sparsity"] for r in res["rows"]})
        lines += [f"### {name}: {res['metric']} (dense, BN folded: {res['dense']:.4f})", "",
                  f"scope={args['scope']}; recovered = iterations={args['iterations']}, "
                  f"retrain_steps={args['retrain_steps']} per iteration, lr={args['lr']}; "
                  "cells: metric (rel-L2 of the logits vs the original)", "",
                  "| method | " + " | ".join(f"s={s} one-shot | s={s} recovered" for s in sps) + " |",
                  "|---|" + "---|---|" * len(sps)]
        by = {(r["method"], r["sparsity"]): r for r in res["rows"]}
        for method in dict.fromkeys(r["method"] for r in res["rows"]):
            cells = []
            for s in sps:
                r = by.get((method, s), {})
                cells += [_cell(r.get("one_shot")), _cell(r.get("recovered"))]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="JSON output path")
    p.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    p.add_argument("--methods", nargs="+", default=["magnitude", "obd", "obs", "dns"])
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7, 0.9])
    p.add_argument("--scope", default="global", choices=["layer", "global"])
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--retrain-steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--calib", type=int, default=512, help="calibration samples")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    return run_and_write(p.parse_args(argv), evaluate, markdown)


def run_and_write(args, evaluate, markdown) -> int:
    """Seeded run of ``evaluate(args)``; the markdown table printed and stored with the numbers
    as JSON in ``args.out`` (shared with tools/prune_channels_eval.py)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    results = evaluate(args)
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    results["markdown"] = markdown(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(results["markdown"])
    print(f"total {results['wall_s']} s; JSON written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
