"""The region runtime: lowering a rewritten graph into compiled regions, and executing them
(plainly, or under cache guards with their controller)."""

from . import profiles
from .cache import CachingExecutor, Request, request
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
    "FlopTally",
    "LoweredRegion",
    "LoweringError",
    "RegionExecutor",
    "RegionProgram",
    "Request",
    "compile_regions",
    "counting_flops",
    "lower",
    "profiles",
    "request",
    "split_regions",
]
