"""The report's schema: typed records, their JSON form, and the one JSON sanitizer.

Everything slimgraph reports travels as these dataclasses (``Report`` is their root): a pass
produces a ``PassRecord`` (with its ``Fidelity``, ``Skip``s, ``LayerChange``s and
``SensitivityCurves``), a build a ``BuildInfo``, ``optimize`` a ``ReportData`` with the
``ModelInfo``, ``Totals``, per-layer ``LayerRow``s and ``Accuracy``. ``to_dict()`` writes the
JSON form (``SCHEMA_VERSION``; the keys the foundation issue promised), ``from_dict()`` reads it
back; pass-specific data without a field of its own sits in ``extra`` and is written at the
record's top level. The HTML page and the terminal summary are rendered from the records.

``jsonable`` is the only JSON sanitizer: numpy and torch values become numbers and lists,
dataclasses dicts, paths strings, non-finite floats ``null``; anything else is a TypeError
naming where it was.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import math
import os
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

SCHEMA_VERSION = 5  # 2: model.notes/fixed_batch; 3: typed records (same keys); 4: warnings;
# 5: environment (CPU, features, versions, seed, load)


def jsonable(obj: Any, where: str) -> Any:
    """Deep-copy ``obj`` into JSON types; raise TypeError naming the key path otherwise."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        return [jsonable(v, f"{where}[]") for v in sorted(obj, key=str)]
    for kind, convert in _CONVERTERS:
        if kind(obj):
            return jsonable(convert(obj), where)
    raise TypeError(f"{where}: cannot put a {type(obj).__name__} into the JSON report")


def _is_torch(obj: Any, *names: str) -> bool:
    torch = sys.modules.get("torch")  # never import torch just to write a report
    return torch is not None and isinstance(obj, tuple(getattr(torch, n) for n in names))


def _path_or_time(obj: Any) -> str:
    return obj.isoformat() if isinstance(obj, (_dt.datetime, _dt.date)) else os.fspath(obj)


_CONVERTERS: list[tuple[Callable[[Any], bool], Callable[[Any], Any]]] = [
    (lambda o: isinstance(o, (np.generic, np.ndarray)), lambda o: o.tolist()),
    (lambda o: isinstance(o, np.dtype), str),
    (lambda o: _is_torch(o, "Tensor"), lambda o: o.detach().cpu().tolist()),
    (lambda o: _is_torch(o, "dtype"), lambda o: str(o).removeprefix("torch.")),
    (lambda o: isinstance(o, enum.Enum), lambda o: o.value),
    (lambda o: isinstance(o, (os.PathLike, _dt.datetime, _dt.date)), _path_or_time),
    (lambda o: dataclasses.is_dataclass(o) and not isinstance(o, type), dataclasses.asdict),
]



# =============================================================================================
# Typed records
# =============================================================================================
class Record:
    """Base of the schema's dataclasses: JSON form in and out.

    ``_flat`` fields (a dict) are merged into the record's top level when written and collect
    unknown keys when read, so a pass or a build can add data without a schema change.
    """

    _flat: ClassVar[str | None] = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == self._flat:
                out.update({k: _plain(v) for k, v in value.items()})
            else:
                out[f.name] = _plain(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: _typed(hints[k], v) for k, v in data.items() if k in names and k != cls._flat}
        if cls._flat:
            kwargs[cls._flat] = {k: v for k, v in data.items() if k not in names}
        return cls(**kwargs)


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _typed(hint: Any, value: Any) -> Any:
    """``value`` (from JSON) as ``hint``: records, lists and optionals of records rebuilt."""
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _typed(inner[0], value) if len(inner) == 1 else value
    if origin is list and args:
        return [_typed(args[0], v) for v in value]
    if isinstance(hint, type) and issubclass(hint, Record) and isinstance(value, dict):
        return hint.from_dict(value)
    return value


@dataclass
class Fidelity(Record):
    """How close a graph's outputs are to a reference's (``numerics.compare_outputs``)."""

    max_abs: float | None = None
    rel_l2: float | None = None
    cosine: float | None = None
    top1_agreement: float | None = None  # None when the outputs are not class scores
    error: str | None = None  # why the outputs could not be compared (count or shape)


@dataclass(frozen=True)
class Skip(Record):
    """A node a pass declined to rewrite, and why."""

    node: str = "?"
    reason: str = ""


@dataclass
class LayerChange(Record):
    """A node whose MACs or parameters a pass changed (added or removed nodes included)."""

    name: str = "?"
    op: str = ""
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0


