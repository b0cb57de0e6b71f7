"""The flow-matching sampler: per-image seeds, guidance batching, no shared state."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffopt.evaluation import zoo
from diffopt.fewstep.sampler import initial_noise, sample


def test_any_subset_of_a_batch_reproduces():
    model, _ = zoo.build("tiny-dit")
    scheduler = FlowMatchEulerDiscreteScheduler()
    reference = zoo.Reference("tiny-dit", model, scheduler, zoo.example_inputs, 10, 2.0, steps=4)
    labels = torch.tensor([1, 2, 3, 4])
    full = reference.sample(labels, [10, 11, 12, 13])
    part = reference.sample(labels[2:], [12, 13])
    torch.testing.assert_close(full[2:], part, rtol=1e-5, atol=1e-5)
    assert len(scheduler.timesteps) == 1000  # the caller's scheduler is never set or stepped


def test_guidance_one_is_one_unbatched_call_per_step():
    calls = []

    def velocity(hidden_states, timestep, class_labels, return_dict):
        calls.append(hidden_states.shape[0])
        return (hidden_states * 0 + class_labels[:, None, None, None].float(),)

    noise = initial_noise((1, 2, 2), [0, 1])
    labels = torch.tensor([1, 3])
    cond, uncond = {"class_labels": labels}, {"class_labels": torch.zeros_like(labels)}
    scheduler = FlowMatchEulerDiscreteScheduler()
    plain = sample(velocity, scheduler, noise, cond, uncond, steps=3, guidance=1.0)
    assert calls == [2, 2, 2]
    calls.clear()
    guided = sample(velocity, scheduler, noise, cond, uncond, steps=3, guidance=2.0)
    assert calls == [4, 4, 4]
    # Euler over σ 1 → 0 with a constant velocity v moves x by -v; guidance 2 doubles v here
    torch.testing.assert_close(noise - plain, labels[:, None, None, None].float().expand_as(noise))
    torch.testing.assert_close(noise - guided, 2 * (noise - plain))
