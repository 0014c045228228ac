#!/usr/bin/env python3
"""Prepare the CUDA proof for a GPU machine that has torch but no TVM and no network.

Builds the digits CNN (trained) and the ResNet-18-style model (seeded random weights) for
``cuda:sm_90`` here, and writes into ``out/gpu_bundle/`` (about 55 MiB, under the device tool's
64 MiB) everything ``tools/cuda_check.py`` needs there:

  artifacts/<model>-sm90/   model.so + kernels.cubin (compiled by NVRTC here) + manifest.json
  tvm-lib/                  libtvm_runtime.so, libtvm_runtime_cuda.so (from the apache-tvm wheel)
  wheels/                   the apache-tvm-ffi wheel for the GPU machine's Python
  models_gpu.py             the PyTorch references, from slimgraph/zoo/models.py alone (torch only)
  run.sh                    installs the wheel into the bundle, runs cuda_check.py per model
                            (correctness vs PyTorch, latency vs eager and torch.compile), and
                            writes <model>.json into $OUT

    .venv/bin/python tools/gpu_bundle.py                 # here
    bash out/gpu_bundle/run.sh                           # there, from the repository root
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
LIMIT_MIB = 62  # the device tool carries at most 64 MiB

MODELS_GPU = '''"""PyTorch references for tools/cuda_check.py on a machine without slimgraph's dependencies:
slimgraph/zoo/models.py is loaded by path (it needs torch only). Written by tools/gpu_bundle.py."""
import importlib.util
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
_spec = importlib.util.spec_from_file_location("slimgraph_models", REPO / "slimgraph" / "models.py")
models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(models)


def digits():
    model = models.DigitsCNN()
    model.load_state_dict(torch.load(REPO / "slimgraph" / "data" / "digits_cnn.pt",
                                     map_location="cpu", weights_only=True))
    return model.eval(), (torch.load(HERE / "digits_input.pt", weights_only=True),)


def resnet18():
    torch.manual_seed(0)  # the weights the artifact was built with (seeded, as in gpu_bundle.py)
    return models.resnet18_factory()
'''

RUN_SH = '''#!/usr/bin/env bash
# Written by tools/gpu_bundle.py. Run from the repository root on the GPU machine.
set -u
B="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-$B/results}"
mkdir -p "$OUT"
nvidia-smi -L || true
python -c "import torch; print('torch', torch.__version__, torch.version.cuda)"
python -m pip install -q --no-index --no-deps --target "$B/pylib" "$B"/wheels/*.whl || exit 2
export PYTHONPATH="$B/pylib${PYTHONPATH:+:$PYTHONPATH}"
status=0
for m in digits resnet18; do
  python tools/cuda_check.py "$B/artifacts/$m-sm90" --tvm-lib "$B/tvm-lib" \\
      --model "$B/models_gpu.py:$m" --repeat 200 --warmup 20 --json "$OUT/$m.json" || status=1
done
exit $status
'''


def _download_ffi_wheel(dest: Path, python: str) -> Path:
    version = importlib.metadata.version("apache-tvm-ffi")
    cmd = [sys.executable, "-m", "pip", "download", f"apache-tvm-ffi=={version}", "--no-deps",
           "--only-binary=:all:", "--python-version", python, "-d", str(dest)]
    for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"):
        cmd += ["--platform", tag]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    wheels = sorted(dest.glob("apache_tvm_ffi-*.whl"))
    if not wheels:
        raise SystemExit(f"gpu_bundle: no apache-tvm-ffi {version} wheel for Python {python}")
    return wheels[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "out" / "gpu_bundle")
    ap.add_argument("--python", default="3.12", help="the GPU machine's Python version")
    args = ap.parse_args(argv)

    import tvm

    from slimgraph.backends.tvm import build
    from slimgraph.zoo.datasets import demo_model
    from slimgraph.zoo.models import resnet18_factory

    out = args.out
    shutil.rmtree(out, ignore_errors=True)
    (out / "artifacts").mkdir(parents=True)
    digits, (dx,) = demo_model()
    torch.save(dx.clone(), out / "digits_input.pt")  # not the whole test set behind the view
    torch.manual_seed(0)
    resnet, (rx,) = resnet18_factory()
    for name, model, x in (("digits", digits, dx), ("resnet18", resnet.eval(), rx)):
        compiled = build(model, (x,), "cuda:sm_90", progress=False)
        if compiled.cuda_binary is None:
            raise SystemExit(f"gpu_bundle: {name}'s kernels were not compiled here "
                             f"({compiled.info.cuda_kernels['note']})")
        compiled.save(out / "artifacts" / f"{name}-sm90")
    lib = out / "tvm-lib"
    lib.mkdir()
    for name in ("libtvm_runtime.so", "libtvm_runtime_cuda.so"):
        shutil.copy2(Path(tvm.__file__).parent / "lib" / name, lib / name)
    _download_ffi_wheel(out / "wheels", args.python)
    (out / "models_gpu.py").write_text(MODELS_GPU)
    (out / "run.sh").write_text(RUN_SH)
    (out / "run.sh").chmod(0o755)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    print(f"gpu_bundle: {out} ({size:.1f} MiB)")
    if size > LIMIT_MIB:
        raise SystemExit(f"gpu_bundle: {size:.1f} MiB is over the {LIMIT_MIB} MiB the device "
                         "tool carries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
