"""Quality and cost metrics for denoiser runs on the reference data (16×16 digits in [-1, 1]).

- `psnr` / `ssim`: an optimized run against the unoptimized run with the same seeds
  (torchmetrics; data range 2 for images in [-1, 1], SSIM window 7 for 16×16 images).
- `DigitClassifier`: a small CNN trained on the digits by ``benchmarks/train_classifier.py`` and
  shipped with its weights; `class_accuracy` scores whether samples show their conditioning class,
  `ref_fid` is the Fréchet distance between its penultimate-layer features of generated and real
  images (the FID recipe with a digits network in place of Inception).
- Video (clips [N, C, F, H, W], `ref_wan`): `frame_accuracy` scores every frame,
  `temporal_consistency` compares the frame-to-frame change of generated clips with the data's,
  and `ref_fid` on clips uses each clip's mean frame features and their mean frame-to-frame change.
- `count_flops` (torch.utils.flop_counter) and `measure_peak_memory` for the cost side.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffopt import quality
from diffopt.evaluation.data import IMAGE_SIZE
from diffopt.evaluation.zoo import ASSETS

CLASSIFIER_WEIGHTS = ASSETS / "digits-classifier.safetensors"
DATA_RANGE = 2.0  # images live in [-1, 1]


def psnr(images: torch.Tensor, reference: torch.Tensor, data_range: float = DATA_RANGE) -> float:
    """Peak signal-to-noise ratio in dB of `images` against `reference` (inf when identical).

    `data_range` is the span of valid values: 2 for images in [-1, 1].
    """
    return quality.psnr(images, reference, data_range)


def ssim(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Structural similarity of `images` to `reference`, averaged over the batch (1 = identical)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    value = structural_similarity_index_measure(
        images, reference, data_range=DATA_RANGE, kernel_size=7
    )
    return float(value)


class DigitClassifier(nn.Module):
    """A small CNN for 1×16×16 digits in [-1, 1]; `features` is its 128-d penultimate layer."""

    num_features = 128

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, self.num_features),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 128] penultimate activations (ref-FID's feature space). Larger images (ref-flux's
        32×32) are average-pooled to 16×16 first."""
        if images.shape[-1] != IMAGE_SIZE:
            images = F.adaptive_avg_pool2d(images, IMAGE_SIZE)
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 10] class logits."""
        return self.head(self.features(images))


@cache
def classifier() -> DigitClassifier:
    """The shipped digits classifier (eval mode, no grad)."""
    from safetensors.torch import load_file

    if not CLASSIFIER_WEIGHTS.exists():
        raise FileNotFoundError(
            f"{CLASSIFIER_WEIGHTS} is missing; train it with python benchmarks/train_classifier.py"
        )
    model = DigitClassifier()
    model.load_state_dict(load_file(CLASSIFIER_WEIGHTS))
    return model.eval().requires_grad_(False)


def frames(videos: torch.Tensor) -> torch.Tensor:
    """Clips [N, C, F, H, W] as one batch of frames [N · F, C, H, W]."""
    n, c, f, h, w = videos.shape
    return videos.transpose(1, 2).reshape(n * f, c, h, w)


def frame_accuracy(videos: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of all frames of `videos` [N, C, F, H, W] the classifier assigns to their clip's
    conditioning label."""
    return class_accuracy(frames(videos), labels.repeat_interleave(videos.shape[2]))


def temporal_change(videos: torch.Tensor) -> float:
    """Mean absolute change between consecutive frames of clips [N, C, F, H, W]."""
    return (videos[:, :, 1:] - videos[:, :, :-1]).abs().mean().item()


def temporal_consistency(videos: torch.Tensor, real: torch.Tensor) -> float:
    """`temporal_change` of generated clips over that of real ones: 1 moves like the data, above 1
    flickers, below 1 is stiffer (0: a still image)."""
    return temporal_change(videos.clamp(-1, 1)) / temporal_change(real)


def class_accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of `images` the classifier assigns to their conditioning `labels`."""
    with torch.no_grad():
        predicted = classifier()(images.clamp(-1, 1)).argmax(-1)
    return (predicted == labels).float().mean().item()


class _ClassifierFeatures(nn.Module):
    """torchmetrics' FID feature extractor protocol around the classifier."""

    num_features = DigitClassifier.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return classifier().features(images * 2 - 1)  # FID hands us [0, 1]


