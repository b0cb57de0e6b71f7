"""SmoothQuant's migration and GPTQ's error-feedback rounding (`kernels/gptq.py`)."""

from __future__ import annotations

import torch

from diffopt.kernels import hadamard, rotate
from diffopt.kernels.gptq import gptq_round, smoothing
from diffopt.kernels.reference import quantize_rows, quantize_weight, stored_values


def correlated_inputs(rows: int, k: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose channels move together (8 directions, the same for every seed), as
    activations do; the seed draws the rows."""
    directions = torch.randn(8, k, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 8, generator=g) @ directions + 0.1 * torch.randn(rows, k, generator=g)


def test_smoothing_is_exact_in_float_and_flattens_activation_outliers():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 32, generator=g)
    x[:, 3] *= 50  # an outlier channel
    w = torch.randn(16, 32, generator=g)
    factor, smoothed = smoothing(x.abs().amax(0), w, alpha=0.5)
    torch.testing.assert_close((x * factor) @ smoothed.T, x @ w.T, rtol=1e-5, atol=1e-4)
    spread = (x * factor).abs().amax(0)
    assert spread.max() / spread.min() < x.abs().amax(0).max() / x.abs().amax(0).min() / 5


def test_gptq_under_an_identity_hessian_is_round_to_nearest():
    """With uncorrelated inputs no column's error has anywhere to go."""
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    scale = (w.abs().amax(1) / 7).to(torch.float16)
    nearest, _ = quantize_rows(w, 4, scale=scale)
    fed_back = gptq_round(w, scale.float()[:, None].expand(-1, 64), 4, torch.eye(64) * 3)
    assert torch.equal(fed_back, nearest)


def test_gptq_lowers_the_output_error_on_fresh_inputs_of_the_same_statistics():
    k = 64
    w = torch.randn(32, k, generator=torch.Generator().manual_seed(3))
    calib, fresh = correlated_inputs(512, k, seed=4), correlated_inputs(512, k, seed=5)
    rotation = hadamard("regular", 16)
    rows = rotate(calib, rotation).double()
    errors = {}
    for name, hessian in (("nearest", None), ("gptq", rows.T @ rows)):
        stored, scale = quantize_weight(w, 4, rotation, clip=True, scale_group=32, hessian=hessian)
        dequantized = stored_values(stored, 4).float() * scale.float().repeat_interleave(32, 1)
        approx = rotate(fresh, rotation) @ dequantized.T
        errors[name] = (approx - fresh @ w.T).pow(2).mean().item()
    assert errors["gptq"] < 0.7 * errors["nearest"], errors


def test_the_hessian_as_the_weight_meets_its_inputs():
    """From XᵀX alone: smoothing and the group rotation applied on both sides equal XᵀX of the
    smoothed, rotated rows (so ranks can sum XᵀX and transform it afterwards)."""
    from diffopt.kernels import LinearInputs
    from diffopt.kernels.gptq import rotated_hessian

    x = correlated_inputs(100, 64, seed=1)
    smooth, rotation = torch.rand(64) + 0.5, hadamard("regular", 16)
    rows = rotate(x * smooth, rotation, torch.float64)
    got = rotated_hessian(LinearInputs(x).gram, smooth, rotation)
    torch.testing.assert_close(got, rows.T @ rows, rtol=1e-5, atol=1e-5)
