#!/usr/bin/env python3
"""Run the onnx package's own backend test data through slimgraph's ONNX frontend.

Each case of ``onnx/backend/test/data/<suite>`` (shipped inside the installed onnx package) is
a ``model.onnx`` with ``test_data_set_*/input_*.pb`` and ``output_*.pb``; the ``light`` model
zoo keeps ``light_<name>.onnx`` and ``light_<name>_output_0.pb`` and is fed the input onnx's
own runner generates (``arange(n) / n`` in float32). Every case is imported with
:func:`slimgraph.ir.onnx_frontend.import_onnx` at the data's input shapes, run in eager
PyTorch, and compared with the expected outputs: same shape, same dtype, and
``|actual - expected| <= atol + rtol * |expected|`` with the tolerances of ``_TOLERANCE``
(``atol`` is scaled by the output's largest magnitude, so one rule covers logits and 1e6-sized
values). Integer and bool outputs must match exactly.

    .venv/bin/python tools/onnx_backend_eval.py --json out/onnx_backend_eval.json
    .venv/bin/python tools/onnx_backend_eval.py --suite pytorch-operator --case prelu -v

Deterministic: inputs come from the data files (or onnx's fixed ``arange`` input), torch runs
single-threaded with a fixed seed. Prints per suite ``passed / total`` and one line per
failure; ``--json`` writes the same as JSON.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from slimgraph.errors import SlimgraphError, UnsupportedOpError
from slimgraph.ir.onnx_frontend import import_onnx

DATA_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data"
DEFAULT_SUITES = ("pytorch-converted", "pytorch-operator", "light")

# (rtol, atol relative to the output's largest magnitude) per expected dtype
_TOLERANCE = {np.dtype(np.float64): (1e-7, 1e-9), np.dtype(np.float32): (1e-3, 1e-5),
              np.dtype(np.float16): (1e-2, 1e-3)}


@dataclass
class Case:
    suite: str
    name: str
    model: Path
    data_sets: list[tuple[list[np.ndarray], list[np.ndarray]]]


@dataclass
class Result:
    suite: str
    case: str
    passed: bool
    kind: str  # "pass", "unsupported", "mismatch", "error"
    reason: str = ""
    opset: int | None = None
    upgraded_from: int | None = None
    max_abs_err: float | None = None
    seconds: float = 0.0


@dataclass
class SuiteSummary:
    passed: int = 0
    total: int = 0
    failures: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------


def available_suites(data_dir: Path = DATA_DIR) -> list[str]:
    return sorted(p.name for p in data_dir.iterdir() if p.is_dir()) if data_dir.is_dir() else []


def _read_pb(path: str) -> np.ndarray:
    t = onnx.TensorProto()
    with open(path, "rb") as f:
        t.ParseFromString(f.read())
    return numpy_helper.to_array(t)


def _numbered(prefix: str) -> list[str]:
    """``<prefix>_0.pb``, ``<prefix>_1.pb``, ... (as many as there are)."""
    n = len(glob.glob(glob.escape(prefix) + "_*.pb"))
    return [f"{prefix}_{i}.pb" for i in range(n)]


def _dir_cases(suite: str, root: Path) -> Iterator[Case]:
    for case_dir in sorted(p for p in root.iterdir() if (p / "model.onnx").is_file()):
        sets = []
        for ds in sorted(glob.glob(str(case_dir / "test_data_set_*"))):
            sets.append(([_read_pb(p) for p in _numbered(os.path.join(ds, "input"))],
                         [_read_pb(p) for p in _numbered(os.path.join(ds, "output"))]))
        yield Case(suite, case_dir.name, case_dir / "model.onnx", sets)


def _light_input(vi: onnx.ValueInfoProto) -> np.ndarray:
    """The input onnx's backend runner feeds the light models (``generate_dummy_data``)."""
    shape = tuple(d.dim_value if d.HasField("dim_value") else 1
                  for d in vi.type.tensor_type.shape.dim)
    n = int(np.prod(shape))
    return (np.arange(n).reshape(shape) / n).astype(np.float32)


def _light_cases(root: Path) -> Iterator[Case]:
    for path in sorted(root.glob("light_*.onnx")):
        model = onnx.load(str(path), load_external_data=False)
        inits = {t.name for t in model.graph.initializer}
        inputs = [_light_input(vi) for vi in model.graph.input if vi.name not in inits]
        outputs = [_read_pb(p) for p in _numbered(f"{path.with_suffix('')}_output")]
        name = "test_" + path.stem.removeprefix("light_")
        yield Case("light", name, path, [(inputs, outputs)])


def discover(suite: str, data_dir: Path = DATA_DIR) -> list[Case]:
    root = data_dir / suite
    if not root.is_dir():
        return []
    return list(_light_cases(root) if suite == "light" else _dir_cases(suite, root))


# --------------------------------------------------------------------------------------------
# Running and comparing
# --------------------------------------------------------------------------------------------


