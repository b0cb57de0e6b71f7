"""The push-then-polish controller on its own: thresholds, guardrails, plans, profiles."""

from __future__ import annotations

import json

import pytest
import torch

from diffopt.config import CacheConfig, ConfigError
from diffopt.runtime.controller import Controller, interval_plan, load_plan, resample_profile


def decisions(config: CacheConfig, steps: int, change: list[float], polish="token") -> str:
    controller = Controller(config, steps, polish)
    return "".join(
        controller.decide(step, torch.tensor([change[step]]))[0] for step in range(steps)
    )


def test_push_then_polish_then_full():
    config = CacheConfig(early=0.25, critical=0.45, warmup=2, max_reuse=20)
    # 0.1 per step: reuse while the sum < 0.25, polish until 0.45, then a full step
    assert decisions(config, 12, [0.1] * 12) == "ffrrttfrrttf"


def test_first_steps_and_last_step_always_compute():
    config = CacheConfig(early=10, critical=20, warmup=3, max_reuse=100)
    assert decisions(config, 8, [0.0] * 8) == "fffrrrrf"


def test_cap_on_consecutive_reuse_forces_a_full_step():
    config = CacheConfig(early=10, critical=20, warmup=1, max_reuse=3)
    assert decisions(config, 10, [0.0] * 10) == "frrrfrrrff"


def test_polish_none_reuses_until_the_critical_line():
    config = CacheConfig(early=0.25, critical=0.45, warmup=2, max_reuse=20)
    assert decisions(config, 12, [0.1] * 12, polish="reuse") == "ffrrrrfrrrrf"


def test_each_sample_accumulates_its_own_change():
    controller = Controller(CacheConfig(early=0.3, critical=0.5, warmup=1), 10, "token")
    controller.decide(0, torch.zeros(2))
    # sample 0 barely changes, sample 1 changes fast: the batch computes for sample 1
    assert controller.decide(1, torch.tensor([0.01, 0.6])) == "full"
    assert controller.accumulated.tolist() == [0.0, 0.0]  # both received a full step
    assert controller.decide(2, torch.tensor([0.01, 0.35])) == "token"
    assert controller.accumulated.tolist() == pytest.approx([0.01, 0.35])


def test_a_vetoed_sample_gets_a_full_step_for_its_batch():
    controller = Controller(CacheConfig(early=10, critical=20, max_reuse=100), 6, "token")
    calm = torch.tensor([False, False])
    assert [controller.decide(s, torch.zeros(2), veto=calm) for s in range(3)] == [
        "full",
        "reuse",
        "reuse",
    ]
    assert controller.decide(3, torch.zeros(2), veto=torch.tensor([False, True])) == "full"
    assert controller.decide(4, torch.zeros(2), veto=calm) == "reuse"


def test_the_check_adds_full_steps_and_never_moves_the_profiles_own():
    # the profile's schedule runs full at steps 0, 3, 6 and 9; a veto at step 4 adds one there,
    # and the profile's next full step stays at 6 (restarting at 4, it would have moved to 7)
    config = CacheConfig(early=0.25, critical=0.25, max_reuse=100, extrapolate=False)

    def actions(vetoed_at: int | None) -> str:
        controller = Controller(config, 10, "reuse")
        return "".join(
            controller.decide(s, torch.tensor([0.1]), veto=torch.tensor([s == vetoed_at]))[0]
            for s in range(10)
        )

    assert actions(None) == "frrfrrfrrf"
    assert actions(4) == "frrffrfrrf"


def test_plan_mode_follows_the_plan_inside_the_guardrails(tmp_path):
    plan = ["reuse", "reuse", "token", "block", "reuse", "reuse"]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    config = CacheConfig(mode="plan", plan=str(path), warmup=1)
    # the warm-up computes regardless; the last step is the plan's (it was measured with it)
    assert decisions(config, 6, [9.0] * 6) == "frtbrr"


def test_interval_plans_place_their_full_steps():
    assert "".join(a[0] for a in interval_plan(10, 3, 2, 1)) == "ffrfrrfrrf"
    assert "".join(a[0] for a in interval_plan(8, 2, 3)) == "ffffrfrf"
    assert "".join(a[0] for a in interval_plan(8, 3, 2)) == "fffrrfrr"  # the last step follows
    with pytest.raises(ConfigError, match="0 <= phase < every"):
        interval_plan(10, 3, 2, 3)


def test_bad_plans_are_named():
    with pytest.raises(ConfigError, match="unknown action"):
        load_plan(["full", "skip"], 2)
    with pytest.raises(ConfigError, match="3 actions but the request runs 4 steps"):
        load_plan(["full"] * 3, 4)
    with pytest.raises(ConfigError, match=r"needs cache\.plan"):
        CacheConfig(mode="plan")
    with pytest.raises(ConfigError, match="early <= critical"):
        CacheConfig(early=0.5, critical=0.1)


def test_resampled_profile_keeps_its_total_and_shape():
    profile = [0.0, 4.0, 1.0, 1.0, 1.0, 1.0, 2.0, 6.0]
    for steps in (4, 8, 28, 50):
        resampled = resample_profile(profile, steps)
        assert len(resampled) == steps
        assert sum(resampled) == pytest.approx(sum(profile))
    coarse = resample_profile(profile, 4)
    assert coarse[-1] > coarse[1]  # the late rise survives
