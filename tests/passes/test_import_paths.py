"""Every registered pass on one trained model imported three ways: torch.fx trace, a ``.pt2``
file from ``torch.export``, and an ONNX export of it. The canonical form means the passes see
the same layers, so each pass must make the same change and give the same numbers."""

import numpy as np
import pytest
import torch

from slimgraph.ir.export_frontend import export_module
from slimgraph.ir.loading import load_model
from slimgraph.passes.base import available_passes, parse_pipeline
from slimgraph.passes.context import PassContext
from slimgraph.passes.manager import PassManager
from slimgraph.zoo.datasets import calibration_set, demo_model, load_digits_split

# Representative options per registered pass (a new pass must be added here: see the last test).
SPECS = {
    "cleanup": "cleanup",
    "const-fold": "const-fold",
    "fold-bn": "fold-bn",
    "fc-svd": "fc-svd{rank=0.9}",
    "spatial-svd": "spatial-svd{rank=macs=0.5}",
    "channel-lowrank": "channel-lowrank{rank=macs=0.5}",
    "tucker2": "tucker2{rank=macs=0.5}",
    "cp": "cp{rank=macs=0.5}",
    "flatten-conv": "flatten-conv{rank=macs=0.5}",
    "prune-channels": "prune-channels{ratio=0.25}",
    "prune-weights": "prune-weights{sparsity=0.5}",
    "finetune": "prune-weights{sparsity=0.5},finetune{epochs=1}",  # a gap to recover
    "quantize": "quantize",
    "fixed-point": "fixed-point{budget=4}",
}
PATHS = ("fx", "pt2", "onnx")


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paths")
    model, (x,) = demo_model()
    ep, dynamic, _ = export_module(model, (x,))
    assert dynamic
    torch.export.save(ep, tmp / "digits.pt2")
    # PRESERVE keeps batch norm in the ONNX file (EVAL mode would fold it into the convs)
    torch.onnx.export(model, (x,), tmp / "digits.onnx", dynamo=False, opset_version=17,
                      training=torch.onnx.TrainingMode.PRESERVE, input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
    out = {"fx": load_model(model, (x,)), "pt2": load_model(str(tmp / "digits.pt2")),
           "onnx": load_model(str(tmp / "digits.onnx"), input_shapes={"input": (1, 1, 16, 16)})}
    assert [g.source for g in out.values()] == ["torch", "pt2", "onnx"]
    return out


@pytest.fixture(scope="module")
def data():
    split = load_digits_split()
    calib = calibration_set(64)
    return [(calib[:32],), (calib[32:],)], split["x_test"][:64]


def _run(graph, spec, data):
    batches, _ = data
    # fold-bn first where the pass is not fold-bn itself: the ONNX exporter's graph and the
    # traced one then agree on where batch norm is
    pipeline = spec if spec.startswith(("cleanup", "fold-bn")) else f"cleanup,fold-bn,{spec}"
    am = PassContext(calibration=batches, reference=graph, seed=0)
    out, records = PassManager(parse_pipeline(pipeline)).run(graph, am)
    return out, records[-1]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_pass_makes_the_same_change_on_every_import_path(name, graphs, data):
    results = {path: _run(graphs[path], SPECS[name], data) for path in PATHS}
    x_test = data[1]
    outs = {path: out.run(x_test)[0] for path, (out, _) in results.items()}
    ref = outs["fx"]
    for path in PATHS:
        out, rec = results[path]
        out.verify()
        if name != "cleanup":  # the exporters already drop dropout; cleanup has less to do there
            assert rec.changed == results["fx"][1].changed, path
        assert rec.stats["macs_after"] == results["fx"][1].stats["macs_after"], path
        assert rec.stats["params_after"] == results["fx"][1].stats["params_after"], path
        err = np.abs(outs[path] - ref).max() / np.abs(ref).max()
        assert err < 1e-4, (path, err)
        assert (outs[path].argmax(1) == ref.argmax(1)).mean() >= 0.98, path
    if name not in ("cleanup", "const-fold"):
        assert results["fx"][1].changed, f"{name} changed nothing on the trained digits CNN"


def test_every_registered_pass_is_covered():
    assert set(available_passes()) == set(SPECS)
