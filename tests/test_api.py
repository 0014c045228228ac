import copy
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import slimgraph
from slimgraph.errors import (
    CalibrationError,
    ModelLoadError,
    PassConfigError,
    ShapeError,
    TargetError,
)
from slimgraph.ir import Graph
from slimgraph.ir.loading import load_calibration, parse_shape
from slimgraph.zoo.models import DigitsCNN, resnet18


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def resnet_result(tmp_path_factory):
    """optimize() of a ResNet-18-style module with fold-bn for x86 (untuned build, to stay fast)."""
    torch.manual_seed(0)
    model = resnet18(width=16, num_classes=10)
    x = torch.randn(1, 3, 64, 64)
    work = tmp_path_factory.mktemp("work")
    return model, x, slimgraph.optimize(model, "x86", pipeline="fold-bn", example_inputs=(x,),
                                        tune_trials=0, workdir=work, benchmark=False, progress=False)


def test_optimize_fold_bn_matches_pytorch(resnet_result):
    model, x, result = resnet_result
    expected = model(x).detach().numpy()
    assert _rel(result.compiled(x)[0], expected) < 1e-4
    assert _rel(result.graph.run(x)[0], expected) < 1e-5


def test_report_shows_fold_bn_with_equal_macs(resnet_result):
    _, _, result = resnet_result
    data = result.report.to_dict()
    assert data["pipeline"] == "fold-bn" and data["target"] == "x86"
    (rec,) = data["passes"]
    assert rec["name"] == "fold-bn" and rec["changed"] and rec["exact"]
    assert rec["stats"]["macs_before"] == rec["stats"]["macs_after"] > 0
    assert rec["stats"]["params_after"] < rec["stats"]["params_before"]
    assert rec["numerics"]["rel_l2"] < 1e-5 and rec["numerics"]["top1_agreement"] == 1.0
    assert set(data["totals"]) >= {"macs_before", "macs_after", "energy_pj_before", "energy_pj_after"}
    backend = data["backend"]
    assert backend["target"] == "x86" and backend["tuned"] is False
    json.dumps(data)  # serializable


def test_save_and_load_round_trip(resnet_result, tmp_path):
    _, x, result = resnet_result
    out = result.save(tmp_path / "art")
    assert {"report.json", "report.html", "model.onnx", "manifest.json"} <= {p.name for p in out.iterdir()}
    loaded = slimgraph.load(out)
    np.testing.assert_allclose(loaded(x)[0], result.compiled(x)[0], rtol=1e-5, atol=1e-6)
    # saving again over an existing directory replaces its outputs and nothing else
    (out / "notes.txt").write_text("mine")
    (out / "runs").mkdir()
    (out / "model.onnx.txt").write_text("stale: this save writes model.onnx")
    result.save(tmp_path / "art")
    assert not list(tmp_path.glob(".art*"))
    assert (out / "notes.txt").read_text() == "mine" and (out / "runs").is_dir()
    assert not (out / "model.onnx.txt").exists()
    np.testing.assert_allclose(slimgraph.load(out)(x)[0], result.compiled(x)[0], rtol=1e-5,
                               atol=1e-6)


def _relabelled(result, pipeline):
    """``result`` as if ``pipeline`` had run (report and manifest say so; same library)."""
    compiled = copy.copy(result.compiled)
    compiled.info = dataclasses.replace(result.compiled.info, pipeline=pipeline)
    report = copy.deepcopy(result.report)
    report.data.pipeline = pipeline
    return dataclasses.replace(result, compiled=compiled, report=report)


def _which(out):
    """The pipeline the artifact in ``out`` says it ran, after checking it loads and agrees."""
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert manifest["pipeline"] == report["pipeline"], "report and library from different saves"
    slimgraph.load(out)  # the library's sha256 matches the manifest
    return manifest["pipeline"]


def test_a_save_killed_after_any_step_leaves_the_old_or_new_artifact(resnet_result, tmp_path):
    from slimgraph.api import SAVED_FILES
    from slimgraph.outputs import replace_outputs_steps

    old, new = _relabelled(resnet_result[2], "old"), _relabelled(resnet_result[2], "new")
    out = tmp_path / "art"
    steps = list(replace_outputs_steps(out, old._write_files, SAVED_FILES, "manifest.json"))
    assert steps[-1] == "renamed"  # a first save renames the whole directory into place
    (out / "notes.txt").write_text("mine")
    (out / "runs").mkdir()
    (out / "runs" / "log").write_text("kept")
    full = list(replace_outputs_steps(out, new._write_files, SAVED_FILES, "manifest.json"))
    assert "exchanged" in full  # this system swaps directories atomically
    for stop in (full.index("linked"), full.index("exchanged")):  # every step: tests/test_outputs.py
        old.save(out)
        gen = replace_outputs_steps(out, new._write_files, SAVED_FILES, "manifest.json")
        for _ in range(stop + 1):
            next(gen)
        del gen  # killed here: no clean-up runs
        assert _which(out) == ("new" if stop >= full.index("exchanged") else "old"), full[stop]
        if full.index("written") <= stop < full.index("removed"):
            assert list(tmp_path.glob(".art.slimgraph-*"))
        new.save(out)  # the next save recovers: user entries back, no temp left
        assert _which(out) == "new"
        assert not list(tmp_path.glob(".art*"))
        assert (out / "notes.txt").read_text() == "mine" and (out / "runs" / "log").read_text() == "kept"
    assert oct(os.stat(out).st_mode & 0o777) != "0o700"  # not mkdtemp's private mode
    assert (out / "report.json").stat().st_mode & 0o044  # readable by others, as open() makes


