"""Kernels of the rotated low-bit linear: the Hadamard rotations, the PyTorch reference (also
the CPU path), the Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``), the
``diffopt::quant_linear`` op that dispatches between them, and the registry of quantization
formats (`formats`: how weights are stored and which op the `quantize` pass emits).

Importing this package registers the op and the ``int`` format; the Triton module is imported
only when a CUDA tensor reaches the op (or when a test imports it directly).
"""

from . import (
    fp4,  # noqa: F401  (registers diffopt::fp4_linear and the nvfp4 / mxfp4 formats)
    ops,  # noqa: F401  (registers diffopt::quant_linear)
)
from .formats import (
    BIAS,
    Constant,
    LinearInputs,
    QuantFormat,
    QuantizedLinear,
    Unsupported,
    X,
    quant_format,
    quant_formats,
    register_quant_format,
)
from .hadamard import Rotation, default_group, hadamard, rotate
from .reference import pack_int4, quantize_weight, unpack_int4

__all__ = [
    "BIAS",
    "Constant",
    "LinearInputs",
    "QuantFormat",
    "QuantizedLinear",
    "Rotation",
    "Unsupported",
    "X",
    "default_group",
    "hadamard",
    "pack_int4",
    "quant_format",
    "quant_formats",
    "quantize_weight",
    "register_quant_format",
    "rotate",
    "unpack_int4",
]
