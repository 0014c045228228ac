import json
import subprocess
import sys

import pytest
import torch

from slimgraph.cli import main
from slimgraph.ir import Graph
from slimgraph.zoo.models import DigitsCNN

FACTORY = "slimgraph/zoo/datasets.py:digits_factory"


def test_inspect_prints_per_layer_table(capsys):
    assert main(["inspect", FACTORY]) == 0
    out = capsys.readouterr().out
    assert "features_0" in out and "Conv2d" in out and "1x32x16x16" in out
    assert "total" in out


def test_inspect_json(capsys):
    assert main(["inspect", FACTORY, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    conv = next(r for r in rows if r["name"] == "features_0")
    assert conv["macs"] == 32 * 16 * 16 * 9 and conv["params"] == 32 * 9


def test_inspect_onnx_with_input_shape(tmp_path, capsys):
    g = Graph.from_torch(DigitsCNN(), (torch.randn(1, 1, 16, 16),))
    path = g.to_onnx(tmp_path / "d.onnx")
    assert main(["inspect", str(path), "--input-shape", f"{g.input_names[0]}=2,1,16,16"]) == 0
    assert "2x32x16x16" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["inspect", "nothere.onnx"], "model file not found"),
    (["inspect", "slimgraph/zoo/models.py:nope"], "no callable 'nope'"),
    (["optimize", FACTORY, "--pipeline", "fold-bn,bogus", "-o", "x"], "unknown pass 'bogus'"),
    (["optimize", FACTORY, "--target", "z80", "-o", "x"], "z80"),
    (["inspect", FACTORY, "--input-shape", "x=1,,a"], "NAME=D0"),
])
def test_user_errors_are_one_line(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slimgraph: error:") and match in err and "Traceback" not in err


def test_corrupt_onnx_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01not a model")
    assert main(["inspect", str(bad)]) == 2
    assert "bad.onnx" in capsys.readouterr().err
    assert bad.read_bytes() == b"\x00\x01not a model"


def test_passes_and_targets_list(capsys):
    assert main(["passes"]) == 0
    assert "fold-bn" in capsys.readouterr().out
    assert main(["targets"]) == 0
    assert "x86" in capsys.readouterr().out


def test_optimize_writes_artifact_and_reports(tmp_path):
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "slimgraph.cli", "optimize", FACTORY,
                           "--pipeline", "cleanup,fold-bn", "--tune-trials", "0", "--no-bench",
                           "--quiet", "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""  # --quiet: nothing but errors
    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["cleanup", "fold-bn"]
    assert (out / "report.html").read_text().count("fold-bn") >= 1
    assert (out / "manifest.json").exists()


def test_bench_times_pytorch_onnxruntime_and_slimgraph_in_one_run(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", FACTORY, "--tune-trials", "0", "--repeat", "3", "--kernels", "3",
                 "--json", str(out)]) == 0
    table = capsys.readouterr().out
    for engine in ("pytorch", "onnxruntime", "slimgraph"):
        assert engine in table
    assert "slimgraph's 3 slowest kernels" in table
    data = json.loads(out.read_text())
    assert len(data["kernels"]) == 3 and data["kernels"][0]["ms"] >= data["kernels"][2]["ms"]
    assert all(data["latency_ms"][k] > 0 for k in ("pytorch", "onnxruntime", "slimgraph"))
    assert set(data["ratios"]) == {"pytorch/slimgraph", "onnxruntime/slimgraph"}
    assert data["numerics"]["rel_l2"] < 1e-5