def test_optimize_from_onnx_file_leaves_it_untouched(tmp_path):
    g = Graph.from_torch(DigitsCNN(), (torch.randn(1, 1, 16, 16),))
    path = g.to_onnx(tmp_path / "digits.onnx")
    before = path.read_bytes()
    result = slimgraph.optimize(str(path), "x86", pipeline="cleanup,fold-bn", compile=False,
                                input_shapes={g.input_names[0]: (1, 1, 16, 16)})
    assert path.read_bytes() == before
    assert result.compiled is None
    assert [p["name"] for p in result.report.to_dict()["passes"]] == ["cleanup", "fold-bn"]


def test_metrics_give_accuracy_before_after_and_after_recovery():
    calls = []

    def metric(graph):
        calls.append(graph)
        return 0.5 + 0.1 * len(calls)

    result = slimgraph.optimize(DigitsCNN(), "x86", pipeline="cleanup,fold-bn", compile=False,
                                example_inputs=(torch.randn(1, 1, 16, 16),), metrics={"acc": metric})
    acc = result.report.to_dict()["accuracy"]
    assert acc["metric"] == "acc" and acc["before"] == pytest.approx(0.6)
    assert acc["after"] == pytest.approx(0.8) and acc["after_recovery"] is None


@pytest.mark.parametrize("kwargs,error,match", [
    ({"model": "missing.onnx"}, ModelLoadError, "not found"),
    ({"model": "model.xyz"}, ModelLoadError, "not found"),
    ({"model": DigitsCNN()}, ShapeError, "example_inputs"),
    ({"model": DigitsCNN(), "pipeline": "fold-bn{nope=1}"}, PassConfigError, "no option 'nope'"),
    ({"model": DigitsCNN(), "target": "riscv"}, TargetError, "riscv"),
])
def test_bad_input_gets_one_clear_error(kwargs, error, match):
    kwargs = {"target": "x86", "compile": False, **kwargs}
    model = kwargs.pop("model")
    target = kwargs.pop("target")
    with pytest.raises(error, match=match):
        slimgraph.optimize(model, target, **kwargs)


def test_calibration_forms():
    g = Graph.from_torch(DigitsCNN(), (torch.randn(1, 1, 16, 16),))
    x = np.random.default_rng(0).standard_normal((70, 1, 16, 16)).astype(np.float32)
    batches, labels = load_calibration(x, g)
    assert [len(b[0]) for b in batches] == [32, 32, 6] and labels is None
    loader = [(torch.tensor(x[:10]), torch.arange(10)), (torch.tensor(x[10:20]), torch.arange(10))]
    batches, labels = load_calibration(loader, g)
    assert len(batches) == 2 and torch.equal(labels[0], torch.arange(10))
    with pytest.raises(CalibrationError, match=r"expects \(N, 1, 16, 16\)"):
        load_calibration(np.zeros((4, 3, 16, 16), np.float32), g)


def test_calibration_dtypes_follow_the_model(caplog):
    g = Graph.from_torch(DigitsCNN(), (torch.randn(1, 1, 16, 16),))
    images = np.random.default_rng(0).integers(0, 255, (8, 1, 16, 16), dtype=np.uint8)
    with caplog.at_level("WARNING", logger="slimgraph"):
        batches, _ = load_calibration(images, g)
    assert batches[0][0].dtype == torch.float32
    assert torch.equal(batches[0][0], torch.from_numpy(images).float())  # cast, not rescaled
    assert "uint8; cast to float32" in caplog.text
    batches, _ = load_calibration(np.zeros((4, 1, 16, 16)), g)  # numpy's float64 default
    assert batches[0][0].dtype == torch.float32
    with pytest.raises(CalibrationError, match="bool"):
        load_calibration(np.zeros((4, 1, 16, 16), bool), g)
    # and optimize() runs with uint8 calibration (the raw RuntimeError the issue saw)
    result = slimgraph.optimize(DigitsCNN().eval(), "x86", example_inputs=(torch.randn(1, 1, 16, 16),),
                                pipeline="fold-bn,prune-channels{ratio=0.25}", calibration=images,
                                compile=False, benchmark=False, progress=False)
    assert result.report.to_dict()["passes"][1]["changed"]


