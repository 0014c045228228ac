"""Report: what a pipeline did, as JSON, a terminal summary, and one static HTML page.

A ``Report`` holds a ``schema.ReportData`` (typed records: the model, one ``PassRecord`` per
pass, totals, per-layer rows, the backend's ``BuildInfo``, the accuracy summary); the JSON is
written from the records and the page and summary are rendered from them. A report read back
from JSON (or built from a plain dict) is converted into the records first; every section but
``model``, ``passes`` and ``totals`` is optional, and a missing one is left out of the page and
the summary rather than failing.

JSON output is strict (no NaN/Infinity: non-finite floats become ``null``); numpy and torch
scalars, arrays, shapes and dtypes are converted. Both files are written atomically (a temp
file in the same directory, then ``os.replace``). The HTML page has no scripts and loads
nothing: inline CSS, charts as inline SVG drawn with matplotlib's object API (no pyplot, no
global backend switch), all text escaped.
"""

from __future__ import annotations

import datetime as _dt
import html
import io
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from slimgraph.outputs import default_mode
from slimgraph.schema import (
    Accuracy,
    BuildInfo,
    Fidelity,
    LayerRow,
    ModelInfo,
    PassRecord,
    ReportData,
    TensorInfo,
    Totals,
    jsonable,
)

__all__ = ["Report"]


class Report:
    """A pipeline report: ``data`` is its ``ReportData`` (a plain dict is converted)."""

    def __init__(self, data: ReportData | dict[str, Any]):
        if isinstance(data, dict):
            data = ReportData.from_dict(jsonable(data, "report"))
        if not isinstance(data, ReportData):
            raise TypeError(f"Report needs ReportData or a dict, got {type(data).__name__}")
        self.data = data

    # ---- JSON -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON form of the report (a deep, plain copy)."""
        return jsonable(self.data.to_dict(), "report")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def save_json(self, path: str | os.PathLike) -> Path:
        return _atomic_write(path, self.to_json())

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> Report:
        with open(path, encoding="utf-8") as f:
            return cls(json.load(f))

    # ---- HTML -------------------------------------------------------------------------------
    def to_html(self) -> str:
        """The report as one self-contained HTML page."""
        return _render_html(self.data)

    def save_html(self, path: str | os.PathLike) -> Path:
        return _atomic_write(path, self.to_html())

    # ---- terminal ---------------------------------------------------------------------------
    def summary(self) -> str:
        """A short plain-text table for the terminal."""
        return _render_summary(self.data)

    def __repr__(self) -> str:
        return f"Report(model={self.data.model.name!r}, pipeline={self.data.pipeline or ''!r})"


# =============================================================================================
# Assembly (what optimize() reports)
# =============================================================================================
def accuracy_section(baseline: dict | None, records: list[PassRecord]) -> Accuracy | None:
    """The first metric before the pipeline, after compression, and after recovery.

    "after" is the value after the last compression pass (before any ``finetune``); when a
    ``finetune`` pass ran, "after_recovery" is the final value.
    """
    if not baseline:
        return None
    name = next(iter(baseline))
    values = [(r.name, (r.metrics or {}).get(name)) for r in records]
    tuned = [i for i, (n, _) in enumerate(values) if n == "finetune"]
    cut = tuned[0] if tuned else len(values)
    after = next((v for _, v in reversed(values[:cut]) if v is not None), baseline[name])
    recovery = values[-1][1] if tuned else None
    return Accuracy(name, baseline[name], after, recovery)


def _layers_view(am, before, after) -> list[LayerRow]:
    from slimgraph.ir.analysis import Cost, Shapes

    cb, ca = am.get(Cost, before).nodes, am.get(Cost, after).nodes
    shapes_b, shapes_a = am.get(Shapes, before), am.get(Shapes, after)
    rows = []
    for name in list(cb) + [n for n in ca if n not in cb]:
        b, a = cb.get(name), ca.get(name)
        if not ((b and (b.macs or b.params)) or (a and (a.macs or a.params))):
            continue
        shape = (shapes_a.get(name) if a else None) or shapes_b.get(name)
        rows.append(LayerRow(name, (a or b).op, list(shape.shape) if hasattr(shape, "shape") else None,
                             b.macs if b else 0, a.macs if a else 0,
                             b.params if b else 0, a.params if a else 0))
    return rows


