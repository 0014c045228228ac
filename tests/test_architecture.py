"""The code's shape: no import cycle between slimgraph's modules, no function over 60 lines."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_FUNCTION_LINES = 60


def test_no_import_cycle():
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "check_imports.py")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "no import cycle" in run.stdout


def test_the_checker_finds_a_cycle(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import check_imports
    finally:
        sys.path.remove(str(ROOT / "tools"))
    pkg = tmp_path / "slimgraph"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from slimgraph import b\n")
    (pkg / "b.py").write_text("from slimgraph.a import f\n")
    monkeypatch.setattr(check_imports, "ROOT", tmp_path)
    assert check_imports.cycles(check_imports.import_graph()) == [["slimgraph.a", "slimgraph.b"]]


def test_no_function_over_60_lines():
    long = []
    for path in sorted((ROOT / "slimgraph").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "\n".join(long)
