"""Quality against a reference run, per sample: what `diffopt.calibrate` promises and reports.

PSNR is computed here, in plain torch, so that the core needs no metrics library; SSIM, FID and
the classifier scores live in the evaluation kit (`diffopt.evaluation.metrics`).
"""

from __future__ import annotations

import math

import torch


def psnr_per_sample(
    images: torch.Tensor, reference: torch.Tensor, data_range: float
) -> torch.Tensor:
    """PSNR in dB of each sample of `images` against `reference` ([B] floats, inf if equal)."""
    if images.shape != reference.shape:
        raise ValueError(
            f"images {tuple(images.shape)} and reference {tuple(reference.shape)} differ in shape"
        )
    error = (images.double() - reference.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / error)


def psnr(images: torch.Tensor, reference: torch.Tensor, data_range: float) -> float:
    """PSNR in dB of the whole batch (its mean squared error), inf when identical.

    `data_range` is the span of valid values: 2 for images in [-1, 1].
    """
    error = (images.double() - reference.double()).pow(2).mean().item()
    return math.inf if error == 0 else 10 * math.log10(data_range**2 / error)
