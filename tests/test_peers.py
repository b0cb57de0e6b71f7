"""Peer adapters: each one really caches on ref-dit, and a reset makes runs repeatable."""

from __future__ import annotations

import copy

import pytest
import torch

from diffopt import metrics, peers, zoo

STEPS = 20


@pytest.fixture(scope="module")
def ref():
    return zoo.load("ref-dit")


def _check(ref, variant):
    labels, seeds = torch.arange(4), [0, 1, 2, 3]
    denoiser = variant.build(copy.deepcopy(ref.model), "eager")

    def once():
        variant.reset(denoiser)
        return ref.sample(labels, seeds, denoiser=denoiser, steps=STEPS)

    first, flops = metrics.count_flops(once)
    _, base_flops = metrics.count_flops(lambda: ref.sample(labels, seeds, steps=STEPS))
    assert flops < 0.95 * base_flops, f"{variant.name} skipped no work"
    torch.testing.assert_close(once(), first, rtol=0, atol=0)  # reset: a cold start every run


@pytest.mark.parametrize(
    "make",
    [
        peers.first_block_cache,
        peers.taylorseer_cache,
        peers.faster_cache,
        peers.pyramid_attention_broadcast,
    ],
)
def test_diffusers_hook_peers(ref, make):
    _check(ref, make())


def test_mag_cache_calibrates_itself(ref):
    labels, seeds = torch.arange(4), [0, 1, 2, 3]
    _check(
        ref, peers.mag_cache(lambda d: ref.sample(labels, seeds, denoiser=d, steps=STEPS), STEPS)
    )


def test_cache_dit_dbcache(ref):
    pytest.importorskip("cache_dit")
    _check(ref, peers.db_cache(STEPS, threshold=0.2))
