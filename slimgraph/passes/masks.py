"""Weight masks of unstructured pruning, as they live in the IR.

Convention (read by ``prune-weights``, and by any pass that trains a pruned graph):

- a pruned layer (Conv/Linear module) holds the *masked* weight in ``weight`` (pruned entries
  are exact zeros) and a registered boolean buffer ``weight_mask`` (True = kept) of the same
  shape. Nothing in ``forward`` reads the mask, so the graph exports with ``torch.export`` and
  ``torch.onnx`` unchanged and the exported weights are the masked ones;
- the mask is a buffer, so it survives ``copy.deepcopy``, ``Graph.copy()`` and ``state_dict``;
- a pass that trains the graph must call ``apply_masks(module)`` after every optimizer step
  (``masked_gradients`` additionally zeroes the gradients of pruned weights during training).
  Releasing a mask (``remove_mask``) makes the layer dense again (dense-sparse-dense).

The mask is training-time metadata: a deployed model reads the zeros in ``weight``. It is
tagged ``slimgraph_bits = 0`` so the cost analysis does not count it as stored weight bytes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

MASK = "weight_mask"


def get_mask(module: nn.Module) -> torch.Tensor | None:
    mask = getattr(module, MASK, None)
    return mask if isinstance(mask, torch.Tensor) else None


def set_mask(module: nn.Module, keep: torch.Tensor) -> None:
    """Store ``keep`` (bool, weight-shaped) as the layer's mask and zero the pruned weights."""
    weight = module.weight
    if keep.shape != weight.shape:
        raise ValueError(f"mask shape {tuple(keep.shape)} != weight shape {tuple(weight.shape)}")
    keep = keep.to(device=weight.device, dtype=torch.bool).clone()
    keep.slimgraph_bits = 0  # metadata, not a stored weight (see the module docstring)
    if MASK in module._buffers:
        module._buffers[MASK] = keep
    else:
        module.register_buffer(MASK, keep)
    with torch.no_grad():
        weight.mul_(keep)


def remove_mask(module: nn.Module) -> None:
    """Release the mask; the weights keep their values (pruned ones stay zero until trained)."""
    module._buffers.pop(MASK, None)


def masked_modules(root: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in root.named_modules() if get_mask(m) is not None}


@torch.no_grad()
def apply_masks(root: nn.Module) -> int:
    """Zero every pruned weight under ``root`` again (call after each optimizer step)."""
    modules = masked_modules(root)
    for m in modules.values():
        m.weight.mul_(get_mask(m))
    return len(modules)


@contextlib.contextmanager
def masked_gradients(root: nn.Module) -> Iterator[None]:
    """Zero the gradients of pruned weights while training inside this block."""
    handles = []
    for m in masked_modules(root).values():
        mask = get_mask(m)
        handles.append(m.weight.register_hook(lambda g, mask=mask: g * mask))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def layer_sparsity(root: nn.Module) -> dict[str, float]:
    """Fraction of pruned weights of every masked layer, by module name."""
    return {name: 1.0 - get_mask(m).float().mean().item() for name, m in masked_modules(root).items()}


def relative_csr_bytes(weight: torch.Tensor, value_bits: int = 32, index_bits: int = 8) -> int:
    """Bytes of ``weight`` in CSR with relative column indices (Han et al. 2016, Deep Compression).

    Rows are output channels (the weight flattened to (out, -1)). Each nonzero stores a
    ``value_bits`` value and an ``index_bits`` gap to the previous nonzero of its row; a gap
    larger than the index range is bridged with a filler zero entry, as in the paper. Row
    pointers are 32-bit (rows + 1 of them).
    """
    w = weight.detach().reshape(weight.shape[0], -1) if weight.dim() > 1 else weight.reshape(1, -1)
    max_gap = (1 << index_bits) - 1
    entries = 0
    for row in w:
        cols = torch.nonzero(row).flatten()
        if cols.numel() == 0:
            continue
        gaps = torch.diff(cols, prepend=cols.new_tensor([-1]))
        entries += int(cols.numel()) + int(((gaps - 1) // max_gap).clamp(min=0).sum())
    return math.ceil(entries * (value_bits + index_bits) / 8) + 4 * (w.shape[0] + 1)


def csr_bytes(weight: torch.Tensor, value_bits: int = 32) -> int:
    """Bytes of plain CSR: ``value_bits`` values, 32-bit column indices, 32-bit row pointers."""
    w = weight.detach().reshape(weight.shape[0], -1) if weight.dim() > 1 else weight.reshape(1, -1)
    nnz = int(torch.count_nonzero(w))
    return math.ceil(nnz * (value_bits + 32) / 8) + 4 * (w.shape[0] + 1)
