"""Low-rank passes on the trained digits CNN: cost, accuracy after factorization and after recovery.

    .venv/bin/python tools/lowrank_eval.py --out lowrank_eval.json
    .venv/bin/python tools/lowrank_eval.py --out lowrank_eval.json --latency --tune-trials 256

Model: the trained demo ``DigitsCNN`` (``slimgraph.zoo.datasets.demo_model()``, 6.1 M MACs). For each
low-rank pass in the registry (fc-svd, spatial-svd, channel-lowrank, tucker2, cp, flatten-conv)
one or more pipelines ``fold-bn,<pass>{...}`` run through the ``PassManager`` with
``PassContext(calibration=<train split, no labels>, reference=<original graph>)``; recovery is
a second ``PassManager`` run of ``finetune{mode=distill,...}`` (Hinton et al. distillation from
the original model on the train split, labels unused). Reported per row: MACs and parameters
before/after (the cost analysis), test accuracy (360 test images) of the original, after
factorization and after recovery, and top-1 agreement with the original on the test split.

``--latency`` also compiles the original and every recovered graph with TVM for x86
(MetaSchedule, ``--tune-trials`` each, one shared tuning database per run) and reports the
median latency at batch 1 (20 runs after 3 warm-ups), measured in this one process.
Prints a markdown table; ``--out`` writes all numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from slimgraph.ir.analysis import AnalysisManager, Cost  # noqa: E402
from slimgraph.ir.graph import Graph  # noqa: E402
from slimgraph.passes import PassManager, available_passes, parse_pipeline  # noqa: E402
from slimgraph.passes.context import PassContext  # noqa: E402

# One row per pipeline; a pass missing from the registry is reported as missing.
PIPELINES = [
    ("fc-svd", "fc-svd{rank=0.9}"),
    ("spatial-svd", "spatial-svd{rank=macs=0.5}"),
    ("channel-lowrank", "channel-lowrank{rank=macs=0.5}"),
    ("channel-lowrank", "channel-lowrank{rank=macs=0.5,nonlinear=true,asymmetric=true}"),
    ("channel-lowrank", "channel-lowrank{target_macs=0.5,asymmetric=true}"),
    ("channel-lowrank", "channel-lowrank{rank=macs=0.25}"),
    ("channel-lowrank", "channel-lowrank{rank=macs=0.25,nonlinear=true,asymmetric=true}"),
    ("tucker2", "tucker2{rank=vbmf}"),
    ("tucker2", "tucker2{target_macs=0.25}"),
    ("cp", "cp{rank=macs=0.5}"),
    ("flatten-conv", "flatten-conv{rank=macs=0.5}"),
]
FINETUNE = "finetune{{mode=distill,epochs={epochs},lr={lr},temperature=4,batch_size=64,seed=0}}"


def load_digits():
    from slimgraph.zoo.datasets import demo_model, load_digits_split

    model, example = demo_model()
    data = load_digits_split()
    graph = Graph.from_torch(model, example, name="digits_cnn")
    return graph, data


def test_metrics(graph: Graph, reference: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Test accuracy, and top-1 agreement and logits rel-L2 against the original's logits."""
    with torch.no_grad():
        logits = graph.gm(x)
    pred = logits.argmax(1)
    return {"accuracy": round((pred == y).float().mean().item(), 4),
            "top1_agreement": round((pred == reference.argmax(1)).float().mean().item(), 4),
            "logits_rel_l2": round(((logits - reference).norm() / reference.norm()).item(), 4)}


def latency_ms(graph: Graph, trials: int, workdir: Path) -> float | None:
    from slimgraph.backends.tvm import build

    compiled = build(graph.to_torch(), graph.example_inputs, "x86", tune_trials=trials,
                     workdir=workdir, progress=False)
    return round(compiled.benchmark()["median_ms"], 4)


