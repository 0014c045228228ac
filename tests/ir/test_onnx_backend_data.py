"""The onnx package's own backend test data, end to end through the ONNX frontend.

Every case of ``pytorch-converted`` and ``pytorch-operator`` (shipped inside the installed onnx
package; most are opset 6, so this also exercises the upgrade) is imported, run and compared
with its expected outputs by ``tools/onnx_backend_eval.py``, the same code as the CLI report.
Both suites together take a few seconds. A regression shows up as an unknown failure or a
lower pass count; a newly passing case as a stale entry of ``KNOWN_FAILURES``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

_TOOL = Path(__file__).resolve().parents[2] / "tools" / "onnx_backend_eval.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("onnx_backend_eval", _TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


backend_eval = _load_tool()

SUITES = ("pytorch-converted", "pytorch-operator")

# onnx 1.23 ships 82 and 35 cases; all of them pass.
MIN_PASSED = {"pytorch-converted": 82, "pytorch-operator": 35}

# "suite/case" -> why it fails. Empty: every case passes. A case that starts to fail must be
# fixed or listed here with its reason; a listed case that passes must be removed.
KNOWN_FAILURES: dict[str, str] = {}


@pytest.fixture(scope="module")
def evaluated():
    if not all(backend_eval.discover(suite) for suite in SUITES):
        pytest.skip(f"the installed onnx ships no backend test data under {backend_eval.DATA_DIR}")
    return backend_eval.evaluate(list(SUITES))


@pytest.mark.parametrize("suite", SUITES)
def test_pass_count(evaluated, suite):
    summary = evaluated[0][suite]
    failures = "\n".join(f"{f['case']}: {f['reason']}" for f in summary.failures)
    assert summary.passed >= MIN_PASSED[suite], f"{summary.passed}/{summary.total}\n{failures}"


def test_every_failure_is_known(evaluated):
    failed = {f"{r.suite}/{r.case}": r.reason for r in evaluated[1] if not r.passed}
    unknown = {case: why for case, why in failed.items() if case not in KNOWN_FAILURES}
    assert not unknown, f"new failures: {unknown}"
    passing = sorted(set(KNOWN_FAILURES) - set(failed))
    assert not passing, f"now pass; remove from KNOWN_FAILURES and raise MIN_PASSED: {passing}"


def test_old_opsets_are_upgraded_to_9(evaluated):
    results = [r for r in evaluated[1] if r.opset is not None]
    upgraded = [r for r in results if r.upgraded_from is not None]
    assert len(upgraded) > len(results) // 2  # most of these files are opset 6
    assert all(r.upgraded_from < 7 and r.opset == 9 for r in upgraded)
    assert all(r.opset >= 7 for r in results)


# --------------------------------------------------------------------------------------------
# The comparison rule of the tool
# --------------------------------------------------------------------------------------------


def test_compare_accepts_same_nans_and_infinities():
    e = np.array([1.0, np.nan, np.inf, -np.inf], dtype=np.float32)
    assert backend_eval.compare(e.copy(), e)[0] is None
    assert "NaN" in backend_eval.compare(np.array([1, 0, np.inf, -np.inf], np.float32), e)[0]
    assert "infinities" in backend_eval.compare(np.array([1, np.nan, 1, -np.inf], np.float32),
                                                e)[0]


def test_compare_checks_shape_dtype_and_exact_integers():
    e = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert "shape" in backend_eval.compare(e.reshape(3, 2), e)[0]
    assert "dtype" in backend_eval.compare(e.astype(np.float64), e)[0]
    i = np.arange(6)
    assert "1 of 6 values differ" in backend_eval.compare(i + (i == 2), i)[0]


def test_compare_is_tighter_for_float64():
    e = np.linspace(-1e6, 1e6, 11)
    a = e * (1 + 1e-6)  # fine in float32, far too loose for float64
    assert backend_eval.compare(a.astype(np.float32), e.astype(np.float32))[0] is None
    why, err = backend_eval.compare(a, e)
    assert why.startswith("mismatch") and err == pytest.approx(1.0)
