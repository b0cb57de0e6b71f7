"""diffopt: a compiler-style graph optimization pass library for diffusion denoisers.

Ways in:
- ``torch.compile(model, backend="diffopt", options={...})`` (no import needed);
- `diffopt.inspect(model, example_inputs, config)` to see what the passes did;
- `diffopt.calibrate(model, run, steps=...)` to fit cache-guard settings on calibration inputs;
- `diffopt.unroll(denoiser, scheduler, steps)` for a few-step schedule as one module (one graph),
  fractional "1.x" schedules included (`diffopt.fit_compensation`);
- `diffopt.export(model, example_inputs, config, out=DIR)` for an ONNX engine (one file per
  region and a manifest) and `diffopt.load_engine(DIR)` to run it with onnxruntime;
- the ``diffopt`` command line (``diffopt demo``, ``diffopt bench``, ``diffopt inspect tiny-dit``).

The evaluation kit (reference models, metrics, the benchmark harness, peers) is the subpackage
`diffopt.evaluation`, installed with the ``eval`` extra; ``diffopt.zoo``, ``diffopt.metrics``
and ``diffopt.bench`` name its modules. Importing diffopt loads neither the evaluation kit, onnx,
onnxruntime nor tensorrt, and does not initialize CUDA.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path
from typing import Any


def _check_same_tree() -> None:
    """Refuse a mix of two checkouts.

    The top-level folders (passes, runtime, ...) are mapped into ``diffopt.*`` by the install, so
    an editable install of one checkout answers ``import diffopt.passes`` for every other
    checkout on the machine: a second clone would silently run the first one's passes.
    """
    tree = Path(__file__).resolve().parent.parent
    for name in ("passes", "runtime", "kernels", "exporters"):
        spec = find_spec(f"diffopt.{name}")
        if spec is None or spec.origin is None:
            raise ImportError(
                f"diffopt.{name} is not installed beside diffopt ({tree}): a checkout maps its "
                f"top-level folders into diffopt when installed: pip install -e {tree}"
            )
        where = Path(spec.origin).resolve()
        if not where.is_relative_to(tree):
            raise ImportError(
                f"diffopt was imported from {tree}, but diffopt.{name} resolves to {where.parent}, "
                "another checkout's install. Install this checkout "
                f"(pip install -e {tree}) or run from the checkout that is installed."
            )


_check_same_tree()

from .backend import diffopt_backend  # noqa: E402  (after the check: it imports the passes)
from .calibration import Calibration, calibrate  # noqa: E402
from .config import (  # noqa: E402
    CacheConfig,
    CleanupConfig,
    Config,
    ConfigError,
    QuantConfig,
)
from .fewstep import (  # noqa: E402
    UnrolledSampler,
    fit_compensation,
    full,
    partial,
    train_schedule,
    unroll,
)
from .inspection import InspectReport, inspect  # noqa: E402
from .runtime import request  # noqa: E402

try:
    __version__ = version("diffopt")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

_LAZY = {
    "export": ("diffopt.exporters", "export"),
    "load_engine": ("diffopt.exporters", "load_engine"),
    "zoo": ("diffopt.evaluation.zoo", None),
    "metrics": ("diffopt.evaluation.metrics", None),
    "bench": ("diffopt.evaluation.bench", None),
    "evaluation": ("diffopt.evaluation", None),
}
"""Names resolved on first use, so that `import diffopt` stays light."""


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'diffopt' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = import_module(module)
    return value if attribute is None else getattr(value, attribute)


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
    "evaluation",
    "export",
    "fit_compensation",
    "full",
    "inspect",
    "load_engine",
    "metrics",
    "partial",
    "request",
    "train_schedule",
    "unroll",
    "zoo",
]
