"""Exporters: regions to ONNX (run by onnxruntime) or TensorRT, plus the engine manifest.

onnx, onnxruntime and tensorrt are imported when an engine is written or loaded, never by
`import diffopt`.
"""

from .onnx import Engine, ExportError, export, load_engine

__all__ = ["Engine", "ExportError", "export", "load_engine"]
