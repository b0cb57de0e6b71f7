"""Kernels of the rotated low-bit linear: the Hadamard rotations, the PyTorch reference (also
the CPU path), the Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``), and the
``diffopt::w4a4_linear`` op that dispatches between them.

Importing this package registers the op; the Triton module is imported only when a CUDA
tensor reaches the op (or when a test imports it directly).
"""

from . import ops  # noqa: F401  (registers diffopt::w4a4_linear)
from .hadamard import Rotation, default_group, hadamard, rotate
from .reference import pack_int4, quantize_weight, unpack_int4

__all__ = [
    "Rotation",
    "default_group",
    "hadamard",
    "pack_int4",
    "quantize_weight",
    "rotate",
    "unpack_int4",
]