class _ClipFeatures(nn.Module):
    """Features of clips [N, C, F, H, W]: the mean of their frames' classifier features and the
    mean absolute change of those features from frame to frame (what the clip shows, and how it
    moves)."""

    num_features = 2 * DigitClassifier.num_features

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        n, _, f = videos.shape[:3]
        features = classifier().features(frames(videos) * 2 - 1).reshape(n, f, -1)
        motion = (features[:, 1:] - features[:, :-1]).abs().mean(1)
        return torch.cat([features.mean(1), motion], dim=1)


def ref_fid(images: torch.Tensor, real: torch.Tensor) -> float:
    """Fréchet distance between classifier features of `images` and of `real` (both in [-1, 1]).

    Clips [N, C, F, H, W] (both sides) get the video ref-FID: each clip's mean frame features and
    their mean frame-to-frame change."""
    return _fid_score(_fid_against(real, images), images)


def _fid_against(real: torch.Tensor, images: torch.Tensor) -> Any:
    """A torchmetrics FID holding `real`'s features (scored once, kept across `reset`), for
    `images` of the same kind."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if images.dim() != real.dim():
        raise ValueError(f"images are {images.dim()}-D but real data is {real.dim()}-D")
    features = _ClipFeatures() if real.dim() == 5 else _ClassifierFeatures()
    fid = FrechetInceptionDistance(feature=features, normalize=True, reset_real_features=False)
    fid.update((real.clamp(-1, 1) + 1) / 2, real=True)
    return fid


def _fid_score(fid: Any, images: torch.Tensor) -> float:
    fid.reset()
    fid.update((images.clamp(-1, 1) + 1) / 2, real=False)
    return fid.compute().item()


def ref_fid_spread(
    images: torch.Tensor, real: torch.Tensor, resamples: int = 30, seed: int = 0
) -> float:
    """The standard deviation of `ref_fid` over bootstrap resamples of `images` (drawn with
    replacement, `real` kept whole): how much a ref-FID at this many images moves with the draw
    of the images alone."""
    (draws,) = _bootstrap_fids(_fid_against(real, images), [images], resamples, seed)
    return draws.std().item()


def ref_fid_difference(
    images: torch.Tensor,
    other: torch.Tensor,
    real: torch.Tensor,
    resamples: int = 30,
    seed: int = 0,
) -> tuple[float, float]:
    """``ref_fid(images) - ref_fid(other)`` and its standard deviation over paired bootstrap
    resamples: the same draw of indices for both, which needs `images[i]` and `other[i]` to
    come from the same seed and label. Two samplers on the same seeds share most of their
    ref-FID's draw-to-draw noise, so a gap far inside either one's `ref_fid_spread` can still
    be told apart from zero by its paired spread."""
    if images.shape != other.shape:
        raise ValueError(
            "a paired ref-FID difference needs samples of the same seeds, got "
            f"{tuple(images.shape)} and {tuple(other.shape)}"
        )
    fid = _fid_against(real, images)  # the real features, scored once for every draw
    gap = _fid_score(fid, images) - _fid_score(fid, other)
    first, second = _bootstrap_fids(fid, [images, other], resamples, seed)
    return gap, (first - second).std().item()


def _bootstrap_fids(
    fid: Any, samples: list[torch.Tensor], resamples: int, seed: int
) -> list[torch.Tensor]:
    """Each of `samples`' ref-FID (on `fid`, from `_fid_against`) over the same `resamples`
    bootstrap draws of indices."""
    gen, n = torch.Generator().manual_seed(seed), len(samples[0])
    picks = [torch.randint(n, (n,), generator=gen) for _ in range(resamples)]
    return [torch.tensor([_fid_score(fid, images[pick]) for pick in picks]) for images in samples]


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run `fn()` once under torch.utils.flop_counter; returns its result and the FLOPs counted."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        result = fn()
    return result, counter.get_total_flops()


def measure_peak_memory(
    fn: Callable[[], Any], device: torch.device | str = "cpu"
) -> tuple[Any, int]:
    """Run `fn()` once; returns its result and the peak bytes of live tensors it reached.

    On CUDA this is the allocator's peak. On CPU, where torch keeps no allocator statistics, it is
    the running sum of the allocations and frees the PyTorch profiler records, in time order
    (memory held before `fn` started is not counted).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with (
        _native_stderr_silenced(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        result = fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return result, peak


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Kineto prints a line to the C-level stderr each time a profiler starts and stops."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
