"""ref-wan: moving-digit clips, the video metrics, and the shipped Wan transformer."""

from __future__ import annotations

import pytest
import torch

from diffopt.evaluation import metrics, ref_wan, zoo

STEPS_FOR_CLASS = 10
PIPELINE_CACHE_PSNR = 17  # 19.2 dB measured (retrained weights; 6 steps, so each reuse is a sixth)


@pytest.fixture(scope="module")
def real():
    return ref_wan.clips(120, seed=3)


def test_clips_move_within_the_classifiers_range(real):
    videos, labels = real
    assert videos.shape == (120, 1, ref_wan.FRAMES, 16, 16)
    assert videos.min() >= -1 and videos.max() <= 1
    # the frames are still readable digits, and they do move
    assert metrics.frame_accuracy(videos, labels) >= 0.93
    assert metrics.temporal_change(videos) > 0.02
    # a straight path in pose space: the middle frame is near the mean of its neighbours
    middle = videos[:, :, 1:-1]
    neighbours = (videos[:, :, :-2] + videos[:, :, 2:]) / 2
    assert (middle - neighbours).abs().mean() < 0.5 * metrics.temporal_change(videos)


def test_clips_are_seeded(real):
    again, _ = ref_wan.clips(120, seed=3)
    assert torch.equal(again, real[0])
    other, _ = ref_wan.clips(120, seed=4)
    assert not torch.equal(other, real[0])


def test_temporal_consistency_sees_stiff_and_flickering_clips(real):
    videos, _ = real
    other, _ = ref_wan.clips(120, seed=5)
    assert metrics.temporal_consistency(other, videos) == pytest.approx(1.0, abs=0.1)
    still = videos[:, :, :1].expand_as(videos)
    assert metrics.temporal_consistency(still, videos) == 0.0
    flicker = videos + 0.3 * torch.randn(videos.shape, generator=torch.Generator().manual_seed(0))
    assert metrics.temporal_consistency(flicker, videos) > 2


def test_video_ref_fid_ranks_real_motion_above_stills_and_shuffled_frames(real):
    videos, _ = real
    other, _ = ref_wan.clips(120, seed=6)
    still = other[:, :, :1].expand_as(other)
    order = torch.randperm(ref_wan.FRAMES, generator=torch.Generator().manual_seed(0))
    shuffled = torch.cat([other[:60], other[60:][:, :, order]])  # half the clips jump about
    same = metrics.ref_fid(other, videos)
    assert same < metrics.ref_fid(still, videos)
    assert same < metrics.ref_fid(shuffled, videos)
    with pytest.raises(ValueError, match="5-D"):
        metrics.ref_fid(videos, videos[:, :, 0])


def test_architecture_is_a_wan_video_dit():
    from diffusers import WanTransformer3DModel

    model = ref_wan.architecture().eval()
    assert isinstance(model, WanTransformer3DModel)
    embeddings = ref_wan.class_embeddings(model)
    condition = embeddings(torch.tensor([1, 10]))
    assert condition.keys() == {"encoder_hidden_states"}  # Wan takes no pooled vector
    x = torch.randn(2, 1, ref_wan.FRAMES, 16, 16)
    with torch.no_grad():
        out = model(x, timestep=torch.tensor([500.0, 20.0]), **condition, return_dict=False)[0]
    assert out.shape == x.shape


@pytest.fixture(scope="module")
def ref():
    return zoo.load("ref-wan")


def test_ref_wan_is_a_shipped_wan_video_dit(ref):
    from diffusers import WanTransformer3DModel

    assert isinstance(ref.model, WanTransformer3DModel) and isinstance(ref, ref_wan.WanReference)
    weights = zoo.ASSETS / ref_wan.NAME / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= 20 * 2**20
    inputs = ref.make_inputs(batch=3)
    assert inputs["hidden_states"].shape == (3, 1, ref_wan.FRAMES, 16, 16)  # 8 frames, 512 tokens
    assert ref.model(**inputs)[0].shape == (3, 1, ref_wan.FRAMES, 16, 16)
    assert ref.null_class == 10 and ref.steps == 50


