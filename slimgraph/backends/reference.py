"""Reference execution: PyTorch eager and ONNX Runtime, with the same timing method as TVM."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from slimgraph.errors import BackendError
from slimgraph.timing import time_callable


def torch_latency(module: torch.nn.Module, inputs: Sequence[torch.Tensor], **kw) -> dict[str, float]:
    module = module.eval()

    def run():
        with torch.inference_mode():
            module(*inputs)
    return time_callable(run, **kw)


class OrtModel:
    """An ONNX Runtime session over an ONNX file, with the host's core count as intra-op threads."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as err:
            raise BackendError(f"ONNX Runtime cannot load {path}: {err}") from err
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs) -> list[np.ndarray]:
        feed = {n: np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)
                for n, x in zip(self.input_names, inputs, strict=True)}
        return self.session.run(None, feed)

    def latency(self, inputs: Sequence, **kw) -> dict[str, float]:
        return time_callable(lambda: self(*inputs), **kw)

    @classmethod
    def from_graph(cls, graph, directory: str | os.PathLike | None = None) -> OrtModel:
        directory = Path(directory or tempfile.mkdtemp(prefix="slimgraph_ort_"))
        path = graph.to_onnx(directory / f"{graph.name}.onnx")
        return cls(path)
