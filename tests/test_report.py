"""Report: JSON round trip, the HTML page, the terminal summary, atomic writes."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch

from slimgraph.report import Report

HOSTILE = "<script>alert('x')</script>"


def _layer(name, op, shape, mb, ma, pb, pa):
    return {"name": name, "op": op, "output_shape": shape, "macs_before": mb, "macs_after": ma,
            "params_before": pb, "params_after": pa}


def full_report() -> dict:
    layers = [
        _layer("features.0", "conv2d", [1, 32, 16, 16], 73728, 73728, 288, 288),
        _layer("features.3", "conv2d", [1, 32, 16, 16], 2359296, 884736, 9216, 3456),
        _layer(HOSTILE, "conv2d", [1, 64, 8, 8], 1179648, 442368, 18432, 6912),
        _layer("price_$x^2$", "linear", [1, 10], 1280, 1280, 1290, 1290),
    ]
    return {
        "slimgraph_version": "0.1.0",
        "created": "2025-01-01T00:00:00+00:00",
        "model": {"name": "DigitsCNN", "source": "torch",
                  "inputs": [{"name": "x", "shape": torch.Size([1, 1, 16, 16]),
                              "dtype": torch.float32}],
                  "outputs": [{"name": "logits", "shape": (1, 10), "dtype": np.dtype("float32")}],
                  "macs": np.int64(3613952), "params": 29226},
        "target": "x86",
        "pipeline": "fold-bn,tucker2{rank=vbmf}",
        "passes": [
            {"name": "fold-bn", "options": {}, "changed": True, "exact": True,
             "stats": {"macs_before": 3613952, "macs_after": 3613952,
                       "params_before": 29418, "params_after": 29226, "folded": np.int32(2)},
             "skipped": [], "wall_time_s": 0.0123,
             "numerics": {"max_abs": np.float32(2e-6), "rel_l2": 4.1e-7, "cosine": 1.0,
                          "top1_agreement": 1.0}},
            {"name": "tucker2", "options": {"rank": "vbmf"}, "changed": True, "exact": False,
             "stats": {"macs_before": 3613952, "macs_after": 1402112,
                       "params_before": 29226, "params_after": 11946},
             "skipped": [{"node": HOSTILE, "reason": "grouped conv & <b>bold</b>"}],
             "wall_time_s": 0.41,
             "numerics": {"max_abs": 0.3, "rel_l2": 0.042, "cosine": 0.9991,
                          "top1_agreement": torch.tensor(0.992)},
             "layers": [_layer("features.3", "conv2d", None, 2359296, 884736, 9216, 3456)],
             "sensitivity": {"features.3": [[0.1, 0.5], [0.5, 0.9], [1.0, 1.0]],
                             HOSTILE: np.array([[0.1, 0.7], [1.0, 1.0]])}},
        ],
        "totals": {"macs_before": 3613952, "macs_after": 1402112, "params_before": 29226,
                   "params_after": 11946, "energy_pj_before": 1.8e7, "energy_pj_after": 7.1e6,
                   "weight_bytes_before": 116904, "weight_bytes_after": 47784},
        "layers": layers,
        "accuracy": {"metric": "top1", "before": 1.0, "after": 0.983, "after_recovery": None},
        "backend": {"target": "x86", "tvm_target": "llvm -mcpu=skylake", "build_time_s": 3.2,
                    "tune_time_s": 0.0, "trials": 0, "trials_measured": 0, "tuned": False,
                    "latency_ms": {"slimgraph": 0.08, "pytorch": 0.29, "onnxruntime": None},
                    "note": "untuned"},
    }


def minimal_report() -> dict:
    return {"model": {"name": "m"}, "passes": [{"name": "cleanup"}], "totals": {}}


def _strict_json(text: str):
    def reject(const):
        raise ValueError(f"non-standard JSON constant {const}")

    return json.loads(text, parse_constant=reject)


# ---- JSON ---------------------------------------------------------------------------------------
def test_json_round_trip(tmp_path):
    report = Report(full_report())
    path = report.save_json(tmp_path / "report.json")
    loaded = Report.load_json(path)
    assert loaded.to_dict() == report.to_dict()
    data = _strict_json(path.read_text())
    assert data["model"]["inputs"][0] == {"name": "x", "shape": [1, 1, 16, 16], "dtype": "float32"}
    assert data["model"]["outputs"][0]["dtype"] == "float32"
    assert data["model"]["macs"] == 3613952 and isinstance(data["model"]["macs"], int)
    assert data["passes"][0]["stats"]["folded"] == 2
    assert data["passes"][1]["numerics"]["top1_agreement"] == pytest.approx(0.992)
    assert data["passes"][1]["sensitivity"][HOSTILE] == [[0.1, 0.7], [1.0, 1.0]]


def test_to_dict_is_a_deep_copy_and_strict():
    src = full_report()
    src["passes"][0]["numerics"]["rel_l2"] = float("nan")
    report = Report(src)
    out = report.to_dict()
    assert out["passes"][0]["numerics"]["rel_l2"] is None  # strict JSON has no NaN
    out["passes"][0]["name"] = "changed"
    out["layers"].clear()
    assert report.data.passes[0].name == "fold-bn"
    assert len(report.data.layers) == 4
    _strict_json(report.to_json())
    assert copy.deepcopy(out) == out


def test_unserializable_value_names_its_place():
    data = minimal_report()
    data["passes"][0]["options"] = {"callback": object()}
    with pytest.raises(TypeError, match=r"passes\[0\]\.options\.callback"):
        Report(data).to_dict()


# ---- HTML ---------------------------------------------------------------------------------------
def test_html_has_every_pass_and_escapes_text(tmp_path):
    page = Report(full_report()).save_html(tmp_path / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    for name in ("fold-bn", "tucker2", "DigitsCNN", "features.3", "llvm -mcpu=skylake"):
        assert name in page
    assert "<script" not in page.lower()  # neither the hostile name nor any script of ours
    assert "&lt;script&gt;" in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "grouped conv &amp;" in page
    assert "<details>" in page and "1 skipped node" in page


def test_html_is_self_contained(tmp_path):
    page = Report(full_report()).to_html()
    lowered = page.lower()
    for needle in ("<script", "<link", "<iframe", "src=\"http", "@import", "url(http"):
        assert needle not in lowered
    assert page.count("<svg") >= 3  # layers, sensitivity, latency charts inline
    assert "price_$x^2$" in page  # mathtext is off: a '$' in a name is plain text


def test_html_headline_numbers():
    page = Report(full_report()).to_html()
    assert "2.58×" in page  # MACs 3613952 -> 1402112
    assert "2.45×" in page  # params
    assert "3.62x faster than PyTorch" in page  # 0.29 / 0.08
    assert "98.3%" in page


def test_many_layers_chart_is_capped_but_table_lists_all():
    data = full_report()
    data["layers"] = [_layer(f"conv{i}", "conv2d", [1, 8, 4, 4], 1000 + i, 500, 10, 5)
                      for i in range(75)]
    page = Report(data).to_html()
    assert "60 of 75 layers" in page
    assert "Per-layer table (75 layers)" in page and "conv0" in page


@pytest.mark.parametrize("mutate", [
    lambda d: None,
    lambda d: d.update(backend={"target": "x86", "latency_ms": None}),
    lambda d: d.update(backend=None, accuracy=None, layers=None),
    lambda d: d["passes"].append({"name": "odd", "numerics": None, "stats": None,
                                  "skipped": None, "sensitivity": {"l": []}}),
    lambda d: d.update(totals={"macs_before": 10, "macs_after": 0}),
])
def test_missing_optional_sections_do_not_crash(tmp_path, mutate):
    data = minimal_report()
    mutate(data)
    report = Report(data)
    page = report.to_html()
    assert "cleanup" in page and "<h2>Passes</h2>" in page
    assert "Latency" not in page and "Layer sensitivity" not in page
    assert "cleanup" in report.summary()
    Report.load_json(report.save_json(tmp_path / "r.json"))


def test_full_report_minus_each_optional_key():
    for key in ("accuracy", "backend", "layers", "created", "slimgraph_version", "target"):
        data = full_report()
        del data[key]
        assert "tucker2" in Report(data).to_html()
        assert "tucker2" in Report(data).summary()


# ---- atomic writes ------------------------------------------------------------------------------
def test_atomic_write_leaves_no_temp_files(tmp_path):
    report = Report(full_report())
    report.save_json(tmp_path / "r.json")
    report.save_html(tmp_path / "r.html")
    report.save_html(tmp_path / "r.html")  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "r.json"]
    assert oct((tmp_path / "r.json").stat().st_mode & 0o777) != oct(0o600)


def test_failed_write_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    path.write_text("old")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        Report(full_report()).save_json(path)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


# ---- summary ------------------------------------------------------------------------------------
def test_summary_lists_passes_and_numbers():
    text = Report(full_report()).summary()
    lines = text.splitlines()
    assert "DigitsCNN" in lines[0] and "fold-bn,tucker2{rank=vbmf}" in lines[0]
    row = next(line for line in lines if line.startswith("tucker2"))
    assert "3.61 M -> 1.4 M" in row
    assert "29.2 k -> 11.9 k" in row
    assert "4.20e-02" in row and "0.99910" in row and "99.2%" in row and "0.41 s" in row
    assert any(line.startswith("fold-bn") for line in lines)
    assert "(2.58x)" in text and "(2.45x)" in text
    assert "accuracy (top1): 100.0% -> 98.3%" in text
    assert "PyTorch 0.29 ms (slimgraph 3.62x faster)" in text and "ONNX Runtime" not in text


# ---- the sections an engineer reads: trade-off, kernels, training, environment -------------------
def test_tradeoff_kernels_training_and_environment_sections():
    data = full_report()
    data["passes"].append({
        "name": "finetune", "changed": True, "exact": False,
        "stats": {"macs_before": 1402112, "macs_after": 1402112, "loss_per_epoch": [0.9, 0.4, 0.2]},
        "numerics": {"rel_l2": 0.02, "cosine": 0.9998, "top1_agreement": 0.998}})
    data["backend"]["task_table"] = [
        {"task": "fused_conv2d_add_relu", "calls": 2, "mflops": 4.7, "planned": 64, "trials": 64,
         "best_us": 21.5},
        {"task": "fused_dense_add", "calls": 1, "mflops": 0.01, "planned": 0, "trials": 0, "best_us": None}]
    data["environment"] = {"cpu": "Test CPU 9000", "machine": "x86_64", "cores": 2,
                           "kernel_features": ["avx2", "avx512_vnni"], "os": "Linux",
                           "versions": {"torch": "2.13.0"}, "seed": 0, "load_average": [0.5, 0.4, 0.3]}
    report = Report(data)
    page = report.to_html()
    for heading in ("Trade-off", "Kernels", "Recovery training", "Environment"):
        assert f"<h2>{heading}</h2>" in page, heading
    assert "top-1 agreement with the original" in page
    assert "default schedule" in page and "fused_conv2d_add_relu" in page
    kernels = page[page.index("<h2>Kernels</h2>"):page.index("<h2>Backend</h2>")]
    assert "43.0" in kernels and "100.0%" in kernels  # calls x best, share of the tuned time
    assert "Test CPU 9000" in page and "avx512_vnni" in page
    assert "measured on: Test CPU 9000, 2 cores (avx2 avx512_vnni), load 0.5" in report.summary()
    assert Report(report.to_dict()).to_dict()["environment"]["cpu"] == "Test CPU 9000"


def test_tradeoff_plot_needs_two_points_on_an_axis():
    data = full_report()
    data["passes"] = data["passes"][1:]  # one changed pass: no MAC curve
    page = Report(data).to_html()
    assert "<h2>Trade-off</h2>" in page  # but the latency axis has slimgraph and PyTorch
    del data["backend"]["latency_ms"]
    assert "Trade-off" not in Report(data).to_html()


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["backend"].update(trials=32, tasks=40, tuned=True, untuned_tasks=[f"k{i}" for i in range(8)]),
     "8 of 40 kernels kept TVM's default (slow) schedules: 32 tuning trials for 40 kernels"),
    (lambda d: d["backend"].update(latency_spread={"slimgraph": 2.3}),
     "noisy latency (p90/p10 above 1.5: slimgraph 2.3)"),
    (lambda d: d["backend"]["latency_ms"].update(slimgraph=0.5, onnxruntime=0.2),
     "slimgraph is 2.5x slower than ONNX Runtime"),
    (lambda d: d["accuracy"].update(after=0.9), "top1 fell from 100.0% to 90.0%"),
    (lambda d: d["passes"][1].update(changed=False, stats={}),
     "tucker2 changed nothing: grouped conv"),
    (lambda d: d["passes"][1]["stats"].update(target_met=False), "the MAC target was not met"),
    (lambda d: d["backend"].update(numerics_vs_graph=None), "artifact's numerics were not checked"),
])
def test_each_result_that_differs_from_the_request_is_a_warning(mutate, expected):
    data = full_report()
    data["backend"]["numerics_vs_graph"] = {"max_abs": 1e-6, "rel_l2": 1e-7}
    mutate(data)
    report = Report(Report(data).to_dict())  # warnings are computed from the data
    from slimgraph.report import result_warnings

    warnings = result_warnings(report.data)
    assert any(expected in w for w in warnings), warnings
    report.data.warnings = warnings
    assert any(expected in line for line in report.summary().splitlines() if line.startswith("warning: "))
    assert "Not what was asked" in report.to_html()


def test_per_layer_table_says_what_each_pass_chose():
    data = full_report()
    data["passes"][1]["stats"]["ranks"] = {"features.3": [4, 6]}
    data["passes"].append({"name": "prune-channels", "changed": True, "stats": {},
                           "removed": {"features.0": {"out": [1, 5]}, "features.3": {"in": [1, 5]}}})
    data["passes"].append({"name": "prune-weights", "changed": True,
                           "stats": {"layer_sparsity": {"price_$x^2$": 0.5}}})
    page = Report(data).to_html()
    table = page[page.index("Per-layer table"):]
    assert "tucker2: rank [4, 6]; prune-channels: -2 in channels" in table
    assert "prune-channels: -2 out channels" in table and "prune-weights: 50% zero" in table
