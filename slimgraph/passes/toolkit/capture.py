"""Activations on calibration data: the one way passes look inside a running graph.

Everything goes through ``Recorder``, an ``fx.Interpreter`` that keeps the values of the nodes
it is asked for (module calls or any other node), so a pass names what it wants by node name
and never installs hooks. ``stream`` hands each value to a callback batch by batch (for running
statistics, nothing kept); ``capture`` keeps them, up to ``max_bytes`` in all (the batches after
the bound are not run). ``inputs=True`` asks for the first input of each named node instead of
its output (what a layer sees). A run stops as soon as everything asked for was seen.

``patches`` turns a conv's input into im2col rows, the form every least-squares fit of a layer
uses (pruning reconstruction, OBD/OBS statistics, the low-rank data fits).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 1 << 30  # what capture() keeps at most, over all nodes and batches


class _Stop(Exception):  # noqa: N818  (a control-flow signal)
    """Raised once everything asked for was recorded: nothing after it needs to run."""


class Recorder(fx.Interpreter):
    """Runs a GraphModule and keeps the tensor outputs of the ``want`` nodes in ``seen``.

    Recorded values flow on as clones, so in-place ops later in the graph cannot change what
    was recorded; with autograd enabled the recorded tensors stay in the graph (gradients with
    respect to activations, as first-order saliency needs).
    """

    def __init__(self, gm: fx.GraphModule, want: Iterable[str], stop_early: bool = False):
        super().__init__(gm)
        self.want, self.seen, self.stop_early = set(want), {}, stop_early

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.want and isinstance(out, torch.Tensor):
            self.seen[n.name] = out
            if self.stop_early and len(self.seen) == len(self.want):
                raise _Stop
            return out.clone()
        return out


def record(gm: fx.GraphModule, inputs: Sequence[torch.Tensor], want: Iterable[str], *,
           stop_early: bool = False) -> tuple[Any, dict[str, torch.Tensor]]:
    """(the graph's output or None when stopped early, {node: value}) for one batch."""
    rec = Recorder(gm, want, stop_early)
    try:
        out = rec.run(*inputs)
    except _Stop:
        out = None
    return out, rec.seen


def first_inputs(gm: fx.GraphModule, names: Iterable[str]) -> dict[str, str]:
    """{node: the node that is its first argument}, for the names whose first arg is a node."""
    wanted = set(names)
    return {n.name: n.args[0].name for n in gm.graph.nodes
            if n.name in wanted and n.args and isinstance(n.args[0], fx.Node)}


def stream(gm: fx.GraphModule, batches: Sequence[tuple[torch.Tensor, ...]], names: Iterable[str],
           visit: Callable[[str, torch.Tensor, int], None], *, inputs: bool = False) -> None:
    """Call ``visit(name, value, batch_index)`` for each named node on each batch (no grad)."""
    names = list(names)
    source = first_inputs(gm, names) if inputs else {n: n for n in names}
    if not source:
        return
    with torch.no_grad():
        for i, batch in enumerate(batches):
            _, seen = record(gm, batch, set(source.values()), stop_early=True)
            for name, node in source.items():
                if node in seen:
                    visit(name, seen[node].detach(), i)


def capture(gm: fx.GraphModule, batches: Sequence[tuple[torch.Tensor, ...]], names: Iterable[str],
            *, inputs: bool = False, max_bytes: int = DEFAULT_MAX_BYTES) -> dict[str, torch.Tensor]:
    """{name: its values on the batches, concatenated along the batch dim}; stops taking new
    batches once ``max_bytes`` are held (logged), so a large calibration set cannot exhaust
    memory."""
    kept: dict[str, list[torch.Tensor]] = {}
    held = 0
    for i, batch in enumerate(batches):
        if held >= max_bytes:
            log.info("activation capture stopped after %d of %d batches (%d MiB held)",
                     i, len(batches), held >> 20)
            break

        def keep(name: str, value: torch.Tensor, _: int) -> None:
            nonlocal held
            kept.setdefault(name, []).append(value.clone())
            held += value.numel() * value.element_size()

        stream(gm, [batch], names, keep, inputs=inputs)
    return {name: torch.cat(values) for name, values in kept.items()}


def patches(conv: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """A Conv1d/Conv2d's input as im2col rows: (N * L, C_in * k) with columns in (c, k) order,
    one row per output position (padding applied as the conv would)."""
    if isinstance(conv, nn.Conv1d):
        x = x.unsqueeze(2)
        k, d, p, s = (1, *conv.kernel_size), (1, *conv.dilation), (0, *conv.padding), (1, *conv.stride)
    else:
        k, d, p, s = conv.kernel_size, conv.dilation, conv.padding, conv.stride
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (N, C*k, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])
