"""Exporters: regions to ONNX (run by onnxruntime) or TensorRT, plus the engine manifest.

Empty until the export issue lands; onnx and tensorrt are imported lazily, never by
`import diffopt`.
"""
