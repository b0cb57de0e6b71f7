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


def test_the_checkouts_kernels_folder_never_shadows_hugging_faces_kernels():
    """transformers installs Hugging Face's `kernels` and diffusers imports it: from the checkout's
    root (where pytest and `python -m` put sys.path[0]) that import must still reach it."""
    root = str(Path(diffopt.__file__).parent.parent)
    ours = str(Path(root, "kernels", "__init__.py"))  # a .venv may sit inside the root
    out = python(
        "import importlib.metadata, sys\n"
        f"assert sys.path[0] in ('', {root!r})\n"
        "try:\n"
        "    importlib.metadata.version('kernels')\n"
        "except importlib.metadata.PackageNotFoundError:\n"
        "    installed = False\n"
        "else:\n"
        "    installed = True\n"
        "try:\n"
        "    import kernels\n"
        "except ModuleNotFoundError:\n"
        "    assert not installed\n"
        "else:\n"
        f"    assert installed and kernels.__file__ != {ours!r}, kernels.__file__\n"
        "import diffopt.kernels, diffusers.models.transformers.transformer_flux\n"
        "assert diffopt.kernels.rotate is not None\n",
        cwd=Path(root),
    )
    assert out.returncode == 0, out.stderr