def test_bench_on_a_target_that_is_not_this_machine_is_a_clear_error(capsys):
    assert main(["bench", FACTORY, "--target", "cuda:sm_90", "--tune-trials", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimgraph: error:") and "cuda" in err.lower()


@pytest.mark.slow
def test_optimize_quantize_builds_integer_kernels_that_keep_test_accuracy(tmp_path):
    """The quantization issue's bar: fold-bn,quantize from the CLI gives an x86 artifact whose
    assembly holds the host's integer dot product and whose test accuracy is within a point."""
    import shutil

    import numpy as np

    import slimgraph
    from slimgraph.backends.tvm import get_target
    from slimgraph.backends.tvm.intrinsics import int8_capability
    from slimgraph.zoo.datasets import calibration_set, demo_model, load_digits_split

    np.save(tmp_path / "calib.npy", calibration_set(256).numpy())
    rc = main(["optimize", "slimgraph/zoo/datasets.py:digits_factory", "--target", "x86",
               "--pipeline", "fold-bn,quantize", "--calibration", str(tmp_path / "calib.npy"),
               "--tune-trials", "32", "--workdir", str(tmp_path / "work"), "-o", str(tmp_path / "out"),
               "--quiet"])
    assert rc == 0
    split = load_digits_split()
    xt, yt = split["x_test"].numpy(), split["y_test"].numpy()
    compiled = slimgraph.load(tmp_path / "out")
    pred = np.concatenate([compiled(xt[i:i + 1])[0] for i in range(len(xt))]).argmax(1)
    model, _ = demo_model()
    fp32 = (model(torch.from_numpy(xt)).argmax(1).numpy() == yt).mean()
    assert (pred == yt).mean() >= fp32 - 0.01
    cap = int8_capability(get_target("x86"))
    objdump = shutil.which("objdump")
    if cap.intrinsic is not None and objdump:
        asm = subprocess.run([objdump, "-d", str(tmp_path / "out" / "model.so")],
                             capture_output=True, text=True, check=True).stdout
        assert ("vpdpbusd" if "VNNI" in cap.description else "vpmaddubsw") in asm


def test_phase_lines_and_warnings_at_the_terminal(tmp_path):
    """One line per phase on stderr; a result that differs from the request is said in the
    summary (the fc-svd MAC target cannot be met: it factors only the linear layers)."""
    proc = subprocess.run([sys.executable, "-m", "slimgraph", "optimize", FACTORY, "--pipeline",
                           "cleanup,fold-bn,fc-svd{target_macs=0.1}", "--tune-trials", "0",
                           "--no-bench", "-o", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for phase in ("slimgraph: importing", "slimgraph: imported DigitsCNN", "pass 1/3: cleanup",
                  "pass 3/3: fc-svd{target_macs=0.1}", "compiling for x86 (no tuning", "built in"):
        assert phase in proc.stderr, phase
    assert "warning: fc-svd{target_macs=0.1}: the MAC target was not met" in proc.stdout
    assert "warning: untuned build for x86" in proc.stdout
    page = (tmp_path / "o" / "report.html").read_text()
    assert "Not what was asked" in page and "the MAC target was not met" in page
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert any("MAC target" in w for w in report["warnings"])


def test_quiet_prints_nothing_but_errors(tmp_path):
    argv = [sys.executable, "-m", "slimgraph", "-q", "optimize", FACTORY, "--pipeline",
            "cleanup,fold-bn,fc-svd{target_macs=0.1}", "--tune-trials", "0", "--no-bench"]
    proc = subprocess.run([*argv, "-o", str(tmp_path / "o")], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stderr
    assert (tmp_path / "o" / "report.json").is_file()  # the warnings are still in the files
    assert "the MAC target was not met" in (tmp_path / "o" / "report.html").read_text()
    (tmp_path / "file").write_text("")
    bad = subprocess.run([*argv, "-o", str(tmp_path / "file")], capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("slimgraph: error: ") and len(bad.stderr.splitlines()) == 1


def test_device_build_that_was_not_checked_is_said(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "slimgraph", "optimize", FACTORY, "--target",
                           "arm64", "--pipeline", "cleanup", "--tune-trials", "0", "-o",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=600)
    if proc.returncode == 2 and "cross" in proc.stderr:
        pytest.skip("no aarch64 cross compiler here (tools/setup_toolchains.sh)")
    assert proc.returncode == 0, proc.stderr
    assert "untuned build for arm64" in proc.stdout and "--rpc" in proc.stdout
    assert "numerics were not checked here (--emulate" in proc.stdout


def test_version_and_python_dash_m(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("slimgraph 0.")
    proc = subprocess.run([sys.executable, "-m", "slimgraph", "passes"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "quantize" in proc.stdout


@pytest.mark.parametrize("name", sorted(__import__("slimgraph.passes", fromlist=["x"]).available_passes()))
def test_passes_name_documents_every_option(name, capsys):
    from slimgraph.passes.base import available_passes, option_docs

    assert main(["passes", name]) == 0
    out = capsys.readouterr().out
    assert out.startswith(name) and "options:" in out
    for opt in option_docs(available_passes()[name]):
        assert opt.name in out and opt.meaning, f"{name}.{opt.name} has no meaning"
        assert opt.meaning in out


def test_unknown_pass_name_is_one_line(capsys):
    assert main(["passes", "tuker2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimgraph: error: unknown pass 'tuker2'") and err.count("\n") == 1


@pytest.mark.parametrize("make, match", [
    (lambda d: (d / "f").write_text("x") and d / "f", "exists and is not a directory"),
    (lambda d: (d / "f").write_text("x") and d / "f" / "sub", "is a file, not a directory"),
])
def test_bad_output_directory_fails_at_once(tmp_path, make, match):
    import time

    out = make(tmp_path)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "slimgraph", "optimize", FACTORY, "-o", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and match in proc.stderr and proc.stderr.count("\n") == 1
    assert time.perf_counter() - start < 10  # no model import, no compile (2 s on a quiet machine)


def test_silent_successes_are_now_errors(tmp_path, capsys):
    (tmp_path / "exits.py").write_text("import sys\ndef f():\n    sys.exit(3)\n")
    assert main(["inspect", f"{tmp_path / 'exits.py'}:f"]) == 2
    assert "called sys.exit(3)" in capsys.readouterr().err
    assert main(["inspect", FACTORY, "--input-shape", "x=1,1,8,8"]) == 2
    assert "fixes them with the example inputs" in capsys.readouterr().err
    from slimgraph.backends.tvm import get_target
    from slimgraph.errors import TargetError

    with pytest.raises(TargetError, match="no such NVIDIA architecture"):
        get_target("cuda:sm_12")


@pytest.mark.parametrize("content", [b"", b"hello\n"], ids=["empty", "text"])
def test_empty_or_text_pt2_is_one_line_and_nothing_else(tmp_path, content):
    (tmp_path / "m.pt2").write_bytes(content)
    proc = subprocess.run([sys.executable, "-m", "slimgraph", "inspect", str(tmp_path / "m.pt2")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"slimgraph: error: cannot read {tmp_path / 'm.pt2'} as a torch.export program: File is not a zip file"]


@pytest.mark.slow
def test_ctrl_c_during_tuning_exits_130_and_keeps_the_database(tmp_path):
    import os
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "slimgraph", "optimize", FACTORY, "--pipeline",
                             "cleanup", "--tune-trials", "400", "--workdir", str(tmp_path / "w"),
                             "--no-bench", "-o", str(tmp_path / "o")],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    records = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # wait until tuning has measured something
        found = list((tmp_path / "w").rglob("database_tuning_record.json"))
        if found and found[0].stat().st_size > 0:
            records = found[0]
            break
        time.sleep(1)
    assert records is not None, "tuning never started"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-2000:]
    assert err.rstrip().splitlines()[-1] == "slimgraph: interrupted"
    assert "Traceback" not in err and "RuntimeError" not in err
    kept = records.read_text().splitlines()
    assert kept and all(line.startswith("[") for line in kept)  # every finished batch is there
    assert not (tmp_path / "o").exists()


def test_bash_completion_script_completes_subcommands_and_flags(tmp_path):
    script = subprocess.run([sys.executable, "-m", "slimgraph", "completion", "bash"],
                            capture_output=True, text=True, check=True).stdout
    (tmp_path / "c.sh").write_text(script)
    # ask bash itself: complete `slimgraph optimize --tune` with the generated function
    probe = (f"source {tmp_path / 'c.sh'}; COMP_WORDS=(slimgraph optimize --tune); COMP_CWORD=2; "
             "COMP_LINE='slimgraph optimize --tune'; COMP_POINT=${#COMP_LINE}; "
             "_shtab_slimgraph slimgraph --tune optimize; printf '%s\\n' \"${COMPREPLY[@]}\"")
    words = subprocess.run(["bash", "-c", probe], capture_output=True, text=True).stdout.split()
    assert {"--tune-trials", "--tune-time"} <= set(words), words
    probe = (f"source {tmp_path / 'c.sh'}; COMP_WORDS=(slimgraph op); COMP_CWORD=1; "
             "COMP_LINE='slimgraph op'; COMP_POINT=${#COMP_LINE}; "
             "_shtab_slimgraph slimgraph op slimgraph; printf '%s\\n' \"${COMPREPLY[@]}\"")
    words = subprocess.run(["bash", "-c", probe], capture_output=True, text=True).stdout.split()
    assert words == ["optimize"], words


def test_every_flag_of_every_command_has_help_text():
    import argparse

    from slimgraph.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in [("slimgraph", parser), *subs.choices.items()]:
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction) or action.dest == "help":
                continue
            assert action.help and action.help != argparse.SUPPRESS, (name, action.option_strings or action.dest)
