"""`import diffopt` stays light: no exporter runtimes, no CUDA initialization."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_light():
    code = (
        "import sys, torch, diffopt, diffopt.backend, diffopt.passes, diffopt.runtime\n"
        "heavy = {'onnx', 'onnxruntime', 'onnxscript', 'tensorrt'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_a_second_checkout_refuses_the_installed_ones_subpackages(tmp_path):
    """An editable install maps diffopt.passes to *its* checkout: another tree must not run it."""
    import shutil
    from pathlib import Path

    import diffopt

    source = Path(diffopt.__file__).parent
    shutil.copytree(source, tmp_path / "diffopt", ignore=shutil.ignore_patterns("assets"))
    out = subprocess.run(
        [sys.executable, "-c", "import diffopt"], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode != 0
    assert f"diffopt was imported from {tmp_path.resolve()}" in out.stderr or (
        "is not installed beside diffopt" in out.stderr
    ), out.stderr


def test_the_core_loads_without_the_evaluation_kit():
    code = (
        "import sys, diffopt.config, diffopt\n"
        "kit = {'sklearn', 'torchmetrics', 'matplotlib', 'rich', 'diffopt.evaluation'}\n"
        "assert not kit & set(sys.modules), kit & set(sys.modules)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
