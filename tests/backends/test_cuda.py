"""CUDA: build for cuda:sm_90 without a GPU, compile its kernels to an sm_90 cubin with NVRTC
(no GPU needed), and check the artifact's structure; running it needs a GPU (``@pytest.mark.gpu``,
skipped cleanly without one). tools/cuda_check.py times it."""

import ctypes
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from slimgraph.backends.tvm import build, device, get_target, load_compiled, nvrtc
from slimgraph.backends.tvm.artifact import ArtifactLoadError
from slimgraph.errors import BackendError, SlimgraphError, TargetError
from slimgraph.zoo.datasets import demo_model

EM_X86_64, EM_CUDA = 62, 190
needs_nvrtc = pytest.mark.skipif(nvrtc.unavailable() is not None,
                                 reason=f"NVRTC not installed: {nvrtc.unavailable()}")


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


@needs_nvrtc
def test_cuda_kernels_are_compiled_to_an_sm_90_cubin_at_build(cuda_artifact):
    out, _, _ = cuda_artifact
    meta = json.loads((out / "manifest.json").read_text())["cuda_kernels"]
    cubin = (out / "kernels.cubin").read_bytes()
    assert meta["binary"] == "kernels.cubin" and meta["arch"] == "sm_90"
    assert meta["compiler"].startswith("NVRTC") and meta["bytes"] == len(cubin)
    assert cubin[:4] == b"\x7fELF" and int.from_bytes(cubin[18:20], "little") == EM_CUDA
    # The source the runtime will be asked to compile at load is the one compiled here.
    source = device.cuda_source(out / "model.so")
    assert nvrtc.source_sha256(source) == meta["source_sha256"]
    assert meta["kernels"] == source.count('extern "C" __global__')


@needs_nvrtc
def test_load_time_compile_callback_answers_with_the_shipped_cubin(cuda_artifact, monkeypatch):
    out, _, _ = cuda_artifact
    meta = json.loads((out / "manifest.json").read_text())["cuda_kernels"]
    binary = nvrtc.CudaBinary(arch="sm_90", cubin=(out / "kernels.cubin").read_bytes(),
                              source_sha256=meta["source_sha256"], kernels=meta["kernels"],
                              compiler=meta["compiler"])
    device.register_precompiled(binary)
    callback = device.cuda_compile_callback("sm_90")
    assert callback(device.cuda_source(out / "model.so")) == binary.cubin
    # Source it has no cubin for, with no compiler here: one error naming both fixes.
    monkeypatch.setattr(device.shutil, "which", lambda name: None)
    monkeypatch.setattr(nvrtc, "unavailable", lambda: "not installed (test)")
    with pytest.raises(TargetError, match="nvcc or pip install"):
        callback('extern "C" __global__ void other() {}')


@needs_nvrtc
def test_nvrtc_rejecting_generated_code_is_a_build_error():
    with pytest.raises(BackendError, match="NVRTC could not compile"):
        nvrtc.compile_source('extern "C" __global__ void k() { undeclared(); }', "sm_90")


def test_cuda_build_without_nvrtc_ships_source_only(tmp_path, monkeypatch):
    monkeypatch.setattr(nvrtc, "unavailable", lambda: "cuda-bindings is not installed (test)")
    model, (x,) = demo_model()
    out = build(model, (x,), "cuda:sm_90", progress=False).save(tmp_path / "src-only")
    meta = json.loads((out / "manifest.json").read_text())["cuda_kernels"]
    assert meta["binary"] is None and "not precompiled" in meta["note"]
    assert meta["kernels"] >= 4 and not (out / "kernels.cubin").exists()


@needs_nvrtc
def test_corrupt_cubin_is_refused_at_load(cuda_artifact, tmp_path):
    out, _, _ = cuda_artifact
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "kernels.cubin").write_bytes(b"\x7fELF broken")
    with pytest.raises(ArtifactLoadError, match="kernels.cubin does not match its manifest"):
        load_compiled(copy)
    (copy / "kernels.cubin").unlink()
    with pytest.raises(ArtifactLoadError, match="compiled CUDA kernels"):
        load_compiled(copy)


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
    out, model, x = cuda_artifact
    y = load_compiled(out)(x)[0]  # the shipped cubin when NVRTC built one, else nvcc here
    fresh = build(model, (x,), "cuda:sm_90", progress=False)(x)[0]  # exported, then loaded
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(y - ref).max() < 1e-4 and np.abs(fresh - ref).max() < 1e-4