@dataclass
class SensitivityCurves(Record):
    """Per layer, [x, y] points of one measured sensitivity (the report draws them)."""

    curves: dict[str, list[list[float]]] = field(default_factory=dict)
    x: str = ""
    y: str = ""


@dataclass
class PassRecord(Record):
    """What one pass did. ``stats`` has macs/params/energy before and after plus the pass's
    own numbers; ``extra`` the pass's structured data (e.g. the channels prune-channels
    removed), written at the top level of the JSON record."""

    _flat: ClassVar[str | None] = "extra"

    name: str = "?"
    spec: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    changed: bool = False
    exact: bool = True
    stats: dict[str, Any] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)
    wall_time_s: float = 0.0
    numerics: Fidelity | None = None
    layers: list[LayerChange] = field(default_factory=list)
    metrics: dict[str, float] | None = None
    sensitivity: SensitivityCurves | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        sens = out.pop("sensitivity")
        if self.metrics is None:
            out.pop("metrics")
        if sens is not None:  # the JSON form: {layer: points} and its axes beside it
            out["sensitivity"], out["sensitivity_axes"] = sens["curves"], {"x": sens["x"], "y": sens["y"]}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PassRecord:
        data = dict(data)
        curves, axes = data.pop("sensitivity", None), data.pop("sensitivity_axes", None) or {}
        record = super().from_dict(data)
        if curves is not None:
            record.sensitivity = SensitivityCurves(curves, axes.get("x", ""), axes.get("y", ""))
        return record


@dataclass
class BuildInfo(Record):
    """How a model was compiled, and (in a report) how it was checked and timed. Keys a target
    or a tool adds beyond these live in ``extra``."""

    _flat: ClassVar[str | None] = "extra"

    target: str = ""
    tvm_target: Any = None
    conv_layout: str | None = None
    trials: int = 0
    trials_measured: int = 0
    tune_time_s: float = 0.0
    tuned: bool = False
    database: str | None = None
    tasks: int | None = None
    tasks_tuned: int | None = None
    stopped_by: str | None = None
    untuned_tasks: list[str] = field(default_factory=list)
    task_table: list[dict[str, Any]] = field(default_factory=list)
    runner: str | None = None
    build_time_s: float = 0.0
    schedules: str = ""
    cuda_kernels: dict[str, Any] | None = None
    pipeline: str | None = None  # the passes that ran before this build (optimize sets it)
    # filled when the report checks and times the build
    numerics_how: str | None = None
    numerics_vs_graph: Fidelity | None = None
    latency_ms: dict[str, float | None] | None = None
    latency_method: str | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TensorInfo(Record):
    name: str = "?"
    shape: list[int] | None = None
    dtype: str = ""


@dataclass
class ModelInfo(Record):
    name: str = "model"
    source: str = "?"
    inputs: list[TensorInfo] = field(default_factory=list)
    outputs: list[TensorInfo] = field(default_factory=list)
    macs: int = 0
    params: int = 0
    fixed_batch: int | None = None
    notes: list[str] = field(default_factory=list)  # how it was imported


@dataclass
class Totals(Record):
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0
    energy_pj_before: float = 0.0
    energy_pj_after: float = 0.0
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0


@dataclass
class LayerRow(Record):
    name: str = "?"
    op: str = ""
    output_shape: list[int] | None = None
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0


@dataclass
class Accuracy(Record):
    """A user metric (fractions in [0, 1]) before the pipeline, after compression, after
    recovery (when a ``finetune`` pass ran)."""

    metric: str = "top1"
    before: float | None = None
    after: float | None = None
    after_recovery: float | None = None
    compiled: float | None = None  # the metric from the compiled artifact, where measured


@dataclass
class ReportData(Record):
    """The root of a report."""

    model: ModelInfo = field(default_factory=ModelInfo)
    passes: list[PassRecord] = field(default_factory=list)
    totals: Totals = field(default_factory=Totals)
    target: str | None = None
    pipeline: str | None = None
    calibration: str | None = None
    layers: list[LayerRow] = field(default_factory=list)
    backend: BuildInfo | None = None
    accuracy: Accuracy | None = None
    warnings: list[str] = field(default_factory=list)  # where the result differs from the request
    environment: dict[str, Any] | None = None  # slimgraph.environment.describe()
    schema_version: int = SCHEMA_VERSION
    slimgraph_version: str = ""
    created: str = ""
