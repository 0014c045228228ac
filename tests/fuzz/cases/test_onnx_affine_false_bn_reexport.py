"""Fuzz case: onnx invariant on the onnx path after import (seeds 21524, 21775 of the
1,000-graph run, re-checked after the affine=False import change).

Diagnosis: a BatchNorm2d(affine=False) imported from ONNX (scale 1, bias 0 -> affine=False)
behind a Reshape whose shape is computed: torch's ONNX exporter builds the missing scale and
bias from the channel count, which its shape inference lost, and ``Graph.to_onnx`` failed
("batch_norm for unknown channel size"). Fixed: ``to_onnx`` gives such layers explicit ones and
zeros in its export copy (``canonical.explicit_batch_norm_affine``). A regression test.
"""

import pytest

from tools.fuzz import build, generate, run_model


@pytest.mark.parametrize("seed", [21524, 21775])
def test_onnx_imported_affine_false_batch_norm_exports_again(seed, tmp_path):
    model, x = build(generate(seed))
    result = run_model(model, x, seed=seed, tmp=tmp_path, paths=["onnx"], passes={"fold-bn": "fold-bn"},
                       compile_targets=[], checks=["onnx"])
    assert not [f for f in result.findings if f.invariant == "onnx"], result.findings[0].message