def test_cuda_check_script_runs_an_artifact_with_the_runtime_only(tmp_path):
    """tools/cuda_check.py's loading path (ctypes runtime + tvm_ffi.load_module + VM), on CPU."""
    import subprocess
    import sys

    model, (x,) = demo_model()
    out = build(model, (x,), "x86", tune_trials=0, progress=False).save(tmp_path / "x86")
    script = Path(__file__).resolve().parents[2] / "tools" / "cuda_check.py"
    proc = subprocess.run([sys.executable, str(script), str(out), "--device", "cpu",
                           "--model", "slimgraph.zoo.datasets:demo_model", "--repeat", "2",
                           "--warmup", "0", "--no-compile", "--json", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["match"] is True and result["max_abs_err"] < 1e-4
    assert result["tvm_ms"] > 0 and result["eager_ms"] > 0


@needs_nvrtc
def test_cuda_check_script_hands_the_shipped_cubin_to_the_runtime(cuda_artifact, monkeypatch):
    """tools/cuda_check.py on a GPU machine needs no CUDA compiler: its load-time callback
    returns kernels.cubin for the library's source (called here as TVM's runtime would)."""
    import importlib.util

    import tvm_ffi

    out, _, _ = cuda_artifact
    script = Path(__file__).resolve().parents[2] / "tools" / "cuda_check.py"
    spec = importlib.util.spec_from_file_location("cuda_check_under_test", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module.shutil, "which", lambda name: None)  # no nvcc there
    manifest = json.loads((out / "manifest.json").read_text())
    assert module.register_compile_callback(out, manifest).startswith("shipped cubin")
    callback = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
    assert bytes(callback(device.cuda_source(out / "model.so"))) == \
        (out / "kernels.cubin").read_bytes()


@needs_nvrtc
def test_optimize_for_cuda_reports_the_compiled_kernels():
    import slimgraph

    model, example = demo_model()
    result = slimgraph.optimize(model, "cuda:sm_90", example_inputs=example, pipeline="cleanup",
                                progress=False)
    kernels = result.report.to_dict()["backend"]["cuda_kernels"]
    assert kernels["binary"] == "kernels.cubin" and kernels["arch"] == "sm_90"
    assert "cubin by NVRTC" in result.report.to_html()


def _cuda_tasks(spec):
    from slimgraph.backends.tvm import lower
    from slimgraph.backends.tvm.tune import prepare, task_infos

    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.ReLU()).eval()
    prepared = prepare(lower(net, (torch.randn(1, 4, 8, 8),)), spec)
    return prepared, task_infos(prepared, spec)[0]


def test_cuda_tuning_without_a_gpu_names_the_ways_out(tmp_path):
    from slimgraph.backends.tvm.rpc import RPCDevice
    from slimgraph.backends.tvm.tune import tune

    spec = get_target("cuda:sm_90")
    prepared, _ = _cuda_tasks(spec)
    with pytest.raises(TargetError, match="over RPC is not supported"):
        tune(prepared, spec, 4, tmp_path, device=RPCDevice("127.0.0.1", 9))
    if _has_gpu():
        pytest.skip("this machine has a GPU")
    with pytest.raises(TargetError, match="no NVIDIA GPU.*tune_trials=0"):
        tune(prepared, spec, 4, tmp_path)


@needs_nvrtc
@pytest.mark.timeout(300)
def test_cuda_tuning_candidates_build_and_compile_for_sm_90(tmp_path):
    """What a CUDA tuning run hands its runner: a MetaSchedule candidate from the CUDA design
    space, built and exported here, whose kernels NVRTC compiles for sm_90."""
    from tvm.s_tir import meta_schedule as ms

    from slimgraph.backends.tvm.tune import _build_candidate, load_tensor_intrinsics

    spec = get_target("cuda:sm_90")
    load_tensor_intrinsics("cuda")
    _, tasks = _cuda_tasks(spec)
    conv = max(tasks, key=lambda t: len(str(t.task_name)))
    ctx = ms.TuneContext(mod=conv.dispatched[0], target=conv.target,
                         space_generator="post-order-apply", task_name=str(conv.task_name),
                         num_threads=1, rand_state=0).clone()
    space = ctx.generate_design_space()[0]
    path = _build_candidate(space.mod, conv.target, str(tmp_path / "c" / "m.so"))
    source = device.cuda_source(path)
    assert 'extern "C" __global__' in source and "threadIdx" in source
    cubin = nvrtc.compile_source(source, "sm_90").cubin
    assert int.from_bytes(cubin[18:20], "little") == EM_CUDA
