"""The runtime: lowering a rewritten graph into compiled regions and executing them."""

from .cache import CachingExecutor, Request, request
from .calibration import Calibration, calibrate
from .executor import FlopTally, RegionExecutor, counting_flops
from .lowering import (
    LoweredRegion,
    LoweringError,
    RegionProgram,
    compile_regions,
    lower,
    split_regions,
)

__all__ = [
    "CachingExecutor",
    "Calibration",
    "FlopTally",
    "LoweredRegion",
    "LoweringError",
    "RegionExecutor",
    "RegionProgram",
    "Request",
    "calibrate",
    "compile_regions",
    "counting_flops",
    "lower",
    "request",
    "split_regions",
]
