"""The report's schema: its version, and the one conversion of values into JSON.

``jsonable`` is the only JSON sanitizer: the report, the pass records and the manifest go
through it. numpy and torch values become numbers and lists, dataclasses dicts, paths strings,
non-finite floats ``null``; anything else is a TypeError naming where it was.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

SCHEMA_VERSION = 2  # 2: model.notes / model.fixed_batch


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