def test_calibration_files(tmp_path):
    g = Graph.from_torch(DigitsCNN(), (torch.randn(1, 1, 16, 16),))
    np.save(tmp_path / "c.npy", np.zeros((8, 1, 16, 16), np.float32))
    np.savez(tmp_path / "c.npz", x=np.zeros((8, 1, 16, 16), np.float32), labels=np.arange(8))
    assert len(load_calibration(tmp_path / "c.npy", g)[0]) == 1
    batches, labels = load_calibration(tmp_path / "c.npz", g)
    assert labels is not None and len(labels[0]) == 8
    with pytest.raises(CalibrationError, match="not found"):
        load_calibration(tmp_path / "nope.npy", g)
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    with pytest.raises(CalibrationError, match="cannot read"):
        load_calibration(tmp_path / "bad.npy", g)


def test_parse_shape():
    assert parse_shape("input=1,3,224,224") == ("input", (1, 3, 224, 224))
    for bad in ("input", "=1,2", "x=1,-2", "x=a,b"):
        with pytest.raises(ShapeError, match="NAME=D0"):
            parse_shape(bad)


def test_pruning_passes_draw_a_sensitivity_chart_in_the_report(tmp_path):
    torch.manual_seed(0)
    result = slimgraph.optimize(
        DigitsCNN(), "x86", compile=False, example_inputs=(torch.randn(1, 1, 16, 16),),
        pipeline="cleanup,prune-channels{target_macs=0.6},fold-bn,prune-weights{sparsity=0.5}")
    passes = {p["name"]: p for p in result.report.to_dict()["passes"]}
    for name in ("prune-channels", "prune-weights"):
        curves = passes[name]["sensitivity"]
        assert curves and all(len(pts) >= 2 for pts in curves.values())
    result.report.save_html(tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    section = html[html.index("<h2>Layer sensitivity</h2>"):]
    assert "<h3>prune-channels</h3>" in section and "<h3>prune-weights</h3>" in section
    assert section.count("<svg") >= 2


def test_export_fallback_model_goes_through_optimize(tmp_path):
    """A model torch.fx cannot trace (SAME padding from the input's shape) is imported through
    torch.export, compressed by fold-bn, a low-rank pass and prune-channels, and compiled; the
    artifact matches PyTorch on a batch evaluated one sample at a time."""
    from tests.ir.test_export_frontend import TfSameNet

    torch.manual_seed(0)
    model = TfSameNet().eval()
    x = torch.randn(1, 3, 16, 16)
    calib = torch.randn(16, 3, 16, 16)
    result = slimgraph.optimize(model, "x86", example_inputs=(x,), calibration=calib,
                                pipeline="cleanup,fold-bn,fc-svd{rank=8},prune-channels{ratio=0.25}",
                                tune_trials=0, workdir=tmp_path, benchmark=False, progress=False)
    assert result.graph.source == "torch.export"
    model_info = result.report.to_dict()["model"]
    assert model_info["fixed_batch"] is None and "torch.fx could not trace" in model_info["notes"][0]
    assert "torch.fx could not trace" in result.report.to_html()
    records = {r["name"]: r for r in result.report.to_dict()["passes"]}
    assert records["fold-bn"]["stats"]["bn_folded"] == 2
    assert records["fc-svd"]["changed"] and records["prune-channels"]["changed"]
    assert records["prune-channels"]["stats"]["macs_after"] < records["prune-channels"]["stats"]["macs_before"]
    batch = torch.randn(4, 3, 16, 16)
    compiled = np.concatenate([result.compiled(batch[i:i + 1])[0] for i in range(4)])
    assert _rel(compiled, result.graph.run(batch)[0]) < 1e-4  # the artifact is the graph
    records_ok = records["prune-channels"]["numerics"]["rel_l2"] < 1.0
    assert records_ok  # compressed, not destroyed


def test_nan_calibration_is_one_clear_error():
    g = Graph.from_torch(DigitsCNN(), (torch.randn(1, 1, 16, 16),))
    data = np.zeros((4, 1, 16, 16), np.float32)
    data[2, 0, 3, 3] = np.nan
    with pytest.raises(CalibrationError, match="NaN or infinite"):
        load_calibration(data, g)


def test_manifest_records_the_pipeline_that_ran(resnet_result, tmp_path):
    _, _, result = resnet_result
    manifest = json.loads((result.save(tmp_path / "art") / "manifest.json").read_text())
    assert manifest["pipeline"] == "fold-bn"  # what ran, not the target's default
    assert slimgraph.load(tmp_path / "art").info.pipeline == "fold-bn"


def test_latency_separates_compression_from_compilation(tmp_path):
    model = DigitsCNN().eval()
    result = slimgraph.optimize(model, "x86", example_inputs=(torch.randn(1, 1, 16, 16),),
                                pipeline="cleanup,fold-bn,fc-svd{rank=8}", tune_trials=0,
                                workdir=tmp_path, progress=False)
    backend = result.report.to_dict()["backend"]
    assert {"slimgraph", "pytorch", "onnxruntime", "pytorch_compressed",
            "onnxruntime_compressed"} <= set(backend["latency_ms"])
    assert set(backend["latency_spread"]) == set(backend["latency_ms"])
    assert all(r >= 3 for r in backend["latency_runs"].values())
    assert "compressed model" in result.report.to_html()
