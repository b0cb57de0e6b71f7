"""The examples run as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize(
    "script, args",
    [
        ("inspect_tiny.py", []),
        ("compile_diffusers.py", ["--inner", "aot_eager"]),
        ("bench_reference.py", ["--images", "10", "--steps", "4"]),
        ("cache_reference.py", ["--images", "6", "--steps", "20", "--target-psnr", "25"]),
        ("quantize_reference.py", ["--images", "6", "--steps", "8"]),
        ("few_step_reference.py", ["--images", "10"]),
        ("export_reference.py", ["--images", "4", "--steps", "20"]),
        ("serve_ray.py", ["--requests", "4", "--steps", "6"]),
    ],
)
def test_example_runs(script, args, tmp_path):
    if script == "serve_ray.py":
        pytest.importorskip("ray.serve")
    command = [sys.executable, str(EXAMPLES / script), *args]
    out = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    if script == "compile_diffusers.py":
        diffs = [float(line.split("=")[-1]) for line in out.stdout.splitlines() if "max |" in line]
        assert len(diffs) == 3 and max(diffs) <= 1e-5
    elif script == "bench_reference.py":
        assert "| baseline" in out.stdout and (tmp_path / "speed_quality.png").exists()
    elif script == "cache_reference.py":
        psnr = float(out.stdout.split("PSNR on fresh seeds: ")[1].split(" dB")[0])
        assert psnr > 20 and "'reuse'" in out.stdout
    elif script == "quantize_reference.py":
        assert "48 rewritten" in out.stdout and "diffopt::quant_linear" not in out.stderr
        psnr = float(out.stdout.split("unquantized model: ")[1].split(" dB")[0])
        assert psnr > 22
    elif script == "few_step_reference.py":
        assert "partial(blocks=5)" in out.stdout and "error after" in out.stdout
        nfe = float(out.stdout.split("effective NFE ")[1].split(";")[0])
        assert 1.5 < nfe <= 1.7
        assert float(out.stdout.split("accuracy ")[1].split()[0]) >= 0.8
    elif script == "serve_ray.py":
        assert "4 requests in" in out.stdout and "gives the same image: True" in out.stdout
    elif script == "export_reference.py":
        assert "same decisions as torch: True" in out.stdout
        assert float(out.stdout.split("max |diff| ")[1].split()[0].rstrip(";")) <= 1e-4
        assert float(out.stdout.split("unquantized model ")[1].split(" dB")[0]) > 22
    else:
        assert (tmp_path / "inspect_tiny.html").exists()