def compare(actual: np.ndarray, expected: np.ndarray) -> tuple[str | None, float | None]:
    """(why they differ, or None; the max abs error of a float comparison)."""
    if actual.shape != expected.shape:
        return f"shape {actual.shape} != expected {expected.shape}", None
    if actual.dtype != expected.dtype:
        return f"dtype {actual.dtype} != expected {expected.dtype}", None
    if expected.dtype not in _TOLERANCE:
        if not np.array_equal(actual, expected):
            return f"{int((actual != expected).sum())} of {expected.size} values differ", None
        return None, 0.0
    rtol, atol_rel = _TOLERANCE[expected.dtype]
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    if not np.array_equal(np.isnan(a), np.isnan(e)):
        return "NaN where the expected output has none (or the reverse)", None
    inf = np.isinf(e)
    if not np.array_equal(a[inf], e[inf]):
        return "infinities differ", None
    finite = np.isfinite(e)
    a, e = a[finite], e[finite]
    scale = float(np.abs(e).max(initial=0.0))
    err = np.abs(a - e)
    max_err = float(err.max(initial=0.0))
    if np.isnan(max_err) or np.any(err > atol_rel * scale + rtol * np.abs(e)):
        worst = int(np.nanargmax(err / (atol_rel * scale + rtol * np.abs(e) + 1e-300)))
        return (f"mismatch: max abs err {max_err:.3g} (output scale {scale:.3g}; worst "
                f"{a[worst]:.6g} vs {e[worst]:.6g}; rtol {rtol:g})"), max_err
    return None, max_err


def _first_line(err: BaseException, model: Path) -> str:
    text = str(err).strip().splitlines()
    line = (text[0] if text else "").replace(str(model), model.name)
    return f"{type(err).__name__}: {line}"[:300]


def run_case(case: Case) -> Result:
    start = time.perf_counter()
    res = Result(case.suite, case.name, False, "error")
    try:
        _run(case, res)
    except UnsupportedOpError as err:
        listing = str(err).split(" unsupported op(s): ", 1)[-1]
        res.kind, res.reason = "unsupported", f"unsupported: {listing}"[:300]
    except SlimgraphError as err:
        res.reason = _first_line(err, case.model)
    except Exception as err:  # a crash is a failure of this case, not of the run
        res.reason = _first_line(err, case.model)
        frame = traceback.extract_tb(err.__traceback__)[-1]
        res.reason += f" [{os.path.basename(frame.filename)}:{frame.lineno}]"
    res.seconds = round(time.perf_counter() - start, 3)
    return res


def _run(case: Case, res: Result) -> None:
    first_inputs = case.data_sets[0][0] if case.data_sets else []
    model = onnx.load(str(case.model), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    names = [vi.name for vi in model.graph.input if vi.name not in inits]
    shapes = {n: tuple(x.shape) for n, x in zip(names, first_inputs, strict=False)
              if x.ndim and all(x.shape)}
    imp = import_onnx(str(case.model), input_shapes=shapes or None)
    res.opset, res.upgraded_from = imp.opset, imp.upgraded_from
    worst = 0.0
    for k, (inputs, expected) in enumerate(case.data_sets):
        tensors = [torch.from_numpy(np.array(x)) for x in inputs]  # a writable copy
        with torch.no_grad():
            out = imp.gm(*tensors)
        actual = [o.detach().numpy() for o in (out if isinstance(out, tuple) else (out,))]
        if len(actual) != len(expected):
            res.kind, res.reason = "mismatch", f"{len(actual)} outputs, {len(expected)} expected"
            return
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            why, err = compare(a, e)
            worst = max(worst, err or 0.0)
            if why:
                res.kind, res.reason = "mismatch", f"data set {k} output {i}: {why}"
                res.max_abs_err = err
                return
    res.passed, res.kind, res.max_abs_err = True, "pass", worst


def evaluate(suites: list[str], pattern: str = "", verbose: bool = False,
             data_dir: Path = DATA_DIR) -> tuple[dict[str, SuiteSummary], list[Result]]:
    torch.manual_seed(0)
    np.random.seed(0)
    summaries, results = {}, []
    for suite in suites:
        summary = summaries.setdefault(suite, SuiteSummary())
        for case in discover(suite, data_dir):
            if pattern and pattern not in case.name:
                continue
            res = run_case(case)
            results.append(res)
            summary.total += 1
            summary.passed += res.passed
            if not res.passed:
                summary.failures.append({"case": res.case, "kind": res.kind,
                                         "reason": res.reason})
            if verbose:
                status = "ok  " if res.passed else "FAIL"
                up = f" (opset {res.upgraded_from}->{res.opset})" if res.upgraded_from else ""
                print(f"  {status} {suite}/{res.case}{up} {res.seconds:.2f}s {res.reason}",
                      file=sys.stderr)
    return summaries, results


def _quiet_onnxruntime() -> None:
    """Constant folding runs onnxruntime sessions; their optimizer warnings are noise here."""
    try:
        import onnxruntime

        onnxruntime.set_default_logger_severity(3)
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", action="append", dest="suites",
                    help=f"suite under {DATA_DIR} (repeatable; default: "
                         f"{', '.join(DEFAULT_SUITES)}; present: "
                         f"{', '.join(available_suites())})")
    ap.add_argument("--case", default="", help="only cases whose name contains this")
    ap.add_argument("--json", type=Path, help="write the summary and every case result here")
    ap.add_argument("-v", "--verbose", action="store_true", help="one line per case")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    _quiet_onnxruntime()
    present = available_suites()
    suites = args.suites or [s for s in DEFAULT_SUITES if s in present]
    missing = [s for s in suites if s not in present]
    if missing:
        ap.error(f"no suite {missing} under {DATA_DIR}; present: {present}")
    summaries, results = evaluate(suites, args.case, args.verbose)
    for suite, s in summaries.items():
        print(f"{suite}: {s.passed} / {s.total} passed")
        for f in s.failures:
            print(f"  FAIL {f['case']}: {f['reason']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"onnx_version": onnx.__version__, "torch_version": torch.__version__,
                  "data_dir": str(DATA_DIR),
                  "suites": {k: asdict(v) for k, v in summaries.items()},
                  "cases": [asdict(r) for r in results]}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
