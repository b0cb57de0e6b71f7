"""`import diffopt` stays light (no exporter runtimes, no evaluation kit, no CUDA initialization)
and refuses to mix two checkouts."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import diffopt


def python(code: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter: what a module imports shows only there."""
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True)


def test_import_is_light():
    out = python(
        "import sys, torch, diffopt, diffopt.backend, diffopt.passes, diffopt.runtime\n"
        "heavy = {'onnx', 'onnxruntime', 'onnxscript', 'tensorrt'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    assert out.returncode == 0, out.stderr


def test_the_core_loads_without_the_evaluation_kit():
    out = python(
        "import sys, diffopt.config, diffopt\n"
        "kit = {'sklearn', 'torchmetrics', 'matplotlib', 'rich', 'diffopt.evaluation'}\n"
        "assert not kit & set(sys.modules), kit & set(sys.modules)\n"
    )
    assert out.returncode == 0, out.stderr


def test_a_second_checkout_refuses_the_installed_ones_subpackages(tmp_path):
    """An editable install maps diffopt.passes to *its* checkout: another tree must not run it."""
    source = Path(diffopt.__file__).parent
    shutil.copytree(source, tmp_path / "diffopt", ignore=shutil.ignore_patterns("assets"))
    out = python("import diffopt", cwd=tmp_path)
    assert out.returncode != 0
    assert f"diffopt was imported from {tmp_path.resolve()}" in out.stderr or (
        "is not installed beside diffopt" in out.stderr
    ), out.stderr
