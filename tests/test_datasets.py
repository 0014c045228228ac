"""The digits split, the accuracy helper, and the shipped demo weights."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.fx

from slimgraph.errors import CalibrationError, ModelLoadError
from slimgraph.zoo import datasets
from slimgraph.zoo.datasets import (
    calibration_set,
    demo_model,
    digits_factory,
    evaluate_accuracy,
    load_digits_split,
    load_metadata,
)
from slimgraph.zoo.models import DigitsCNN

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def split():
    return load_digits_split()


@pytest.fixture(scope="module")
def trained():
    model, example = demo_model()
    return model, example


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.tobytes() for row in x.reshape(len(x), -1).numpy()}


def test_split_shapes_and_dtypes(split):
    sizes = {s: len(split[f"y_{s}"]) for s in SPLITS}
    assert sizes == {"train": 1077, "val": 360, "test": 360}
    for s in SPLITS:
        assert split[f"x_{s}"].shape == (sizes[s], 1, 16, 16)
        assert split[f"x_{s}"].dtype == torch.float32
        assert split[f"y_{s}"].dtype == torch.int64


def test_split_is_disjoint_and_complete(split):
    # load_digits has no duplicate images, so image bytes identify samples.
    rows = {s: _rows(split[f"x_{s}"]) for s in SPLITS}
    assert all(len(rows[s]) == len(split[f"y_{s}"]) for s in SPLITS)
    assert not rows["train"] & rows["val"]
    assert not rows["train"] & rows["test"]
    assert not rows["val"] & rows["test"]
    assert sum(len(r) for r in rows.values()) == 1797


def test_split_is_stratified(split):
    total = sum(torch.bincount(split[f"y_{s}"], minlength=10) for s in SPLITS)
    for s, frac in zip(SPLITS, datasets.SPLIT_FRACTIONS, strict=True):
        counts = torch.bincount(split[f"y_{s}"], minlength=10).double()
        assert torch.all((counts - frac * total).abs() <= 1.5), (s, counts.tolist())


def test_split_is_standardized_with_train_statistics(split):
    # Standardization happens before the (mean-preserving in the interior) upsampling,
    # so the train split is close to zero mean and unit std, not exactly.
    assert abs(float(split["x_train"].mean())) < 0.05
    assert 0.8 < float(split["x_train"].std()) < 1.1
    again = load_digits_split()
    assert torch.equal(again["x_test"], split["x_test"])
    again["x_test"].zero_()  # a caller's copy: the cache must not change
    assert torch.equal(load_digits_split()["x_test"], split["x_test"])


def test_shipped_weights_match_metadata(trained, split):
    meta = load_metadata()
    digest = hashlib.sha256(datasets.WEIGHTS_PATH.read_bytes()).hexdigest()
    assert digest == meta["sha256"], "digits_cnn.pt differs from the file digits_cnn.json describes"
    model, _ = trained
    acc = evaluate_accuracy(model, split["x_test"], split["y_test"])
    assert meta["test_accuracy"] > 0.95
    assert acc >= meta["test_accuracy"] - 0.005


def test_demo_model_and_factory(trained, split):
    model, example = trained
    assert isinstance(model, DigitsCNN) and not model.training
    assert len(example) == 1 and example[0].shape == (1, 1, 16, 16)
    assert torch.equal(example[0], split["x_test"][:1])
    model2, example2 = digits_factory()
    assert torch.equal(model2(example2[0]), model(example[0]))


def test_evaluate_accuracy_module_graphmodule_and_numpy_callable(trained, split):
    model, _ = trained
    x, y = split["x_test"], split["y_test"]
    ref = evaluate_accuracy(model, x, y)
    gm = torch.fx.symbolic_trace(model)
    assert evaluate_accuracy(gm, x, y) == ref

    def numpy_runner(arr):  # the shape of an ONNX Runtime / TVM runner: numpy in, list out
        assert isinstance(arr, np.ndarray) and arr.dtype == np.float32
        with torch.no_grad():
            return [model(torch.from_numpy(arr)).numpy()]

    assert evaluate_accuracy(numpy_runner, x, y, batch_size=100, numpy_inputs=True) == ref
    assert evaluate_accuracy(lambda t: [model(t).numpy()], x, y, batch_size=7) == ref
    assert evaluate_accuracy(lambda t: model(t), x[:20], y[:20], batch_size=1) == (
        evaluate_accuracy(model, x[:20], y[:20])
    )


def test_evaluate_accuracy_counts_and_restores_mode(split):
    x, y = split["x_val"][:10], split["y_val"][:10]

    def oracle(t):
        return torch.nn.functional.one_hot(y[: len(t)], 10).float()

    assert evaluate_accuracy(oracle, x, y, batch_size=10) == 1.0
    wrong = (y + 1) % 10
    assert evaluate_accuracy(lambda t: torch.nn.functional.one_hot(wrong, 10).float(), x, y,
                             batch_size=10) == 0.0
    model = DigitsCNN().train()
    evaluate_accuracy(model, x, y)
    assert model.training
    with pytest.raises(ValueError):
        evaluate_accuracy(model, x, y[:5])


def test_calibration_set(split):
    calib = calibration_set(32)
    assert calib.shape == (32, 1, 16, 16)
    assert torch.equal(calib, split["x_train"][:32])
    assert len(calibration_set(10_000)) == len(split["x_train"])
    with pytest.raises(CalibrationError):
        calibration_set(0)


def test_missing_weights_is_a_model_load_error(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "WEIGHTS_PATH", tmp_path / "nope.pt")
    with pytest.raises(ModelLoadError, match="train_digits"):
        demo_model()


@pytest.mark.slow
def test_training_is_deterministic(tmp_path):
    digests = []
    for run in ("a", "b"):
        out = tmp_path / run
        subprocess.run(
            [sys.executable, str(REPO / "tools" / "train_digits.py"), "--epochs", "1",
             "--out-dir", str(out)],
            check=True, capture_output=True, timeout=300,
        )
        digests.append(json.loads((out / "digits_cnn.json").read_text())["sha256"])
    assert digests[0] == digests[1]
