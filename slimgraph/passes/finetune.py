"""finetune: recover accuracy after compression by distillation from the original model.

Knowledge distillation (Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural
Network", 2015): the compressed graph (student) is trained to match the original model's
(teacher's) softened outputs, ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, on the
user's calibration data, which needs no labels. With labels, ``mode="auto"`` mixes in
cross-entropy on the labels (weight ``alpha``), and ``mode="supervised"`` trains on labels only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from slimgraph.errors import PassConfigError
from slimgraph.ir.analysis import Analysis, Cost, Shapes
from slimgraph.passes.base import Pass, PassResult, Skip, register_pass
from slimgraph.passes.masks import apply_masks, masked_gradients, masked_modules
from slimgraph.passes.toolkit.train import (
    Hooks,
    Minibatches,
    Objective,
    teacher_outputs,
    train,
    trainable,
)


@register_pass
@dataclass(frozen=True)
class Finetune(Pass):
    """Train a copy of the graph's weights: distillation from ``ctx.reference`` or labels.

    Losses (per sample, averaged over the batch):
      distill:    ``T^2 * KL(p_teacher^T || p_student^T)`` (labels, if any, are not used);
      supervised: cross-entropy on the labels (needs labels);
      auto:       distill without labels; with labels
                  ``(1 - alpha) * T^2 * KL + alpha * CE`` (``alpha`` is used only here).
    The softmax is over dim 1 of the first output (logits ``(N, classes, ...)``).
    The learning rate decays from ``lr`` to 0 over all steps (cosine; Loshchilov and Hutter
    2017), so the last steps do not jolt a nearly recovered model. Batch norm stays in eval
    mode (running statistics frozen; affine parameters train); dropout is active. Layers with a ``weight_mask`` buffer (``passes.masks``, from
    pruning) get masked gradients and the mask re-applied after every step: pruned weights stay 0.
    Parameters with ``requires_grad=False`` stay frozen. Deterministic for a given ``seed``.
    Requires: calibration data from the user (``ctx.calibration``), and a teacher
    (``ctx.reference``) unless supervised. Preserves: shapes, cost (only weight values change).
    Declines (reported, graph unchanged): no user calibration data (random data cannot recover
    accuracy), no teacher for distillation, no labels for supervised mode, no trainable
    parameters, outputs that are not class scores.
    Exact: no.
    """

    name: ClassVar[str] = "finetune"
    exact: ClassVar[bool] = False
    preserves: ClassVar[tuple[type[Analysis], ...]] = (Shapes, Cost)

    epochs: int = 5  # passes over the calibration data
    lr: float = 1e-3  # peak learning rate (cosine decay to 0)
    temperature: float = 4.0  # distillation temperature T
    alpha: float = 0.5  # weight of cross-entropy in distillation with labels (mode auto)
    mode: Literal["distill", "supervised", "auto"] = "auto"  # distill (from the original model), supervised (labels) or auto
    optimizer: Literal["adam", "sgd"] = "adam"  # adam or sgd (momentum 0.9)
    batch_size: int = 32  # samples per step
    seed: int = 0  # seed of shuffling and dropout

    def validate(self) -> None:
        checks = {
            "epochs": (self.epochs >= 1, "an integer >= 1"),
            "lr": (self.lr > 0 and math.isfinite(self.lr), "a positive number"),
            "temperature": (self.temperature > 0 and math.isfinite(self.temperature), "> 0"),
            "alpha": (0.0 <= self.alpha <= 1.0, "in [0, 1]"),
            "mode": (self.mode in ("distill", "supervised", "auto"), "distill, supervised or auto"),
            "optimizer": (self.optimizer in ("adam", "sgd"), "adam or sgd"),
            "batch_size": (self.batch_size >= 1, "an integer >= 1"),
        }
        for option, (ok, want) in checks.items():
            if not ok:
                raise PassConfigError(f"finetune: option {option}={getattr(self, option)!r} must be {want}")

    # ------------------------------------------------------------------ plan
    def _decline(self, graph, ctx) -> str | None:
        if not ctx.calibration:
            return ("no calibration data from the user; fine-tuning on random inputs cannot "
                    "recover accuracy (pass calibration=...)")
        mode = self._effective_mode(ctx)
        if mode == "supervised" and not ctx.labels:
            return "mode=supervised needs labels with the calibration data"
        if mode != "supervised" and ctx.reference is None:
            return "no teacher for distillation (the analysis manager has no reference graph)"
        if not any(p.requires_grad and p.is_floating_point() for p in graph.gm.parameters()):
            return "the graph has no trainable parameters"
        return None

    def _effective_mode(self, ctx) -> str:
        if self.mode != "auto":
            return self.mode
        return "distill+ce" if ctx.labels else "distill"

    # ------------------------------------------------------------------ run
    def run(self, graph, ctx) -> PassResult:
        reason = self._decline(graph, ctx)
        if reason:
            return PassResult(graph, changed=False, skipped=[Skip("*", reason)])
        mode = self._effective_mode(ctx)
        inputs = _concat_batches(ctx.calibration_batches(graph))
        labels = torch.cat([y.reshape(-1).long() for y in ctx.labels]) if ctx.labels else None
        # a graph that only runs at one batch size (Graph.fixed_batch) trains and evaluates at it
        bs = graph.fixed_batch or self.batch_size
        chunk = graph.fixed_batch or max(self.batch_size, 256)
        teacher = teacher_outputs(ctx.reference.gm, inputs, chunk) if mode != "supervised" else None
        if teacher is not None and teacher.dim() < 2:
            return PassResult(graph, changed=False, skipped=[Skip(
                "*", f"the first output has shape {tuple(teacher.shape)}, not (N, classes, ...)")])
        if labels is not None and len(labels) != len(inputs[0]):
            if mode == "supervised":
                return PassResult(graph, changed=False, skipped=[Skip(
                    "*", f"{len(labels)} labels for {len(inputs[0])} calibration samples")])
            labels, mode = None, "distill"  # labels that do not line up are not used
        if mode == "distill":
            gap = _rel_l2(teacher_outputs(graph.gm, inputs, chunk), teacher)
            if gap < 1e-6:  # a zero loss: Adam's first steps would only move weights by noise
                return PassResult(graph, changed=False, skipped=[Skip(
                    "*", f"the graph already reproduces its teacher (outputs rel-L2 {gap:.1e}); "
                    "nothing to distill")])
        out = graph.copy()
        gm = out.gm
        objective = Objective(mode, teacher=teacher, labels=labels, temperature=self.temperature,
                              alpha=self.alpha)
        before = _agreement(gm, inputs, teacher, chunk)
        losses = self._train(gm, inputs, objective, bs)
        after = _agreement(gm, inputs, teacher, chunk)
        stats: dict[str, Any] = {
            "mode": mode, "epochs": self.epochs, "samples": len(inputs[0]),
            "steps": self.epochs * math.ceil(len(inputs[0]) / bs),
            "loss_first": losses[0], "loss_last": losses[-1],
            "loss_per_epoch": [round(v, 6) for v in losses],
            "trainable_params": sum(p.numel() for p in trainable(gm)),
            "masked_layers": len(masked_modules(gm)),
        }
        if before is not None:
            stats["teacher_top1_agreement_before"] = before
            stats["teacher_top1_agreement_after"] = after
        return PassResult(out, changed=True, stats=stats)

    def _train(self, gm, inputs, objective: Objective, bs: int) -> list[float]:
        """Epochs of minibatch training (toolkit.train); returns the mean loss of each epoch."""
        params = trainable(gm)
        opt = (torch.optim.Adam(params, lr=self.lr) if self.optimizer == "adam"
               else torch.optim.SGD(params, lr=self.lr, momentum=0.9))
        batches = Minibatches(len(inputs[0]), bs, shuffle=True, seed=self.seed)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.epochs * batches.per_epoch)
        apply_masks(gm)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # dropout masks
            with masked_gradients(gm):
                steps = train(gm, inputs, objective, batches.steps(self.epochs * batches.per_epoch),
                              optimizer=opt, scheduler=sched, hooks=Hooks(after_step=lambda: apply_masks(gm)))
        sizes = [len(idx) for idx in Minibatches(len(inputs[0]), bs, shuffle=False).epoch()]
        per = batches.per_epoch
        return [sum(loss * n for loss, n in zip(steps[e * per:(e + 1) * per], sizes, strict=True)) / len(inputs[0])
                for e in range(self.epochs)]


# ---------------------------------------------------------------------- helpers
def _concat_batches(batches) -> tuple[torch.Tensor, ...]:
    return tuple(torch.cat([b[i] for b in batches]) for i in range(len(batches[0])))


def _agreement(gm, inputs, teacher, chunk) -> float | None:
    if teacher is None or teacher.dim() < 2:
        return None
    student = teacher_outputs(gm, inputs, chunk)
    return round(float((student.argmax(1) == teacher.argmax(1)).float().mean()), 6)


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))
