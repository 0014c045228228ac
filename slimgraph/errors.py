"""One exception hierarchy for everything a user can get wrong.

Every error a user sees is a ``SlimgraphError``; lower-level exceptions (torch, onnx, TVM) are
chained with ``raise ... from err`` so the cause stays visible to a developer, while the CLI
prints only the one-line message.
"""

from __future__ import annotations


class SlimgraphError(Exception):
    """Base class of every error slimgraph raises on purpose."""


class ModelLoadError(SlimgraphError):
    """A model file is missing, unreadable, corrupt, or of a kind slimgraph does not load."""


class UnsupportedOpError(SlimgraphError):
    """A model uses ops slimgraph cannot import; ``ops`` lists every one of them."""

    def __init__(self, ops: dict[str, list[str]] | list[str], where: str = "model"):
        if isinstance(ops, dict):
            self.ops = dict(sorted(ops.items()))
            listing = "; ".join(
                f"{op} (nodes: {', '.join(nodes[:3])}{', ...' if len(nodes) > 3 else ''})"
                for op, nodes in self.ops.items()
            )
        else:
            self.ops = {op: [] for op in sorted(set(ops))}
            listing = ", ".join(self.ops)
        super().__init__(f"{where} uses {len(self.ops)} unsupported op(s): {listing}")


class ShapeError(SlimgraphError):
    """Input shapes are missing, inconsistent with the model, or not static where they must be."""


class PassConfigError(SlimgraphError):
    """An unknown pass name, an unknown option, or an option value out of range."""


class PassError(SlimgraphError):
    """A pass failed while running; names the pass and the passes that ran before it."""


class VerifyError(SlimgraphError):
    """The graph is malformed (dangling nodes, missing outputs, failed execution)."""


class BackendError(SlimgraphError):
    """Lowering, building, tuning, loading or running a compiled artifact failed."""


class TargetError(SlimgraphError):
    """An unknown target name or a target whose toolchain is missing on this machine."""


class CalibrationError(SlimgraphError):
    """Calibration data is missing, unreadable, or does not match the model's inputs."""
