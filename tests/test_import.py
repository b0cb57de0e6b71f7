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
