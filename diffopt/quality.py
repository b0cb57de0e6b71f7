"""Quality against a reference run, per sample: what `diffopt.calibrate` promises and reports.

PSNR is computed here, in plain torch, so that the core needs no metrics library; SSIM, FID and
the classifier scores live in the evaluation kit (`diffopt.evaluation.metrics`).

A batch's PSNR (of its mean squared error) hides how its samples are spread: a cache setting can
keep the median sample at 40 dB while a few samples flip to another image. `PsnrStats` reports the
tail beside the mean, and the promise covers both: the mean, and the 5th percentile within
`TAIL_MARGIN_DB` of the target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

TAIL_MARGIN_DB = 3.0
"""How far under the target the 5th-percentile sample may sit (``p5 >= target - 3 dB``)."""


def mse_per_sample(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample of `images` against `reference`: [B] float64."""
    if images.shape != reference.shape:
        raise ValueError(
            f"images {tuple(images.shape)} and reference {tuple(reference.shape)} differ in shape"
        )
    return (images.double() - reference.double()).pow(2).flatten(1).mean(1)


def to_psnr(mse: torch.Tensor | float, data_range: float) -> torch.Tensor | float:
    """PSNR in dB of a mean squared error (a tensor of them, or one float; inf for 0)."""
    if isinstance(mse, torch.Tensor):
        return 10 * torch.log10(data_range**2 / mse)
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def psnr_per_sample(
    images: torch.Tensor, reference: torch.Tensor, data_range: float
) -> torch.Tensor:
    """PSNR in dB of each sample of `images` against `reference` ([B] floats, inf if equal)."""
    return to_psnr(mse_per_sample(images, reference), data_range)


def psnr(images: torch.Tensor, reference: torch.Tensor, data_range: float) -> float:
    """PSNR in dB of the whole batch (its mean squared error), inf when identical.

    `data_range` is the span of valid values: 2 for images in [-1, 1].
    """
    return to_psnr(mse_per_sample(images, reference).mean().item(), data_range)


@dataclass(frozen=True)
class PsnrStats:
    """How a batch of samples did against the reference: the mean and the tail, in dB."""

    mean: float
    """PSNR of the mean squared error over all samples (the usual batch PSNR)."""
    minimum: float
    """The worst sample's PSNR."""
    p5: float
    """5th percentile of the per-sample PSNRs (the 95th of their squared errors, interpolated
    linearly between order statistics)."""
    median: float
    samples: int

    @classmethod
    def from_mse(cls, mse: Sequence[float] | torch.Tensor, data_range: float) -> PsnrStats:
        """The statistics of per-sample squared errors (`mse_per_sample`)."""
        mse = torch.as_tensor(mse, dtype=torch.float64)
        if mse.numel() == 0:
            raise ValueError("no samples to score")
        # quantiles of the errors, not of the dB values: an identical sample is 0, never inf
        p95, median = torch.quantile(mse, torch.tensor([0.95, 0.5], dtype=torch.float64)).tolist()
        return cls(
            mean=to_psnr(mse.mean().item(), data_range),
            minimum=to_psnr(mse.max().item(), data_range),
            p5=to_psnr(p95, data_range),
            median=to_psnr(median, data_range),
            samples=mse.numel(),
        )

    def meets(self, target: float) -> bool:
        """Whether these samples keep the promise: mean >= target, p5 >= target - tail margin."""
        return self.mean >= target and self.p5 >= target - TAIL_MARGIN_DB

    def cells(self) -> list[str]:
        """mean, p5, min, median formatted for a table (`STATS_HEADERS`)."""
        return [format_db(v) for v in (self.mean, self.p5, self.minimum, self.median)]


STATS_HEADERS = ("PSNR dB", "p5 dB", "min dB", "median dB")
"""Column names of `PsnrStats.cells`."""


def psnr_stats(images: torch.Tensor, reference: torch.Tensor, data_range: float) -> PsnrStats:
    """Mean-MSE PSNR and the per-sample percentiles of `images` against `reference`."""
    return PsnrStats.from_mse(mse_per_sample(images, reference), data_range)


def format_db(value: float) -> str:
    """A PSNR for a table: one decimal, or ``inf`` for an identical result."""
    return "inf" if value == math.inf else f"{value:.1f}"


@dataclass(frozen=True)
class FreshEstimate:
    """What one setting's per-sample errors on the calibration inputs say about fresh inputs.

    A calibration set's own PSNR is the figure the setting was picked for, so it flatters it;
    resampling the calibration inputs (bootstrap) gives the spread a fresh set of the same size
    would show, and its lower bound is what a selection can stand on.
    """

    estimate: float
    """Mean-MSE PSNR on the calibration inputs (the point estimate for fresh inputs)."""
    low: float
    """Lower bound of the mean-MSE PSNR at `confidence` (bootstrap percentile)."""
    high: float
    """Upper bound at `confidence` (the other side of the interval)."""
    p5_low: float
    """Lower bound of the 5th-percentile sample's PSNR at `confidence`."""
    confidence: float
    samples: int

    def meets(self, target: float) -> bool:
        """Whether fresh inputs keep the promise at this confidence: the mean-MSE PSNR's lower
        bound reaches `target`, and the 5th percentile's is within `TAIL_MARGIN_DB` of it."""
        return self.low >= target and self.p5_low >= target - TAIL_MARGIN_DB

    def inputs_for_margin(self, margin_db: float) -> int:
        """Calibration inputs for the lower bound to sit within `margin_db` of the estimate
        (the interval narrows as one over the square root of the count)."""
        spread = self.estimate - self.low
        if not math.isfinite(spread) or spread <= margin_db:
            return self.samples
        return math.ceil(self.samples * (spread / margin_db) ** 2)


def fresh_estimate(
    mse: Sequence[float] | torch.Tensor,
    data_range: float,
    *,
    confidence: float = 0.9,
    resamples: int = 2000,
    seed: int = 0,
) -> FreshEstimate:
    """Bootstrap the per-sample squared errors of the calibration inputs: the mean-MSE PSNR a
    fresh set of the same size would give, with a two-sided `confidence` interval, and a lower
    bound for its 5th-percentile sample. Seeded, so a calibration is reproducible."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    mse = torch.as_tensor(mse, dtype=torch.float64)
    n = mse.numel()
    if n == 0:
        raise ValueError("no samples to score")
    gen = torch.Generator().manual_seed(seed)
    drawn = mse[torch.randint(n, (resamples, n), generator=gen)]
    tail = (1 - confidence) / 2
    means = drawn.mean(1)
    high_mse, low_mse = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    p95 = torch.quantile(drawn, 0.95, dim=1)
    worst_p95 = torch.quantile(p95, 1 - tail)
    return FreshEstimate(
        estimate=to_psnr(mse.mean().item(), data_range),
        low=to_psnr(low_mse.item(), data_range),
        high=to_psnr(high_mse.item(), data_range),
        p5_low=to_psnr(worst_p95.item(), data_range),
        confidence=confidence,
        samples=n,
    )


def inputs_to_see(rate: float, confidence: float) -> int:
    """Calibration inputs needed for a failure that hits a `rate` share of inputs to show up in
    at least one of them with `confidence` (``1 - (1 - rate) ** n >= confidence``)."""
    if not (0 < rate < 1 and 0 < confidence < 1):
        raise ValueError(f"rate and confidence must be in (0, 1), got {rate}, {confidence}")
    return math.ceil(math.log(1 - confidence) / math.log(1 - rate))
