"""CUDA: build for cuda:sm_90 without a GPU and check the artifact's structure; running it needs
a GPU (``@pytest.mark.gpu``, skipped cleanly without one). tools/cuda_check.py times it."""

import ctypes
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from slimgraph.backends.tvm import build, device, get_target, load_compiled
from slimgraph.datasets import demo_model
from slimgraph.errors import SlimgraphError, TargetError

EM_X86_64 = 62


def _has_gpu() -> bool:
    if not Path("/dev/nvidia0").exists():
        return False
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def cuda_artifact(tmp_path_factory):
    model, (x,) = demo_model()
    compiled = build(model, (x,), "cuda:sm_90", tune_trials=0, progress=False)
    out = compiled.save(tmp_path_factory.mktemp("cuda") / "digits-sm90")
    return out, model, x


def test_cuda_target_has_what_metaschedule_needs():
    spec = get_target("cuda:sm_80")
    assert spec.kind == "cuda" and spec.tvm_target["arch"] == "sm_80"
    for key in ("max_threads_per_block", "max_shared_memory_per_block", "thread_warp_size",
                "registers_per_block", "max_num_threads"):
        assert spec.tvm_target[key] > 0
    assert spec.host == {"kind": "llvm"}
    with pytest.raises(TargetError, match="sm_80 or sm_90"):
        get_target("cuda:ampere")


def test_cuda_build_without_gpu_writes_library_manifest_and_cuda_source(cuda_artifact):
    out, _, _ = cuda_artifact
    lib = out / "model.so"
    assert lib.is_file()
    assert int.from_bytes(lib.read_bytes()[18:20], "little") == EM_X86_64  # host code
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == "cuda:sm_90" and manifest["target_kind"] == "cuda"
    assert manifest["tvm_target"]["arch"] == "sm_90"
    assert manifest["outputs"][0]["shape"] == [1, 10]
    assert manifest["tvm_version"] and manifest["slimgraph_version"]
    source = device.cuda_source(lib)
    assert source.count('extern "C" __global__') >= 4  # conv, pool, dense kernels


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not installed")
def test_cuda_source_compiles_with_nvcc_for_sm_90(cuda_artifact):
    out, _, _ = cuda_artifact
    fatbin = device.nvcc_compile_callback("sm_90")(device.cuda_source(out / "model.so"))
    assert len(fatbin) > 1000
    assert fatbin[:4] == bytes.fromhex("50ed55ba")  # fatbin magic


def test_cuda_artifact_without_gpu_is_a_clear_error(cuda_artifact):
    out, _, _ = cuda_artifact
    if _has_gpu():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SlimgraphError, match="(?i)cuda|gpu"):
        load_compiled(out)(np.zeros((1, 1, 16, 16), np.float32))
    with pytest.raises(TargetError, match="NVIDIA"):
        device.prepare_cuda_runtime("sm_90")


@pytest.mark.gpu
def test_cuda_artifact_runs_on_gpu_and_matches_pytorch(cuda_artifact):
    if not _has_gpu():
        pytest.skip("no CUDA GPU on this machine")
    import tvm
    from tvm import relax

    out, model, x = cuda_artifact
    device.prepare_cuda_runtime("sm_90")
    lib = tvm.runtime.load_module(str(out / "model.so"))
    vm = relax.VirtualMachine(lib, tvm.cuda(0))
    result = vm["main"](tvm.runtime.tensor(x.numpy(), tvm.cuda(0)))
    y = (result[0] if not hasattr(result, "numpy") else result).numpy()
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(y - ref).max() < 1e-4


def test_cuda_check_script_runs_an_artifact_with_the_runtime_only(tmp_path):
    """tools/cuda_check.py's loading path (ctypes runtime + tvm_ffi.load_module + VM), on CPU."""
    import subprocess
    import sys

    model, (x,) = demo_model()
    out = build(model, (x,), "x86", tune_trials=0, progress=False).save(tmp_path / "x86")
    script = Path(__file__).resolve().parents[2] / "tools" / "cuda_check.py"
    proc = subprocess.run([sys.executable, str(script), str(out), "--device", "cpu",
                           "--model", "slimgraph.datasets:demo_model", "--repeat", "2",
                           "--warmup", "0", "--no-compile", "--json", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["match"] is True and result["max_abs_err"] < 1e-4
    assert result["tvm_ms"] > 0 and result["eager_ms"] > 0
