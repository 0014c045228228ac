"""Pass, PassResult, the registry, and the one pipeline syntax used everywhere.

A pass is a frozen dataclass: its fields are its options, validated in ``__post_init__``
(raise ``PassConfigError``). ``run`` must not mutate its input graph; it returns a new graph
in a ``PassResult`` with what it changed and what it declined (node, reason).

Pipeline syntax (CLI, API, reports): ``cleanup,fold-bn,fc-svd{energy=0.9,min_rank=2}``.
Values are parsed as int, float, bool (true/false), none, or else kept as strings.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from slimgraph.errors import PassConfigError
from slimgraph.ir.analysis import Analysis
from slimgraph.schema import SensitivityCurves, Skip

if TYPE_CHECKING:
    from slimgraph.ir.graph import Graph
    from slimgraph.passes.context import PassContext


@dataclass
class PassResult:
    graph: Any  # ir.Graph
    changed: bool
    skipped: list[Skip] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)  # pass-specific numbers for the report
    preserved: tuple[type[Analysis], ...] | None = None  # overrides the class's ``preserves`` when set
    extra: dict[str, Any] = field(default_factory=dict)  # pass-specific structured data
    sensitivity: SensitivityCurves | None = None  # measured per-layer sensitivity (report chart)


@dataclass(frozen=True)
class Pass(ABC):
    """Base class of every pass. Subclasses are ``@register_pass @dataclass(frozen=True)``."""

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True  # exact passes must match the reference to 1e-5
    requires: ClassVar[tuple[type[Analysis], ...]] = ()  # analyses it reads (prefetched)
    preserves: ClassVar[tuple[type[Analysis], ...]] = ()  # analyses still valid on its output
    # What the record says when the pass changed nothing and declined nothing: a pass never
    # silently does nothing (the pass manager adds this as a skip on the whole graph).
    nothing_found: ClassVar[str] = "found nothing it rewrites in this graph"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:  # noqa: B027 - optional hook
        """Check option values; raise ``PassConfigError`` naming the option and the range."""

    @abstractmethod
    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Rewrite a copy of ``graph``; never mutate ``graph`` itself. ``ctx`` holds the run
        data (calibration, labels, reference, seed, target) and the analysis cache
        (``ctx.analyses.get(Cost, graph)``)."""

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def spec(self) -> str:
        """This pass in pipeline syntax, listing only options that differ from the defaults."""
        changed = {}
        for f in dataclasses.fields(self):
            default = f.default if f.default is not dataclasses.MISSING else None
            if getattr(self, f.name) != default:
                changed[f.name] = getattr(self, f.name)
        if not changed:
            return self.name
        return self.name + "{" + ",".join(f"{k}={_format_value(v)}" for k, v in changed.items()) + "}"


@dataclass(frozen=True)
class OptionDoc:
    """One option of a pass, for ``slimgraph passes NAME``."""

    name: str
    type: str
    default: Any
    choices: tuple[Any, ...]
    meaning: str


def option_docs(cls: type[Pass]) -> list[OptionDoc]:
    """Each option of ``cls``: its type, default, allowed values (Literal types) and meaning
    (the comment on the field's line in the pass's source, inherited fields included)."""
    hints = typing.get_type_hints(cls)
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^    (\w+): [^\n#]+?#\s*(.+)$", source, re.M):
            comments[m.group(1)] = m.group(2).strip()
    docs = []
    for f in dataclasses.fields(cls):
        hint = hints.get(f.name)
        args = typing.get_args(hint) if hint is not None else ()
        choices = tuple(c for a in (hint, *args) if typing.get_origin(a) is typing.Literal
                        for c in typing.get_args(a))
        docs.append(OptionDoc(f.name, _hint_name(hint), f.default, choices, comments.get(f.name, "")))
    return docs


PASS_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    if not cls.name or not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", cls.name):
        raise TypeError(f"{cls.__name__}.name must be kebab-case, got {cls.name!r}")
    if cls.name in PASS_REGISTRY and PASS_REGISTRY[cls.name] is not cls:
        raise TypeError(f"pass name {cls.name!r} registered twice")
    PASS_REGISTRY[cls.name] = cls
    return cls


def available_passes() -> dict[str, type[Pass]]:
    import slimgraph.passes  # noqa: F401  (registers the built-in passes)

    return dict(sorted(PASS_REGISTRY.items()))


def create_pass(name: str, **options: Any) -> Pass:
    passes = available_passes()
    if name not in passes:
        raise PassConfigError(f"unknown pass {name!r}; available: {', '.join(passes)}")
    cls = passes[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in options.items():
        if key not in fields:
            known = ", ".join(fields) or "none"
            raise PassConfigError(f"pass {name!r} has no option {key!r}; its options: {known}")
        options[key] = _coerce(name, key, value, hints.get(key))
    try:
        return cls(**options)
    except PassConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise PassConfigError(f"pass {name!r}: bad options {options}: {err}") from err


def _coerce(pass_name: str, key: str, value: Any, hint: Any) -> Any:
    """Check a value against the option's type hint; ints are accepted where floats are."""
    if hint is None or hint is Any:
        return value
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    base = [typing.get_origin(a) or a for a in allowed]
    if isinstance(value, bool) and bool not in base:
        raise PassConfigError(f"pass {pass_name!r}: option {key}={value!r} must be {_hint_name(hint)}")
    if any(isinstance(value, b) for b in base if isinstance(b, type)):
        return value
    if float in base and isinstance(value, int):
        return float(value)
    if typing.Literal in base:
        choices = [c for a in allowed if typing.get_origin(a) is typing.Literal for c in typing.get_args(a)]
        if value in choices:
            return value
    raise PassConfigError(f"pass {pass_name!r}: option {key}={value!r} must be {_hint_name(hint)}")


def _hint_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


# ------------------------------------------------------------------- pipeline syntax
_ITEM = re.compile(r"\s*([A-Za-z0-9_-]+)\s*(?:\{(.*)\})?\s*$", re.S)


def _split_top(text: str, sep: str = ",") -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth < 0:
                raise PassConfigError(f"unbalanced braces in pipeline {text!r}")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise PassConfigError(f"unbalanced braces in pipeline {text!r}")
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def parse_value(text: str) -> Any:
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if t.startswith("[") and t.endswith("]"):
        return tuple(parse_value(x) for x in _split_top(t[1:-1]) if x)
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t.strip("'\"")


def parse_pipeline(text: str | None) -> list[Pass]:
    """``"cleanup,fold-bn,fc-svd{energy=0.9}"`` -> pass objects (validated)."""
    if text is None or not text.strip():
        return []
    passes = []
    for item in _split_top(text):
        if not item:
            raise PassConfigError(f"empty pass name in pipeline {text!r}")
        m = _ITEM.match(item)
        if not m:
            raise PassConfigError(f"cannot parse pipeline item {item!r} (expected name or name{{k=v,...}})")
        name, body = m.group(1), m.group(2)
        options: dict[str, Any] = {}
        for kv in _split_top(body) if body and body.strip() else []:
            if "=" not in kv:
                raise PassConfigError(f"option {kv!r} of pass {name!r} must be key=value")
            key, value = kv.split("=", 1)
            options[key.strip().replace("-", "_")] = parse_value(value)
        passes.append(create_pass(name, **options))
    return passes


def format_pipeline(passes: list[Pass]) -> str:
    return ",".join(p.spec() for p in passes)


def _format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, tuple | list):
        return "[" + ",".join(_format_value(x) for x in v) + "]"
    return str(v)
