"""Requests in flight at the same time through one compiled model: each keeps its own cache."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

import diffopt
from diffopt.runtime import profiles

from ..caching import build, cached, denoise, latent_key, stepping

STEPS = 12


def served():
    """tiny-dit at batch 1 behind cache guards, calibrated by its first request."""
    model, inputs = build(batch=1)
    compiled = cached(model, STEPS)
    with diffopt.request(steps=STEPS, calibrate=True):
        denoise(compiled, inputs, STEPS)
    return compiled, inputs


def noised(inputs: dict, seed: int) -> dict:
    key = latent_key(inputs)
    noise = torch.randn(inputs[key].shape, generator=torch.Generator().manual_seed(seed))
    return {**inputs, key: noise}


def sample(compiled, inputs: dict, seed: int):
    with diffopt.request(steps=STEPS) as req:
        out = denoise(compiled, noised(inputs, seed), STEPS)
    return out, req.actions


def expect_same(got: dict, alone: dict) -> None:
    for seed, (out, actions) in alone.items():
        assert got[seed][1] == actions, seed
        assert torch.equal(got[seed][0], out), seed
    reused = sum(a != "full" for _, actions in alone.values() for a in actions[0])
    assert reused > 0  # the cache did something each request could have mixed up


def test_requests_on_threads_match_the_same_requests_one_by_one():
    compiled, inputs = served()
    seeds = range(8)
    alone = {s: sample(compiled, inputs, s) for s in seeds}
    got, start = {}, threading.Barrier(len(seeds))

    def serve(seed: int) -> None:
        start.wait()  # all in flight together
        got[seed] = sample(compiled, inputs, seed)

    threads = [threading.Thread(target=serve, args=(s,)) for s in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expect_same(got, alone)


def test_asyncio_requests_interleaved_step_by_step_match_one_by_one():
    compiled, inputs = served()
    seeds = range(8)
    alone = {s: sample(compiled, inputs, s) for s in seeds}

    async def serve(seed: int):
        with diffopt.request(steps=STEPS) as req:
            steps = []
            for latents in stepping(compiled, noised(inputs, seed), STEPS):
                steps.append(latents)
                await asyncio.sleep(0)  # the next task's step runs before this one's
        return seed, (steps[-1], req.actions)

    async def serve_all():
        return dict(await asyncio.gather(*(serve(s) for s in seeds)))

    expect_same(asyncio.run(serve_all()), alone)


def test_a_request_that_fails_half_way_leaves_the_next_unaffected():
    compiled, inputs = served()
    alone = {1: sample(compiled, inputs, 1)}
    with pytest.raises(RuntimeError, match="client went away"), diffopt.request(steps=STEPS):
        for step, _ in enumerate(stepping(compiled, noised(inputs, 0), STEPS)):
            if step == 5:
                raise RuntimeError("client went away")
    expect_same({1: sample(compiled, inputs, 1)}, alone)


def test_a_calibration_that_fails_half_way_is_not_kept():
    model, inputs = build(batch=1)
    compiled = cached(model, STEPS)
    with pytest.raises(RuntimeError), diffopt.request(steps=STEPS, calibrate=True):
        for step, _ in enumerate(stepping(compiled, inputs, STEPS)):
            if step == 5:
                raise RuntimeError("cancelled")
    assert profiles.lookup(profiles.model_weights(model.parameters())) is None
    with diffopt.request(steps=STEPS) as req:
        denoise(compiled, inputs, STEPS)
    assert set(req.actions[0]) == {"full"}  # the next request calibrates instead
