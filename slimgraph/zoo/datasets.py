"""The demo data set and the trained demo model.

Data: scikit-learn's bundled ``load_digits`` (1797 8x8 grey images, values 0..16, 10 classes;
shipped inside the scikit-learn wheel, nothing is downloaded). Preprocessing, in order:

1. scale to [0, 1] (divide by 16);
2. a fixed stratified split, 60 / 20 / 20 (train / val / test), seeded;
3. standardize with the *train* split's scalar mean and std (one value for all pixels);
4. upsample to 16x16 with bilinear interpolation (``align_corners=False``) -> (N, 1, 16, 16).

Model: ``DigitsCNN`` with the weights in ``slimgraph/data/digits_cnn.pt``, trained by
``tools/train_digits.py`` (its metadata, including the accuracies it reached, is in
``slimgraph/data/digits_cnn.json``).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slimgraph.errors import CalibrationError, ModelLoadError
from slimgraph.zoo.models import DigitsCNN

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
WEIGHTS_PATH = DATA_DIR / "digits_cnn.pt"
METADATA_PATH = DATA_DIR / "digits_cnn.json"

IMAGE_SIZE = 16
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)  # train, val, test
_SPLIT_KEYS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")


def load_digits_split(seed: int = 0) -> dict[str, torch.Tensor]:
    """The digits data set as float32 images (N, 1, 16, 16) and int64 labels, split 60/20/20.

    Returns a fresh dict (callers may modify it) with keys ``x_train, y_train, x_val, y_val,
    x_test, y_test`` plus the scalar standardization constants ``mean`` and ``std`` (computed on
    the train split, in [0, 1] pixel units, as 0-d tensors).
    """
    cached = _load_split_cached(int(seed))
    return {k: v.clone() for k, v in cached.items()}


@functools.lru_cache(maxsize=4)
def _load_split_cached(seed: int) -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # (N, 8, 8) in [0, 1]
    labels = digits.target.astype(np.int64)
    index = np.arange(len(labels))
    _, val_frac, test_frac = SPLIT_FRACTIONS
    rest, test = train_test_split(index, test_size=test_frac, stratify=labels, random_state=seed)
    train, val = train_test_split(
        rest, test_size=val_frac / (1.0 - test_frac), stratify=labels[rest], random_state=seed
    )
    mean = float(images[train].mean())
    std = float(images[train].std())
    out: dict[str, torch.Tensor] = {}
    for split, idx in (("train", train), ("val", val), ("test", test)):
        x = torch.from_numpy((images[idx] - mean) / std).unsqueeze(1)
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        out[f"x_{split}"] = x.contiguous().float()
        out[f"y_{split}"] = torch.from_numpy(labels[idx])
    out["mean"] = torch.tensor(mean)
    out["std"] = torch.tensor(std)
    return out


def calibration_set(n: int = 256, seed: int = 0) -> torch.Tensor:
    """The first ``n`` train images (N, 1, 16, 16), no labels, for passes that calibrate.

    The train split is already in a seeded random order, so this is a class-mixed sample.
    Asking for more images than the train split holds returns the whole train split.
    """
    if int(n) <= 0:
        raise CalibrationError(f"calibration_set needs n >= 1, got {n}")
    return load_digits_split(seed)["x_train"][: int(n)]


def _to_numpy_logits(out: Any) -> np.ndarray:
    """First output of a model call as a 2-D numpy array of logits."""
    if isinstance(out, (list, tuple)):
        if not out:
            raise TypeError("the model returned an empty list of outputs")
        out = out[0]
    if isinstance(out, torch.Tensor):
        return out.detach().cpu().float().numpy()
    arr = out.numpy() if hasattr(out, "numpy") and not isinstance(out, np.ndarray) else out
    return np.asarray(arr)


def evaluate_accuracy(
    model_or_callable: nn.Module | Callable[[Any], Any],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 256,
    numpy_inputs: bool = False,
) -> float:
    """Top-1 accuracy in [0, 1] of a model on ``(x, y)``, evaluated in batches.

    Works with an ``nn.Module`` (a ``torch.fx.GraphModule`` included: run in eval mode under
    ``torch.no_grad``, its train/eval mode restored afterwards) or any callable whose first
    output is the logits: a tensor, a numpy array, or a list/tuple of them (ONNX Runtime and
    TVM runners return lists of numpy arrays). Callables get torch tensors, or contiguous
    float32 numpy arrays when ``numpy_inputs=True``. Use ``batch_size=1`` for artifacts
    compiled for a static batch of one.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    if len(y) == 0:
        raise ValueError("cannot evaluate accuracy on an empty set")
    was_training = isinstance(model_or_callable, nn.Module) and model_or_callable.training
    if was_training:
        model_or_callable.eval()
    try:
        correct = 0
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                xb = x[start : start + batch_size]
                inp = np.ascontiguousarray(xb.numpy(), dtype=np.float32) if numpy_inputs else xb
                logits = _to_numpy_logits(model_or_callable(inp))
                pred = logits.reshape(len(xb), -1).argmax(axis=1)
                correct += int((pred == y[start : start + batch_size].numpy()).sum())
    finally:
        if was_training:
            model_or_callable.train()
    return correct / len(y)


def load_metadata() -> dict[str, Any]:
    """The training record written next to the shipped weights (``digits_cnn.json``)."""
    try:
        return json.loads(METADATA_PATH.read_text())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read the demo model's metadata {METADATA_PATH}") from err


def demo_model(seed: int = 0) -> tuple[DigitsCNN, tuple[torch.Tensor]]:
    """The trained ``DigitsCNN`` in eval mode and ``example_inputs=(x_test[:1],)``."""
    model = DigitsCNN()
    try:
        state = torch.load(WEIGHTS_PATH, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (OSError, RuntimeError, ValueError) as err:
        raise ModelLoadError(
            f"cannot load the demo weights {WEIGHTS_PATH}; re-create them with "
            "`python tools/train_digits.py`"
        ) from err
    model.eval()
    return model, (load_digits_split(seed)["x_test"][:1],)


def digits_factory() -> tuple[DigitsCNN, tuple[torch.Tensor]]:
    """``file.py:factory`` style entry for the CLI: same as ``demo_model()``."""
    return demo_model()
