"""Exporters: regions to ONNX (run by onnxruntime) or TensorRT, plus the engine manifest.

One file a job: `writer` (`export`, the steps in order), `regions` (a region as an engine sees
it), `variants` (token-refresh runs), `static_scales` (``qdq_static`` calibration), `onnx` (ONNX
files), `manifest` (the engine directory format), `formats` (the format registry; `onnx` and
`tensorrt` register theirs), `engine` (`load_engine`: the onnxruntime runtime), `quant_onnx`
(diffopt's quantized linear in ONNX ops).

onnx, onnxruntime and tensorrt are imported when an engine is written or loaded, never by
`import diffopt`.
"""

from .engine import Engine, load_engine
from .formats import ExportError
from .writer import export

__all__ = ["Engine", "ExportError", "export", "load_engine"]
