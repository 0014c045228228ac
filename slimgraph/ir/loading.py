"""Turning what a user hands us (module, file, factory spec, calibration data) into IR inputs."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimgraph.errors import CalibrationError, ModelLoadError, ShapeError
from slimgraph.ir.graph import Graph, cast_like, to_tensor

log = logging.getLogger("slimgraph")


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``"input=1,3,224,224"`` -> ("input", (1, 3, 224, 224)); the CLI's --input-shape."""
    name, sep, dims = text.partition("=")
    try:
        if not sep or not name.strip():
            raise ValueError
        shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
        if not shape or any(d <= 0 for d in shape):
            raise ValueError
    except ValueError as err:
        raise ShapeError(f"bad input shape {text!r}: expected NAME=D0,D1,... with positive dims, "
                         "e.g. input=1,3,224,224") from err
    return name.strip(), shape


def load_factory(spec: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """``path/to/file.py:factory`` -> the (module, example_inputs) the factory returns."""
    path_text, _, func = spec.rpartition(":")
    path = Path(path_text)
    if not path.is_file():
        raise ModelLoadError(f"model factory file not found: {path}")
    try:
        mod_name = f"_slimgraph_user_{abs(hash(str(path.resolve())))}"
        loader = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[mod_name] = module
        loader.loader.exec_module(module)
    except SystemExit as err:
        raise ModelLoadError(f"importing {path} called sys.exit({err.code})") from err
    except Exception as err:
        raise ModelLoadError(f"cannot import {path}: {type(err).__name__}: {err}") from err
    factory = getattr(module, func, None)
    if not callable(factory):
        raise ModelLoadError(f"{path} has no callable {func!r}")
    try:
        result = factory()
    except SystemExit as err:
        raise ModelLoadError(f"{spec} called sys.exit({err.code}) instead of returning "
                             "(module, example_inputs)") from err
    except Exception as err:
        raise ModelLoadError(f"{spec} raised {type(err).__name__}: {err}") from err
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        raise ModelLoadError(f"{spec} must return (nn.Module, example_inputs), got {type(result).__name__}")
    module_obj, inputs = result
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    return module_obj, inputs


def load_model(model: Any, example_inputs: Sequence[Any] | None = None,
               input_shapes: Mapping[str, Sequence[int]] | None = None) -> Graph:
    """An nn.Module, an ir.Graph, or a path (``.onnx``, ``.pt2``, ``file.py:factory``) as a Graph."""
    if isinstance(model, Graph):
        return model
    if isinstance(model, nn.Module):
        if example_inputs is None:
            if not input_shapes:
                raise ShapeError("a torch module needs example_inputs (or input_shapes) to fix shapes")
            gen = torch.Generator().manual_seed(0)
            example_inputs = tuple(torch.randn(tuple(s), generator=gen) for s in input_shapes.values())
        return Graph.from_torch(model, example_inputs)
    if isinstance(model, str | os.PathLike):
        text = os.fspath(model)
        if text.endswith(".py") or ".py:" in text:
            if ":" not in text.rsplit(".py", 1)[1]:
                raise ModelLoadError(f"{text}: name the factory, as file.py:factory")
            if input_shapes:
                raise ShapeError("--input-shape / input_shapes sets the shapes of ONNX inputs; a "
                                 "file.py:factory fixes them with the example inputs it returns")
            module, inputs = load_factory(text)
            return Graph.from_torch(module, example_inputs or inputs)
        path = Path(text)
        if not path.exists():
            raise ModelLoadError(f"model file not found: {path}")
        if path.suffix == ".onnx":
            return Graph.from_onnx(path, input_shapes=dict(input_shapes) if input_shapes else None)
        if path.suffix == ".pt2":
            return Graph.from_exported_program(path)
        raise ModelLoadError(f"{path}: unknown model format {path.suffix!r}; use .onnx, .pt2 or file.py:factory")
    raise ModelLoadError(f"cannot load a model from {type(model).__name__}; pass an nn.Module, an "
                         "ir.Graph, or a path to .onnx/.pt2 or file.py:factory")


def _check_batch(batch: tuple[torch.Tensor, ...], graph: Graph, where: str) -> None:
    if len(batch) != len(graph.example_inputs):
        raise CalibrationError(f"{where}: {len(batch)} input(s) per batch, the model takes "
                               f"{len(graph.example_inputs)} ({', '.join(graph.input_names)})")
    for name, x, ex in zip(graph.input_names, batch, graph.example_inputs, strict=True):
        if x.dim() != ex.dim() or tuple(x.shape[1:]) != tuple(ex.shape[1:]):
            raise CalibrationError(f"{where}: input {name!r} has shape {tuple(x.shape)}, the model "
                                   f"expects (N, {', '.join(map(str, ex.shape[1:]))})")


def _split(x: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(torch.split(x, batch_size)) if len(x) else []


def load_calibration(data: Any, graph: Graph, batch_size: int = 32
                     ) -> tuple[list[tuple[torch.Tensor, ...]] | None, list[torch.Tensor] | None]:
    """Calibration samples as (input batches, label batches or None).

    Accepts an array or tensor of samples (N, ...), an iterable of batches (a DataLoader; a
    batch may be a tensor, a tuple of inputs, or (inputs..., labels)), a dict of arrays keyed by
    input name (``labels`` optional), or a path to a ``.npy``/``.npz`` file.
    """
    if data is None:
        return None, None
    n_in = len(graph.example_inputs)
    if isinstance(data, str | os.PathLike):
        data = _read_array_file(Path(data), graph)
    if isinstance(data, Mapping):
        missing = [n for n in graph.input_names if n not in data]
        if missing and n_in == 1 and len([k for k in data if k not in ("labels", "y")]) == 1:
            key = next(k for k in data if k not in ("labels", "y"))
            data = {graph.input_names[0]: data[key], **{k: v for k, v in data.items() if k in ("labels", "y")}}
            missing = []
        if missing:
            raise CalibrationError(f"calibration data lacks input(s) {missing}; keys: {sorted(data)}")
        arrays = [to_tensor(data[n]) for n in graph.input_names]
        labels = data.get("labels", data.get("y"))
        cols = [_split(a, batch_size) for a in arrays]
        batches = list(zip(*cols, strict=True))
        label_batches = _split(to_tensor(labels), batch_size) if labels is not None else None
    elif isinstance(data, np.ndarray | torch.Tensor):
        if n_in != 1:
            raise CalibrationError(f"the model takes {n_in} inputs; pass calibration as a dict by input name")
        batches = [(b,) for b in _split(to_tensor(data), batch_size)]
        label_batches = None
    elif isinstance(data, Iterable):
        batches, label_batches = [], []
        for item in data:
            parts = [item] if isinstance(item, torch.Tensor | np.ndarray) else list(item)
            if len(parts) == n_in + 1:
                label_batches.append(to_tensor(parts.pop()))
            batches.append(tuple(to_tensor(p) for p in parts))
        label_batches = label_batches if label_batches and len(label_batches) == len(batches) else None
    else:
        raise CalibrationError(f"cannot use {type(data).__name__} as calibration data")
    if not batches:
        raise CalibrationError("calibration data is empty")
    for i, b in enumerate(batches):
        _check_batch(b, graph, f"calibration batch {i}")
    batches = [_as_model_dtype(b, graph) for b in batches]
    for i, batch in enumerate(batches):
        for name, x in zip(graph.input_names, batch, strict=True):
            if x.is_floating_point() and not torch.isfinite(x).all():
                raise CalibrationError(f"calibration batch {i}: input {name!r} holds NaN or "
                                       "infinite values")
    return batches, label_batches


def _as_model_dtype(batch: tuple[torch.Tensor, ...], graph: Graph) -> tuple[torch.Tensor, ...]:
    """Samples in the dtype of the model's inputs: float64 arrays become float32 for a float32
    model, and integer images (uint8 as stored) are cast, values unchanged, with a warning."""
    out = []
    for name, x, ex in zip(graph.input_names, batch, graph.example_inputs, strict=True):
        if ex.is_floating_point() and not x.is_floating_point():
            if x.dtype == torch.bool or x.is_complex():
                raise CalibrationError(f"calibration input {name!r} is {_dtype(x)}; the model "
                                       f"takes {_dtype(ex)}")
            _warn_once(f"calibration input {name!r} is {_dtype(x)}; cast to {_dtype(ex)} with "
                       "values unchanged (not rescaled: normalize it as the model expects)")
            x = x.to(ex.dtype)
        out.append(cast_like(x, ex))
    return tuple(out)


def _dtype(x: torch.Tensor) -> str:
    return str(x.dtype).removeprefix("torch.")


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


def _read_array_file(path: Path, graph: Graph) -> Any:
    if not path.is_file():
        raise CalibrationError(f"calibration file not found: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as err:
        raise CalibrationError(f"cannot read calibration file {path}: {err}") from err
    if isinstance(loaded, np.ndarray):
        return loaded
    return {k: loaded[k] for k in loaded.files}
