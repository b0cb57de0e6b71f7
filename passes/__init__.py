"""Graph passes: region analysis, the pass manager, and one file per pass.

Importing this package registers every pass it holds.
"""

from . import block_guard, remove_noops, step_guard, token_guard, w4a4  # noqa: F401  (register)
from .graph import DenoiserGraph, Guard, InputRoles, Region, TensorRole
from .manager import PassSpec, register_pass, registered_passes, run_passes
from .regions import analyze
from .report import PassError, PassReport

__all__ = [
    "DenoiserGraph",
    "Guard",
    "InputRoles",
    "PassError",
    "PassReport",
    "PassSpec",
    "Region",
    "TensorRole",
    "analyze",
    "register_pass",
    "registered_passes",
    "run_passes",
]
