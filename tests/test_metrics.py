"""diffopt.evaluation.metrics: each metric on inputs whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from diffopt.evaluation import metrics
from diffopt.evaluation.data import digits


@pytest.fixture(scope="module")
def real():
    return digits("test")


def test_psnr_and_ssim():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(4, 1, 16, 16, generator=gen) * 2 - 1
    assert metrics.psnr(a, a) == math.inf
    assert metrics.ssim(a, a) == pytest.approx(1.0)
    noisy = a + 0.02 * torch.randn(a.shape, generator=gen)
    # PSNR = 10 log10(range² / MSE) with range 2 and MSE ≈ 0.02²
    assert metrics.psnr(noisy, a) == pytest.approx(10 * math.log10(4 / 0.02**2), abs=0.5)
    assert metrics.ssim(noisy, a) > metrics.ssim(a + 0.5 * torch.randn(a.shape), a)


def test_classifier_recognizes_held_out_digits(real):
    images, labels = real
    assert metrics.class_accuracy(images, labels) >= 0.97
    assert metrics.class_accuracy(images, (labels + 1) % 10) < 0.05


def test_ref_fid_separates_real_from_noise(real):
    images, _ = real
    half = len(images) // 2
    same = metrics.ref_fid(images[:half], images[half:])
    noise = metrics.ref_fid(torch.rand_like(images[:half]) * 2 - 1, images[half:])
    assert same < 0.2 * noise


def test_ref_fid_spread_shrinks_with_more_images(real):
    images, _ = real
    few, many = images[:40], images[:240]
    spread_few = metrics.ref_fid_spread(few, images[240:], resamples=8)
    spread_many = metrics.ref_fid_spread(many, images[240:], resamples=8)
    assert 0 < spread_many < spread_few
    assert metrics.ref_fid_spread(few, images[240:], resamples=8) == spread_few  # seeded


def test_a_paired_ref_fid_difference_is_tighter_than_either_spread(real):
    images, _ = real
    few, rest = images[:80], images[240:]
    blurred = (few + 0.1 * torch.randn_like(few)).clamp(-1, 1)
    gap, sd = metrics.ref_fid_difference(blurred, few, rest, resamples=8)
    assert gap == pytest.approx(metrics.ref_fid(blurred, rest) - metrics.ref_fid(few, rest))
    assert 0 < sd < 0.5 * metrics.ref_fid_spread(few, rest, resamples=8)
    assert metrics.ref_fid_difference(few, few, rest, resamples=4) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same seeds"):
        metrics.ref_fid_difference(few, images[:40], rest)


def test_count_flops_of_a_matmul():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    result, flops = metrics.count_flops(lambda: a @ b)
    assert flops == 2 * 8 * 16 * 4 and result.shape == (8, 4)


def test_peak_memory_sees_a_temporary():
    def make() -> float:
        big = torch.ones(1024, 1024)  # 4 MiB, freed before returning
        return float(big.sum())

    result, peak = metrics.measure_peak_memory(make)
    assert result == 1024 * 1024
    assert 4 * 2**20 <= peak < 8 * 2**20
