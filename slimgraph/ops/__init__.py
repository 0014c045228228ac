"""Custom ``torch.library`` ops of slimgraph's IR (ops no framework has).

Importing ``slimgraph.ops`` registers them: ``torch.ops.slimgraph.qconv2d`` and friends
(``quantized.py``). Their TVM lowerings live with the backend
(``slimgraph.backends.tvm.int8``), so this package needs only torch.
"""

from .qdq import QAddInfo, QDQInfo, dequantize_s8, has_integer_ops, register_onnx_symbolics, to_qdq
from .quantized import (
    QuantizationError,
    dequantize_u8,
    qadd,
    qadd_terms,
    qconv2d,
    qlinear,
    quantize_u8,
    requant_multiplier,
    requantize,
)

__all__ = [
    "QAddInfo",
    "QDQInfo",
    "QuantizationError",
    "dequantize_s8",
    "has_integer_ops",
    "register_onnx_symbolics",
    "to_qdq",
    "dequantize_u8",
    "qadd",
    "qadd_terms",
    "qconv2d",
    "qlinear",
    "quantize_u8",
    "requant_multiplier",
    "requantize",
]
