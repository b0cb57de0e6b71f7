"""Graph passes: region analysis, the pass manager, and one file per pass.

Importing this package registers every pass it holds.
"""

from . import remove_noops  # noqa: F401  (registers the pass)
from .graph import DenoiserGraph, InputRoles, Region, TensorRole
from .manager import PassSpec, register_pass, registered_passes, run_passes
from .regions import analyze
from .report import PassError, PassReport

__all__ = [
    "DenoiserGraph",
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
