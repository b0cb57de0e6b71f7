"""Kernels of the rotated low-bit linear: the Hadamard rotations, the PyTorch reference (also
the CPU path), the Triton kernels (CUDA, or CPU under ``TRITON_INTERPRET=1``), the
``diffopt::quant_linear`` op that dispatches between them, and the registry of quantization
formats (`formats`: how weights are stored and which op the `quantize` pass emits).

Importing this package registers the op and the ``int`` format; the Triton module is imported
only when a CUDA tensor reaches the op (or when a test imports it directly).
"""

import importlib.machinery
import importlib.util
import os
import sys

if __name__ == "kernels":
    # This folder is diffopt.kernels. Run from a checkout's root (python -m, pytest), the root is on
    # sys.path and the folder would shadow Hugging Face's `kernels` package, which transformers
    # installs and diffusers imports. Hand that import over to the installed package.
    _root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels' (diffopt's is diffopt.kernels)")
    sys.modules["kernels"] = _installed = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_installed)
else:
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
