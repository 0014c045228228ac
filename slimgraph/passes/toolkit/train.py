"""Recovery training: one loop for every pass that trains (fine-tuning, retraining pruned or
quantized weights), with what differs between them as data.

- ``Objective``: distillation from teacher logits at temperature T (Hinton et al. 2015),
  supervised cross-entropy, both mixed, or mean-squared error to the teacher's outputs.
- ``Minibatches``: samples in minibatches, reshuffled every epoch (seeded) or in a fixed
  cycle.
- ``Hooks``: what a pass keeps true around each optimizer step: pruning masks re-applied,
  dynamic network surgery's dense weights swapped in and out, quantizers kept in the forward
  pass (fake-quant modules are ordinary modules of the graph, so they train as they are).
- Data parallel: under ``torchrun`` (``WORLD_SIZE`` > 1) the loop joins the process group
  (gloo), wraps the model in ``DistributedDataParallel`` and gives each rank its share of every
  minibatch; gradients are averaged across ranks, so every rank ends with the same weights as
  one process training on the whole minibatch (exactly so when the ranks' shares are equal).

Batch-norm statistics stay frozen (the layers run in eval mode) unless ``train_bn`` is set.
"""

from __future__ import annotations

import atexit
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from slimgraph.ir.graph import flatten_outputs
from slimgraph.passes.toolkit.progress import Progress

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
MODES = ("distill", "supervised", "distill+ce", "mse")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` over dim 1, mean over the rest.

    The ``T^2`` keeps gradient magnitudes comparable across temperatures (Hinton et al. 2015).
    """
    t = float(temperature)
    log_p_s = F.log_softmax(student / t, dim=1)
    log_p_t = F.log_softmax(teacher / t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    return kl.mean() * t * t


@dataclass(frozen=True)
class Objective:
    """The loss on the samples ``idx``, from the student's first output."""

    mode: str
    teacher: torch.Tensor | None = None  # teacher outputs for every sample
    labels: torch.Tensor | None = None  # class labels for every sample
    temperature: float = 4.0
    alpha: float = 0.5  # weight of cross-entropy in "distill+ce"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"objective mode {self.mode!r}: expected one of {MODES}")
        needs_teacher = self.mode in ("distill", "distill+ce", "mse")
        if needs_teacher and self.teacher is None:
            raise ValueError(f"objective {self.mode!r} needs teacher outputs")
        if self.mode in ("supervised", "distill+ce") and self.labels is None:
            raise ValueError(f"objective {self.mode!r} needs labels")

    def loss(self, student: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if self.mode == "supervised":
            return F.cross_entropy(student, self.labels[idx])
        if self.mode == "mse":
            return F.mse_loss(student, self.teacher[idx])
        kd = distillation_loss(student, self.teacher[idx], self.temperature)
        if self.mode == "distill+ce":
            return (1.0 - self.alpha) * kd + self.alpha * F.cross_entropy(student, self.labels[idx])
        return kd


@dataclass
class Minibatches:
    """Sample indices in minibatches: reshuffled per epoch (seeded), or in order."""

    n: int
    batch_size: int
    shuffle: bool = True
    seed: int = 0
    _gen: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._gen = torch.Generator().manual_seed(self.seed)

    @property
    def per_epoch(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def epoch(self) -> Iterator[torch.Tensor]:
        order = torch.randperm(self.n, generator=self._gen) if self.shuffle else torch.arange(self.n)
        for start in range(0, self.n, self.batch_size):
            yield order[start:start + self.batch_size]

    def steps(self, count: int) -> Iterator[torch.Tensor]:
        done = 0
        while done < count:
            for idx in self.epoch():
                if done == count:
                    return
                yield idx
                done += 1


@dataclass
class Hooks:
    """Callbacks around each optimizer step (all optional)."""

    after_backward: Callable[[], None] | None = None  # e.g. DNS: load the dense weights
    after_step: Callable[[], None] | None = None  # e.g. re-apply masks, update DNS masks


def train(gm: nn.Module, inputs: Sequence[torch.Tensor], objective: Objective,
          schedule: Iterator[torch.Tensor] | Sequence[torch.Tensor], *, optimizer: torch.optim.Optimizer,
          scheduler=None, hooks: Hooks | None = None, train_bn: bool = False,
          dropout: bool = True) -> list[float]:
    """One optimizer step per minibatch of ``schedule``; returns each step's loss.

    ``gm`` trains in place (eval-mode batch norm unless ``train_bn``; ``dropout=False`` keeps
    the whole model in eval mode); under ``torchrun`` the steps are data parallel (see the
    module docstring).
    """
    hooks = hooks or Hooks()
    model, rank, world = _parallel(gm)
    if dropout:
        _train_mode(gm, train_bn)
    else:
        gm.eval()
    losses = []
    progress = Progress("training: step", len(schedule) if isinstance(schedule, Sequence) else None)
    try:
        with torch.enable_grad():
            for idx in schedule:
                part = idx[rank::world] if world > 1 else idx
                loss = objective.loss(flatten_outputs(model(*(x[part] for x in inputs)))[0], part)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if hooks.after_backward:
                    hooks.after_backward()
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                if hooks.after_step:
                    hooks.after_step()
                losses.append(_mean_across_ranks(float(loss.detach()), world))
                progress.step(f"loss {losses[-1]:.4g}")
    finally:
        gm.eval()
    progress.close(f"loss {losses[-1]:.4g}" if losses else "")
    return losses


def trainable(gm: nn.Module) -> list[nn.Parameter]:
    return [p for p in gm.parameters() if p.requires_grad and p.is_floating_point()]


def teacher_outputs(gm: nn.Module, inputs: Sequence[torch.Tensor], chunk: int) -> torch.Tensor:
    """The first output of ``gm`` (eval mode, no grad) on every sample, in chunks."""
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            n = len(inputs[0])
            parts = [flatten_outputs(gm(*(x[s:s + chunk] for x in inputs)))[0]
                     for s in range(0, n, chunk)]
    finally:
        gm.train(was_training)
    return torch.cat(parts).float()


def _train_mode(gm: nn.Module, train_bn: bool) -> None:
    gm.train()
    if not train_bn:
        for mod in gm.modules():
            if isinstance(mod, _BN):
                mod.eval()


def _parallel(gm: nn.Module) -> tuple[nn.Module, int, int]:
    """(the module to call, this rank, world size): DDP-wrapped under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not torch.distributed.is_available():
        return gm, 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
        atexit.register(_close_process_group)
    return nn.parallel.DistributedDataParallel(gm), dist.get_rank(), dist.get_world_size()


def _close_process_group() -> None:
    """At exit, the process group this module started: wait for every rank, then destroy it.
    Without this a rank that exits first can tear gloo's connections down under another rank
    still shutting down, which then aborts (SIGABRT; seen under load on 2 cores)."""
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def _mean_across_ranks(value: float, world: int) -> float:
    if world <= 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / world
