"""ref-wan: moving-digit clips, the video metrics, and the shipped Wan transformer."""

from __future__ import annotations

import pytest
import torch

from diffopt.evaluation import metrics, ref_wan


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
