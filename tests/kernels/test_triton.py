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
