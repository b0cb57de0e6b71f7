"""diffopt.quality: per-sample PSNR statistics, on errors whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from diffopt import quality


def images_with_errors(errors: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """A reference batch and a copy whose sample i is off by `errors[i]` everywhere."""
    reference = torch.zeros(len(errors), 1, 4, 4)
    return reference + torch.tensor(errors).view(-1, 1, 1, 1), reference


def test_one_flipped_sample_sinks_the_mean_but_not_the_median():
    images, reference = images_with_errors([0.01] * 39 + [1.0])  # 46 dB each, one at 6 dB
    stats = quality.psnr_stats(images, reference, data_range=2.0)
    assert stats.samples == 40
    assert stats.median == pytest.approx(10 * math.log10(4 / 0.01**2))
    assert stats.minimum == pytest.approx(10 * math.log10(4 / 1.0))
    assert stats.mean == pytest.approx(quality.psnr(images, reference, 2.0))
    assert stats.mean < 23  # the one sample dominates the mean squared error
    assert stats.minimum < stats.p5 <= stats.median  # p5 of 40 lies between the 2 worst
    assert not stats.meets(30) and stats.meets(20)


def test_identical_samples_are_infinite_not_nan():
    images, reference = images_with_errors([0.0, 0.0, 0.1])
    stats = quality.psnr_stats(images, reference, 2.0)
    assert stats.median == math.inf and math.isfinite(stats.minimum)
    assert stats.cells()[3] == "inf"
    assert quality.psnr(reference, reference, 2.0) == math.inf


def test_the_tail_margin_is_part_of_the_promise():
    # the mean meets 30 dB, but a tenth of the samples sit at 26 dB
    errors = [0.01] * 18 + [0.1] * 2
    stats = quality.psnr_stats(*images_with_errors(errors), data_range=2.0)
    assert stats.mean > 30 and stats.p5 < 30 - quality.TAIL_MARGIN_DB
    assert not stats.meets(30)
