"""Every approximate pass at its default options on the trained digits CNN, no recovery step.

    .venv/bin/python tools/defaults_eval.py --json defaults_eval.json

Model: the trained demo ``DigitsCNN`` (``slimgraph.zoo.datasets.demo_model()``). For every pass in the
registry that is not exact (``Pass.exact`` false), except ``finetune`` (a recovery step, not a
compression), the pipeline ``fold-bn,<pass>`` (the pass with no options) runs through the
``PassManager`` with ``PassContext(calibration=<train split, no labels, batches of 64>,
reference=<original graph>)``. Reported per pass: whether it changed the graph, MACs and
parameters kept (the cost analysis, vs the original), test accuracy (360 held-out images) and
top-1 agreement with the original's predictions on them, and the pass's wall time. A pass whose
defaults are not runnable (a required option) is reported with its ``PassConfigError``.

The bar (tests/passes/test_defaults.py): every runnable approximate pass keeps >= 95% top-1
agreement at its defaults while still compressing (fewer MACs or parameters, or sparsity).
Prints a markdown table; ``--json`` writes all numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from slimgraph.errors import PassConfigError  # noqa: E402
from slimgraph.ir.analysis import AnalysisManager, Cost  # noqa: E402
from slimgraph.ir.graph import Graph  # noqa: E402
from slimgraph.passes import PassManager, available_passes, parse_pipeline  # noqa: E402
from slimgraph.passes.context import PassContext  # noqa: E402

NOT_COMPRESSION = ("finetune",)  # approximate, but a recovery step: nothing to keep at defaults
AGREEMENT_BAR = 0.95


def approximate_passes() -> list[str]:
    """Registry names of the passes that change a model's outputs and compress it."""
    return sorted(n for n, cls in available_passes().items() if not cls.exact and n not in NOT_COMPRESSION)


def setup(batch_size: int = 64) -> dict:
    """The original graph, the test split, the calibration batches and the original's logits."""
    from slimgraph.zoo.datasets import demo_model, load_digits_split

    model, example = demo_model()
    data = load_digits_split()
    graph = Graph.from_torch(model, example, name="digits_cnn")
    with torch.no_grad():
        ref_logits = graph.gm(data["x_test"])
    return {"graph": graph, "x_test": data["x_test"], "y_test": data["y_test"], "ref_logits": ref_logits,
            "calib": [(b,) for b in data["x_train"].split(batch_size)]}


def evaluate(name: str, ctx: dict) -> dict:
    """Run ``fold-bn,<name>`` at defaults; the row for the table."""
    graph = ctx["graph"]
    row: dict = {"pass": name}
    try:
        pipeline = parse_pipeline(f"fold-bn,{name}")
    except PassConfigError as err:
        return {**row, "error": f"no runnable defaults: {err}"}
    am = PassContext(ctx["calib"], reference=graph)
    t0 = time.perf_counter()
    out, records = PassManager(pipeline).run(graph, am)
    row["seconds"] = round(time.perf_counter() - t0, 2)
    rec = records[-1]
    before, after = am.analyses.get(Cost, graph), am.analyses.get(Cost, out)
    with torch.no_grad():
        logits = out.gm(ctx["x_test"])
    pred = logits.argmax(1)
    sparsity = rec.stats.get("sparsity", 0.0)
    row.update(
        changed=bool(rec.changed), options=pipeline[-1].spec(), sparsity=sparsity,
        compressed=(after.macs < before.macs or after.params < before.params or sparsity > 0
                    or after.weight_bytes < before.weight_bytes),
        macs=after.macs, macs_kept=round(after.macs / before.macs, 4),
        params=after.params, params_kept=round(after.params / before.params, 4),
        accuracy=round((pred == ctx["y_test"]).float().mean().item(), 4),
        agreement=round((pred == ctx["ref_logits"].argmax(1)).float().mean().item(), 4),
        stats={k: v for k, v in rec.stats.items() if k in ("ranks", "layers_factorized", "macs_saved",
                                                               "layers_pruned", "fit")},
        skipped=[f"{s.node}: {s.reason}" for s in rec.skipped])
    return row


def markdown(base: dict, rows: list[dict]) -> str:
    lines = ["| pass (defaults, after fold-bn) | changed | MACs kept | params kept | sparsity | test acc | "
             "agreement | time s |", "|---|---|---|---|---|---|---|---|",
             f"| original | - | {base['macs']:,} | {base['params']:,} | - | {base['accuracy']:.4f} | 1 | - |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['pass']} | {r['error']} | | | | | | |")
            continue
        flag = "" if r["agreement"] >= AGREEMENT_BAR else " **<0.95**"
        lines.append(f"| {r['pass']} | {'yes' if r['changed'] else 'no'} | {r['macs_kept']:.3f} "
                     f"| {r['params_kept']:.3f} | {r['sparsity']:g} | {r['accuracy']:.4f} "
                     f"| {r['agreement']:.4f}{flag} | {r['seconds']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--only", default="", help="comma-separated pass names to evaluate")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    ctx = setup()
    cost = AnalysisManager().get(Cost, ctx["graph"])
    base = {"macs": cost.macs, "params": cost.params, "test_images": len(ctx["y_test"]),
            "calibration_images": sum(len(b[0]) for b in ctx["calib"]),
            "accuracy": round((ctx["ref_logits"].argmax(1) == ctx["y_test"]).float().mean().item(), 4)}
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    rows = []
    for name in approximate_passes():
        if only and name not in only:
            continue
        rows.append(evaluate(name, ctx))
        r = rows[-1]
        print(f"[defaults_eval] {name}: " + (r["error"] if "error" in r else
              f"agreement {r['agreement']:.4f}, MACs kept {r['macs_kept']:.3f} ({r['seconds']} s)"),
              file=sys.stderr, flush=True)
    print(markdown(base, rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": "digits_cnn", "baseline": base, "rows": rows}, indent=2,
                                        default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
