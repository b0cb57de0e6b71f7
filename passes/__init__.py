"""Graph passes: region analysis, the pass manager, and one file per pass.

Importing this package registers every pass it holds; they run in the order of `PIPELINE`
(`manager.py`): fold_constants, real_rotary, step_guard, block_guard, token_guard, quantize,
remove_noops. A pass from outside diffopt registers with
`register_pass(..., after=... or before=...)`.
"""

from diffopt.guards import Guard

from . import (  # noqa: F401 (register)
    block_guard,
    fold_constants,
    quantize,
    real_rotary,
    remove_noops,
    step_guard,
    token_guard,
)
from .graph import DenoiserGraph, InputRoles, Region, TensorRole
from .manager import PIPELINE, PassSpec, pipeline, register_pass, registered_passes, run_passes
from .regions import analyze
from .report import PassError, PassReport

__all__ = [
    "PIPELINE",
    "DenoiserGraph",
    "Guard",
    "InputRoles",
    "PassError",
    "PassReport",
    "PassSpec",
    "Region",
    "TensorRole",
    "analyze",
    "pipeline",
    "register_pass",
    "registered_passes",
    "run_passes",
]