def test_clips_show_their_class_in_every_frame(ref):
    labels = torch.arange(10)
    videos = ref.sample(labels, seeds=range(7000, 7010), steps=STEPS_FOR_CLASS)
    assert videos.shape == (10, 1, ref_wan.FRAMES, 16, 16)
    assert metrics.frame_accuracy(videos, labels) >= 0.8
    assert 0.3 < metrics.temporal_consistency(videos, ref_wan.clips(100)[0]) < 3


def test_the_diffopt_backend_runs_ref_wan_like_eager(ref):
    compiled = torch.compile(ref.model, backend="diffopt", options={"inner": "eager"})
    inputs = ref.make_inputs(batch=2)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs)[0], ref.model(**inputs)[0], rtol=0, atol=1e-4)


def test_wanpipeline_runs_the_compiled_transformer_with_cache_guards(ref):
    """A diffusers WanPipeline whose transformer is compiled by diffopt: the first request
    calibrates (runs in full), the next reuses in both guidance branches."""
    import diffopt
    from diffopt import quality
    from diffopt.runtime import profiles

    steps, labels = 6, torch.tensor([3])
    expected = ref.pipeline()(**ref.pipeline_inputs(labels, steps, seed=0)).frames
    profiles.forget(ref.model)
    options = {"inner": "eager", "cache": {"steps": steps, "polish": "none"}}
    pipe = ref.pipeline(torch.compile(ref.model, backend="diffopt", options=options))
    first = pipe(**ref.pipeline_inputs(labels, steps, seed=0)).frames
    torch.testing.assert_close(first, expected, rtol=0, atol=1e-4)
    with diffopt.request(steps=steps) as req:
        second = pipe(**ref.pipeline_inputs(labels, steps, seed=0)).frames
    assert len(req.actions) == 2, req.actions
    assert all("reuse" in branch for branch in req.actions.values()), req.actions
    assert quality.psnr(second, expected, 2.0) > PIPELINE_CACHE_PSNR


def test_wanpipeline_runs_the_compiled_transformer_with_w4a4(ref):
    from diffopt import quality

    steps, labels = 2, torch.tensor([3])
    expected = ref.pipeline()(**ref.pipeline_inputs(labels, steps, seed=0)).frames
    options = {"inner": "eager", "quant": "w4a4"}
    pipe = ref.pipeline(torch.compile(ref.model, backend="diffopt", options=options))
    videos = pipe(**ref.pipeline_inputs(labels, steps, seed=0)).frames
    assert quality.psnr(videos, expected, 2.0) > 17  # 19.9 dB measured: K = 128 is small for W4A4


def test_the_unrolled_schedule_is_wanpipeline(ref):
    """`diffopt.unroll` on the trained Wan: the whole guided schedule as one module (cond and
    uncond as one batch) gives WanPipeline's clips (two calls per step), eager and compiled."""
    import diffopt

    steps, labels = 4, torch.tensor([2, 5])
    latents = ref.noise([0, 1])
    pipe = ref.pipeline()
    expected = pipe(**ref.pipeline_inputs(labels, steps, seed=0), latents=latents).frames
    sampler = diffopt.unroll(ref.model, ref.scheduler, steps, guidance=ref.guidance)
    cond = ref.condition(labels)
    uncond = ref.condition(torch.full_like(labels, ref.null_class))
    with torch.no_grad():
        eager = sampler(latents, cond, uncond)
        compiled = torch.compile(
            sampler, backend="diffopt", options={"inner": "eager"}, fullgraph=True
        )(latents, cond, uncond)
    torch.testing.assert_close(eager, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(compiled, expected, atol=1e-4, rtol=1e-4)
