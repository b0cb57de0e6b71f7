"""The runtime: lowering a rewritten graph into compiled regions and executing them."""

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
    "FlopTally",
    "LoweredRegion",
    "LoweringError",
    "RegionExecutor",
    "RegionProgram",
    "compile_regions",
    "counting_flops",
    "lower",
    "split_regions",
]
