"""The caching executor: what it skips, what it rebuilds, and whose state it keeps."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch

import diffopt
from diffopt.backend import build_executor, input_slots, optimize
from diffopt.config import CacheConfig, Config, ConfigError
from diffopt.runtime import cache, counting_flops, profiles

from ..caching import build, cached, denoise
from ..conftest import FAMILIES, first_output

ALWAYS_FULL = {"early": 0.0, "critical": 0.0}
ALWAYS_REUSE = {"early": 1e3, "critical": 1e3, "max_reuse": 100, "polish": "none", "warmup": 2}


def calibrated(model, inputs, steps=12, **settings):
    """A cached model whose first request (the calibration) has run."""
    compiled = cached(model, steps, **settings)
    denoise(compiled, inputs, steps)
    return compiled


def test_always_full_matches_the_uncached_run_exactly():
    model, inputs = build()
    expected = denoise(model, inputs, 12)
    compiled = calibrated(model, inputs, **ALWAYS_FULL)
    with diffopt.request(steps=12) as req:
        out = denoise(compiled, inputs, 12)
    assert req.hit_rates()["full"] == 1.0
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_reused_steps_skip_the_blocks_and_stay_close():
    model, inputs = build()
    expected = denoise(model, inputs, 12)
    compiled = calibrated(model, inputs, **ALWAYS_REUSE)
    with counting_flops() as flops, diffopt.request(steps=12) as req:
        out = denoise(compiled, inputs, 12)
    with (
        counting_flops() as full_flops,
        diffopt.request(steps=12, cache=CacheConfig(**ALWAYS_FULL)),
    ):
        denoise(compiled, inputs, 12)
    assert req.actions[0] == ["full"] * 2 + ["reuse"] * 9 + ["full"]
    assert flops.total < 0.4 * full_flops.total  # 3 of 12 steps ran the blocks
    assert out.isfinite().all()
    assert (out - expected).abs().mean() < 0.5 * expected.abs().mean()


@pytest.mark.parametrize(
    ("family", "polish"),
    [("tiny-dit", "token"), ("tiny-dit", "block"), ("tiny-flux", "token"), ("tiny-sd3", "token")],
)
def test_a_full_refresh_is_a_full_step(family, polish):
    """Refreshing every token (or every block) must reproduce the uncached step; on Flux the
    rotary tables and on both dual-stream models the joint sequence go through the gather."""
    model, inputs = build(family)
    expected = denoise(model, inputs, 12)
    compiled = calibrated(model, inputs)
    settings = CacheConfig(
        early=0.0,
        critical=100.0,
        max_reuse=100,
        polish=polish,
        token_ratio=1.0,
        block_ratio=1.0,
        extrapolate=False,
    )
    with diffopt.request(steps=12, cache=settings) as req:
        out = denoise(compiled, inputs, 12)
    assert req.actions[0][2:-1] == [polish] * 9
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_partial_token_refresh_runs_a_shorter_sequence():
    model, inputs = build()
    compiled = calibrated(model, inputs)
    settings = CacheConfig(early=0.0, critical=100.0, max_reuse=100, token_ratio=0.25)
    with counting_flops() as flops, diffopt.request(steps=12, cache=settings) as req:
        out = denoise(compiled, inputs, 12)
    with (
        counting_flops() as full_flops,
        diffopt.request(steps=12, cache=CacheConfig(**ALWAYS_FULL)),
    ):
        denoise(compiled, inputs, 12)
    assert req.actions[0].count("token") == 9
    assert 0.25 < req.compute() < 0.6
    assert flops.total < 0.7 * full_flops.total
    assert out.isfinite().all()


def test_a_new_request_never_sees_the_previous_cache():
    model, inputs = build()
    compiled = calibrated(model, inputs, **ALWAYS_REUSE)
    other = {**inputs, "hidden_states": torch.randn_like(inputs["hidden_states"])}
    denoise(compiled, inputs, 12)
    # no request context: the timestep jumping back up starts a new request
    torch.testing.assert_close(
        denoise(compiled, other, 1), denoise(model, other, 1), rtol=0, atol=0
    )


def test_a_request_in_which_no_diffopt_graph_ran_says_so_and_why():
    """Dynamo stops compiling a code object after its recompile limit and runs it eagerly, with
    no error: the request is the place where that shows (no cache, no quantization)."""
    model, inputs = build()
    compiled = calibrated(model, inputs, **ALWAYS_REUSE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a request that ran diffopt's graphs is quiet
        with diffopt.request(steps=12):
            denoise(compiled, inputs, 12)
    with (
        pytest.warns(UserWarning, match="no diffopt graph ran inside this diffopt.request"),
        diffopt.request(steps=12),
    ):
        denoise(model, inputs, 12)  # the model itself, not the compiled one
    loose = torch.compile(model, backend="diffopt", options={"inner": "eager"})
    other = {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with (
        torch._dynamo.config.patch(recompile_limit=1),
        pytest.warns(UserWarning, match="recompile_limit"),
        diffopt.request(steps=12),
    ):
        denoise(loose, other, 12)  # a new batch size would recompile: past the limit


def test_separate_guidance_calls_keep_separate_state():
    """A pipeline that calls cond and uncond one after the other at each timestep."""
    model, inputs = build(batch=1)
    compiled = calibrated(model, inputs, **ALWAYS_REUSE)
    uncond = {**inputs, "class_labels": torch.full_like(inputs["class_labels"], 0)}
    with diffopt.request(steps=6) as req, torch.no_grad():
        x = inputs["hidden_states"]
        for t in torch.linspace(900, 100, 6):
            step = {"hidden_states": x, "timestep": t.expand(1)}
            cond_out = compiled(**inputs | step)[0]
            uncond_out = compiled(**uncond | step)[0]
            assert not torch.equal(cond_out, uncond_out)
            x = x - 0.1 * (uncond_out + 2 * (cond_out - uncond_out))[:, :1]
    assert set(req.actions) == {0, 1}
    assert req.actions[0] == req.actions[1] == ["full", "full", "reuse", "reuse", "reuse", "full"]


def test_missing_step_count_is_a_clear_error():
    model, inputs = build()
    compiled = cached(model, steps=None, profile=[1.0] * 12)
    with pytest.raises(ConfigError, match="need the step count"):
        denoise(compiled, inputs, 3)


def test_more_calls_than_steps_is_an_error():
    model, inputs = build()
    compiled = calibrated(model, inputs, steps=12)
    with pytest.raises(ConfigError, match="more than steps=4"), diffopt.request(steps=4):
        denoise(compiled, inputs, 6)


def test_block0_indicator_decides_per_sample():
    model, inputs = build()
    compiled = calibrated(model, inputs, indicator="block0", early=0.2, critical=0.4)
    with diffopt.request(steps=12) as req:
        denoise(compiled, inputs, 12)
    assert "reuse" in req.actions[0] and req.actions[0][-1] == "full"


@pytest.mark.parametrize(("before", "after"), [("profile", "block0"), ("block0", "profile")])
def test_a_model_calibrated_under_one_indicator_calibrates_again_under_the_other(before, after):
    """The two indicators read different calibrations (block 0's change, the stack's): a model
    compiled under the other indicator than the one its calibration measured runs its next
    request in full and calibrates, as an uncalibrated model would (before: a TypeError in
    resample_profile, the profile it reads being None)."""
    model, inputs = build()
    settings = {"early": 0.2, "critical": 0.4}
    calibrated(model, inputs, indicator=before, **settings)
    torch._dynamo.reset()
    compiled = cached(model, 12, indicator=after, **settings)
    with diffopt.request(steps=12) as req:
        denoise(compiled, inputs, 12)
    assert req.actions[0] == ["full"] * 12  # it calibrates
    with diffopt.request(steps=12) as req:
        denoise(compiled, inputs, 12)
    assert "reuse" in req.actions[0]


def test_no_recompiles_over_fifty_steps():
    model, inputs = build()
    compiled = cached(model, steps=50, early=0.1, critical=0.2)
    denoise(compiled, inputs, 50)  # calibrates (and compiles)
    denoise(compiled, inputs, 50)  # warm-up of the cached request
    with torch.compiler.set_stance("fail_on_recompile"), diffopt.request(steps=50) as req:
        denoise(compiled, inputs, 50, start=777.0)
    assert req.hit_rates()["reuse"] > 0.3


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_reuses_steps(family):
    model, inputs = build(family)
    expected = denoise(model, inputs, 10)
    compiled = calibrated(model, inputs, steps=10, early=0.3, critical=0.6)
    with diffopt.request(steps=10) as req:
        out = denoise(compiled, inputs, 10)
    assert req.hit_rates()["reuse"] > 0
    assert out.isfinite().all()
    assert (out - expected).abs().mean() < expected.abs().mean()


@pytest.mark.inductor
def test_inductor_regions_with_token_refresh():
    model, inputs = build()
    expected = denoise(model, inputs, 12)
    compiled = torch.compile(
        model,
        backend="diffopt",
        options={
            "inner": "inductor",
            "cache": {
                "steps": 12,
                "early": 0.0,
                "critical": 100.0,
                "max_reuse": 100,
                "token_ratio": 1.0,
                "extrapolate": False,
            },
        },
    )
    denoise(compiled, inputs, 12)  # calibration
    with diffopt.request(steps=12) as req:
        out = denoise(compiled, inputs, 12)
    assert req.actions[0].count("token") == 9
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(("tolerance", "vetoed"), [(1e6, False), (1e-6, True)])
def test_the_check_vetoes_reuse_for_samples_that_move_more_than_the_profile(tolerance, vetoed):
    """check="stack": at each full step, a sample whose residual moved more than the profile
    expects (times the tolerance) holds its batch to full steps; within tolerance, the profile
    alone decides."""
    model, inputs = build()
    settings = {**ALWAYS_REUSE, "max_reuse": 3, "polish": "none"}
    compiled = calibrated(model, inputs, check="stack", check_tolerance=tolerance, **settings)
    with diffopt.request(steps=12) as req:
        denoise(compiled, inputs, 12)
    if vetoed:  # drift is measured from the second full step on (its slope): full ever after
        assert req.actions[0] == ["full"] * 12
        assert req.vetoes[0] == [2] * 10  # both samples, at steps 2 to 11
    else:
        cycle = ["reuse", "reuse", "reuse", "full"]
        assert req.actions[0] == ["full", "full", *cycle * 2, "reuse", "full"]
        assert not any(req.vetoes[0])


def test_the_check_needs_the_profile_indicator():
    with pytest.raises(ConfigError, match=r"cache\.check compares"):
        CacheConfig(check="stack", indicator="block0")


@pytest.mark.parametrize(("measured", "used"), [("profile", "block0"), ("block0", "profile")])
def test_a_calibrated_profile_is_refused_under_the_other_indicator(measured, used, tmp_path):
    """`diffopt.calibrate` records the indicator its profile measured (the stack's change, or
    block 0's); a profile given under the other was read as if it were that one's, silently. A
    profile saved before the indicator was recorded is taken as it is."""
    model, inputs = build()
    found = diffopt.calibrate(
        model,
        lambda denoiser: denoise(denoiser, inputs, 12),
        steps=12,
        cache=CacheConfig(indicator=measured),
        inner="eager",
    )
    assert found.config.profile_indicator == measured
    saved = json.loads(found.save(tmp_path / "cache.json").read_text())
    Config(cache=found.config).save(tmp_path / "config.json")
    for loaded in (CacheConfig(**saved), Config.load(tmp_path / "config.json").cache):
        assert (loaded.profile, loaded.profile_indicator) == (found.config.profile, measured)
    mismatch = (
        rf"calibrated with indicator='{measured}' .* used with indicator='{used}' .*"
        rf"recalibrate with that indicator .* or pass indicator='{measured}'"
    )
    with pytest.raises(ConfigError, match=mismatch):
        CacheConfig(**{**saved, "indicator": used})
    with pytest.raises(ConfigError, match=mismatch):
        dataclasses.replace(found.config, indicator=used)
    with pytest.raises(ConfigError, match=mismatch):
        Config.from_dict({"cache": {**saved, "indicator": used}})
    # changed after it was built: refused when a request starts
    config = CacheConfig(**saved)
    config.indicator = used
    torch._dynamo.reset()
    compiled = torch.compile(
        model, backend="diffopt", options={"inner": "eager", "cache": config}, fullgraph=True
    )
    with pytest.raises(ConfigError, match=mismatch):
        denoise(compiled, inputs, 12)
    # saved before the indicator was recorded: unknown, accepted
    del saved["profile_indicator"]
    assert CacheConfig(**{**saved, "indicator": used}).profile_indicator is None


def test_a_second_batch_size_recompiles_dynamic_and_keeps_the_calibration():
    """A new batch size compiles a new graph (a new executor); the model's profile, measured on
    its first request, is found again: no uncached request per new shape."""
    model, inputs = build(batch=2)
    compiled = calibrated(model, inputs, early=0.0, critical=100.0, max_reuse=100)
    _, bigger = build(batch=3)
    with diffopt.request(steps=12) as req:
        out = denoise(compiled, bigger, 12)  # dynamic batch: a new graph, same weights
    assert req.actions[0].count("token") == 9
    assert out.shape[0] == 3 and out.isfinite().all()


def test_a_calibration_belongs_to_the_model_it_was_measured_on():
    """Two instances of one class share dynamo's compiled graph (weights are graph inputs), so
    the profile is kept by weights: the second model calibrates on its own first request."""
    first, inputs = build()
    second, _ = build()
    with torch.no_grad():
        for weight in second.parameters():
            weight.mul_(1.1)
    settings = {"early": 0.05, "critical": 0.15, "polish": "none"}
    one, two = cached(first, **settings), cached(second, **settings)
    denoise(one, inputs, 12)  # the first model's calibration
    assert profiles.profile_of(first) is not None and profiles.profile_of(second) is None
    for compiled, calibrates in ((two, True), (one, False), (two, False)):
        with diffopt.request(steps=12) as req:
            denoise(compiled, inputs, 12)
        assert (req.hit_rates()["full"] == 1.0) == calibrates
    assert profiles.profile_of(first) is not profiles.profile_of(second)
    found = profiles.profile_of(second)
    assert found.condition.steps == 12 and found.condition.batch == 2
    assert found.condition.tokens == 16 and len(found.condition.timesteps) == 12
    report = str(diffopt.inspect(second, inputs, {"cache": {"steps": 12}}))
    assert "cache profile: this DiTTransformer2DModel's own: measured on" in report


def transfer_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "cache profile calibrated at" in str(w.message)]


def test_a_profile_used_under_another_condition_is_warned_about_with_the_fix():
    model, inputs = build()
    compiled = cached(model, None, early=0.05, critical=0.15, polish="none")
    with diffopt.request(steps=12):
        denoise(compiled, inputs, 12)  # the calibration
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with diffopt.request(steps=12):
            denoise(compiled, inputs, 12)  # what it was calibrated on: silent
        assert not transfer_warnings(caught)
        with diffopt.request(steps=8):
            denoise(compiled, inputs, 8)  # same schedule shape, fewer steps
        with diffopt.request(steps=12):
            denoise(compiled, inputs, 12, start=300.0)  # another schedule
    found = transfer_warnings(caught)
    assert len(found) == 2
    assert "12 steps, batch 2, 16 tokens" in found[0] and "8 steps instead of 12" in found[0]
    assert "diffopt.calibrate(model, run, steps=8" in found[0] and "forget(model)" in found[0]
    assert "another timestep schedule" in found[1]


def test_a_calibrated_config_knows_what_it_was_measured_on():
    measured = profiles.Condition(50, 20, 64, tuple(range(1000, 0, -20)), speed=0.74)
    same = dataclasses.replace(measured, batch=8)  # a batch size changes no decision's quality
    assert measured.differences(same) == {}
    config = CacheConfig(calibrated_on=dataclasses.asdict(measured))
    restored = profiles.Condition.from_dict(json.loads(json.dumps(config.calibrated_on)))
    assert restored == measured
    stronger = dataclasses.replace(measured, speed=0.86)  # ref-dit at guidance 4 against 1.5
    assert "higher guidance scale" in measured.differences(stronger)["speed"]
    assert measured.differences(dataclasses.replace(measured, speed=0.7)) == {}  # weaker: safe
    fewer = dataclasses.replace(measured, steps=25, timesteps=tuple(range(1000, 0, -40)))
    assert measured.differences(fewer) == {"steps": "25 steps instead of 50"}  # same shape
    shifted = tuple(1000 * (1 - i / 25) ** 0.5 for i in range(25))
    other = dataclasses.replace(fewer, tokens=256, timesteps=shifted)
    assert set(measured.differences(other)) == {"steps", "tokens", "schedule"}
    # one sample's speed varies by about 5 %: a batch of 1 is not warned for +16 %
    alone = dataclasses.replace(stronger, batch=1)
    assert "speed" not in measured.differences(alone)
    assert "speed" in measured.differences(dataclasses.replace(alone, speed=0.74 * 1.25))


@pytest.mark.parametrize(
    ("family", "text", "tokens"),
    [("tiny-wan", None, 32), ("tiny-flux", None, 16), ("tiny-flux", 24, 16)],
)
def test_the_calibration_records_the_image_streams_tokens(family, text, tokens):
    # Wan's blocks also read the text [B, 6, D] and the timestep projection [B, 6, D], Flux's the
    # text, which can be longer than the image (FLUX.1's 512 tokens at 352 px): taken for the
    # stream, the condition and its early speed described the text tokens
    model, inputs = build(family)
    if text:
        inputs["encoder_hidden_states"] = torch.randn(
            2, text, inputs["encoder_hidden_states"].shape[2]
        )
        inputs["txt_ids"] = torch.zeros(text, 3)
    calibrated(model, inputs, steps=6)
    found = profiles.lookup(profiles.model_weights(model.parameters()))
    assert (found.condition.batch, found.condition.tokens) == (2, tokens)
    assert found.condition.inputs == 2


def test_a_guidance_batch_counts_each_input_once():
    """Classifier-free guidance runs each input twice (the same latents): the early speed of its
    2 rows is one input's, and may move as much by chance as one input's does."""
    model, inputs = build(batch=4)
    compiled = cached(model, 6)
    x, labels = inputs["hidden_states"][:2].clone(), inputs["class_labels"][:2]
    with torch.no_grad():
        for t in torch.linspace(1000.0, 1000.0 / 6, 6):
            call = {**inputs, "hidden_states": torch.cat([x, x]), "timestep": t.expand(4)}
            call["class_labels"] = torch.cat([labels, torch.full_like(labels, 10)])
            cond, uncond = first_output(compiled(**call))[:, : x.shape[1]].chunk(2)
            x = x - (uncond + 4.0 * (cond - uncond)) / 6
    found = profiles.lookup(profiles.model_weights(model.parameters()))
    assert (found.condition.batch, found.condition.inputs) == (4, 2)
    # ref-wan, 2 clips on their own schedule: +9 % is within one input's spread of 5 %
    measured = profiles.Condition(50, 24, 512, speed=1.0, inputs=12)
    clips = profiles.Condition(50, 4, 512, speed=1.09, inputs=2)
    assert "speed" not in measured.differences(clips)
    assert "speed" in measured.differences(dataclasses.replace(clips, inputs=4))
    assert "speed" in measured.differences(dataclasses.replace(clips, speed=1.25))


def test_a_request_that_reuses_early_is_compared_on_the_steps_it_measured():
    """The first steps move more than the third's mean: a request exact only at steps 1 and 2
    (a reuse from step 3) is as fast as its calibration there, though its mean is 9 % higher."""
    measured = profiles.Condition(18, 16, 64, stream=(None, 0.030, 0.028) + (0.025,) * 4)
    measured = dataclasses.replace(measured, speed=profiles.early_speed(measured.stream, 18))
    early = (None, 0.030, 0.028, None, None, None, None)
    now = profiles.Condition(18, 16, 64, speed=profiles.early_speed(early, 18), stream=early)
    assert now.speed > 1.08 * measured.speed and measured.speed_ratio(now) == pytest.approx(1.0)
    assert "speed" not in measured.differences(now)
    faster = tuple(None if v is None else 1.2 * v for v in early)
    assert "speed" in measured.differences(dataclasses.replace(now, stream=faster))
    # a profile saved before per-step changes were kept compares by the mean, as it did
    assert "speed" in dataclasses.replace(measured, stream=()).differences(now)


def test_another_resolution_recompiles_dynamic_with_the_token_guard_skipped():
    """Flux at a second image size: dynamo recompiles with a symbolic image length, beside the
    text's fixed one (the token guard compared the two and crashed: '>' between int and str)."""
    model, inputs = build("tiny-flux")
    compiled = calibrated(model, inputs, steps=6)
    larger = {**inputs, "hidden_states": torch.randn(2, 36, inputs["hidden_states"].shape[2])}
    larger["img_ids"] = torch.zeros(36, 3)
    with warnings.catch_warnings(record=True) as caught, diffopt.request(steps=6) as req:
        warnings.simplefilter("always")
        out = denoise(compiled, larger, 6)
    assert out.shape == larger["hidden_states"].shape and out.isfinite().all()
    said = [str(w.message) for w in caught]
    assert "reuse" in req.actions[0]  # the model's profile carries over, with a warning
    assert any("36 tokens" in m for m in said), said


def test_weights_loaded_in_place_calibrate_again():
    model, inputs = build()
    compiled = calibrated(model, inputs, early=0.05, critical=0.15, polish="none")
    other, _ = build()
    model.load_state_dict({k: v * 1.1 for k, v in other.state_dict().items()})
    assert profiles.profile_of(model) is None
    with diffopt.request(steps=12) as req:
        denoise(compiled, inputs, 12)
    assert req.hit_rates()["full"] == 1.0  # measured again, on the new weights
    profiles.forget(model)
    assert profiles.profile_of(model) is None


def test_fully_dynamic_shapes_pass_sizes_through_reused_spans():
    """Under dynamic=True a block region also hands sizes (ints, floats) to later regions; the
    cache holds them as they are instead of treating them as tensors."""
    model, inputs = build()
    settings = {"steps": 12, "polish": "block", "early": 0.05, "critical": 0.15}
    compiled = torch.compile(
        model, backend="diffopt", dynamic=True, options={"inner": "eager", "cache": settings}
    )
    denoise(compiled, inputs, 12)  # the calibration request
    with diffopt.request(steps=12) as req:
        out = denoise(compiled, inputs, 12)
    assert req.hit_rates()["reuse"] > 0 and out.isfinite().all()


def test_inspecting_or_exporting_leaves_compiled_models_alone():
    """capture() used to reset dynamo globally: a calibrated cached model then recompiled and
    silently calibrated again on its next request."""
    model, inputs = build()
    compiled = calibrated(model, inputs, early=0.05, critical=0.15, polish="none")
    diffopt.inspect(model, inputs)  # captures the same model class on its own
    with diffopt.request(steps=12) as req:
        denoise(compiled, inputs, 12)
    assert req.hit_rates()["reuse"] > 0


@pytest.mark.parametrize("indicator", ["profile", "block0"])
def test_plan_mode_needs_no_calibrated_profile(indicator):
    """A plan names every step's action, so no indicator (and no profile) is read."""
    model, inputs = build()
    plan = ["full", "full", "reuse", "token", "block", "full"]
    compiled = cached(model, steps=6, mode="plan", plan=plan, indicator=indicator)
    with diffopt.request(steps=6) as req:
        out = denoise(compiled, inputs, 6)
    assert req.actions[0] == plan
    assert out.isfinite().all()


def test_reuse_needs_the_step_guard():
    """With step_guard off, reuse steps run in full (the token guard's span is not a licence)
    and nobody is warned that reuse never fired."""
    model, inputs = build()
    expected = denoise(model, inputs, 12)
    compiled = calibrated(model, inputs, step_guard=False, **ALWAYS_REUSE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with diffopt.request(steps=12) as req:
            out = denoise(compiled, inputs, 12)
        with diffopt.request(steps=12):
            denoise(compiled, inputs, 1)  # its first call closes the request above
    assert req.actions[0] == ["full"] * 12
    assert not [w for w in caught if "never fired" in str(w.message)]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_idle_guards_warn_for_a_users_request_but_not_for_a_search_trial():
    model, inputs = build()
    compiled = calibrated(model, inputs)
    never = CacheConfig(**ALWAYS_FULL)  # thresholds 0: neither reuse nor a refresh fires
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with diffopt.request(steps=12, cache=never, trial=True):
            denoise(compiled, inputs, 12)  # the trial ends with its scope: no warning
    assert not [w for w in caught if "never fired" in str(w.message)]
    with (
        pytest.warns(UserWarning, match=r"\['reuse', 'token'\] never fired"),
        diffopt.request(steps=12, cache=never),
    ):
        denoise(compiled, inputs, 12)  # the user's request ends with its scope: warned


def test_actions_dispatch_through_the_strategy_registry(monkeypatch):
    reuse = cache.STRATEGIES["reuse"]
    steps = []

    def counted(executor, call):
        steps.append(call.step)
        return reuse.run(executor, call)

    monkeypatch.setitem(cache.STRATEGIES, "reuse", dataclasses.replace(reuse, run=counted))
    model, inputs = build()
    compiled = calibrated(model, inputs, **ALWAYS_REUSE)
    with diffopt.request(steps=12):
        denoise(compiled, inputs, 12)
    assert steps == list(range(2, 11))
    with pytest.raises(ValueError, match="not a cache action"):
        cache.strategy("skip")


def _recording_short_runs(model, plan, **settings):
    """`model` compiled with eager regions, whose token refreshes run what the variants provider
    gives and record it: a list of (region index, token count, inputs, outputs)."""
    config = Config(
        inner="eager", cache=CacheConfig(steps=len(plan), mode="plan", plan=plan, **settings)
    )
    runs = []

    def backend(gm, example_inputs):
        optimized = optimize(gm, example_inputs, config)
        program = optimized.program

        def variants(index, count, examples):
            def run(*inputs):
                outputs = program.regions[index](*inputs)  # eager: any sequence length
                runs.append((index, count, inputs, outputs))
                return outputs

            return run

        timestep, weights = input_slots(optimized.graph)
        return build_executor(
            program,
            config,
            optimized.graph.guards,
            timestep_slot=timestep,
            param_slots=weights,
            variants=variants,
        )

    return torch.compile(model, backend=backend, fullgraph=True), runs


def test_token_refreshes_run_the_regions_the_variants_provider_gives():
    """How an exporter records the shorter-sequence runs: a provider passed to the executor."""
    model, inputs = build()
    plan = ["full", "full", "token", "full"]
    compiled, runs = _recording_short_runs(model, plan)
    with diffopt.request(steps=4) as req:
        denoise(compiled, inputs, 4)
    assert req.actions[0] == plan
    # the anchor's and the refresh's short runs, over the span's two blocks, at one length
    assert len(runs) == 4 and len({count for _, count, *_ in runs}) == 1


def _flux_on_tokens(model, call, chosen):
    """Flux's span output on the image tokens `chosen` alone: the model called with those
    latents and their position ids (so the rotary rows come from the model, not a gather)."""
    captured = {}
    last = model.single_transformer_blocks[-1]
    hook = last.register_forward_hook(lambda module, args, out: captured.update(image=out[1]))
    latents, ids = call["hidden_states"][:, chosen], call["img_ids"][chosen]
    model(**{**call, "hidden_states": latents, "img_ids": ids})
    hook.remove()
    return captured["image"]


def _sd3_on_tokens(model, call, chosen):
    """SD3's blocks on the image tokens `chosen` of each sample alone (the text stays whole)."""
    image = model.pos_embed(call["hidden_states"])
    image = image.gather(1, _rows(chosen, image))
    text = model.context_embedder(call["encoder_hidden_states"])
    temb = model.time_text_embed(call["timestep"], call["pooled_projections"])
    for block in model.transformer_blocks:
        text, image = block(image, text, temb)
    return image


def _ltx_on_tokens(model, call, chosen):
    """LTX's span output on the video tokens `chosen` [B, k] of each sample alone: the model
    called with those latents and their grid coordinates, so its rotary rows come from its own
    rotary embedding (``video_coords``, which it divides by its base sizes), not a gather."""
    captured = {}
    last = model.transformer_blocks[-1]
    hook = last.register_forward_hook(lambda module, args, out: captured.update(image=out))
    rope = model.rope
    axes = [torch.arange(call[k], dtype=torch.float32) for k in ("num_frames", "height", "width")]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij")).flatten(1)  # [3, N]: f, h, w
    base = torch.tensor([rope.base_num_frames, rope.base_height, rope.base_width])
    coords = grid[:, chosen].transpose(0, 1) * base[:, None]  # [B, 3, k]
    latents = call["hidden_states"].gather(1, _rows(chosen, call["hidden_states"]))
    model(**{**call, "hidden_states": latents, "video_coords": coords})
    hook.remove()
    return captured["image"]


def _sana_wm_refiner_on_tokens(model, call, chosen):
    """Sana-WM's refiner on the tokens `chosen` [B, k] alone: the model called with those
    latents and those rows of the rotary tables its call passes."""
    captured = {}
    last = model.transformer_blocks[-1]
    hook = last.register_forward_hook(lambda module, args, out: captured.update(image=out))
    latents = call["hidden_states"].gather(1, _rows(chosen, call["hidden_states"]))
    tables = tuple(t.gather(1, _rows(chosen, t)) for t in call["video_rotary_emb"])
    model(**{**call, "hidden_states": latents, "video_rotary_emb": tables})
    hook.remove()
    return captured["image"]


def _random_rotary(call):
    """The call with a rotary table of distinct rows (the family's example passes cos 1, sin 0:
    a gather of the wrong rows would go unseen)."""
    if "video_rotary_emb" not in call:
        return call
    cos, _ = call["video_rotary_emb"]
    angles = torch.randn(cos.shape, generator=torch.Generator().manual_seed(2))
    return {**call, "video_rotary_emb": (angles.cos(), angles.sin())}


@pytest.mark.parametrize(
    ("family", "stream", "on_tokens"),
    [
        ("tiny-flux", "x_embedder", _flux_on_tokens),
        ("tiny-sd3", "pos_embed", _sd3_on_tokens),
        ("tiny-ltx", "proj_in", _ltx_on_tokens),
        ("tiny-sana-wm-refiner", "proj_in", _sana_wm_refiner_on_tokens),
    ],
)
def test_a_short_run_is_the_blocks_on_the_refreshed_tokens_alone(family, stream, on_tokens):
    """A token refresh runs the span on the gathered tokens: on dual-stream models that is the
    image tokens with their own rotary rows (Flux's tables are shared by the batch, so both
    samples refresh the same tokens) next to the whole text stream, whatever order the blocks
    join the two in; on LTX and Sana-WM's refiner, each sample's tokens with their rows of the
    [B, N, D] rotary tables, which have the stream's shape. A wrong gather (rows, offsets, the
    cut between the streams, a table taken for the stream) differs."""
    model, inputs = build(family)
    inputs = _random_rotary(inputs)
    plan = ["full", "full", "token", "full"]
    compiled, runs = _recording_short_runs(model, plan, token_ratio=0.25)
    generator = torch.Generator().manual_seed(0)
    calls = [
        {
            **inputs,
            "hidden_states": torch.randn(inputs["hidden_states"].shape, generator=generator),
            "timestep": inputs["timestep"] * (1 - step / len(plan)),
        }
        for step in range(len(plan))
    ]
    with diffopt.request(steps=len(plan)) as req, torch.no_grad():
        for call in calls:
            compiled(**call)
    assert req.actions[0] == plan
    first, last = min(i for i, *_ in runs), max(i for i, *_ in runs)
    starts = [k for k, (index, *_) in enumerate(runs) if index == first]
    ends = [k for k, (index, *_) in enumerate(runs) if index == last]
    assert len(starts) == len(ends) == 2  # the anchor's short run, then the refresh's
    # the anchor runs on the last full step's values (call 1), the refresh on its own (call 2)
    for call, start, end in zip(calls[1:3], starts, ends, strict=True):
        with torch.no_grad():
            full = getattr(model, stream)(call["hidden_states"])  # [B, N, D] entering the span
        _, count, region_inputs, _ = runs[start]
        shaped = [v for v in region_inputs if _shape(v) == (len(full), count, full.shape[2])]
        # the gathered stream: the one of that shape whose rows are rows of the full stream
        gathered = min(shaped, key=lambda v: float(torch.cdist(v, full).amin(-1).max()))
        # which tokens each sample refreshed: the rows of the full stream it holds
        chosen = torch.cdist(gathered, full).argmin(-1)
        torch.testing.assert_close(gathered, full.gather(1, _rows(chosen, gathered)))
        if family == "tiny-flux":
            assert (chosen == chosen[0]).all()  # tables shared by the batch: one token set
            chosen = chosen[0]
        with torch.no_grad():
            expected = on_tokens(model, call, chosen)
        short = next(v for v in runs[end][3] if _shape(v) == tuple(expected.shape))
        torch.testing.assert_close(short, expected, rtol=1e-5, atol=1e-5)


def _step_outputs(model, inputs, key, plan, **settings):
    """`model`'s outputs under a cache `plan` over a falling timestep, and the model's own."""
    torch._dynamo.reset()
    compiled = cached(model, len(plan), mode="plan", plan=plan, **settings)
    outs, refs = [], []
    with diffopt.request(steps=len(plan)) as req, torch.no_grad():
        for step in range(len(plan)):
            call = {**inputs, key: inputs[key] * (1 - 0.2 * step)}
            outs.append(first_output(compiled(**call)))
            refs.append(first_output(model(**call)))
    assert req.actions[0] == plan
    return outs, refs


@pytest.mark.parametrize("family", ["tiny-ltx", "tiny-sana-wm-refiner", "tiny-ltx2"])
@pytest.mark.parametrize("extrapolate", [False, True])
def test_a_token_refresh_is_closer_to_the_full_step_than_a_reuse(family, extrapolate):
    """The refreshed quarter of the tokens moves towards the full step's output (there 3.6x
    closer than a reuse on LTX, 2.1x on Sana-WM's refiner, holding residuals; 5.5x and 3.2x
    extrapolating them), the other tokens are the reuse's: the step's error is 14-20 % below
    a reuse's. Compared at one extrapolate setting: on these random-weight models an extrapolated
    residual is further off than a held one by more than the refresh gains."""
    model, inputs = build(family)
    runs = {}
    for action in ("reuse", "token"):
        plan = ["full", "full", action, "full"]
        outs, refs = _step_outputs(model, inputs, "timestep", plan, extrapolate=extrapolate)
        runs[action] = outs[2]
    fresh = refs[2]
    refreshed = (runs["token"] - runs["reuse"]).abs().amax(-1) > 0  # [B, N]
    assert refreshed.sum(1).tolist() == [8, 8]  # 25 % of 32 tokens, per sample
    error = {a: (out - fresh).abs().mean(-1) for a, out in runs.items()}
    assert error["token"][refreshed].mean() < 0.7 * error["reuse"][refreshed].mean()
    torch.testing.assert_close(error["token"][~refreshed], error["reuse"][~refreshed])
    assert error["token"].mean() < error["reuse"].mean()


def _shape(value):
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _rows(chosen, like):
    return chosen[..., None].expand(-1, -1, like.shape[-1])


class _EmbedsThenBreaks(torch.nn.Module):
    """HunyuanVideo 1.5's shape: the noise level is embedded, then the prologue branches on a
    tensor's value (a graph break), and the blocks run in a graph that sees only the embedding."""

    def __init__(self) -> None:
        super().__init__()
        from ..models import Block

        self.time, self.embed = torch.nn.Linear(16, 16), torch.nn.Linear(4, 16)
        self.blocks = torch.nn.ModuleList(Block(16) for _ in range(3))
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, t: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        from ..models import timestep_embedding

        temb = self.time(timestep_embedding(t, 16))
        if torch.all(image == 0):  # data-dependent: dynamo splits the forward here
            temb = temb * 1.0
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, temb)
        return self.head(h)


def test_steps_and_guidance_branches_are_told_apart_across_a_graph_break():
    """The guarded graph after the break has no timestep input; it reads the noise level the
    graph before the break recorded on the request, so the two guidance calls of a step are
    two branches of one step, not two steps."""
    torch.manual_seed(0)
    model = _EmbedsThenBreaks().eval()
    plan = ["full", "full", "reuse", "full"]
    options = {"inner": "eager", "cache": {"mode": "plan", "plan": plan, "steps": 4}}
    compiled = torch.compile(model, backend="diffopt", options=options)
    x, image = torch.randn(2, 10, 4), torch.zeros(2, 3)
    with torch.no_grad(), diffopt.request(steps=4) as req:
        for step in range(4):
            t = torch.full((2,), 900.0 - 200 * step)
            for _ in ("cond", "uncond"):
                compiled(x, t, image)
    assert req.actions == {0: plan, 1: plan}


class _BlocksAroundABreak(torch.nn.Module):
    """Blocks on both sides of a graph break: two guarded graphs in one denoiser call, the
    second without a timestep input of its own."""

    def __init__(self) -> None:
        super().__init__()
        from ..models import Block

        self.time, self.embed = torch.nn.Linear(16, 16), torch.nn.Linear(4, 16)
        self.before = torch.nn.ModuleList(Block(16) for _ in range(3))
        self.after = torch.nn.ModuleList(Block(16) for _ in range(3))
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        from ..models import timestep_embedding

        temb = self.time(timestep_embedding(t, 16))
        h = self.embed(x)
        for block in self.before:
            h = block(h, temb)
        torch._dynamo.graph_break()
        for block in self.after:
            h = block(h, temb)
        return self.head(h)


def test_blocks_on_both_sides_of_a_graph_break_share_the_step_of_their_call():
    """The graph after the break places its call by the noise level the graph before it read:
    both take each step's guidance branches (calls 0–3 of a step: before, after, before,
    after), instead of the second counting every call as a new step and overrunning `steps`."""
    torch.manual_seed(0)
    model = _BlocksAroundABreak().eval()
    plan = ["full", "full", "reuse", "full"]
    options = {"inner": "eager", "cache": {"mode": "plan", "plan": plan, "steps": 4}}
    compiled = torch.compile(model, backend="diffopt", options=options)
    x = torch.randn(2, 10, 4)

    t = [torch.full((2,), 900.0 - 200 * step) for step in range(4)]

    def sample() -> list[torch.Tensor]:
        with torch.no_grad():
            return [compiled(x, t[step]) for step in range(4) for _ in ("cond", "uncond")]

    with diffopt.request(steps=4) as req:
        scoped = sample()
    assert req.actions == {call: plan for call in range(4)}
    assert req.compute() == 0.75
    with torch.no_grad():
        assert not torch.equal(scoped[-1], model(x, t[-1]))  # reused, not only recorded
        torch.testing.assert_close(scoped[-1], model(x, t[-1]), rtol=0, atol=0.2)
    # outside a scope the graph after the break places its calls the same way (it took every
    # call for another guidance branch of its first step)
    for a, b in zip(sample(), scoped, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_rising_timestep_schedule_is_one_request_and_turning_back_starts_the_next():
    """Z-Image's pipeline passes ``1 - sigma``, which rises from step to step. Taken for a new
    request at every step (the timestep was assumed to fall), its cache never reused; the
    direction is now learned from the first move, and a request ends where it turns back."""
    model, inputs = build()
    plan = ["full", "full", "reuse", "full"]
    compiled = cached(model, steps=4, mode="plan", plan=plan)

    def rising(denoiser, x):
        with torch.no_grad():
            for t in torch.linspace(100, 700, 4):
                v = denoiser(**inputs | {"hidden_states": x, "timestep": t.expand(2)})[0]
                x = x - 0.25 * v[:, : x.shape[1]]  # the DiT predicts noise and variance
        return x

    other = torch.randn_like(inputs["hidden_states"])
    with diffopt.request(steps=4) as req:
        first = rising(compiled, inputs["hidden_states"])
        second = rising(compiled, other)  # back to 100: the next request, in the same scope
    assert req.actions == {0: plan + plan}
    torch._dynamo.reset()
    fresh = cached(model, steps=4, mode="plan", plan=plan)
    torch.testing.assert_close(rising(fresh, other), second, rtol=0, atol=0)
    assert not torch.equal(first, rising(model, inputs["hidden_states"]))  # the reuse moved it


# ---- residual bases where several inputs share the stream's shape ------------------------------


def _gated(name):
    """(model, its ModuleList of blocks, keyword inputs): blocks fed per-token gates of the
    stream's shape beside the stream."""
    if name == "gated":
        from ..models import gated_model

        model, inputs = gated_model()
        return model, model.blocks, inputs
    model, inputs = build(name)
    return model, model.layers, inputs


def _block_ends(model, blocks, call):
    """Each block's (input stream, output) when `model` runs `call`."""
    seen = {}

    def keep(i, args, out):
        seen.setdefault(i, (args[0], out))  # returns None: the output stays

    hooks = [
        block.register_forward_hook(lambda m, args, out, i=i: keep(i, args, out))
        for i, block in enumerate(blocks)
    ]
    with torch.no_grad():
        model(**call)
    for hook in hooks:
        hook.remove()
    return [seen[i] for i in range(len(blocks))]


def _with_outputs(model, blocks, call, rebuild):
    """`model` on `call` with the output of each block `i` in `rebuild` replaced by
    ``rebuild[i](input stream of block 0, input stream of block i)``."""
    entered = {}

    def enter(args):
        entered.setdefault(0, args[0])  # returns None: the input stays

    hooks = [blocks[0].register_forward_pre_hook(lambda m, args: enter(args))]
    for i, fn in rebuild.items():
        hooks.append(
            blocks[i].register_forward_hook(lambda m, args, out, f=fn: f(entered[0], args[0]))
        )
    with torch.no_grad():
        out = model(**call)
    for hook in hooks:
        hook.remove()
    return first_output(out)


def _steps_of(inputs, count):
    """`count` calls along a smooth path, as a sampler makes them: the latents and the noise
    level move a little from call to call."""
    generator = torch.Generator().manual_seed(1)
    latents = inputs["hidden_states"]
    drift = torch.randn(latents.shape, generator=generator) * latents.std()
    return [
        {
            **inputs,
            "hidden_states": latents + 0.1 * step * drift,
            "timestep": inputs["timestep"] * (1 - 0.05 * step),
        }
        for step in range(count)
    ]


@pytest.mark.parametrize("name", ["gated", "tiny-ernie-image"])
def test_a_reused_step_re_adds_the_residual_to_the_stream_not_to_a_gate(name):
    """A reuse step's span output is its fresh input stream plus the stack's residual of the
    last full step: on blocks whose gates have the stream's shape the runtime pairs the exit
    with the stream by the chain of additions (shapes alone cached the stale value)."""
    model, blocks, inputs = _gated(name)
    plan = ["full", "full", "reuse", "full"]
    compiled = cached(model, steps=4, mode="plan", plan=plan, extrapolate=False)
    calls = _steps_of(inputs, len(plan))
    with diffopt.request(steps=len(plan)) as req, torch.no_grad():
        outs = [first_output(compiled(**call)) for call in calls]
    assert req.actions[0] == plan
    ends = _block_ends(model, blocks, calls[1])
    residual = ends[-1][1] - ends[0][0]
    expected = _with_outputs(
        model, blocks, calls[2], {len(blocks) - 1: lambda x0, x: x0 + residual}
    )
    torch.testing.assert_close(outs[2], expected, rtol=1e-5, atol=1e-5)
    # closer to the step run in full than the stale output a value cache would have given
    stale = _with_outputs(model, blocks, calls[2], {len(blocks) - 1: lambda x0, x: ends[-1][1]})
    with torch.no_grad():
        fresh = first_output(model(**calls[2]))
    assert (outs[2] - fresh).abs().mean() < 0.75 * (stale - fresh).abs().mean()


@pytest.mark.parametrize("damping", [0.0, 0.5, 1.0])
def test_an_extrapolated_residual_moves_by_the_damping_times_its_slope(damping):
    """Reuse extends the stack's residual from the last two full steps by `damping` times its
    slope: 0 holds it, 1 is linear (`CacheConfig.damping`)."""
    model, blocks, inputs = _gated("gated")
    plan = ["full", "full", "reuse", "full"]
    compiled = cached(model, steps=4, mode="plan", plan=plan, extrapolate=True, damping=damping)
    calls = _steps_of(inputs, len(plan))
    with diffopt.request(steps=len(plan)) as req, torch.no_grad():
        outs = [first_output(compiled(**call)) for call in calls]
    assert req.actions[0] == plan
    first, second = (_block_ends(model, blocks, calls[k]) for k in (0, 1))
    residuals = [ends[-1][1] - ends[0][0] for ends in (first, second)]
    residual = residuals[1] + damping * (residuals[1] - residuals[0])
    expected = _with_outputs(
        model, blocks, calls[2], {len(blocks) - 1: lambda x0, x: x0 + residual}
    )
    torch.testing.assert_close(outs[2], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["gated", "tiny-ernie-image"])
def test_a_block_refresh_re_adds_each_reused_blocks_residual_to_its_own_stream(name):
    """Half the blocks run on a block refresh; each other re-adds its last full step's residual
    to the stream entering it (not to a gate of the same shape)."""
    model, blocks, inputs = _gated(name)
    plan = ["full", "full", "block", "full"]
    compiled = cached(model, steps=4, mode="plan", plan=plan, extrapolate=False, block_ratio=0.5)
    calls = _steps_of(inputs, len(plan))
    with diffopt.request(steps=len(plan)) as req, torch.no_grad():
        outs = [first_output(compiled(**call)) for call in calls]
    assert req.actions[0] == plan
    residuals = [out - x for x, out in _block_ends(model, blocks, calls[1])]
    candidates = [  # which block reuses depends on how much each changed: either may
        _with_outputs(model, blocks, calls[2], {i: lambda x0, x, r=residuals[i]: x + r})
        for i in range(len(blocks))
    ]
    errors = [float((outs[2] - c).abs().max()) for c in candidates]
    assert min(errors) < 1e-5, errors


def test_a_tokens_first_stream_is_the_stream_before_and_after_the_span_first_ran():
    """Ernie-Image's stream is [S, B, H], beside [B, S, 1, d] rotary tables: guessed by shape
    before the span first ran (the table: 2 rows to decide for) and paired by residual after it
    (the stream: 24), the controller of a model whose profile was known before its executor's
    first call (a new executor for other settings, the calibration kept) got vectors of two
    lengths and failed."""
    model, inputs = build("tiny-ernie-image")
    calibrated(model, inputs, 8)
    torch._dynamo.reset()
    compiled = cached(model, 8, polish="block")  # other settings: another executor
    with diffopt.request(steps=8) as req:
        out = denoise(compiled, inputs, 8)
    assert "reuse" in req.actions[0]
    assert out.isfinite().all()
