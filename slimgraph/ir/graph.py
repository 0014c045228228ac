"""The one graph IR: a torch.fx ``GraphModule`` plus what slimgraph needs to know around it.

A ``Graph`` is executable (``run``), trainable (``to_torch``), exportable (``to_onnx``; TVM via
``torch.export``), and carries the example inputs that fix its static shapes for analyses and
compilation. Passes never mutate a ``Graph``: they ``copy()`` it and rewrite the copy.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from slimgraph.errors import ModelLoadError, ShapeError, SlimgraphError, VerifyError
from slimgraph.ir.canonical import canonicalize, explicit_batch_norm_affine, explicit_split_sizes
from slimgraph.outputs import default_mode


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_tensor(value: Any) -> torch.Tensor:
    """A numpy array, tensor or nested number list as a CPU tensor (dtype kept)."""
    return value.detach().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))


def cast_like(x: torch.Tensor, example: torch.Tensor) -> torch.Tensor:
    """``x`` in ``example``'s dtype where both are floating point (numpy's float64 default meets
    a float32 model); anything else is left for the model to accept or refuse."""
    if x.is_floating_point() and example.is_floating_point() and x.dtype != example.dtype:
        return x.to(example.dtype)
    return x


def _like_module(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """A float64 example input for a module whose weights are float32 becomes float32."""
    p = next(iter(module.parameters()), None)
    if p is not None and x.dtype == torch.float64 and p.dtype != torch.float64:
        return x.to(p.dtype)
    return x


def _short(err: BaseException) -> str:
    """The first informative line of an exception from inside torch."""
    for line in str(err).strip().splitlines():
        line = line.strip(" -")
        if line and not line.startswith(("Constraints violated", "For more information", "Traceback")):
            return line[:240]
    return type(err).__name__


@contextlib.contextmanager
def _quiet_torch():
    """torch.export's own warnings (deprecations, guard notes) are not the user's business."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger = logging.getLogger("torch")
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            logger.setLevel(level)


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """A module's output (tensor, tuple, list, dict, nested) as a flat list of tensors."""
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


