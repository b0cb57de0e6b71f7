"""The evaluation kit: reference models (`zoo`), quality and cost metrics (`metrics`), the
benchmark harness (`bench`), peer libraries wrapped as bench variants (`peers`), the digits data
(`data`), which the ``diffopt demo`` command (`diffopt/cli.py`) runs on.

Its dependencies (scikit-learn, torchmetrics, matplotlib, tqdm) come with the ``eval``
extra: ``pip install "diffopt[eval]"``.
"""

from importlib.util import find_spec

_MISSING = [
    name for name in ("sklearn", "torchmetrics", "matplotlib", "tqdm") if find_spec(name) is None
]
if _MISSING:
    raise ImportError(
        f"diffopt.evaluation needs {', '.join(_MISSING)}, which the 'eval' extra installs: "
        'pip install "diffopt[eval]" (or ".[eval]" in a checkout)'
    )