def run_row(graph: Graph, calib, spec: str, args, data, ref_logits) -> dict:
    x, y = data["x_test"], data["y_test"]
    am = PassContext(calib, reference=graph)
    t0 = time.perf_counter()
    factored, records = PassManager(parse_pipeline(f"fold-bn,{spec}")).run(graph, am)
    t_fact = time.perf_counter() - t0
    rec = records[-1]
    row = {"spec": spec, "changed": rec.changed,
           "macs_before": am.analyses.get(Cost, graph).macs, "macs_after": am.analyses.get(Cost, factored).macs,
           "params_before": am.analyses.get(Cost, graph).params, "params_after": am.analyses.get(Cost, factored).params,
           "ranks": rec.stats.get("ranks"), "skipped": [s.to_dict() for s in rec.skipped],
           "factorized": test_metrics(factored, ref_logits, x, y), "factorize_s": round(t_fact, 2)}
    if "fit" in rec.stats:
        row["fit"] = rec.stats["fit"]
    t0 = time.perf_counter()
    ft = FINETUNE.format(epochs=args.epochs, lr=args.lr)
    recovered, ft_records = PassManager(parse_pipeline(ft)).run(factored, am)
    row["recovery"] = {"spec": ft, **{k: ft_records[0].stats.get(k) for k in (
        "mode", "epochs", "samples", "loss_first", "loss_last")}}
    row["recovered"] = test_metrics(recovered, ref_logits, x, y)
    row["recover_s"] = round(time.perf_counter() - t0, 2)
    row["_graph"] = recovered
    return row


def markdown(base: dict, rows: list[dict], latency: bool) -> str:
    head = ("| pipeline (after fold-bn) | MACs | params | factorized: acc / agree / rel-L2 | "
            "recovered: acc / agree / rel-L2 |" + (" latency ms |" if latency else ""))
    lines = [head, "|" + "---|" * (5 + latency)]
    lines.append(f"| original | {base['macs']:,} | {base['params']:,} | {base['accuracy']:.4f} / 1 / 0 "
                 f"| - |" + (f" {base.get('latency_ms')} |" if latency else ""))
    for r in rows:
        if "missing" in r:
            lines.append(f"| {r['spec']} | pass not in the registry |" + " |" * (3 + latency))
            continue
        f, c = r["factorized"], r["recovered"]
        lines.append(
            f"| `{r['spec']}` | {r['macs_after']:,} ({r['macs_after'] / r['macs_before']:.2f}x) "
            f"| {r['params_after']:,} ({r['params_after'] / r['params_before']:.2f}x) "
            f"| {_cell(f)} | {_cell(c)} |" + (f" {r.get('latency_ms')} |" if latency else ""))
    return "\n".join(lines)


def _cell(m: dict) -> str:
    return f"{m['accuracy']:.4f} / {m['top1_agreement']:.4f} / {m['logits_rel_l2']:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--only", default="", help="comma-separated pass names to evaluate")
    parser.add_argument("--epochs", type=int, default=5, help="finetune epochs (distillation)")
    parser.add_argument("--lr", type=float, default=1e-3, help="finetune learning rate")
    parser.add_argument("--calib", type=int, default=0, help="train images used (0: all)")
    parser.add_argument("--latency", action="store_true", help="also compile with TVM and time")
    parser.add_argument("--tune-trials", type=int, default=256, help="MetaSchedule trials per model")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    graph, data = load_digits()
    x_train = data["x_train"][: args.calib] if args.calib else data["x_train"]
    calib = [(b,) for b in x_train.split(64)]
    with torch.no_grad():
        ref_logits = graph.gm(data["x_test"])
    cost = AnalysisManager().get(Cost, graph)
    base = {"macs": cost.macs, "params": cost.params,
            "accuracy": round((ref_logits.argmax(1) == data["y_test"]).float().mean().item(), 4),
            "test_images": len(data["y_test"]), "train_images_used": len(x_train)}
    registry = available_passes()
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    rows = []
    for pass_name, spec in PIPELINES:
        if only and pass_name not in only:
            continue
        if pass_name not in registry:
            rows.append({"spec": spec, "missing": True})
            continue
        row = run_row(graph, calib, spec, args, data, ref_logits)
        rows.append(row)
        print(f"[lowrank_eval] {spec}: factorized acc {row['factorized']['accuracy']:.4f}, "
              f"recovered {row['recovered']['accuracy']:.4f} "
              f"({row['factorize_s']} s + {row['recover_s']} s)", file=sys.stderr, flush=True)

    if args.latency:
        with tempfile.TemporaryDirectory(prefix="lowrank_eval_tvm_") as tmp:
            base["latency_ms"] = latency_ms(graph, args.tune_trials, Path(tmp))
            for row in rows:
                if "_graph" in row:
                    row["latency_ms"] = latency_ms(row["_graph"], args.tune_trials, Path(tmp))
        base["latency_method"] = (f"TVM x86, MetaSchedule {args.tune_trials} trials per model, "
                                  "median of 20 runs after 3 warm-ups, batch 1, one process")
    for row in rows:
        row.pop("_graph", None)

    print(markdown(base, rows, args.latency))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": "digits_cnn", "baseline": base, "rows": rows,
                                        "finetune": FINETUNE.format(epochs=args.epochs, lr=args.lr)},
                                       indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
