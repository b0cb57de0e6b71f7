"""The Triton kernels, run by Triton's interpreter on CPU, against the PyTorch reference.

conftest.py sets TRITON_INTERPRET=1 before anything imports triton. Integer parts must agree
exactly; the dequantized output within float32 rounding (it is in fact bit-identical here).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install triton)")

from diffopt.kernels import hadamard, pack_int4, quantize_weight
from diffopt.kernels import reference as ref
from diffopt.kernels import triton_w4a4 as tk

SHAPES = [  # (M, K, N): odd M and N, K not a multiple of the kernels' K tile, K < tile
    (33, 64, 24),
    (70, 320, 40),
    (5, 48, 17),
    (1, 256, 7),
]
CASES = [
    (4, 4, "regular"),
    (4, 4, "sylvester"),
    (4, 4, "none"),
    (8, 4, "regular"),
    (4, 8, "regular"),
    (8, 8, "none"),
]


def rotation_for(kind: str, k: int):
    return hadamard(kind, 64 if k % 64 == 0 else 16)


@pytest.mark.parametrize(("m", "k", "n"), SHAPES)
@pytest.mark.parametrize(("act_bits", "weight_bits", "kind"), CASES)
def test_rotate_quantize_matches_the_reference_exactly(m, k, n, act_bits, weight_bits, kind):
    torch.manual_seed(m + k)
    # Small integers: every rotated value is an exact dyadic float, so the comparison is exact
    # whatever order the dot sums in (and exact ties exercise the rounding rule).
    x = torch.randint(-3, 4, (m, k)).float()
    h = rotation_for(kind, k)
    values, scale = tk.rotate_quantize(x, act_bits, h)
    expected, expected_scale = ref.quantize_activation(x, act_bits, h)
    if act_bits == 4:
        expected = pack_int4(expected)
    assert torch.equal(values, expected)
    assert torch.equal(scale, expected_scale)


@pytest.mark.parametrize(("m", "k", "n"), [*SHAPES, (9, 41, 10)])
@pytest.mark.parametrize(("a_bits", "b_bits"), [(4, 4), (8, 4), (4, 8), (8, 8)])
def test_int_gemm_accumulates_exactly(m, k, n, a_bits, b_bits):
    if k % 2 and 4 in (a_bits, b_bits):
        pytest.skip("int4 packing needs an even K")
    torch.manual_seed(k)
    low = lambda bits, rows: torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (rows, k),  # noqa: E731
                                           dtype=torch.int8)  # fmt: skip
    a, b = low(a_bits, m), low(b_bits, n)
    stored = lambda v, bits: pack_int4(v) if bits == 4 else v  # noqa: E731
    ones_m, ones_n = torch.ones(m), torch.ones(n, dtype=torch.float16)
    out = tk.int_gemm(
        stored(a, a_bits), a_bits, ones_m, stored(b, b_bits), b_bits, ones_n, None, k,
        torch.float32,
    )  # fmt: skip
    assert torch.equal(out, ref.int_matmul(a, b).float())  # |acc| < 2^24: exact in float32


@pytest.mark.parametrize(("m", "k", "n"), SHAPES)
@pytest.mark.parametrize(("act_bits", "weight_bits", "kind"), CASES)
def test_fused_linear_matches_the_reference(m, k, n, act_bits, weight_bits, kind):
    torch.manual_seed(m * n)
    x, w, b = torch.randn(m, k) + 0.3, torch.randn(n, k) / k**0.5, torch.randn(n)
    h = rotation_for(kind, k)
    stored, scale = quantize_weight(w, weight_bits, h)
    got = tk.rotated_linear(x, stored, scale, b, h, act_bits, weight_bits)
    want = ref.rotated_linear(x, stored, scale, b, h, act_bits, weight_bits)
    # Stated tolerance: float32 rounding of the rotation (a flipped code moves one output by
    # at most one quantization step); observed: identical.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "tiles",
    [tk.Tiles(block_m=32, block_n=32, block_kh=32, block_k=32, num_warps=8, num_stages=4),
     tk.Tiles(block_m=16, block_n=64, block_kh=128, block_k=256)],
)  # fmt: skip
def test_other_tiles_give_the_same_result(tiles):
    """The tiles `benchmarks/w4a4_gpu.py --sweep` tries change speed, never the numbers."""
    torch.manual_seed(0)
    x, w, b = torch.randn(70, 320) + 0.3, torch.randn(40, 320) / 320**0.5, torch.randn(40)
    h = hadamard("regular", 64)
    stored, scale = quantize_weight(w, 4, h)
    got = tk.rotated_linear(x, stored, scale, b, h, 4, 4, tiles)
    assert torch.equal(got, tk.rotated_linear(x, stored, scale, b, h, 4, 4))


def test_gpu_benchmark_script_runs_end_to_end_as_a_dry_run(tmp_path):
    """A lent GPU gives minutes: the script must not fail there for a reason the CPU shows."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[2] / "benchmarks" / "w4a4_gpu.py"
    done = subprocess.run(
        [sys.executable, str(script), "--dry-run", "--sweep", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "w4a4-gpu.json").read_text())
    for result in report["results"]:
        assert result["checks"]["vs reference"] < 1e-5
        for entries in result["sweep"].values():
            assert all("ms" in e for e in entries), entries
