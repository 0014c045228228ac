"""The seed architectures through slimgraph: every import path, exact passes, an x86 build, and
every structural pass. Each pass either changes the graph (fewer MACs, same output shape) or
declines every site it saw with a reason; nothing crashes."""

import io

import numpy as np
import onnx
import pytest
import torch

from slimgraph.backends.tvm import build
from slimgraph.ir.export_frontend import export_module
from slimgraph.ir.graph import Graph
from slimgraph.passes.base import parse_pipeline
from slimgraph.passes.context import PassContext
from slimgraph.passes.manager import PassManager, VerifyInstrument
from slimgraph.zoo import ZOO

STRUCTURAL = ["prune-channels{ratio=0.25}", "fc-svd", "spatial-svd", "channel-lowrank", "tucker2",
              "cp", "flatten-conv", "spatial-svd{rank=macs=0.5}", "tucker2{rank=macs=0.5}"]


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


@pytest.fixture(scope="module", params=sorted(ZOO))
def zoo_model(request):
    model, (x,) = ZOO[request.param]()
    graph = Graph.from_torch(model, (x,), name=request.param)
    base, _ = PassManager(parse_pipeline("cleanup,fold-bn"), [VerifyInstrument()]).run(
        graph, PassContext(reference=graph))
    return request.param, model, x, base


def test_import_paths_match_pytorch(zoo_model, tmp_path):
    name, model, x, _ = zoo_model
    xb = torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(1))
    want = model(xb).detach().numpy()
    ep, dynamic, _ = export_module(model, (x,))
    torch.export.save(ep, tmp_path / "m.pt2")
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["x"],
                      dynamic_axes={"x": {0: "n"}})
    from slimgraph.ir.loading import load_model

    for path, g in (("pt2", load_model(str(tmp_path / "m.pt2"))),
                    ("onnx", Graph.from_onnx(onnx.load_from_string(buf.getvalue())))):
        assert not g.untranslated(), (path, g.untranslated())
        assert _rel(g.run(xb)[0], want) < 1e-4, path
    assert dynamic, f"{name} should export with a dynamic batch"


def test_fold_bn_is_exact_and_the_x86_build_matches(zoo_model):
    name, model, x, base = zoo_model
    want = model(x).detach().numpy()
    assert _rel(base.run(x)[0], want) < 1e-5
    compiled = build(base.gm, (x,), "x86", tune_trials=0)
    assert _rel(compiled(x)[0], want) < 1e-4


@pytest.mark.parametrize("spec", STRUCTURAL)
def test_structural_pass_changes_or_declines_with_reasons(zoo_model, spec):
    name, _, x, base = zoo_model
    out, (rec,) = PassManager(parse_pipeline(spec), [VerifyInstrument()]).run(
        base, PassContext(reference=base))
    if rec.changed:
        assert rec.stats["macs_after"] < rec.stats["macs_before"], (name, spec)
        assert out.run(x)[0].shape == base.run(x)[0].shape
    else:
        assert rec.skipped and all(s.reason for s in rec.skipped), (name, spec)
