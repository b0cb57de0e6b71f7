"""`diffopt.calibrate`: record the change indicator on calibration inputs, then pick settings.

One full run records the indicator at every step; that profile is what thresholds are measured
against (they are fractions of the whole run's change), so the same settings transfer across
models, step counts and quantization. With ``cache="auto"`` and a quality budget, every setting
on a small grid is run on the same inputs and the one that does the least block work while
meeting the budget wins; each setting is a per-request override, so nothing recompiles.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from diffopt import quality
from diffopt.config import CacheConfig, Config, ConfigError, InnerBackend
from diffopt.guards import ACTIONS, CacheAction
from diffopt.runtime.cache import request

Run = Callable[[Callable[..., Any]], torch.Tensor]
"""``run(denoiser) -> samples``: one whole sampling run on the calibration inputs."""

CRITICAL_GRID = {
    False: (0.05, 0.1, 0.15, 0.2, 0.3, 0.4),
    True: (0.05, 0.1, 0.2, 0.35, 0.5, 0.8, 1.2, 1.6),
}
"""Critical lines searched by ``cache="auto"``, held and extrapolated reuse: fractions of the
run's calibrated change, or of its curvature weighted by the distance from the last full step."""


@dataclass
class Trial:
    """One setting tried by the search, and how it did against the uncached run."""

    settings: dict[str, Any]
    stats: quality.PsnrStats
    """Mean-MSE PSNR and per-sample percentiles on the calibration inputs."""
    work: float
    """Guarded block work as a share of the uncached run's."""
    hit_rates: dict[str, float]

    @property
    def psnr(self) -> float:
        """PSNR of the mean squared error over the calibration inputs."""
        return self.stats.mean


@dataclass
class Calibration:
    """What `calibrate` found: the settings to use, and the evidence for them."""

    config: CacheConfig
    """Ready for ``options={"cache": calibration.config}``; holds the calibrated profile."""
    plan: list[CacheAction]
    """The chosen setting's actions per step (first guidance branch), for ``mode="plan"``."""
    trials: list[Trial] = field(default_factory=list)

    def save(self, path: str | Path) -> Path:
        """Write the cache config as JSON (loadable with `CacheConfig(**json.load(...))`)."""
        path = Path(path)
        path.write_text(json.dumps(dataclasses.asdict(self.config), indent=2) + "\n")
        return path

    def save_plan(self, path: str | Path) -> Path:
        """Write the plan as a JSON list of actions, for ``cache.plan``."""
        path = Path(path)
        path.write_text(json.dumps(self.plan) + "\n")
        return path

    def table(self) -> str:
        """Every setting tried: PSNR (mean-MSE, 5th percentile, worst and median sample), guarded
        block work and the hit rate of each action."""
        from tabulate import tabulate

        rows = [
            [json.dumps(t.settings), *t.stats.cells(), f"{t.work:.3f}"]
            + [f"{t.hit_rates[a]:.2f}" for a in ACTIONS]
            for t in self.trials
        ]
        headers = ["settings", *quality.STATS_HEADERS, "work", *ACTIONS]
        return tabulate(rows, headers, tablefmt="github")


def calibrate(
    model: torch.nn.Module,
    run: Run,
    *,
    steps: int,
    cache: CacheConfig | Literal["auto"] | None = None,
    target_psnr: float | None = None,
    data_range: float = 2.0,
    inner: InnerBackend = "eager",
) -> Calibration:
    """Calibrate cache guards for `model` on the inputs `run` samples.

    `run(denoiser)` must sample once with the given denoiser (``steps`` denoiser calls per
    guidance branch) and return the result. Without ``cache="auto"``, the given (or default)
    settings get the calibrated profile. With ``cache="auto"`` and `target_psnr`, the grid is
    searched for the least block work whose samples stay within `target_psnr` dB (PSNR with
    `data_range`) of the uncached run's; if none does, a `ConfigError` says how close it got.
    """
    auto = cache == "auto"
    if auto and target_psnr is None:
        raise ConfigError('cache="auto" needs a quality budget, e.g. target_psnr=30')
    base = CacheConfig(steps=steps) if cache in (None, "auto") else cache
    base = dataclasses.replace(base, steps=steps, profile=None, curvature=None, mode="online")
    denoiser = torch.compile(model, backend="diffopt", options=Config(inner=inner, cache=base))
    # a model compiled often (a benchmark, repeated calibration) must not fall back to eager
    limit = max(torch._dynamo.config.recompile_limit, 64)
    with torch._dynamo.config.patch(recompile_limit=limit):
        return _search(denoiser, run, base, steps, auto, target_psnr, data_range)


def _search(
    denoiser: Callable[..., Any],
    run: Run,
    base: CacheConfig,
    steps: int,
    auto: bool,
    target_psnr: float | None,
    data_range: float,
) -> Calibration:
    with request(steps=steps, calibrate=True) as calibration_run:
        reference = run(denoiser)
    key = "block0" if base.indicator == "block0" else "stack"
    profile = calibration_run.recorded.get(key)
    if not profile:
        raise ConfigError(
            "calibration recorded no indicator: the denoiser was never called with cache guards "
            "(did `run` use the denoiser it was given? see the step_guard pass report)"
        )
    curvature = calibration_run.recorded.get("curvature") if key == "stack" else None
    base = dataclasses.replace(base, profile=profile, curvature=curvature)
    candidates = _grid(base) if auto else [base]

    trials, plans = [], []
    for settings in candidates:
        # the search's own settings: guards idle under them are its finding, not a user error
        with request(steps=steps, cache=settings, trial=auto) as req:
            samples = run(denoiser)
        changed = {k: v for k, v in dataclasses.asdict(settings).items() if v != getattr(base, k)}
        trials.append(
            Trial(
                changed,
                quality.psnr_stats(samples, reference, data_range),
                req.compute(),
                req.hit_rates(),
            )
        )
        plans.append(req.actions.get(0, []))
    if not auto:
        return Calibration(base, plans[0], trials)
    passing = [i for i, t in enumerate(trials) if t.psnr >= target_psnr]
    if not passing:
        best = max(trials, key=lambda t: t.psnr)
        raise ConfigError(
            f"no cache setting reached target_psnr={target_psnr} dB (best: {best.psnr:.1f} dB "
            f"with {best.settings}); lower the target or calibrate with more steps"
        )
    chosen = min(passing, key=lambda i: (trials[i].work, -trials[i].psnr))
    return Calibration(candidates[chosen], plans[chosen], trials)


def _grid(base: CacheConfig) -> list[CacheConfig]:
    """Settings ``cache="auto"`` tries: push-only, and push-then-polish with each refresh."""
    grid = []
    pairs = [(c, extrapolate) for extrapolate, grid in CRITICAL_GRID.items() for c in grid]
    for critical, extrapolate in pairs:
        for max_reuse in (base.max_reuse, 2 * base.max_reuse):
            grid.append(
                dataclasses.replace(
                    base,
                    early=critical,
                    critical=critical,
                    polish="none",
                    extrapolate=extrapolate,
                    max_reuse=max_reuse,
                )
            )
        for polish in ("token", "block"):
            grid.append(
                dataclasses.replace(
                    base,
                    early=critical / 2,
                    critical=critical,
                    polish=polish,
                    extrapolate=extrapolate,
                )
            )
    return grid