class Graph:
    """A torch.fx GraphModule in canonical form, with example inputs, names and provenance.

    Every frontend produces the canonical form described in ``slimgraph.ir.export_frontend``
    (parametrized layers as modules, other ops as the torch callables fx tracing records).
    ``fixed_batch`` is None when the graph runs at any batch size; an int when the model (a
    ``torch.export`` program specialized to its example batch) only runs at that batch, in which
    case ``run`` evaluates a larger batch in slices of that size. ``notes`` say how the model was
    imported (fallbacks, upgrades, untranslated ops) for the report.
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        example_inputs: Sequence[torch.Tensor],
        *,
        input_names: Sequence[str] | None = None,
        output_names: Sequence[str] | None = None,
        name: str = "model",
        source: str = "torch",
        fixed_batch: int | None = None,
        notes: Sequence[str] = (),
    ):
        self.gm = gm
        self.example_inputs = tuple(to_tensor(x) for x in example_inputs)
        placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        self.input_names = list(input_names or placeholders)
        self._output_names = list(output_names) if output_names else None
        self.name = name
        self.source = source
        self.fixed_batch = fixed_batch
        self.notes = list(notes)
        try:
            self.gm.eval()
        except NotImplementedError:  # torch.export's unflattened modules refuse .eval(); they are
            pass                     # already inference graphs

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_torch(
        cls, module: nn.Module, example_inputs: Sequence[Any] | torch.Tensor, *, name: str | None = None
    ) -> Graph:
        """Trace ``module`` with torch.fx; where tracing fails, import it through torch.export.

        The module is deep-copied first, so nothing slimgraph does touches the caller's weights.
        The export fallback asks for a dynamic batch dimension; a model that fixes its batch
        size is imported at its example batch (``fixed_batch``).
        """
        if not isinstance(module, nn.Module):
            raise SlimgraphError(f"from_torch expects an nn.Module, got {type(module).__name__}")
        if isinstance(example_inputs, torch.Tensor | np.ndarray):
            example_inputs = (example_inputs,)
        if not example_inputs:
            raise ShapeError("from_torch needs example_inputs (a tuple of tensors) to fix shapes")
        module = copy.deepcopy(module).eval()
        inputs = tuple(_like_module(to_tensor(x), module) for x in example_inputs)
        name = name or type(module).__name__
        if isinstance(module, fx.GraphModule):
            canonicalize(module)
            return cls(module, inputs, name=name, source="torch")
        try:
            gm = fx.symbolic_trace(module)
            gm.graph.lint()
        except Exception as trace_err:  # fx cannot trace data-dependent Python; try export
            why = _short(trace_err)
        else:
            canonicalize(gm)
            return cls(gm, inputs, name=name, source="torch")
        from slimgraph.ir.export_frontend import export_module

        try:
            with _quiet_torch():
                ep, dynamic, fixed_why = export_module(module, inputs)
        except Exception as export_err:
            raise ModelLoadError(f"cannot import {name}: torch.fx tracing failed ({why}) and "
                                 f"torch.export failed ({_short(export_err)})") from export_err
        notes = [f"imported with torch.export: torch.fx could not trace it ({why})"]
        if not dynamic:
            notes.append(f"batch fixed at {inputs[0].shape[0]}: the model does not export with a "
                         f"dynamic batch ({fixed_why})")
        return cls._from_program(ep, inputs, name, "torch.export", dynamic, notes)

    @classmethod
    def _from_program(cls, ep, inputs: tuple, name: str, source: str, dynamic: bool,
                      notes: list[str]) -> Graph:
        from slimgraph.ir.export_frontend import import_exported_program

        imported = import_exported_program(ep, where=name)
        if imported.untranslated:
            ops = ", ".join(f"{op} ({len(nodes)}x)" for op, nodes in sorted(imported.untranslated.items()))
            notes.append(f"kept as ATen calls (no canonical form; passes leave them as they are): {ops}")
        batch = None if dynamic or not inputs or not inputs[0].dim() else int(inputs[0].shape[0])
        canonicalize(imported.gm)
        return cls(imported.gm, inputs, input_names=imported.input_names, name=name, source=source,
                   fixed_batch=batch, notes=notes)

    @classmethod
    def from_onnx(
        cls, model: str | os.PathLike | Any, input_shapes: dict[str, Sequence[int]] | None = None
    ) -> Graph:
        """Import an ONNX file or ModelProto, specializing dynamic dims.

        Opsets 1-6 are upgraded to 9 with ``onnx.version_converter`` (said in ``notes``); 7 and
        newer import as they are. A dynamic batch dim is imported as 1 (the graph still runs at
        any batch); other dynamic dims need ``input_shapes``.
        """
        from slimgraph.ir.onnx_frontend import import_onnx

        imported = import_onnx(model, input_shapes=input_shapes)
        name = Path(model).stem if isinstance(model, str | os.PathLike) else (
            getattr(getattr(model, "graph", None), "name", "") or "onnx_model")
        notes = []
        if imported.upgraded_from is not None:
            notes.append(f"upgraded from ONNX opset {imported.upgraded_from} to {imported.opset} "
                         "with onnx.version_converter")
        if imported.batch_defaulted:
            notes.append(f"dynamic batch dim of {', '.join(imported.batch_defaulted)} imported as 1")
        return cls(imported.gm, imported.example_inputs, input_names=imported.input_names,
                   output_names=imported.output_names, name=name, source="onnx", notes=notes)

    @classmethod
    def from_exported_program(cls, path: str | os.PathLike, *, name: str | None = None) -> Graph:
        """Load a ``torch.export`` program saved with ``torch.export.save`` (a ``.pt2`` file).

        The program's ATen graph is rewritten into the canonical form; a program exported with a
        dynamic batch runs at any batch size, one exported with static shapes at its own.
        """
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        try:
            with _quiet_torch():
                ep = torch.export.load(str(path))
        except Exception as err:
            raise ModelLoadError(f"cannot read {path} as a torch.export program: {_short(err)}") from err
        example = ep.example_inputs[0] if getattr(ep, "example_inputs", None) else None
        if not example:
            raise ShapeError(f"{path} stores no example inputs; save it with torch.export.export(m, args)")
        vals = [n.meta.get("val") for n in ep.graph.nodes
                if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs]
        dynamic = bool(vals) and all(isinstance(getattr(v, "shape", (1,))[0], torch.SymInt)
                                     for v in vals if getattr(v, "dim", lambda: 0)())
        notes = [] if dynamic else [f"batch fixed at {example[0].shape[0]}: the program was exported "
                                    "with static shapes"]
        inputs = tuple(to_tensor(x) for x in example)
        if dynamic:  # costs are per sample: a dynamic program's example batch is only an example
            inputs = tuple(x[:1] if x.dim() else x for x in inputs)
        return cls._from_program(ep, inputs, name or path.stem, "pt2", dynamic, notes)

    # ---------------------------------------------------------------- basics
    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    @property
    def nodes(self) -> Iterator[fx.Node]:
        return iter(self.gm.graph.nodes)

    @property
    def output_names(self) -> list[str]:
        if self._output_names:
            return list(self._output_names)
        n = len(flatten_outputs(self._forward(self.example_inputs)))
        return ["output"] if n == 1 else [f"output_{i}" for i in range(n)]

    def copy(self) -> Graph:
        """A deep copy: rewriting the copy never touches this graph's nodes or weights."""
        return self.with_gm(copy.deepcopy(self.gm))

    def with_gm(self, gm: fx.GraphModule) -> Graph:
        """A new Graph around ``gm`` that keeps this graph's inputs, names and source."""
        return Graph(gm, self.example_inputs, input_names=self.input_names,
                     output_names=self._output_names, name=self.name, source=self.source,
                     fixed_batch=self.fixed_batch, notes=self.notes)

    def module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(node.target)

    def input_specs(self) -> list[TensorSpec]:
        return [TensorSpec(n, tuple(x.shape), _dtype_name(x.dtype))
                for n, x in zip(self.input_names, self.example_inputs, strict=True)]

    def output_specs(self) -> list[TensorSpec]:
        outs = flatten_outputs(self._forward(self.example_inputs))
        return [TensorSpec(n, tuple(o.shape), _dtype_name(o.dtype))
                for n, o in zip(self.output_names, outs, strict=True)]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.gm.parameters())

    def __repr__(self) -> str:
        n = sum(1 for _ in self.nodes)
        return f"Graph({self.name!r}, source={self.source}, nodes={n}, params={self.num_params()})"

    # ---------------------------------------------------------------- execution
    def _forward(self, inputs: Sequence[torch.Tensor]) -> Any:
        with torch.no_grad():
            return self.gm(*inputs)

    def run(self, *inputs: Any) -> list[np.ndarray]:
        """Run on numpy arrays or tensors (any batch size the model allows); numpy outputs.

        Floating-point inputs are cast to the model's input dtype. A graph with a fixed batch
        runs a larger batch in slices of that size (which must divide it).
        """
        if len(inputs) != len(self.example_inputs):
            raise ShapeError(f"{self.name} takes {len(self.example_inputs)} input(s) "
                             f"({', '.join(self.input_names)}), got {len(inputs)}")
        tensors = [cast_like(to_tensor(x), ex) for x, ex in zip(inputs, self.example_inputs, strict=True)]
        for name, t, ex in zip(self.input_names, tensors, self.example_inputs, strict=True):
            if t.dim() != ex.dim() or tuple(t.shape[1:]) != tuple(ex.shape[1:]):
                raise ShapeError(f"input {name!r}: expected shape (N, {', '.join(map(str, ex.shape[1:]))}), "
                                 f"got {tuple(t.shape)}")
        return [o.detach().cpu().numpy() for o in self.forward_batches(tensors)]

    def forward_batches(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The graph's flat outputs on ``tensors``, in slices of ``fixed_batch`` where it has one."""
        n = int(tensors[0].shape[0]) if tensors and tensors[0].dim() else 0
        step = self.fixed_batch
        if not step or n == step:
            return flatten_outputs(self._forward(tensors))
        if n % step:
            raise ShapeError(f"{self.name} runs only at batch {step} (its torch.export program fixes "
                             f"the batch size); got a batch of {n}, which {step} does not divide")
        parts = [flatten_outputs(self._forward([t[i:i + step] for t in tensors])) for i in range(0, n, step)]
        return [torch.cat(outs) for outs in zip(*parts, strict=True)]

    def untranslated(self) -> list[tuple[str, str]]:
        """(node, ATen op) for calls the export frontend kept without a canonical form."""
        return [(n.name, n.meta["slimgraph_untranslated"]) for n in self.gm.graph.nodes
                if "slimgraph_untranslated" in n.meta]

    def to_torch(self) -> fx.GraphModule:
        """A trainable, independent copy of the graph as a torch.fx GraphModule."""
        return copy.deepcopy(self.gm)

    def to_onnx(self, path: str | os.PathLike, *, opset: int = 17, dynamic_batch: bool = True) -> Path:
        """Export with torch's ONNX exporter; written atomically (temp file then rename).

        A quantized graph is written in QDQ form (``slimgraph.ops.qdq``): int8 weights with
        per-channel scales, QuantizeLinear/DequantizeLinear around each integer layer."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        out_names = self.output_names
        axes = {n: {0: "batch"} for n in [*self.input_names, *out_names]} if dynamic_batch else None
        module, folding = self.to_torch(), True
        explicit_split_sizes(module, self.example_inputs)
        explicit_batch_norm_affine(module)
        if any(str(n.target).startswith("slimgraph.") for n in self.gm.graph.nodes):
            from slimgraph.ops import has_integer_ops, register_onnx_symbolics, to_qdq

            register_onnx_symbolics()
            if has_integer_ops(module):  # integer layers go out in QDQ form (int8 initializers)
                module, folding = to_qdq(module), False
        fd, tmp = tempfile.mkstemp(suffix=".onnx.tmp", dir=path.parent)
        os.close(fd)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(module, self.example_inputs, tmp, dynamo=False,
                                  opset_version=opset, input_names=self.input_names,
                                  output_names=out_names, dynamic_axes=axes,
                                  do_constant_folding=folding)
            os.chmod(tmp, default_mode())  # mkstemp makes 0600
            os.replace(tmp, path)
        except Exception as err:
            raise SlimgraphError(f"ONNX export of {self.name} failed: {err}") from err
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    # ---------------------------------------------------------------- checks
    def verify(self) -> None:
        """Raise ``VerifyError`` unless the graph is well formed and runs on its example inputs."""
        try:
            self.gm.graph.lint()
        except Exception as err:
            raise VerifyError(f"{self.name}: malformed graph: {err}") from err
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                try:
                    self.gm.get_submodule(node.target)
                except AttributeError as err:
                    raise VerifyError(f"{self.name}: node {node.name} calls missing module {node.target}") from err
            elif node.op == "get_attr" and _lookup_attr(self.gm, node.target) is None:
                raise VerifyError(f"{self.name}: node {node.name} reads missing attribute {node.target}")
        if not any(n.op == "output" for n in self.gm.graph.nodes):
            raise VerifyError(f"{self.name}: graph has no output")
        try:
            outs = flatten_outputs(self._forward(self.example_inputs))
        except Exception as err:
            raise VerifyError(f"{self.name}: graph fails to run on its example inputs: {err}") from err
        if not outs:
            raise VerifyError(f"{self.name}: graph produces no tensor output")
        for i, o in enumerate(outs):
            if o.is_floating_point() and not torch.isfinite(o).all():
                raise VerifyError(f"{self.name}: output {i} has non-finite values")


def _lookup_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj
