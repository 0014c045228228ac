"""arm64: cross-compile the demo CNN, run it with the C++ runner under qemu-aarch64, compare with
PyTorch. Skips with the reason when the cross compiler, qemu or the aarch64 TVM wheels are
missing (tools/setup_toolchains.sh installs the first two; the wheels come from PyPI)."""

import json
import shutil

import numpy as np
import pytest
import torch

from slimgraph.backends.tvm import build, device, get_target, load_compiled
from slimgraph.errors import ShapeError, SlimgraphError, TargetError
from slimgraph.zoo.datasets import demo_model

EM_AARCH64 = 183  # ELF e_machine


def _need_toolchain():
    try:
        device.check_cross_compiler()
        device.check_qemu()
        device.runner_path("arm64")  # builds it once (downloads the aarch64 wheels)
    except TargetError as err:
        pytest.skip(f"arm64 toolchain unavailable: {err}")


@pytest.fixture(scope="module")
def arm64_artifact(tmp_path_factory):
    _need_toolchain()
    model, (x,) = demo_model()
    compiled = build(model, (x,), "arm64", tune_trials=0, progress=False)
    out = compiled.save(tmp_path_factory.mktemp("arm64") / "digits-arm64")
    return out, model, x


def _elf_machine(path) -> int:
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF"
    return int.from_bytes(head[18:20], "little")


def test_arm64_target_is_aarch64_neon():
    spec = get_target("arm64")
    assert spec.kind == "arm64"
    assert spec.tvm_target["mtriple"] == "aarch64-linux-gnu"
    assert "+neon" in spec.tvm_target["mattr"]
    assert not spec.is_host


def test_arm64_runs_under_qemu_and_matches_pytorch(arm64_artifact):
    out, model, x = arm64_artifact
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target_kind"] == "arm64"
    assert manifest["inputs"] == [{"name": manifest["inputs"][0]["name"],
                                   "shape": [1, 1, 16, 16], "dtype": "float32"}]
    assert manifest["tuning"]["tuned"] is False  # untuned schedules, and the manifest says so
    assert _elf_machine(out / "model.so") == EM_AARCH64

    outputs, latency = device.run_with_runner(out, [x], repeat=2, warmup=0)
    with torch.no_grad():
        ref = model(x).numpy()
    assert len(outputs) == 1 and outputs[0].shape == ref.shape == (1, 10)
    assert np.abs(outputs[0] - ref).max() < 1e-4
    assert latency["emulated"] is True and latency["repeat"] == 2
    assert latency["median_ms"] > 0


def test_runner_rejects_wrong_input_shape(arm64_artifact):
    out, _, _ = arm64_artifact
    with pytest.raises(ShapeError, match=r"expected shape \[1, 1, 16, 16\]"):
        device.run_with_runner(out, [np.zeros((1, 1, 8, 8), np.float32)])


def test_loading_arm64_artifact_on_x86_is_a_clear_error(arm64_artifact):
    out, _, _ = arm64_artifact
    if device.host_arch() == "arm64":
        pytest.skip("this machine is arm64: the artifact loads natively")
    with pytest.raises(SlimgraphError, match="arm64"):
        load_compiled(out)


def test_missing_cross_compiler_names_the_fix(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(TargetError, match=r"g\+\+-aarch64-linux-gnu.*tools/setup_toolchains.sh"):
        device.check_cross_compiler()
    with pytest.raises(TargetError, match=r"given for arm64 is not on PATH"):
        device.check_cross_compiler("aarch64-linux-android24-clang++")


def test_missing_qemu_names_the_fix(monkeypatch):
    monkeypatch.setattr(device, "host_arch", lambda: "x86")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(TargetError, match=r"qemu-user.*tools/setup_toolchains.sh"):
        device.check_qemu()


def test_runner_refuses_cuda_artifacts():
    with pytest.raises(TargetError, match="cuda_check.py"):
        device.runner_command("cuda")
