"""diffopt: a compiler-style graph optimization pass library for diffusion denoisers.

Three ways in:
- ``torch.compile(model, backend="diffopt", options={...})`` (no import needed);
- `diffopt.inspect(model, example_inputs, config)` to see what the passes did;
- the ``diffopt`` command line (``diffopt inspect tiny-dit``).

Importing diffopt loads neither onnx, onnxruntime nor tensorrt, and does not initialize CUDA.
"""

from importlib.metadata import PackageNotFoundError, version

from .backend import diffopt_backend
from .config import CleanupConfig, Config, ConfigError
from .inspection import InspectReport, inspect

try:
    __version__ = version("diffopt")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "CleanupConfig",
    "Config",
    "ConfigError",
    "InspectReport",
    "__version__",
    "diffopt_backend",
    "inspect",
]
