"""`make demo` runs tools/demo.py: a short run of it (no tuning, exact passes) must work."""

import json

from tools.demo import main


def test_demo_script_runs_and_writes_the_report(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "out"), "--pipeline", "cleanup,fold-bn", "--tune-trials", "0",
                 "--workdir", str(tmp_path / "work")]) == 0
    printed = capsys.readouterr().out
    assert "demo: accuracy 100.00% -> 100.00% (optimized graph), 100.00% (compiled TVM artifact)" in printed
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["accuracy"]["compiled"] == 1.0
    assert "compiled artifact 100.0%" in printed
