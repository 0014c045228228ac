"""Fidelity metrics between reference outputs and a candidate's outputs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def compare_outputs(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> dict:
    """max_abs, rel_l2, cosine over all outputs; top-1 agreement on the first output.

    top1_agreement is the share of samples whose argmax over the last axis matches; it is
    ``None`` when the first output is not (N, classes).
    """
    if len(reference) != len(candidate):
        return {"max_abs": float("inf"), "rel_l2": float("inf"), "cosine": 0.0, "top1_agreement": None,
                "error": f"{len(candidate)} outputs, expected {len(reference)}"}
    ref = np.concatenate([np.asarray(r, dtype=np.float64).ravel() for r in reference])
    out = np.concatenate([np.asarray(c, dtype=np.float64).ravel() for c in candidate])
    if ref.shape != out.shape:
        return {"max_abs": float("inf"), "rel_l2": float("inf"), "cosine": 0.0, "top1_agreement": None,
                "error": "output shapes differ"}
    diff = ref - out
    ref_norm = float(np.linalg.norm(ref))
    rel_l2 = float(np.linalg.norm(diff) / ref_norm) if ref_norm > 0 else float(np.linalg.norm(diff))
    denom = ref_norm * float(np.linalg.norm(out))
    cosine = float(ref @ out / denom) if denom > 0 else float(ref_norm == 0 and np.linalg.norm(out) == 0)
    top1 = None
    r0, c0 = np.asarray(reference[0]), np.asarray(candidate[0])
    if r0.ndim == 2 and r0.shape[1] > 1 and r0.shape == c0.shape:
        top1 = float(np.mean(r0.argmax(axis=1) == c0.argmax(axis=1)))
    return {"max_abs": float(np.max(np.abs(diff))) if diff.size else 0.0, "rel_l2": rel_l2,
            "cosine": cosine, "top1_agreement": top1}
