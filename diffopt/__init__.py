"""diffopt: a compiler-style graph optimization pass library for diffusion denoisers.

Ways in:
- ``torch.compile(model, backend="diffopt", options={...})`` (no import needed);
- `diffopt.inspect(model, example_inputs, config)` to see what the passes did;
- `diffopt.calibrate(model, run, steps=...)` to fit cache-guard settings on calibration inputs;
- `diffopt.unroll(denoiser, scheduler, steps)` for a few-step schedule as one module (one graph),
  fractional "1.x" schedules included (`diffopt.fit_compensation`);
- `diffopt.export(model, example_inputs, config, out=DIR)` for an ONNX engine (one file per
  region and a manifest) and `diffopt.load(DIR)` to run it with onnxruntime;
- the ``diffopt`` command line (``diffopt demo``, ``diffopt bench``, ``diffopt inspect tiny-dit``).

Reference models live in `diffopt.zoo` (``zoo.load("ref-dit")``), quality and cost metrics in
`diffopt.metrics`, the benchmark harness in `diffopt.bench`.

Importing diffopt loads neither onnx, onnxruntime nor tensorrt, and does not initialize CUDA.
"""

from importlib.metadata import PackageNotFoundError, version

from . import bench, metrics, zoo
from .backend import diffopt_backend
from .config import CacheConfig, CleanupConfig, Config, ConfigError, QuantConfig
from .exporters import export, load
from .inspection import InspectReport, inspect
from .runtime import (
    Calibration,
    UnrolledSampler,
    calibrate,
    fit_compensation,
    full,
    partial,
    request,
    unroll,
)

try:
    __version__ = version("diffopt")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "CacheConfig",
    "Calibration",
    "CleanupConfig",
    "Config",
    "ConfigError",
    "InspectReport",
    "QuantConfig",
    "UnrolledSampler",
    "__version__",
    "bench",
    "calibrate",
    "diffopt_backend",
    "export",
    "fit_compensation",
    "full",
    "inspect",
    "load",
    "metrics",
    "partial",
    "request",
    "unroll",
    "zoo",
]
