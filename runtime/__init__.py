"""The runtime: lowering a rewritten graph into compiled regions and executing them."""

from .executor import RegionExecutor
from .lowering import (
    LoweredRegion,
    LoweringError,
    RegionProgram,
    compile_regions,
    lower,
    split_regions,
)

__all__ = [
    "LoweredRegion",
    "LoweringError",
    "RegionExecutor",
    "RegionProgram",
    "compile_regions",
    "lower",
    "split_regions",
]
