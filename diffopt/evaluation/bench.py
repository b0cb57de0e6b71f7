"""`diffopt bench`: a baseline and any number of variants, on the same seeds, side by side.

Every variant samples the same images (same labels, same per-image seeds) as the baseline.
Timing rounds are interleaved across variants and the median is kept, so machine drift hits all
of them alike; quality is scored once, against the baseline's images (PSNR, SSIM) and with the
digits classifier (class accuracy, ref-FID against the real digits; for clips, ref-wan's, the
accuracy of every frame and the video ref-FID against real moving-digit clips). FLOPs are counted
with each variant's regions run eagerly (what a compiled kernel hides from the flop counter it
cannot count); peak memory is measured in a separate run.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from diffopt import quality
from diffopt.config import CacheConfig
from diffopt.evaluation import metrics
from diffopt.evaluation.zoo import Reference
from diffopt.runtime import counting_flops

Build = Callable[[torch.nn.Module, str], Callable[..., Any]]
"""``build(model copy, inner backend) -> denoiser``: `inner` is "eager" when counting FLOPs."""


@dataclass
class Variant:
    """One way of running the denoiser."""

    name: str
    build: Build
    family: str = "diffopt"
    """``"baseline"``, ``"diffopt"`` or ``"peer"`` (another library, run through an adapter)."""
    reset: Callable[[Any], None] = field(default=lambda denoiser: None)
    """Clears state carried between sampling runs (cache hooks), so every run starts cold."""


def baseline() -> Variant:
    """The unoptimized model, eager."""
    return Variant("baseline", lambda model, inner: model, family="baseline")


def diffopt_variant(
    name: str,
    options: dict[str, Any] | None = None,
    warmup: Callable[[Callable[..., Any]], Any] | None = None,
) -> Variant:
    """`torch.compile(model, backend="diffopt", options=...)`; inner backend from the harness.

    `warmup(compiled)` runs right after compiling, so that the capture, and whatever calibrates
    on its inputs (``quant.smooth_alpha``, ``quant.gptq``, ``min_sqnr``), sees calibration
    inputs rather than the benchmark's; give them the benchmark's shapes, or it recompiles."""

    def build(model: torch.nn.Module, inner: str) -> Callable[..., Any]:
        compiled = torch.compile(
            model, backend="diffopt", options={**(options or {}), "inner": inner}
        )
        if warmup is not None:
            warmup(compiled)
        return compiled

    return Variant(name, build)


def cached_variant(
    name: str, cache: CacheConfig | Callable[[], CacheConfig], inner: str | None = None
) -> Variant:
    """diffopt with cache guards. `cache` may be a function, called once at the first build
    (to calibrate lazily); `inner` pins the region backend (None: the harness's)."""
    settings: list[CacheConfig] = []

    def build(model: torch.nn.Module, harness_inner: str) -> Callable[..., Any]:
        if not settings:
            settings.append(cache() if callable(cache) else cache)
        regions = "eager" if harness_inner == "eager" else (inner or harness_inner)
        options = {"inner": regions, "cache": dataclasses.asdict(settings[0])}
        return torch.compile(model, backend="diffopt", options=options)

    return Variant(name, build)


def auto_cache_variant(
    reference: Reference, steps: int, target_psnr: float = 30.0, images: int = 20
) -> Variant:
    """Cache guards from ``diffopt.calibrate(cache="auto", target_psnr=...)``, calibrated on
    `images` seeds disjoint from the benchmark's (which start at 0)."""
    labels, seeds = torch.arange(images) % 10, list(range(10_000, 10_000 + images))

    def calibrated() -> CacheConfig:
        from diffopt.calibration import calibrate

        def sample(denoiser: Callable[..., Any]) -> torch.Tensor:
            return reference.sample(labels, seeds, denoiser=denoiser, steps=steps)

        found = calibrate(
            reference.model, sample, steps=steps, cache="auto", target_psnr=target_psnr
        )
        return found.config

    return cached_variant(f"diffopt cache (auto, {target_psnr:g} dB)", calibrated)


def diffopt_variants(reference: Reference | None = None, steps: int | None = None) -> list[Variant]:
    """Every diffopt optimization that exists, one variant each (grows as passes land).

    With a `reference`, the cache guards join, calibrated for that model and step count.
    """
    variants = [diffopt_variant("diffopt (capture + cleanup)")]
    if reference is not None:
        variants.append(auto_cache_variant(reference, steps or reference.steps))
    # on CPU the op runs its PyTorch reference: this row shows quality and memory, not speed
    variants.append(diffopt_variant("diffopt W4A4 (rotated)", {"quant": "w4a4"}))
    return variants


def torch_compile_variant() -> Variant:
    """Plain `torch.compile` with the same inner backend: the bar any compiler must clear."""

    def build(model: torch.nn.Module, inner: str) -> Callable[..., Any]:
        return model if inner == "eager" else torch.compile(model, backend=inner)

    return Variant("torch.compile", build, family="peer")


@dataclass
class Row:
    """One variant's measurements; ratios are against the baseline of the same run."""

    name: str
    family: str
    seconds: float
    """Median wall time of sampling all images once."""
    time_ratio: float
    flops: int
    flops_ratio: float
    psnr: float
    """PSNR of the mean squared error over all images, against the baseline's."""
    psnr_p5: float
    """5th-percentile image's PSNR: the tail a mean hides (`diffopt.quality.PsnrStats`)."""
    psnr_min: float
    psnr_median: float
    ssim: float
    ref_fid: float
    accuracy: float
    peak_mb: float


@dataclass
class BenchResult:
    """What `run` measured: one `Row` per variant, and the images each produced."""

    model: str
    images: int
    steps: int
    repeats: int
    inner: str
    rows: list[Row]
    samples: dict[str, torch.Tensor]
    """Each variant's images, [N, C, H, W] in [-1, 1]."""

    def markdown(self) -> str:
        """The rows as a GitHub table, under a caption with the run's settings."""
        from tabulate import tabulate

        table = [
            [
                r.name,
                r.family,
                f"{r.seconds:.2f}",
                f"{r.time_ratio:.3f}",
                f"{r.flops_ratio:.3f}",
                *map(quality.format_db, (r.psnr, r.psnr_p5, r.psnr_min)),
                f"{r.ssim:.3f}",
                f"{r.ref_fid:.2f}",
                f"{r.accuracy:.3f}",
                f"{r.peak_mb:.1f}",
            ]
            for r in self.rows
        ]
        headers = [
            "variant",
            "family",
            "seconds",
            "time / base",
            "FLOPs / base",
            *quality.STATS_HEADERS[:3],
            "SSIM",
            "ref-FID",
            "accuracy",
            "peak MB",
        ]
        caption = (
            f"{self.model}: {self.images} images, {self.steps} steps, median of {self.repeats} "
            f"interleaved runs, inner={self.inner}"
        )
        return caption + "\n\n" + tabulate(table, headers, tablefmt="github")

    def plot(self, path: str | Path) -> Path:
        """Two panels against the speedup over the baseline: PSNR against the baseline's images
        (what a reader can trust at any image count) and class accuracy. Variants are told apart
        by the legend, not by labels that would overlap where variants coincide."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        finite = [r.psnr for r in self.rows if math.isfinite(r.psnr)]
        identical = max(finite, default=40.0) + 5  # where an exact match (inf dB) is drawn
        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
        for i, row in enumerate(self.rows):
            style = {
                "marker": {"baseline": "s", "diffopt": "o", "peer": "^"}.get(row.family, "x"),
                "color": f"C{i % 10}",
                "s": 60,
                "label": row.name,
            }
            speedup = 1 / row.time_ratio
            left.scatter(speedup, row.psnr if math.isfinite(row.psnr) else identical, **style)
            right.scatter(speedup, 100 * row.accuracy, **style)
        left.axhline(identical, color="0.6", lw=0.8, ls=":")
        left.annotate(
            "identical to baseline",
            (0.01, identical),
            xycoords=("axes fraction", "data"),
            xytext=(0, 3),
            textcoords="offset points",
            fontsize=8,
            color="0.4",
        )
        left.set_ylabel("PSNR against the baseline (dB, higher is better)")
        right.set_ylabel("class accuracy (%)")
        for ax in (left, right):
            ax.set_xlabel("speedup over baseline (wall time)")
            ax.grid(alpha=0.3)
        handles, labels = left.get_legend_handles_labels()
        fig.legend(
            handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False
        )
        fig.suptitle(f"{self.model}: speed vs quality ({self.images} images, {self.steps} steps)")
        fig.tight_layout(rect=(0, 0.06 + 0.04 * ((len(labels) - 1) // 4), 1, 1))
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def to_dict(self) -> dict[str, Any]:
        """Everything but the images, for JSON."""
        return {k: v for k, v in asdict(self).items() if k != "samples"}


def run(
    reference: Reference,
    variants: Sequence[Variant],
    *,
    images: int = 100,
    repeats: int = 3,
    steps: int | None = None,
    inner: str = "inductor",
    seed: int = 0,
    progress: bool = True,
    memory: bool = True,
) -> BenchResult:
    """Sample `images` images (labels 0..9 in turn) with each variant; the first is the baseline.

    ``memory=False`` skips the separate peak-memory run (the column reads nan).
    """
    if not variants or variants[0].family != "baseline":
        raise ValueError(
            "the first variant must be the baseline (diffopt.evaluation.bench.baseline())"
        )
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be unique, got {names}")
    steps = steps or reference.steps
    labels = torch.arange(images) % 10
    seeds = [seed + i for i in range(images)]

    def sample_with(variant: Variant, denoiser: Callable[..., Any]) -> torch.Tensor:
        variant.reset(denoiser)
        return reference.sample(labels, seeds, denoiser=denoiser, steps=steps)

    # every variant compiles the same forward: past dynamo's limit it would silently run eager
    limit = max(torch._dynamo.config.recompile_limit, 4 * len(variants))
    torch._dynamo.config.recompile_limit = limit
    denoisers = {}
    samples: dict[str, torch.Tensor] = {}
    flops: dict[str, int] = {}
    peaks: dict[str, int] = {}
    bar = tqdm(total=len(variants) * (2 + repeats), desc="bench", disable=not progress)
    for variant in variants:  # build, compile and check quality once
        bar.set_postfix_str(variant.name)
        counting = variant.build(copy.deepcopy(reference.model), "eager")
        flops[variant.name] = _count_flops(
            lambda v=variant, d=counting: sample_with(v, d), counting
        )
        if flops[variant.name] == 0:
            raise RuntimeError(
                f"variant {variant.name!r} ran no counted work: dynamo ran it eagerly outside "
                "diffopt (recompile limit?); raise torch._dynamo.config.recompile_limit"
            )
        denoisers[variant.name] = variant.build(copy.deepcopy(reference.model), inner)
        samples[variant.name] = sample_with(variant, denoisers[variant.name])  # also warms up
        bar.update(2)
    for variant in variants:
        peaks[variant.name] = (
            metrics.measure_peak_memory(lambda v=variant: sample_with(v, denoisers[v.name]))[1]
            if memory
            else float("nan")
        )
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        for variant in variants:
            start = time.perf_counter()
            sample_with(variant, denoisers[variant.name])
            times[variant.name].append(time.perf_counter() - start)
            bar.update(1)
    bar.close()

    base = names[0]
    video = samples[base].dim() == 5  # clips [N, C, F, H, W] (ref-wan): video ref-FID, per frame
    real = _real_clips(images) if video else _real_digits()[0]
    accuracy = metrics.frame_accuracy if video else metrics.class_accuracy
    rows = []
    for variant in variants:
        name = variant.name
        seconds = statistics.median(times[name])
        stats = quality.psnr_stats(samples[name], samples[base], metrics.DATA_RANGE)
        rows.append(
            Row(
                name=name,
                family=variant.family,
                seconds=seconds,
                time_ratio=seconds / statistics.median(times[base]),
                flops=flops[name],
                flops_ratio=flops[name] / flops[base],
                psnr=stats.mean,
                psnr_p5=stats.p5,
                psnr_min=stats.minimum,
                psnr_median=stats.median,
                ssim=metrics.ssim(samples[name], samples[base]),
                ref_fid=metrics.ref_fid(samples[name], real),
                accuracy=accuracy(samples[name], labels),
                peak_mb=peaks[name] / 2**20,
            )
        )
    return BenchResult(reference.name, images, steps, repeats, inner, rows, samples)


def _count_flops(run_once: Callable[[], Any], denoiser: Any) -> int:
    """FLOPs of one sampling run; compiled denoisers count inside diffopt's executor."""
    if isinstance(denoiser, torch._dynamo.eval_frame.OptimizedModule):
        with counting_flops() as tally:
            run_once()
        return tally.total
    return metrics.count_flops(run_once)[1]


def _real_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from diffopt.evaluation.data import digits

    return digits("all")


def _real_clips(count: int) -> torch.Tensor:
    """Real moving-digit clips for the video ref-FID, as `train_ref_wan.py` scores its samples."""
    from diffopt.evaluation import ref_wan

    return ref_wan.clips(max(count, 300), seed=1)[0]


def save_grid(images: torch.Tensor, path: str | Path, columns: int = 10) -> Path:
    """Write images [N, 1, H, W] in [-1, 1] as one grayscale PNG, `columns` per row; clips
    [N, 1, T, H, W] (ref-wan's samples) are tiles of their T frames side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if images.dim() == 5:  # a clip's frames left to right: [N, 1, H, T * W]
        n, c, t, h, w = images.shape
        images = images.permute(0, 1, 3, 2, 4).reshape(n, c, h, t * w)
    n, _, h, w = images.shape
    rows = -(-n // columns)
    padded = torch.full((rows * columns, h + 2, w + 2), -1.0)
    padded[:n, 1:-1, 1:-1] = images[:, 0].clamp(-1, 1)
    grid = padded.reshape(rows, columns, h + 2, w + 2).permute(0, 2, 1, 3)
    grid = grid.reshape(rows * (h + 2), columns * (w + 2))
    path = Path(path)
    plt.imsave(path, ((grid + 1) / 2).numpy(), cmap="gray", vmin=0, vmax=1)
    return path
