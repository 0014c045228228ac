"""Device targets through the public interface: arm64 options, `--cc`, tuning without a device
(untuned or from a database, and the report says which), tuning through RPC from build(), and
the CLI for arm64."""

import json
import shutil
import socket

import numpy as np
import pytest
import torch

import slimgraph
from slimgraph.backends.tvm import build, get_target, list_targets
from slimgraph.backends.tvm.rpc import LocalRPCServer
from slimgraph.cli import main as cli_main
from slimgraph.errors import SlimgraphError, TargetError
from slimgraph.zoo.datasets import demo_model


def _have_cross() -> bool:
    return shutil.which("aarch64-linux-gnu-g++") is not None


def test_arm64_extensions_become_llvm_attributes():
    spec = get_target("arm64:dotprod+i8mm")
    assert spec.tvm_target["mattr"] == ["+neon", "+dotprod", "+i8mm"]
    assert "dotprod" in spec.description and "i8mm" in spec.description
    assert not spec.is_host
    cpu = get_target("arm64:cortex-a76+dotprod")
    assert cpu.tvm_target["mcpu"] == "cortex-a76"
    assert cpu.key != get_target("arm64:dotprod").key  # separate tuning databases
    attrs = get_target("arm64:dotprod").to_tvm().attrs
    assert bool(attrs["feature.has_dotprod"]) is True


@pytest.mark.parametrize("name, match", [
    ("arm64:foo_bar", "neither an extension"),
    ("arm64:notacpu", "does not know the aarch64 CPU"),
    ("riscv", "unknown target"),
    ("cuda:ampere", "sm_80 or sm_90"),
])
def test_bad_target_names_are_one_clear_error(name, match):
    with pytest.raises(TargetError, match=match):
        get_target(name)


def test_targets_listing_covers_every_family():
    names = [t.name for t in list_targets()]
    for name in ("x86", "arm64", "arm64:dotprod", "cuda:sm_80", "cuda:sm_90"):
        assert name in names
    assert all(t.default_pipeline for t in list_targets())


def test_cc_not_on_path_fails_before_lowering():
    model, example = demo_model()
    with pytest.raises(TargetError, match="not on PATH"):
        build(model, example, "arm64", cc="aarch64-linux-android24-clang++")


@pytest.mark.skipif(not _have_cross(), reason="aarch64-linux-gnu-g++ not installed "
                    "(tools/setup_toolchains.sh)")
def test_optimize_for_arm64_without_device_is_untuned_and_says_so(tmp_path):
    model, example = demo_model()
    result = slimgraph.optimize(model, "arm64:dotprod", example_inputs=example,
                                pipeline="cleanup,fold-bn", tune_trials=64, workdir=tmp_path,
                                cc="aarch64-linux-gnu-g++", progress=False)
    backend = result.report.to_dict()["backend"]
    assert backend["tuned"] is False and backend["trials_measured"] == 0
    assert "not tuned" in backend["note"] and "--rpc" in backend["note"]
    assert "default schedules" in backend["schedules"]
    assert backend["latency_ms"] is None
    out = result.save(tmp_path / "arm64-out")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "arm64:dotprod"
    assert "+dotprod" in manifest["tvm_target"]["mattr"]
    assert (out / "model.so").read_bytes()[18:20] == (183).to_bytes(2, "little")  # aarch64


def test_given_database_that_does_not_exist_is_a_clear_error(tmp_path):
    model, example = demo_model()
    with pytest.raises(SlimgraphError, match="no tuning database"):
        slimgraph.optimize(model, "arm64", example_inputs=example, pipeline="cleanup",
                           tune_trials=8, database=tmp_path / "nothing", progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_build_tunes_through_rpc_and_reports_the_runner(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 8, 8)
    port = _free_port()
    with LocalRPCServer(port=port, port_end=port + 50, start_timeout_s=120) as server:
        compiled = build(net, (x,), "x86", tune_trials=4, database=tmp_path / "db",
                         rpc=server.device.address, time_budget_s=300, progress=False)
    assert compiled.info.runner.startswith("rpc 127.0.0.1:")
    assert compiled.info.trials_measured == 4 and compiled.info.stopped_by == "done"
    assert "measured on rpc" in compiled.info.schedules
    with torch.no_grad():
        ref = net(x).numpy()
    assert np.abs(compiled(x)[0] - ref).max() < 1e-4


@pytest.mark.skipif(not _have_cross(), reason="aarch64-linux-gnu-g++ not installed "
                    "(tools/setup_toolchains.sh)")
def test_cli_optimize_arm64_writes_a_deployable_artifact(tmp_path, capsys):
    out = tmp_path / "cli-arm64"
    rc = cli_main(["optimize", "slimgraph/zoo/datasets.py:demo_model", "--target", "arm64",
                   "--pipeline", "cleanup,fold-bn", "--quiet", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target_kind"] == "arm64"
    assert manifest["tuning"]["tuned"] is False
    report = json.loads((out / "report.json").read_text())
    assert "not tuned" in report["backend"]["note"]


def test_optimize_arm64_with_emulate_checks_numerics_under_qemu(tmp_path):
    from slimgraph.backends.tvm import device

    try:
        device.check_cross_compiler()
        device.check_qemu()
        device.runner_path("arm64")
    except TargetError as err:
        pytest.skip(f"arm64 toolchain unavailable: {err}")
    model, example = demo_model()
    result = slimgraph.optimize(model, "arm64", example_inputs=example, pipeline="cleanup,fold-bn",
                                tune_trials=0, emulate=True, progress=False)
    backend = result.report.to_dict()["backend"]
    assert "qemu-aarch64" in backend["numerics_how"]
    assert backend["numerics_vs_graph"]["max_abs"] < 1e-4
    result.report.save_html(tmp_path / "r.html")
    assert "qemu-aarch64" in (tmp_path / "r.html").read_text()
    # without emulate the report says why nothing ran and how to check it
    plain = slimgraph.optimize(model, "arm64", example_inputs=example, pipeline="cleanup",
                               tune_trials=0, progress=False).report.to_dict()["backend"]
    assert plain["numerics_vs_graph"] is None and "--emulate" in plain["note"]




@pytest.mark.skipif(not _have_cross(), reason="aarch64-linux-gnu-g++ not installed "
                    "(tools/setup_toolchains.sh)")
def test_rpc_tuning_candidates_for_arm64_are_aarch64_libraries(tmp_path):
    """What an arm64 board behind --rpc receives: each candidate linked by the cross compiler."""
    from slimgraph.backends.tvm import lower
    from slimgraph.backends.tvm.device import cross_compiler_path
    from slimgraph.backends.tvm.tune import _build_candidate, prepare, task_infos

    spec = get_target("arm64:dotprod")
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.ReLU()).eval()
    tasks, _ = task_infos(prepare(lower(net, (torch.randn(1, 2, 6, 6),)), spec), spec)
    path = _build_candidate(tasks[0].dispatched[0], tasks[0].target, str(tmp_path / "c" / "m.so"),
                            cross_compiler_path(spec))
    header = open(path, "rb").read(20)
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
