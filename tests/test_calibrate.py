"""diffopt.calibrate on the reference model, and cache guards inside a diffusers pipeline."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

import diffopt
from diffopt import quality
from diffopt.calibration import DAMPING_GRID, Calibration, Trial, _grid, select
from diffopt.config import CacheConfig, ConfigError
from diffopt.evaluation import zoo
from diffopt.runtime.controller import open_loop_actions

STEPS = 20


@pytest.fixture(scope="module")
def reference():
    return zoo.load("ref-dit")


def sampler(reference, images=6):
    labels, seeds = torch.arange(images) % 10, list(range(500, 500 + images))
    return lambda denoiser: reference.sample(labels, seeds, denoiser=denoiser, steps=STEPS)


def test_auto_picks_the_cheapest_setting_that_meets_the_budget(reference, tmp_path, recwarn):
    runs = []
    sample = sampler(reference)

    def run(denoiser):
        runs.append(denoiser)
        return sample(denoiser)

    calibration = diffopt.calibrate(reference.model, run, steps=STEPS, cache="auto", target_psnr=30)
    # settings the search chose itself are not the user's to fix: no idle-guard warnings
    assert not [w for w in recwarn if "never fired" in str(w.message)]
    assert len(calibration.config.profile) == STEPS
    chosen = calibration.chosen
    assert chosen.config == calibration.config and chosen.plan == calibration.plan
    # chosen on its estimate for fresh inputs: the bounds, not the calibration set's own figure
    assert chosen.fresh.low >= 30 and chosen.fresh.p5_low >= 27
    assert chosen.psnr >= chosen.fresh.low and chosen.fresh.samples == 6
    passing = [t for t in calibration.trials if t.fresh.meets(30)]
    assert chosen.work == min(t.work for t in passing) < 0.5  # most steps reuse
    table = calibration.table()
    for words in ("PSNR dB", "p5 dB", "min dB", "fresh dB (90% interval)", "calibration inputs"):
        assert words in table
    # fixed-interval plans are candidates too, one letter per step in the table
    planned = [t for t in calibration.trials if t.config.mode == "plan"]
    assert planned and all(t.plan == t.config.plan for t in planned)
    assert '"plan": "ffffrrrrf' in table  # every 5 from the 4th step (warm-up 3, phase 1)
    # actions known in advance are the ones the runs took; settings that share them ran once
    keys = []
    for t in calibration.trials:
        ahead = open_loop_actions(t.config, STEPS)
        if "token" in ahead or "block" in ahead:  # a refresh before two full steps runs full
            assert all(a in (b, "full") for a, b in zip(t.plan, ahead, strict=True))
        else:
            assert t.plan == ahead
            keys.append((tuple(ahead), t.config.extrapolate))
    assert len(runs) == 1 + len(calibration.trials) - len(keys) + len(set(keys))
    assert len(set(keys)) < len(keys)
    # the same trials, another budget: nothing runs again
    looser = calibration.retarget(20)
    assert looser.trials is calibration.trials and looser.chosen.work <= chosen.work

    # the chosen config and plan reproduce on fresh seeds, through files
    config = CacheConfig(**json.loads(calibration.save(tmp_path / "cache.json").read_text()))
    config.mode, config.plan = "plan", str(calibration.save_plan(tmp_path / "plan.json"))
    torch._dynamo.reset()
    compiled = torch.compile(
        reference.model, backend="diffopt", options={"inner": "eager", "cache": config}
    )
    with diffopt.request(steps=STEPS) as req:
        sampler(reference)(compiled)
    assert req.actions[0] == calibration.plan


def test_plans_are_tried_only_where_the_asked_for_check_would_run():
    # a plan reads no profile: under check="stack" it would drop the safety net asked for
    assert any(c.mode == "plan" for c in _grid(CacheConfig(steps=STEPS)))
    assert all(c.mode == "online" for c in _grid(CacheConfig(steps=STEPS, check="stack")))


def test_an_impossible_budget_says_how_close_it_got(reference):
    with pytest.raises(ConfigError, match=r"no cache setting reached target_psnr=200.*best"):
        diffopt.calibrate(
            reference.model, sampler(reference, 2), steps=STEPS, cache="auto", target_psnr=200
        )


def trial(work: float, errors: list[float]) -> Trial:
    """A trial whose calibration inputs had these per-sample squared errors."""
    mse = torch.tensor(errors, dtype=torch.float64)
    return Trial(
        {"work": work},
        CacheConfig(),
        quality.PsnrStats.from_mse(mse, 2.0),
        quality.fresh_estimate(mse, 2.0),
        work,
        {},
    )


def test_selection_stands_on_the_fresh_input_estimate_not_the_calibration_figure():
    """The cheap setting meets 30 dB on its 12 calibration inputs (31.6 dB, every sample above
    27 dB), but 5 of them at 27.9 dB say a fresh set of 12 falls under 30 dB often: its
    bootstrap lower bound is 29.6 dB. Edge-picking on the calibration figure takes it; the
    fresh-input selection takes the next setting."""
    risky = trial(0.2, [0.0065] * 5 + [1e-4] * 7)
    steady = trial(0.3, [2e-4] * 12)  # 43 dB on every input
    assert risky.psnr >= 30 and not risky.fresh.meets(30)
    assert select([risky, steady], 30, by="calibration") is risky
    assert select([risky, steady], 30) is steady


def test_the_tail_is_part_of_the_promise():
    """Mean-MSE PSNR alone would pass a setting whose worst tenth sits 6 dB under the target."""
    tailed = trial(0.2, [1e-6] * 10 + [0.01] * 2)
    assert tailed.fresh.low >= 30 and tailed.fresh.p5_low < 27
    with pytest.raises(ConfigError, match=r"no cache setting reached target_psnr=30.*p5"):
        select([tailed], 30)


def test_calibration_inputs_needed_for_a_confidence():
    assert quality.inputs_to_see(0.05, 0.9) == 45  # 1 - 0.95**45 >= 0.9
    assert quality.inputs_to_see(0.5, 0.9) == 4
    estimate = trial(0.1, [1e-4, 4e-4, 2e-4, 8e-4]).fresh
    assert estimate.inputs_for_margin(100) == 4  # already that tight
    assert estimate.inputs_for_margin(0.1) > 4


def test_a_run_that_ignores_the_denoiser_is_named(reference):
    with pytest.raises(ConfigError, match="did `run` use the denoiser"):
        diffopt.calibrate(reference.model, lambda d: torch.zeros(1), steps=STEPS)


def tiny_dit_pipeline() -> DiTPipeline:
    """A DiT pipeline from tiny random components (1000 classes: the pipeline's null label)."""
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=3,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
        norm_num_groups=2,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        norm_num_groups=4,
        sample_size=8,
    )
    pipe = DiTPipeline(transformer.eval(), vae.eval(), DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_cached_transformer_inside_a_diffusers_pipeline():
    """`pipe.transformer = torch.compile(..., backend="diffopt", options={"cache": ...})`."""
    pipe = tiny_dit_pipeline()

    def generate():
        generator = torch.Generator().manual_seed(0)
        return pipe(
            class_labels=[3, 7],
            num_inference_steps=STEPS,
            guidance_scale=4.0,
            output_type="np",
            generator=generator,
        ).images

    baseline = generate()
    pipe.transformer = torch.compile(
        pipe.transformer,
        backend="diffopt",
        options={"inner": "eager", "cache": {"steps": STEPS, "early": 0.1, "critical": 0.2}},
    )
    first = generate()  # no request scope: the first request calibrates, so it is exact
    np.testing.assert_allclose(first, baseline, atol=1e-5)
    with diffopt.request(steps=STEPS) as req:
        images = generate()
    assert req.hit_rates()["reuse"] >= 0.25
    assert np.isfinite(images).all() and not np.array_equal(images, baseline)
    with diffopt.request(steps=STEPS, cache=CacheConfig(steps=STEPS, early=0, critical=0)):
        np.testing.assert_allclose(generate(), baseline, atol=1e-5)  # thresholds 0: all full


def test_refine_drops_or_moves_full_steps_while_the_budget_holds(reference):
    found = diffopt.calibrate(
        reference.model, sampler(reference), steps=STEPS, cache="auto", target_psnr=30
    )
    if set(found.chosen.plan) - {"full", "reuse"}:
        pytest.skip("the 30 dB choice refreshes: nothing for refine to move")
    refined = found.refine(rounds=2)
    assert refined.trials[: len(found.trials)] == found.trials  # the evidence so far is kept
    new = refined.trials[len(found.trials) :]
    start = found.chosen.plan
    # first the extrapolation's dampings on the starting setting (its actions unchanged)
    damped = new[: len(DAMPING_GRID)] if found.chosen.config.extrapolate else []
    assert [t.config.damping for t in damped] == list(DAMPING_GRID)[: len(damped)]
    assert all(t.plan == start for t in damped)
    new = new[len(damped) :]
    assert new and all(t.config.mode == "plan" and t.plan == t.config.plan for t in new)
    warmup = found.chosen.plan.index("reuse")
    for t in new[: start[warmup:].count("full")]:  # the first round: one full step fewer each
        assert t.plan[:warmup] == start[:warmup]
        assert sum(a != b for a, b in zip(t.plan, start, strict=True)) == 1
        assert t.plan.count("full") == start.count("full") - 1
    # the choice is made again over every trial: never more work, the budget still kept
    assert refined.chosen.fresh.meets(30) and refined.chosen.work <= found.chosen.work
    assert refined.chosen is select(refined.trials, 30)
    assert refined.retarget(25).search is found.search  # a second refine can start from there
    with pytest.raises(ConfigError, match="refine needs the calibration"):
        diffopt.calibration.Calibration(found.config, found.plan, found.trials, 30).refine()


def test_refine_starts_from_full_steps_and_reuse_where_a_refresh_was_chosen(reference):
    found = diffopt.calibrate(
        reference.model, sampler(reference), steps=STEPS, cache="auto", target_psnr=30
    )
    movable = [t for t in found.trials if not set(t.plan) - {"full", "reuse"}]
    start = select(movable, 30)
    refreshing = next(t for t in found.trials if set(t.plan) & {"block", "token"})
    # a refresh that wins the grid (made cheaper than anything else here)
    winner = dataclasses.replace(refreshing, work=start.work / 2, fresh=start.fresh)
    trials = [*found.trials, winner]
    chosen = Calibration(winner.config, winner.plan, trials, 30, winner, found.search)
    refined = chosen.refine(rounds=1)
    new = [t for t in refined.trials[len(trials) :] if t.plan != start.plan]  # not a damping
    assert new, "refine tried nothing"
    warmup = start.plan.index("reuse")
    for t in new:  # each one full step fewer than the cheapest full-and-reuse setting, or moved
        assert t.plan[:warmup] == start.plan[:warmup]
        assert sum(a != b for a, b in zip(t.plan, start.plan, strict=True)) in (1, 2)
    assert refined.chosen is winner  # the choice is still made over every trial
    only_refreshing = [t for t in trials if set(t.plan) & {"block", "token"}]
    with pytest.raises(ConfigError, match="no setting of full steps and reuse alone keeps"):
        Calibration(winner.config, winner.plan, only_refreshing, 30, winner, found.search).refine()
