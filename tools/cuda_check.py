#!/usr/bin/env python3
"""Run a slimgraph CUDA artifact with TVM's runtime only, check it against PyTorch, time it.

For a machine with an NVIDIA GPU, torch (CUDA build) and no TVM compiler::

    pip install apache-tvm-ffi==0.1.14.post1            # the tvm-ffi wheel for this Python
    pip download --no-deps apache-tvm==0.27.0.post1 -d wheels && \
        unzip -j wheels/apache_tvm-*.whl 'tvm/lib/libtvm_runtime*.so' -d tvm-lib
    python tools/cuda_check.py out/digits-sm90 --tvm-lib tvm-lib \
        --model slimgraph.zoo.datasets:demo_model --json out/cuda_check.json

It loads ``libtvm_runtime.so`` and ``libtvm_runtime_cuda.so`` with ctypes (RTLD_GLOBAL),
registers ``tvm_callback_cuda_compile`` (the library holds CUDA source, compiled when loaded:
the callback answers with the artifact's ``kernels.cubin``, compiled by NVRTC at build time, and
falls back to nvcc --fatbin for the artifact's arch), loads ``model.so`` with ``tvm_ffi.load_module``, creates the Relax VM and
calls ``main`` with torch CUDA tensors. It then compares with the PyTorch model on the GPU and
prints median latencies of TVM, PyTorch eager and torch.compile (``--no-compile`` skips it).
``--device cpu`` runs an x86 artifact the same way (checks this script without a GPU).
Exit code 0: outputs match within --atol; 1: they do not; 2: it could not run.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KDL_CPU, KDL_CUDA, POOLED_ALLOCATOR = 1, 2, 2


def fail(message: str) -> None:
    print(f"cuda_check: {message}", file=sys.stderr)
    sys.exit(2)


def find_tvm_lib(given: str | None) -> Path:
    if given:
        return Path(given)
    spec = importlib.util.find_spec("tvm")  # an installed TVM, if any (not imported)
    if spec is not None and spec.origin:
        return Path(spec.origin).parent / "lib"
    fail("no TVM runtime libraries: pass --tvm-lib DIR holding libtvm_runtime.so and "
         "libtvm_runtime_cuda.so (unzip them from the apache-tvm wheel)")
    raise AssertionError  # unreachable


def load_runtime(lib_dir: Path, cuda: bool) -> None:
    # Without this, TVM's thread pool pins the calling thread to one core (and torch with it).
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    import tvm_ffi  # noqa: F401 - loads libtvm_ffi.so first

    names = ["libtvm_runtime.so"] + (["libtvm_runtime_cuda.so"] if cuda else [])
    for name in names:
        path = lib_dir / name
        if not path.is_file():
            fail(f"{path} is missing")
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)


def register_compile_callback(artifact: Path, manifest: dict) -> str:
    """TVM's runtime compiles the library's CUDA source while loading it: answer with the
    cubin the build shipped (kernels.cubin, compiled by NVRTC) when the source matches, else
    with nvcc. Returns which one will be used."""
    import tvm_ffi

    arch = manifest["tvm_target"]["arch"]
    meta = manifest.get("cuda_kernels") or {}
    cubin = (artifact / meta["binary"]).read_bytes() if meta.get("binary") else None
    if cubin is not None and hashlib.sha256(cubin).hexdigest() != meta.get("binary_sha256"):
        fail(f"{artifact / meta['binary']} does not match its manifest")
    nvcc = shutil.which("nvcc")
    if cubin is None and nvcc is None:
        fail("the artifact has no precompiled kernels and nvcc is not on PATH")

    def compile_cuda(code: str) -> bytes:
        if cubin is not None and hashlib.sha256(code.encode()).hexdigest() == meta["source_sha256"]:
            return cubin
        if nvcc is None:
            raise RuntimeError("CUDA source without a precompiled cubin, and no nvcc")
        with tempfile.TemporaryDirectory() as tmp:
            src, out = Path(tmp) / "k.cu", Path(tmp) / "k.fatbin"
            src.write_text(code)
            subprocess.run([nvcc, "--fatbin", "-O3", f"-arch={arch}", "-o", str(out), str(src)],
                           check=True)
            return out.read_bytes()

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)
    return f"shipped cubin ({meta.get('compiler')})" if cubin is not None else "nvcc at load"


def load_vm(artifact: Path, cuda: bool):
    import tvm_ffi

    lib = tvm_ffi.load_module(str(artifact / "model.so"))
    vm = lib["vm_load_executable"]()
    if cuda:
        vm["vm_initialization"](KDL_CUDA, 0, POOLED_ALLOCATOR, KDL_CPU, 0, POOLED_ALLOCATOR)
    else:
        vm["vm_initialization"](KDL_CPU, 0, POOLED_ALLOCATOR)
    return lib, vm["main"]


def load_model(ref: str):
    module, _, attr = ref.partition(":")
    if module.endswith(".py"):
        spec = importlib.util.spec_from_file_location("cuda_check_model", module)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        mod = importlib.import_module(module)
    made = getattr(mod, attr or "model")()
    model, inputs = made if isinstance(made, tuple) else (made, None)
    return model.eval(), inputs


def median_ms(fn, sync, repeat: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def first_tensor(result):
    import torch

    while not hasattr(result, "__dlpack__"):
        result = result[0]
    return torch.from_dlpack(result)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", help="folder with model.so and manifest.json")
    p.add_argument("--tvm-lib", help="folder with libtvm_runtime.so and libtvm_runtime_cuda.so")
    p.add_argument("--model", help="module:factory (or file.py:factory) returning the torch "
                   "model, or (model, example_inputs), to compare with")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--repeat", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--json", help="write the results here too")
    args = p.parse_args()

    import torch

    artifact = Path(args.artifact)
    manifest = json.loads((artifact / "manifest.json").read_text())
    cuda = args.device == "cuda"
    if cuda and manifest.get("target_kind") != "cuda":
        fail(f"{artifact} was built for {manifest.get('target')}, not a CUDA target")
    if cuda and not torch.cuda.is_available():
        fail("torch sees no CUDA GPU here")
    load_runtime(find_tvm_lib(args.tvm_lib), cuda)
    kernels = register_compile_callback(artifact, manifest) if cuda else None
    _lib, tvm_main = load_vm(artifact, cuda)  # keep the library alive while running

    dev = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model, example = load_model(args.model) if args.model else (None, None)
    if example is None:
        gen = torch.Generator().manual_seed(0)
        example = tuple(torch.randn(i["shape"], generator=gen) for i in manifest["inputs"])
    inputs = [t.to(dev).contiguous() for t in example]
    result = {"artifact": str(artifact), "target": manifest.get("target"),
              "device": torch.cuda.get_device_name() if cuda else "cpu", "kernels": kernels}
    out = first_tensor(tvm_main(*inputs))
    result["tvm_ms"] = median_ms(lambda: tvm_main(*inputs), sync, args.repeat, args.warmup)
    ok = True
    if model is not None:
        model = model.to(dev)
        with torch.no_grad():
            ref = model(*inputs)
            result["max_abs_err"] = float((out.to(ref.device) - ref).abs().max())
            ok = result["max_abs_err"] <= args.atol
            result["eager_ms"] = median_ms(lambda: model(*inputs), sync, args.repeat,
                                           args.warmup)
            if not args.no_compile:
                compiled = torch.compile(model)
                compiled(*inputs)
                result["compile_ms"] = median_ms(lambda: compiled(*inputs), sync, args.repeat,
                                                 args.warmup)
    result["match"] = ok
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
