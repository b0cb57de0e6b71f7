"""benchmarks/input_sensitivity.py's reading of the velocities the sampler's calls return."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def script(benchmark_script):
    return benchmark_script("input_sensitivity")  # it imports cache_robustness beside it


def test_the_velocities_with_a_guidance_batch_and_without_one(script):
    """Guidance 4 calls the model on cond and uncond as one batch; guidance 1 (the robustness
    benchmark's ``euler-50 g1 s1 b16``) on the inputs alone, where splitting the batch in two
    left no uncond half and the script stopped on a shape mismatch."""
    cond, uncond = torch.randn(5, 3, 4), torch.randn(5, 3, 4)
    guided = script.velocities(torch.cat([cond, uncond], dim=1), 3, 4.0)
    assert guided.keys() == {"guided", "cond", "uncond"}
    torch.testing.assert_close(guided["guided"], uncond + 4.0 * (cond - uncond))
    assert torch.equal(guided["cond"], cond) and torch.equal(guided["uncond"], uncond)
    alone = script.velocities(cond, 3, 1.0)
    assert alone.keys() == {"guided"} and torch.equal(alone["guided"], cond)
