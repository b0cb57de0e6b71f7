"""The runtime: lowering a rewritten graph into compiled regions and executing them."""

from .cache import CachingExecutor, Request, request
from .calibration import Calibration, calibrate
from .compensation import Compensation, CompensationFit, fit_compensation
from .executor import FlopTally, RegionExecutor, counting_flops
from .lowering import (
    LoweredRegion,
    LoweringError,
    RegionProgram,
    compile_regions,
    lower,
    split_regions,
)
from .unroll import Full, Partial, UnrolledSampler, full, partial, scheduler_steps, unroll

__all__ = [
    "CachingExecutor",
    "Calibration",
    "Compensation",
    "CompensationFit",
    "FlopTally",
    "Full",
    "LoweredRegion",
    "LoweringError",
    "Partial",
    "RegionExecutor",
    "RegionProgram",
    "Request",
    "UnrolledSampler",
    "calibrate",
    "compile_regions",
    "counting_flops",
    "fit_compensation",
    "full",
    "lower",
    "partial",
    "request",
    "scheduler_steps",
    "split_regions",
    "unroll",
]