def assemble_report(original, optimized, records: list[PassRecord], ctx, target: str,
                    pipeline: str, backend: BuildInfo | None, *,
                    accuracy: Accuracy | None = None) -> Report:
    """The report of one ``optimize`` run: the model as imported, every pass record, totals,
    the per-layer view, the backend section and the accuracy summary."""
    from slimgraph import __version__
    from slimgraph.environment import describe
    from slimgraph.ir.analysis import Cost

    am = ctx.analyses
    cb, ca = am.get(Cost, original), am.get(Cost, optimized)
    model = ModelInfo(original.name, original.source,
                      [TensorInfo(s.name, list(s.shape), s.dtype) for s in original.input_specs()],
                      [TensorInfo(s.name, list(s.shape), s.dtype) for s in original.output_specs()],
                      cb.macs, cb.params, original.fixed_batch, list(original.notes))
    totals = Totals(cb.macs, ca.macs, cb.params, ca.params, cb.energy_pj, ca.energy_pj,
                    cb.weight_bytes, ca.weight_bytes)
    data = ReportData(
        model, list(records), totals, target=target, pipeline=pipeline,
        calibration=ctx.calibration_source, layers=_layers_view(am, original, optimized),
        backend=backend, accuracy=accuracy, slimgraph_version=__version__,
        environment=describe(ctx.seed), created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    data.warnings = result_warnings(data)
    return Report(data)


def result_warnings(data: ReportData) -> list[str]:
    """Where the result differs from what was asked: unmet targets, passes that changed
    nothing, kernels left on default schedules, unchecked device builds, accuracy lost."""
    out = []
    for p in data.passes:
        st = p.stats or {}
        if st.get("target_met") is False or any("not reached" in s.reason for s in p.skipped or []):
            kept = st.get("macs_after", 0) / max(st.get("macs_before", 1), 1)
            out.append(f"{p.spec or p.name}: the MAC target was not met (kept {kept:.0%} of the "
                       f"MACs; {len(p.skipped or [])} sites declined, see the pass's details)")
        elif not p.changed and p.name not in ("cleanup", "const-fold"):
            reason = (p.skipped or [None])[0]
            out.append(f"{p.spec or p.name} changed nothing" + (f": {reason.reason}" if reason else ""))
    out += _backend_warnings(data.backend)
    acc = data.accuracy
    if acc and acc.before is not None:
        final = acc.after_recovery if acc.after_recovery is not None else acc.after
        if final is not None and acc.before - final > 0.01:
            out.append(f"{acc.metric} fell from {acc.before:.1%} to {final:.1%}")
    return out


def _backend_warnings(be: BuildInfo | None) -> list[str]:
    if be is None:
        return []
    out = []
    untuned, tasks = len(be.untuned_tasks or []), be.tasks or 0
    if be.trials and untuned:
        out.append(f"{untuned} of {tasks} kernels kept TVM's default (slow) schedules: "
                   f"{be.trials} tuning trials for {tasks} kernels; raise --tune-trials")
    elif not be.tuned and not be.extra.get("int8_sketched"):
        out.append(f"untuned build for {be.target}: TVM's default schedules"
                   + (" (tune on the device with --rpc)" if be.latency_ms is None else ""))
    if be.numerics_vs_graph is None:
        out.append(f"the {be.target} artifact's numerics were not checked here"
                   + (" (--emulate checks an arm64 build under qemu)" if be.target.startswith("arm64") else ""))
    lat = be.latency_ms or {}
    noisy = {k: v for k, v in (be.extra.get("latency_spread") or {}).items() if v > 1.5}
    if noisy:
        out.append("noisy latency (p90/p10 above 1.5: " + ", ".join(
            f"{_LATENCY_NAMES.get(k, k)} {v:.1f}" for k, v in noisy.items())
            + "); the machine is busy, compare ratios from a quieter run")
    if lat.get("slimgraph") and lat.get("onnxruntime") and lat["slimgraph"] > lat["onnxruntime"]:
        out.append(f"slimgraph is {lat['slimgraph'] / lat['onnxruntime']:.1f}x slower than ONNX "
                   "Runtime on the original model here")
    return out


# =============================================================================================
# JSON conversion and atomic files
# =============================================================================================
def _atomic_write(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` via a temp file in the same directory and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# =============================================================================================
# Number formatting shared by the summary and the page
# =============================================================================================
_DASH = "—"


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _si(x: Any, unit: str = "", digits: int = 3) -> str:
    """6110000 -> '6.11 M'; None -> '—'."""
    v = _num(x)
    if v is None:
        return _DASH
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.{digits}g} {prefix}{unit}".rstrip()
    return f"{v:.{digits}g} {unit}".rstrip()


def _bytes(x: Any) -> str:
    v = _num(x)
    if v is None:
        return _DASH
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {unit}"
    return f"{v:.0f} B"


def _energy(pj: Any) -> str:
    v = _num(pj)
    if v is None:
        return _DASH
    for scale, unit in ((1e9, "mJ"), (1e6, "µJ"), (1e3, "nJ")):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {unit}"
    return f"{v:.3g} pJ"


def _ratio(before: Any, after: Any) -> float | None:
    b, a = _num(before), _num(after)
    if b is None or a is None or a <= 0 or b <= 0:
        return None
    return b / a


def _fold(before: Any, after: Any) -> str:
    r = _ratio(before, after)
    return _DASH if r is None else f"{r:.2f}x"


def _pct(x: Any, digits: int = 1) -> str:
    v = _num(x)
    return _DASH if v is None else f"{100 * v:.{digits}f}%"


def _sci(x: Any) -> str:
    v = _num(x)
    return _DASH if v is None else f"{v:.2e}"


def _cos(x: Any) -> str:
    v = _num(x)
    return _DASH if v is None else f"{v:.5f}"


def _ms(x: Any) -> str:
    v = _num(x)
    return _DASH if v is None else f"{v:.3g} ms"


def _secs(x: Any) -> str:
    v = _num(x)
    return _DASH if v is None else (f"{v:.2f} s" if v < 100 else f"{v:.0f} s")


def _options(opts: Any) -> str:
    """Pipeline syntax for options: ``{rank=vbmf, energy=0.9}``; empty -> ''."""
    if not opts:
        return ""
    if not isinstance(opts, dict):
        return str(opts)
    return "{" + ", ".join(f"{k}={v}" for k, v in opts.items()) + "}"


def _faster(speedup: float) -> str:
    """3.62 -> '3.62x faster'; 0.38 -> '2.63x slower'."""
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"


def _yes(x: Any) -> str:
    return _DASH if x is None else ("yes" if x else "no")


_LATENCY_NAMES = {"slimgraph": "slimgraph", "pytorch": "PyTorch", "onnxruntime": "ONNX Runtime",
                  "pytorch_compressed": "PyTorch (compressed model)",
                  "onnxruntime_compressed": "ONNX Runtime (compressed model)"}


def _latency(data: ReportData) -> dict[str, float]:
    lat = (data.backend.latency_ms if data.backend else None) or {}
    return {k: float(v) for k, v in lat.items() if _num(v) is not None}


def _speedups(data: ReportData) -> list[tuple[str, float, float]]:
    """(reference name, reference ms, speedup of slimgraph over it) for each reference."""
    lat = _latency(data)
    ours = lat.get("slimgraph")
    if not ours:
        return []
    return [(_LATENCY_NAMES.get(k, k), v, v / ours) for k, v in lat.items() if k != "slimgraph"]


# =============================================================================================
# Terminal summary
# =============================================================================================
def _render_summary(data: ReportData) -> str:
    model, totals = data.model or ModelInfo(), data.totals or Totals()
    lines = [
        f"slimgraph report: {model.name} ({model.source})"
        f"  target={data.target or _DASH}  pipeline={data.pipeline or _DASH!s}"
    ]
    lines += [f"warning: {w}" for w in data.warnings or []]
    header = ("pass", "changed", "MACs before -> after", "params before -> after",
              "rel-L2", "cosine", "top-1 agree", "skipped", "time")
    rows = [header] + [_summary_row(p) for p in data.passes or []]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    lines.append(
        f"totals: MACs {_si(totals.macs_before)} -> {_si(totals.macs_after)} ({_fold(totals.macs_before, totals.macs_after)})  params {_si(totals.params_before)} -> {_si(totals.params_after)} ({_fold(totals.params_before, totals.params_after)})  energy {_energy(totals.energy_pj_before)} -> {_energy(totals.energy_pj_after)}  weights {_bytes(totals.weight_bytes_before)} -> {_bytes(totals.weight_bytes_after)}"
    )
    acc = data.accuracy
    if acc:
        line = f"accuracy ({acc.metric}): {_pct(acc.before)} -> {_pct(acc.after)}"
        if acc.after_recovery is not None:
            line += f" (after recovery {_pct(acc.after_recovery)})"
        if acc.compiled is not None:
            line += f"; compiled artifact {_pct(acc.compiled)}"
        lines.append(line)
    lat = _latency(data)
    if lat:
        parts = [f"slimgraph {_ms(lat.get('slimgraph'))}"]
        parts += [f"{name} {_ms(ms)} (slimgraph {_faster(x)})" for name, ms, x in _speedups(data)]
        lines.append("latency: " + " | ".join(parts))
        if data.environment:
            lines.append(f"measured on: {_where(data.environment)}")
    return "\n".join(lines)


def _where(env: dict) -> str:
    """``AMD EPYC, 2 cores (avx2 fma avx512_vnni), load 1.2``: the CPU a figure came from."""
    text = f"{env.get('cpu', '?')}, {env.get('cores', '?')} cores"
    if env.get("kernel_features"):
        text += f" ({' '.join(env['kernel_features'])})"
    if env.get("load_average"):
        text += f", load {env['load_average'][0]}"
    return text


def _summary_row(p: PassRecord) -> tuple[str, ...]:
    st, nm = p.stats or {}, p.numerics or Fidelity()
    return (
        str(p.spec or (str(p.name) + _options(p.options))),
        _yes(p.changed),
        f"{_si(st.get('macs_before'))} -> {_si(st.get('macs_after'))}",
        f"{_si(st.get('params_before'))} -> {_si(st.get('params_after'))}",
        _sci(nm.rel_l2),
        _cos(nm.cosine),
        _pct(nm.top1_agreement),
        str(len(p.skipped or [])),
        _secs(p.wall_time_s),
    )


# =============================================================================================
# HTML page
# =============================================================================================
_E = html.escape
_BEFORE, _AFTER, _REF, _INK, _GRID = "#b6bfcc", "#2563eb", "#94a3b8", "#1f2937", "#e5e7eb"
_MAX_CHART_LAYERS = 60

_CSS = """
:root{--ink:#1f2937;--muted:#6b7280;--line:#e5e7eb;--accent:#2563eb;--good:#047857;--bad:#b91c1c;--bg:#f8fafc}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif}
main{max-width:1120px;margin:0 auto;padding:28px 24px 48px}
h1{font-size:24px;margin:0 0 4px}
h2{font-size:17px;margin:32px 0 10px;padding-bottom:4px;border-bottom:1px solid var(--line)}
.sub{color:var(--muted);margin:0 0 2px}
.sub code,td code{background:#eef2f7;padding:1px 5px;border-radius:4px;font-size:12.5px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(160px,1fr));gap:12px;margin-top:18px}
.card{background:#fff;border:1px solid var(--line);border-radius:10px;padding:12px 14px}
.card .k{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:22px;font-weight:650;margin:2px 0}
.card .u{font-size:13px;font-weight:500;color:var(--muted)}
.card .d{color:var(--muted);font-size:12.5px}
.good{color:var(--good)} .bad{color:var(--bad)}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid var(--line);border-radius:8px;font-size:13px}
th,td{padding:6px 9px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{background:#f1f5f9;font-weight:600;white-space:nowrap}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr:last-child td{border-bottom:none}
table.kv th{width:190px}
tr.sub td{background:#fbfcfe;padding-top:2px;font-size:12.5px}
.tag{display:inline-block;padding:0 7px;border-radius:9px;font-size:12px;font-weight:600}
.yes{background:#dbeafe;color:#1e40af} .no{background:#f1f5f9;color:var(--muted)}
.exact{background:#d1fae5;color:#065f46} .approx{background:#fef3c7;color:#92400e}
details summary{cursor:pointer;color:var(--accent)}
details ul{margin:6px 0 0;padding-left:18px} details li{margin:2px 0}
.scroll{overflow-x:auto}
.chart{background:#fff;border:1px solid var(--line);border-radius:8px;padding:8px;margin:8px 0}
.chart svg{width:100%;height:auto;display:block}
.note{color:var(--muted);font-size:12.5px;margin:6px 0}
pre{background:#0f172a;color:#e2e8f0;padding:12px;border-radius:8px;overflow:auto;font-size:12px;max-height:480px}
footer{margin-top:36px;color:var(--muted);font-size:12px}
.warn{background:#fef3c7;border:1px solid #f59e0b;border-radius:10px;padding:10px 14px;margin-top:16px;color:#78350f}
.warn ul{margin:4px 0 0;padding-left:18px}
"""


def _render_html(data: ReportData) -> str:
    title = f"slimgraph report: {(data.model or ModelInfo()).name}"
    sections = [
        _header(data),
        _warnings_box(data),
        _cards(data),
        _passes_section(data),
        _layers_section(data),
        _tradeoff_section(data),
        _sensitivity_section(data),
        _training_section(data),
        _latency_section(data),
        _kernels_section(data),
        _backend_section(data),
        _model_section(data),
        _environment_section(data),
        _raw_section(data),
    ]
    foot = ["slimgraph " + str(data.slimgraph_version or "")]
    foot += [f"created {data.created}"] if data.created else []
    footer = f"<footer>{_E(' · '.join(foot).strip())}</footer>"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
        f"<title>{_E(title)}</title><style>{_CSS}</style></head>\n<body><main>\n"
        + "\n".join(s for s in sections if s)
        + f"\n{footer}\n</main></body></html>\n"
    )


def _header(data: ReportData) -> str:
    model = data.model or ModelInfo()
    sub = [
        f"source <code>{_E(str(model.source))}</code>",
        f"target <code>{_E(str(data.target or _DASH))}</code>",
    ]
    return (
        f"<header><h1>{_E(str(model.name))}</h1>"
        f"<p class=\"sub\">{' · '.join(sub)}</p>"
        f"<p class=\"sub\">pipeline <code>{_E(str(data.pipeline or _DASH))}</code></p></header>"
    )


def _warnings_box(data: ReportData) -> str:
    if not data.warnings:
        return ""
    items = "".join(f"<li>{_E(w)}</li>" for w in data.warnings)
    return f"<section class=\"warn\"><b>Not what was asked</b><ul>{items}</ul></section>"


def _card(key: str, value: str, detail: str = "", cls: str = "", unit: str = "") -> str:
    c = f" class=\"{cls}\"" if cls else ""
    u = f" <span class=\"u\">{_E(unit)}</span>" if unit else ""
    return (
        f"<div class=\"card\"><div class=\"k\">{_E(key)}</div><div class=\"v\"{c}>{_E(value)}{u}</div>"
        f"<div class=\"d\">{_E(detail)}</div></div>"
    )


def _reduction_card(key: str, totals: Totals, field: str, fmt: Callable[[Any], str]) -> str:
    before, after = getattr(totals, f"{field}_before"), getattr(totals, f"{field}_after")
    if before is None and after is None:
        return ""
    r = _ratio(before, after)
    value = _DASH if r is None else f"{r:.2f}×"
    cls = "" if r is None else ("good" if r > 1.0001 else "bad" if r < 0.9999 else "")
    unit = "" if r is None else ("smaller" if r >= 1 else "larger")
    return _card(key, value, f"{fmt(before)} → {fmt(after)}", cls, unit)


def _cards(data: ReportData) -> str:
    totals = data.totals or Totals()
    cards = [
        _reduction_card("MACs", totals, "macs", _si),
        _reduction_card("Parameters", totals, "params", _si),
        _reduction_card("Weight bytes", totals, "weight_bytes", _bytes),
        _reduction_card("Energy (est.)", totals, "energy_pj", _energy),
    ]
    lat = _latency(data)
    if "slimgraph" in lat:
        refs = " · ".join(f"{_faster(x)} than {n}" for n, _ref_ms, x in _speedups(data)
                          if "compressed" not in n)  # the latency section has those rows
        cards.append(_card("Latency", _ms(lat["slimgraph"]), refs or "no reference timed"))
    acc = data.accuracy
    if acc and acc.after is not None:
        final = acc.after_recovery if acc.after_recovery is not None else acc.after
        detail = f"before {_pct(acc.before)}, after {_pct(acc.after)}"
        if acc.after_recovery is not None:
            detail += f", recovered {_pct(acc.after_recovery)}"
        if acc.compiled is not None:
            detail += f", compiled {_pct(acc.compiled)}"
        drop = (_num(acc.before) or 0) - (_num(final) or 0)
        cls = "bad" if drop > 0.01 else "good" if drop <= 0.002 else ""
        cards.append(_card(f"Accuracy ({acc.metric})", _pct(final), detail, cls))
    cards = [c for c in cards if c]
    return f"<section class=\"cards\">{''.join(cards)}</section>" if cards else ""


# ---- passes -----------------------------------------------------------------------------------
_PASS_HEAD = ("#", "pass", "changed", "exact", "MACs before → after", "params before → after",
              "rel-L2", "cosine", "top-1 agree", "time", "skipped")


def _passes_section(data: ReportData) -> str:
    passes = data.passes or []
    if not passes:
        return "<h2>Passes</h2><p class=\"note\">No passes ran.</p>"
    head = "".join(f"<th>{_E(h)}</th>" for h in _PASS_HEAD)
    rows = "".join(_pass_row(i, p) for i, p in enumerate(passes, 1))
    inputs = ("the user's calibration data" if data.calibration == "user"
              else "seeded random inputs (no calibration data was given)")
    note = (f"<p class=\"note\">Fidelity is measured against the original model on {inputs}: "
            "relative L2 error of the outputs, cosine similarity, and top-1 agreement (the share "
            "of samples whose top class matches the original model's; not test accuracy).</p>")
    return f"<h2>Passes</h2><div class=\"scroll\"><table><tr>{head}</tr>{rows}</table></div>{note}"


def _tag(text: str, cls: str) -> str:
    return f"<span class=\"tag {cls}\">{_E(text)}</span>"


def _pass_row(i: int, p: PassRecord) -> str:
    st, nm = p.stats or {}, p.numerics or Fidelity()
    changed = p.changed
    exact = p.exact
    cells = [
        f"<td class=\"n\">{i}</td>",
        f"<td><b>{_E(str(p.name))}</b>{_spec_options_html(p)}</td>",
        f"<td>{_tag(_yes(changed), 'yes' if changed else 'no')}</td>",
        f"<td>{_tag('exact' if exact else 'approx', 'exact' if exact else 'approx')}</td>"
        if exact is not None else f"<td>{_DASH}</td>",
        _before_after_cell(st.get("macs_before"), st.get("macs_after")),
        _before_after_cell(st.get("params_before"), st.get("params_after")),
        f"<td class=\"n\">{_sci(nm.rel_l2)}</td>",
        f"<td class=\"n\">{_cos(nm.cosine)}</td>",
        f"<td class=\"n\">{_pct(nm.top1_agreement)}</td>",
        f"<td class=\"n\">{_secs(p.wall_time_s)}</td>",
        f"<td class=\"n\">{len(p.skipped or [])}</td>",
    ]
    details = _pass_details(p)
    if details:
        details = f"<tr class=\"sub\"><td></td><td colspan=\"{len(_PASS_HEAD) - 1}\">{details}</td></tr>"
    return "<tr>" + "".join(cells) + "</tr>" + details


def _spec_options_html(p: PassRecord) -> str:
    """The options the user set (the spec's braces), not every default."""
    if p.spec and "{" in p.spec:
        return f"<br><code>{_E(p.spec[p.spec.index('{'):])}</code>"
    return "" if p.spec else _options_html(p.options)


def _options_html(opts: Any) -> str:
    return f"<br><code>{_E(_options(opts))}</code>" if opts else ""


def _before_after_cell(before: Any, after: Any) -> str:
    r = _ratio(before, after)
    extra = ""
    if r is not None and f"{r:.2f}" != "1.00":
        extra = f" <span class=\"{'good' if r > 1 else 'bad'}\">({r:.2f}x)</span>"
    return f"<td class=\"n\">{_si(before)} → {_si(after)}{extra}</td>"


def _pass_details(p: PassRecord) -> str:
    skipped = p.skipped or []
    layers = p.layers or []
    extras = {k: v for k, v in (p.stats or {}).items()
              if k not in ("macs_before", "macs_after", "params_before", "params_after")}
    if not (skipped or layers or extras):
        return ""
    parts = []
    if skipped:
        items = "".join(
            f"<li><code>{_E(str(s.node))}</code>: {_E(str(s.reason))}</li>"
            for s in skipped
        )
        parts.append(f"<div>skipped:</div><ul>{items}</ul>")
    if layers:
        items = "".join(
            f"<li><code>{_E(str(lay.name))}</code> ({_E(str(lay.op))}): "
            f"MACs {_si(lay.macs_before)} → {_si(lay.macs_after)}, "
            f"params {_si(lay.params_before)} → {_si(lay.params_after)}</li>"
            for lay in layers
        )
        parts.append(f"<div>layers changed:</div><ul>{items}</ul>")
    if extras:
        items = "".join(f"<li>{_E(str(k))}: {_E(_short(v))}</li>" for k, v in extras.items())
        parts.append(f"<div>stats:</div><ul>{items}</ul>")
    label = [f"{len(skipped)} skipped node{'s' * (len(skipped) != 1)}"] if skipped else []
    label += [f"{len(layers)} layer{'s' * (len(layers) != 1)} changed"] if layers else []
    label += ["pass statistics"] if extras else []
    summary = f"{p.name}: {', '.join(label)}"
    return f"<details><summary>{_E(summary)}</summary>{''.join(parts)}</details>"


def _short(v: Any, limit: int = 200) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    return s if len(s) <= limit else s[: limit - 1] + "…"


# ---- charts -----------------------------------------------------------------------------------
def _figure_svg(draw: Callable[[Any], None], width_in: float, height_in: float, salt: str) -> str:
    """Draw with matplotlib's object API and return an inline <svg> element."""
    import matplotlib
    from matplotlib.figure import Figure

    rc = {"svg.fonttype": "none", "svg.hashsalt": f"slimgraph-{salt}", "text.parse_math": False,
          "font.size": 9, "font.family": "sans-serif", "axes.edgecolor": _REF,
          "axes.labelcolor": _INK, "xtick.color": _INK, "ytick.color": _INK}
    with matplotlib.rc_context(rc):
        fig = Figure(figsize=(width_in, height_in), layout="constrained")
        draw(fig)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML declaration and DOCTYPE
    return re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)


def _clip(label: str, n: int = 42) -> str:
    return label if len(label) <= n else label[: n - 1] + "…"


def _style_axis(ax: Any, xlabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", color=_GRID, linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _barh_pair(ax: Any, names: list[str], before: list[float], after: list[float], xlabel: str,
               fmt: Callable[[Any], str]) -> None:
    y = list(range(len(names)))
    h = 0.38
    ax.barh([v - h / 2 for v in y], before, h, color=_BEFORE, label="before")
    ax.barh([v + h / 2 for v in y], after, h, color=_AFTER, label="after")
    ax.set_yticks(y, [_clip(n) for n in names])
    ax.invert_yaxis()
    ax.set_ylim(len(names) - 0.4, -0.6)
    _style_axis(ax, xlabel)
    ax.xaxis.set_major_formatter(lambda v, _pos: fmt(v).replace(" ", ""))


def _layers_section(data: ReportData) -> str:
    layers = list(data.layers or [])
    if not layers:
        return ""
    # layers without MACs (batch norm, activations) cost next to nothing: the table has them
    costly = [lay for lay in layers if _num(lay.macs_before) or _num(lay.macs_after)] or layers
    shown, note = costly, ""
    if len(costly) > _MAX_CHART_LAYERS:
        top = sorted(range(len(costly)), key=lambda i: -(_num(costly[i].macs_before) or 0))
        keep = set(top[:_MAX_CHART_LAYERS])
        shown = [lay for i, lay in enumerate(costly) if i in keep]
        note = (f"<p class=\"note\">The chart shows the {_MAX_CHART_LAYERS} of {len(layers)} "
                "layers with the most MACs; the table lists all.</p>")
    names = [str(lay.name) for lay in shown]

    def col(key: str) -> list[float]:
        return [_num(getattr(lay, key)) or 0.0 for lay in shown]

    def draw(fig: Any) -> None:
        ax1, ax2 = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [1, 1]})
        _barh_pair(ax1, names, col("macs_before"), col("macs_after"), "MACs", _si)
        _barh_pair(ax2, names, col("params_before"), col("params_after"), "parameters", _si)
        ax2.tick_params(axis="y", left=False)
        if len(shown) > 20:  # long charts: repeat the value axis on top
            for ax in (ax1, ax2):
                ax.tick_params(axis="x", top=True, labeltop=True)
        fig.legend(*ax1.get_legend_handles_labels(), loc="outside upper center", ncol=2,
                   frameon=False)

    svg = _figure_svg(draw, 11, 1.4 + (0.3 if len(shown) <= 20 else 0.24) * len(shown), "layers")
    return (f"<h2>Per-layer MACs and parameters</h2>{note}<div class=\"chart\">{svg}</div>"
            f"{_layers_table(layers, layer_settings(data.passes))}")


def layer_settings(passes: list[PassRecord]) -> dict[str, list[str]]:
    """What each pass chose per layer (original node names): low-rank ranks, pruned channels,
    weight sparsity, fixed-point bits."""
    out: dict[str, list[str]] = {}
    for p in passes or []:
        st, ex = p.stats or {}, p.extra or {}
        for node, rank in (st.get("ranks") or {}).items():
            out.setdefault(node, []).append(f"{p.name}: rank {rank}")
        for node, frac in (st.get("layer_sparsity") or {}).items():
            if _num(frac):
                out.setdefault(node, []).append(f"{p.name}: {_num(frac):.0%} zero")
        for node, bits in (st.get("bits_per_layer") or {}).items():
            out.setdefault(node, []).append(f"{p.name}: {bits}-bit")
        for node, lost in (ex.get("removed") or {}).items():
            parts = [f"-{len(lost[k])} {k}" for k in ("out", "in") if isinstance(lost, dict) and lost.get(k)]
            if parts:
                out.setdefault(node, []).append(f"{p.name}: {', '.join(parts)} channels")
    return out


def _layers_table(layers: list[LayerRow], settings: dict[str, list[str]] | None = None) -> str:
    settings = settings or {}
    head = "".join(f"<th>{h}</th>" for h in (
        "layer", "op", "output shape", "MACs before → after", "params before → after", "chosen"))
    rows = "".join(
        f"<tr><td><code>{_E(str(lay.name))}</code></td><td>{_E(str(lay.op))}</td>"
        f"<td>{_E(_shape(lay.output_shape))}</td>"
        f"{_before_after_cell(lay.macs_before, lay.macs_after)}"
        f"{_before_after_cell(lay.params_before, lay.params_after)}"
        f"<td>{_E('; '.join(settings.get(str(lay.name), [])))}</td></tr>"
        for lay in layers
    )
    return (f"<details><summary>Per-layer table ({len(layers)} layers)</summary>"
            f"<table><tr>{head}</tr>{rows}</table></details>")


def _shape(s: Any) -> str:
    if isinstance(s, (list, tuple)):
        return "×".join(str(d) for d in s)
    return "" if s is None else str(s)


def _sensitivity_section(data: ReportData) -> str:
    blocks = []
    for i, p in enumerate(data.passes or []):
        sens = p.sensitivity
        if sens is None or not isinstance(sens.curves, dict) or not sens.curves:
            continue
        axes = {"x": sens.x or "compression setting", "y": sens.y or "fidelity"}
        curves = {str(k): _points(v) for k, v in sens.curves.items()}
        curves = {k: v for k, v in curves.items() if v}
        if not curves:
            continue

        def draw(fig: Any, curves: dict = curves, axes: dict = axes) -> None:
            ax = fig.subplots()
            cmap = _colors(len(curves))
            for j, (name, pts) in enumerate(curves.items()):
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.4, color=cmap[j],
                        label=_clip(name, 32))
            _style_axis(ax, str(axes.get("x", "compression setting")))
            ax.grid(axis="y", color=_GRID, linewidth=0.8)
            ax.set_ylabel(str(axes.get("y", "fidelity")))
            ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
                      fontsize=8, ncol=1 if len(curves) <= 18 else 2)

        svg = _figure_svg(draw, 11, 3.6, f"sens{i}")
        blocks.append(f"<h3>{_E(str(p.name))}</h3><div class=\"chart\">{svg}</div>")
    if not blocks:
        return ""
    return "<h2>Layer sensitivity</h2>" + "".join(blocks)


def _tradeoff_points(data: ReportData) -> tuple[str, list[tuple[float, float, str]]]:
    """(y label, [(MACs, quality, pass)]): the original, then the model after each pass that
    changed it. Quality is the first user metric where every point has one, else top-1
    agreement with the original (else cosine similarity)."""
    changed = [p for p in data.passes or [] if p.changed and p.numerics is not None]
    if not changed:
        return "", []
    metric = next(iter(changed[0].metrics or {}), None)
    if metric and all(p.metrics and metric in p.metrics for p in changed) and data.accuracy:
        label = metric
        points = [((data.totals or Totals()).macs_before, _num(data.accuracy.before), "original")]
        points += [(p.stats.get("macs_after"), _num(p.metrics[metric]), p.name) for p in changed]
    else:
        key = "top1_agreement" if all(p.numerics.top1_agreement is not None for p in changed) else "cosine"
        label = {"top1_agreement": "top-1 agreement with the original", "cosine": "output cosine similarity"}[key]
        points = [((data.totals or Totals()).macs_before, 1.0, "original")]
        points += [(p.stats.get("macs_after"), _num(getattr(p.numerics, key)), p.name) for p in changed]
    return label, [(float(x), float(y), n) for x, y, n in points if _num(x) is not None and y is not None]


def _latency_points(data: ReportData, points: list) -> list[tuple[float, float, str]]:
    """(measured ms, quality, engine): the original model in PyTorch / ONNX Runtime at the
    original's quality, the compressed one in each engine at the pipeline's final quality."""
    lat = _latency(data)
    if not points or "slimgraph" not in lat:
        return []
    start, final = points[0][1], points[-1][1]
    return [(ms, final if (k == "slimgraph" or k.endswith("_compressed")) else start,
             _LATENCY_NAMES.get(k, k)) for k, ms in lat.items()]


def _tradeoff_section(data: ReportData) -> str:
    """Quality against MACs along the pipeline (only with two changed passes or more), and
    against measured latency per engine (when the run was timed)."""
    label, points = _tradeoff_points(data)
    by_latency = _latency_points(data, points)
    if len(points) < 3 and len(by_latency) < 2:
        return ""

    def draw(fig: Any) -> None:
        axes = fig.subplots(1, 2 if len(points) >= 3 and len(by_latency) >= 2 else 1, sharey=True,
                            squeeze=False)[0]
        plots = ([(points, "MACs (the pipeline runs right to left)", True)] if len(points) >= 3 else [])
        plots += [(by_latency, "measured latency (ms)", False)] if len(by_latency) >= 2 else []
        for ax, (pts, xlabel, line) in zip(axes, plots, strict=True):
            xs, ys, _ = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", color=_AFTER, linewidth=1.4 if line else 0)
            labels: dict[tuple[float, float], list[str]] = {}
            for x, y, name in pts:  # passes that left a point where it was share its label
                labels.setdefault((x, y), []).append(name)
            for j, ((x, y), group) in enumerate(sorted(labels.items())):
                dy = 6 if line else (6, -14, 18, -26)[j % 4]  # engines sit close: stagger
                ax.annotate(_clip(", ".join(group), 40), (x, y), textcoords="offset points",
                            xytext=(-4, dy), fontsize=8, ha="right" if x == max(xs) else "left")
            _style_axis(ax, xlabel)
            ax.grid(color=_GRID, linewidth=0.8)
        axes[0].set_ylabel(label)

    svg = _figure_svg(draw, 11, 3.4, "tradeoff")
    return (f"<h2>Trade-off</h2><div class=\"chart\">{svg}</div><p class=\"note\">{_E(label)} "
            "against MACs after each pass that changed the model, and against the latency measured "
            "for the original model (PyTorch, ONNX Runtime) and the compressed one (every engine).</p>")


def _training_section(data: ReportData) -> str:
    """Loss curves of the passes that trained (``stats.loss_per_epoch``)."""
    curves = {f"{i + 1}. {p.name}": [float(v) for v in p.stats["loss_per_epoch"]]
              for i, p in enumerate(data.passes or [])
              if isinstance((p.stats or {}).get("loss_per_epoch"), list) and len(p.stats["loss_per_epoch"]) >= 2}
    if not curves:
        return ""

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        cmap = _colors(len(curves))
        for j, (name, losses) in enumerate(curves.items()):
            ax.plot(range(1, len(losses) + 1), losses, marker="o", markersize=3, color=cmap[j], label=name)
        _style_axis(ax, "epoch")
        ax.set_ylabel("mean training loss")
        ax.grid(axis="y", color=_GRID, linewidth=0.8)
        ax.legend(frameon=False, fontsize=8)

    return f"<h2>Recovery training</h2><div class=\"chart\">{_figure_svg(draw, 11, 3.0, 'loss')}</div>"


def _points(v: Any) -> list[tuple[float, float]]:
    pts = []
    for item in v if isinstance(v, Iterable) and not isinstance(v, (str, dict)) else []:
        if isinstance(item, (list, tuple)) and len(item) >= 2:
            x, y = _num(item[0]), _num(item[1])
            if x is not None and y is not None:
                pts.append((x, y))
    return sorted(pts)


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "viridis"]
    if n <= 20:
        return [cmap(i) for i in range(n)]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def _latency_section(data: ReportData) -> str:
    lat = _latency(data)
    if not lat:
        return ""
    order = [k for k in ("slimgraph", "pytorch", "onnxruntime", "pytorch_compressed",
                         "onnxruntime_compressed") if k in lat]
    order += [k for k in lat if k not in order]
    names = [_LATENCY_NAMES.get(k, k) for k in order]
    values = [lat[k] for k in order]

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        colors = [_AFTER if k == "slimgraph" else _REF for k in order]
        bars = ax.barh(range(len(order)), values, 0.6, color=colors)
        ax.set_yticks(range(len(order)), names)
        ax.invert_yaxis()
        ax.bar_label(bars, [f"{v:.3g} ms" for v in values], padding=4, fontsize=9)
        ax.set_xlim(0, max(values) * 1.18)
        _style_axis(ax, "latency (ms, lower is better)")

    svg = _figure_svg(draw, 11, 0.8 + 0.42 * len(order), "latency")
    speed = "; ".join(f"{_faster(x)} than {n}" for n, _ms_, x in _speedups(data))
    note = (f"<p class=\"note\">slimgraph (the compressed model, compiled) is {_E(speed)}. "
            "PyTorch and ONNX Runtime run the original model; their \"compressed model\" rows run "
            "the compressed one, so compression's share and the compiler's share can be told "
            "apart.</p>") if speed else ""
    return f"<h2>Latency</h2><div class=\"chart\">{svg}</div>{note}"


# ---- backend, model, raw ------------------------------------------------------------------------
def _cuda_kernels_text(meta) -> str:
    if not isinstance(meta, dict):
        return str(meta)
    if meta.get("binary"):
        return (f"{meta.get('kernels')} kernels compiled to an {meta.get('arch')} cubin by "
                f"{meta.get('compiler')} at build ({meta.get('bytes', 0) / 1024:.0f} KiB, "
                f"{meta['binary']}); loading needs no CUDA compiler")
    return f"{meta.get('kernels')} kernels as CUDA source: {meta.get('note', '')}"


_BACKEND_ROWS = (("target", "target", str), ("TVM target", "tvm_target", str),
                 ("conv layout", "conv_layout", str),
                 ("build time", "build_time_s", _secs), ("tuning time", "tune_time_s", _secs),
                 ("tuned", "tuned", _yes), ("trials", "trials", str),
                 ("trials measured", "trials_measured", str), ("schedules", "schedules", str),
                 ("CUDA kernels", "cuda_kernels", _cuda_kernels_text),
                 ("compiled vs optimized graph", "numerics_vs_graph",
                  lambda n: f"max abs {_sci(n.max_abs)}, rel-L2 {_sci(n.rel_l2)}"
                            if isinstance(n, Fidelity) else str(n)),
                 ("run by", "numerics_how", str), ("note", "note", str))


def _kv_table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{_E(k)}</th><td>{_E(v)}</td></tr>" for k, v in rows)
    return f"<table class=\"kv\">{body}</table>"


def _backend_section(data: ReportData) -> str:
    be = data.backend
    if be is None:
        return ""
    rows = [(label, fmt(getattr(be, key))) for label, key, fmt in _BACKEND_ROWS
            if getattr(be, key) not in (None, "")]
    return "<h2>Backend</h2>" + _kv_table(rows) if rows else ""


KERNEL_ROWS = 25


def _kernels_section(data: ReportData) -> str:
    """The tuned kernels, costliest first: calls x best time is each one's share of a run."""
    table = [t for t in (data.backend.task_table if data.backend else []) if isinstance(t, dict)]
    if not table:
        return ""

    def total(t: dict) -> float:
        return (t.get("best_us") or 0.0) * (t.get("calls") or 1)

    rows_ = sorted(table, key=total, reverse=True)
    whole = sum(total(t) for t in rows_) or 1.0
    head = "".join(f"<th>{h}</th>" for h in ("kernel", "calls", "MFLOP", "trials (this run / database)", "best (µs)",
                                             "calls x best", "share", "GFLOP/s"))
    body = []
    for t in rows_[:KERNEL_ROWS]:
        best = t.get("best_us")
        gflops = (t.get("mflops") or 0) / best if best else None
        cells = [_clip(str(t.get("task", "?")), 48), str(t.get("calls", "")), f"{t.get('mflops', 0):.3g}",
                 f"{t.get('trials', 0)} / {t.get('in_database', t.get('trials', 0))}",
                 f"{best:.1f}" if best else "default schedule",
                 f"{total(t):.1f}" if best else _DASH, _pct(total(t) / whole) if best else _DASH,
                 f"{gflops:.3g}" if gflops else _DASH]
        body.append("<tr>" + "".join(f"<td>{_E(c)}</td>" for c in cells) + "</tr>")
    more = len(rows_) - KERNEL_ROWS
    note = (f"<p class=\"note\">{more} more kernels in the raw JSON (backend.task_table).</p>"
            if more > 0 else "")
    return (f"<h2>Kernels</h2><div class=\"scroll\"><table><tr>{head}</tr>{''.join(body)}"
            f"</table></div>{note}")


def _environment_section(data: ReportData) -> str:
    env = data.environment
    if not env:
        return ""
    versions = env.get("versions") or {}
    rows = [("CPU", f"{env.get('cpu', '?')} ({env.get('machine', '?')}), {env.get('cores', '?')} cores"),
            ("kernel features", " ".join(env.get("kernel_features") or []) or _DASH),
            ("OS", str(env.get("os", _DASH))),
            ("versions", ", ".join(f"{k} {v}" for k, v in versions.items())),
            ("seed", str(env.get("seed"))),
            ("load average (1, 5, 15 min)", ", ".join(map(str, env.get("load_average") or [])) or _DASH)]
    return "<h2>Environment</h2>" + _kv_table(rows)


def _model_section(data: ReportData) -> str:
    model = data.model or ModelInfo()
    rows = [("name", str(model.name)), ("source", str(model.source)),
            ("MACs", _si(model.macs)), ("parameters", _si(model.params))]
    for kind in ("inputs", "outputs"):
        for io_ in getattr(model, kind) or []:
            rows.append((kind[:-1], f"{io_.name}: {_shape(io_.shape)} {io_.dtype}".rstrip()))
    if model.fixed_batch:
        rows.append(("batch", f"fixed at {model.fixed_batch}"))
    rows += [("import", note) for note in model.notes or []]
    return "<h2>Model</h2>" + _kv_table(rows)


def _raw_section(data: ReportData) -> str:
    text = json.dumps(jsonable(data.to_dict(), "report"), indent=2, allow_nan=False)
    return f"<details><summary>Raw report JSON</summary><pre>{_E(text)}</pre></details>"
