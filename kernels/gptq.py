"""Calibrated weight preparation: SmoothQuant's migration and GPTQ's error-feedback rounding.

Both read what a linear saw on calibration inputs (`formats.LinearInputs`):

- `smoothing` divides each input channel by s_j = max|x_j|^α / max|W_j|^(1-α) and multiplies
  the weight's column by it, so activation outliers move into the weight (SmoothQuant);
- `gptq_round` rounds the weight one column at a time and spreads each column's rounding error
  over the columns not yet rounded, weighted by the inverse Hessian H = XᵀX of the inputs
  (GPTQ), so the *output* error on those inputs shrinks, not just the weight error. The scales
  are fixed beforehand (GPTQ's static groups): the stored layout is the same as plain rounding.
"""

from __future__ import annotations

import torch

from .hadamard import rotate
from .reference import qmax, round_half_away

GPTQ_BLOCK = 128
"""Columns rounded per lazy batch (the error of a batch reaches later columns in one matmul)."""
GPTQ_DAMP = 0.01
"""Added to H's diagonal, as a fraction of its mean, so that H stays invertible."""


def smoothing(
    absmax: torch.Tensor, weight: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """SmoothQuant for inputs whose channels reach `absmax` [K] and `weight` [N, K]: the
    per-channel factor the activation is multiplied by (1 / s, float32 [K]) and the weight with
    its columns times s. ``x Wᵀ = (x / s)(W s)ᵀ`` exactly; only what quantization does to each
    side changes."""
    act = absmax.float().clamp(min=1e-5)
    wmax = weight.abs().amax(dim=0).float().clamp(min=1e-5)
    s = (act.pow(alpha) / wmax.pow(1 - alpha)).clamp(1e-4, 1e4)
    return s.reciprocal(), weight.float() * s[None, :]


def rotated_hessian(
    gram: torch.Tensor, smooth: torch.Tensor | None, rotation: torch.Tensor | None
) -> torch.Tensor:
    """XᵀX [K, K] of the inputs as the quantized weight meets them: smoothed (x · smooth) and
    rotated in groups (x · R): ``Rᵀ S XᵀX S R``."""
    h = gram.double()
    if smooth is not None:
        s = smooth.double()
        h = h * s[:, None] * s[None, :]
    if rotation is not None:  # R is block-diagonal, H symmetric: rotate its rows, twice
        h = rotate(rotate(h, rotation, torch.float64).T, rotation, torch.float64)
    return h


def gptq_round(
    weight: torch.Tensor, scale: torch.Tensor, bits: int, hessian: torch.Tensor
) -> torch.Tensor:
    """Round float32 `weight` [N, K] to int8 levels against fixed per-element `scale` [N, K]
    with GPTQ's error feedback under `hessian` [K, K] (XᵀX of the inputs the weight multiplies).

    Channels the inputs never used (a zero diagonal) are rounded plainly and pass no error on.
    """
    q = qmax(bits)
    k = weight.shape[1]
    w = weight.float().clone()
    inv_scale = torch.where(scale > 0, 1 / scale.float(), 0.0)
    h = hessian.double().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(GPTQ_DAMP * h.diagonal().mean())
    # the upper Cholesky factor of H⁻¹: row i holds how column i's error spreads to later ones
    spread = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    spread = spread.float()
    values = torch.empty_like(w, dtype=torch.int8)
    for start in range(0, k, GPTQ_BLOCK):
        end = min(start + GPTQ_BLOCK, k)
        errors = torch.empty(w.shape[0], end - start)
        for j in range(start, end):
            level = round_half_away(w[:, j] * inv_scale[:, j], max_magnitude=q)
            values[:, j] = level.to(torch.int8)
            error = (w[:, j] - level * scale[:, j].float()) / spread[j, j]
            w[:, j:end] -= error[:, None] * spread[j, j:end][None, :]
            errors[:, j - start] = error
        w[:, end:] -= errors @ spread[start:end, end:]
    return values
