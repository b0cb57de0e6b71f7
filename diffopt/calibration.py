"""`diffopt.calibrate`: record the change indicator on calibration inputs, then pick settings.

One full run records the indicator at every step; that profile is what thresholds are measured
against (they are fractions of the whole run's change). With ``cache="auto"`` and a quality
budget, every setting on a small grid is run on the same inputs (each a per-request override, so
nothing recompiles), and the one with the least block work whose *fresh-input* estimate keeps the
budget wins: the promise is about inputs calibration never saw, so a setting is judged by the
bootstrap lower bounds of its mean-MSE PSNR and of its 5th-percentile sample
(`diffopt.quality.fresh_estimate`), not by the calibration inputs' own figure, which the search
picked it for.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from diffopt import quality
from diffopt.config import CacheConfig, Config, ConfigError, InnerBackend
from diffopt.guards import ACTIONS, CacheAction
from diffopt.runtime.cache import request
from diffopt.runtime.controller import interval_plan, open_loop_actions
from diffopt.runtime.profiles import Condition

Run = Callable[[Callable[..., Any]], torch.Tensor]
"""``run(denoiser) -> samples``: one whole sampling run on the calibration inputs."""

CRITICAL_GRID = {
    False: (0.05, 0.1, 0.15, 0.2, 0.3, 0.4),
    True: (0.05, 0.1, 0.2, 0.35, 0.5, 0.8, 1.2, 1.6),
}
"""Critical lines searched by ``cache="auto"``, held and extrapolated reuse: fractions of the
run's calibrated change, or of its curvature weighted by the distance from the last full step.
Tried and reverted: held 0.02/0.03 and extrapolated 0.03 (+12 settings) were never chosen on
ref-dit at 28 steps (budgets 42/40/34/30 picked the same settings as without them). There the
40 dB budget passed over extrapolated 0.35 (40.6 dB on the calibration inputs, fresh lower
bound 38.9 dB, work 0.25) for 0.2 (45.4 dB on fresh inputs, work 0.29): the bound's margin,
not the grid, is what a 41 dB peer point beats."""

INTERVAL_GRID = {"every": (2, 3, 4, 5, 6, 7, 8), "warmup": (2, 3)}
"""Fixed schedules ``cache="auto"`` also tries (`diffopt.runtime.controller.interval_plan`, with
extrapolated reuse), at every phase: on ref-flux at 28 steps (20 calibration inputs,
``benchmarks/results/cache-sweep-ref-flux-28-plans-calibration.md``) every-3 plans at work 0.429
ran from 43.7 to 49.0 dB by where the full steps fell, and the best beat the controller's best
there (47.6 dB at work 0.464). Every 7 and 8 reach TaylorSeer 8's work (0.18 on ref-wan at 50
steps), which every 6 (0.24) did not."""


DAMPING_GRID = (0.85, 0.7)
"""Extrapolation dampings (`CacheConfig.damping`) `Calibration.refine` tries on its starting
plan before it moves full steps (on ref-flux at 28 steps, 12 calibration seeds: 0.85 gave an
every-3 plan +1.5 dB and a 10-full-step plan +2.7 dB; 0.7 was best on some 10-full plans;
0.55 lost on all)."""


Selection = Literal["fresh", "calibration"]
"""How `select` reads a trial: ``"fresh"`` by its estimate for inputs calibration never saw (the
bootstrap lower bounds of `diffopt.quality.FreshEstimate`), ``"calibration"`` by the calibration
inputs' own mean-MSE PSNR (the edge-picking diffopt did before; flatters the chosen setting)."""


@dataclass
class Trial:
    """One setting tried by the search, and how it did against the uncached run."""

    settings: dict[str, Any]
    """The fields that differ from the base settings."""
    config: CacheConfig
    """The whole setting, calibrated profile included."""
    stats: quality.PsnrStats
    """Mean-MSE PSNR and per-sample percentiles on the calibration inputs."""
    fresh: quality.FreshEstimate
    """What the per-sample errors say about fresh inputs (bootstrap interval and bounds)."""
    work: float
    """Guarded block work as a share of the uncached run's."""
    hit_rates: dict[str, float]
    plan: list[CacheAction] = field(default_factory=list, repr=False)
    """The actions it took per step (first guidance branch)."""
    mse: list[float] = field(default_factory=list, repr=False)
    """Each calibration input's mean squared error against the uncached run."""

    @property
    def psnr(self) -> float:
        """PSNR of the mean squared error over the calibration inputs."""
        return self.stats.mean

    def describe(self) -> str:
        """`settings` as one line of JSON, a plan as one letter per step (f full, r reuse,
        b block, t token)."""
        plan = self.settings.get("plan")
        if isinstance(plan, list):
            return json.dumps({**self.settings, "plan": "".join(a[0] for a in plan)})
        return json.dumps(self.settings)


def select(trials: Sequence[Trial], target_psnr: float, *, by: Selection = "fresh") -> Trial:
    """The trial with the least block work that keeps `target_psnr`.

    ``by="fresh"``: its fresh-input lower bounds keep the promise (mean-MSE PSNR >= target,
    5th percentile >= target - `diffopt.quality.TAIL_MARGIN_DB`); ``by="calibration"``: its
    calibration inputs' own mean-MSE PSNR reaches the target. Raises `ConfigError` with the
    closest setting when none does.
    """
    # a setting that skipped nothing on the calibration inputs is no cache: it keeps any budget
    skipping = [t for t in trials if t.work < 1.0 - 1e-9] or list(trials)
    if by == "fresh":
        passing = [t for t in skipping if t.fresh.meets(target_psnr)]
    elif by == "calibration":
        passing = [t for t in skipping if t.psnr >= target_psnr]
    else:
        raise ConfigError(f"select by 'fresh' or 'calibration', not {by!r}")
    if passing:
        return min(passing, key=lambda t: (t.work, -t.fresh.low))
    best = max(skipping, key=lambda t: t.fresh.low if by == "fresh" else t.psnr)
    if by == "calibration":
        reached = f"best: {best.psnr:.1f} dB"
    else:
        reached = (
            f"best: {best.fresh.low:.1f} dB for fresh inputs at {best.fresh.confidence:.0%} "
            f"confidence, p5 {best.fresh.p5_low:.1f} dB; {best.psnr:.1f} dB on the calibration "
            "inputs"
        )
    raise ConfigError(
        f"no cache setting reached target_psnr={target_psnr} dB ({reached}, with "
        f"{best.describe()}); lower the target, calibrate with more steps or more inputs"
    )


@dataclass
class Calibration:
    """What `calibrate` found: the settings to use, and the evidence for them."""

    config: CacheConfig
    """Ready for ``options={"cache": calibration.config}``; holds the calibrated profile."""
    plan: list[CacheAction]
    """The chosen setting's actions per step (first guidance branch), for ``mode="plan"``."""
    trials: list[Trial] = field(default_factory=list)
    target_psnr: float | None = None
    """The quality budget the setting was chosen for (None without ``cache="auto"``)."""
    chosen: Trial | None = None
    """The trial `config` comes from."""
    search: _Search | None = field(default=None, repr=False, compare=False)
    """What the trials ran on, for `refine` (only in the process that calibrated)."""

    def retarget(self, target_psnr: float, *, by: Selection = "fresh") -> Calibration:
        """The same trials' choice for another budget (or another rule), without running
        anything again."""
        chosen = select(self.trials, target_psnr, by=by)
        return Calibration(
            chosen.config, chosen.plan, self.trials, target_psnr, chosen, self.search
        )

    def refine(self, target_psnr: float | None = None, *, rounds: int = 3) -> Calibration:
        """Search where the full steps fall, from the setting chosen for `target_psnr` (default:
        this calibration's budget), on the same calibration inputs.

        First it tries the extrapolation dampings of `DAMPING_GRID` on the starting setting
        (how far reuse follows the residual's slope) and keeps the one whose fresh-input bounds
        are highest. Each round then tries dropping each full step after the warm-up and keeps
        the drop whose
        fresh-input bounds stay highest while they still meet the budget; when no drop does, it
        moves one full step by one step instead, keeping the move that raises the mean's lower
        bound most, and stops when none does. Every plan tried joins the trials, and the choice
        is made again over all of them (`select`), so the result is never worse on the
        calibration inputs' evidence. Measured on ref-flux at 28 steps (``cache_sweep.py
        --refine``, one run, 10 fresh images): the 38.4 dB budget went from 42.5 dB at work 0.32
        to 39.8 dB (p5 37.6) at 0.29, TaylorSeer 5's work, where TaylorSeer 5 reaches 38.1 dB; on
        ref-wan at 50 steps each budget kept its PSNR with 0.83-0.89 of TaylorSeer's work.
        Many plans tried on the same inputs flatter the best of them: check the refined setting
        on fresh inputs. Costs up to ``3 * full steps`` sampling runs per round. Starts from
        the cheapest setting of full steps and reuse alone (a plan, or the controller without
        refresh) that keeps the budget, also where a refreshing setting won the grid (on
        ref-dit at 28 steps the 50 dB budget chose a block refresh at work 0.50). Needs the
        calibration `calibrate` returned in this process."""
        target = self.target_psnr if target_psnr is None else target_psnr
        if self.search is None or target is None:
            raise ConfigError(
                "refine needs the calibration calibrate(cache='auto', target_psnr=...) returned "
                "in this process (a loaded config has no calibration inputs to search on)"
            )
        # refine moves full steps, so it starts from the cheapest setting of full steps and
        # reuse alone that keeps the budget, also where a block or token refresh won the grid
        movable = [t for t in self.trials if not set(t.plan) - {"full", "reuse"}]
        if not any(t.fresh.meets(target) for t in movable):
            chosen = select(self.trials, target)
            raise ConfigError(
                f"refine moves full steps, and no setting of full steps and reuse alone keeps "
                f"{target:g} dB: use the choice as it is ({chosen.describe()})"
            )
        current = select(movable, target)
        warmup = current.plan.index("reuse") if "reuse" in current.plan else len(current.plan)
        steps = self.search.base.steps
        seen = {_same_samples_key(t.config, steps) for t in self.trials}
        tried: list[Trial] = []

        def run(plans: list[list[CacheAction]]) -> list[Trial]:
            """The plans not measured yet, with the current setting's reuse (extrapolated or
            held)."""
            settings = [dataclasses.replace(current.config, mode="plan", plan=p) for p in plans]
            new = [c for c in settings if _same_samples_key(c, steps) not in seen]
            seen.update(_same_samples_key(c, steps) for c in new)
            trials = self.search.measure(new)
            tried.extend(trials)
            return trials

        if current.config.extrapolate:  # how far reuse follows the slope, for this plan
            dampings = [dataclasses.replace(current.config, damping=d) for d in DAMPING_GRID]
            seen.update(_same_samples_key(c, steps) for c in dampings)
            damped = self.search.measure(dampings)
            tried.extend(damped)
            kept = [t for t in damped if t.fresh.meets(target)]
            current = max([current, *kept], key=lambda t: (t.fresh.low, t.fresh.p5_low))
        for _ in range(rounds):
            plan = current.plan
            full = [i for i in range(warmup, len(plan)) if plan[i] == "full"]
            drops = [t for t in run([_moved(plan, i) for i in full]) if t.fresh.meets(target)]
            if drops:
                current = max(drops, key=lambda t: (t.fresh.low, t.fresh.p5_low))
                continue
            moves = [
                _moved(plan, i, j)
                for i in full
                for j in (i - 1, i + 1)
                if warmup <= j < len(plan) and plan[j] == "reuse"
            ]
            best = max(run(moves), key=lambda t: t.fresh.low, default=None)
            if best is None or best.fresh.low <= current.fresh.low:
                break
            current = best
        trials = self.trials + tried
        chosen = select(trials, target)
        return Calibration(chosen.config, chosen.plan, trials, target, chosen, self.search)

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
        """Every setting tried: PSNR on the calibration inputs (mean-MSE, 5th percentile, worst
        and median sample), the estimate for fresh inputs with its interval, block work and the
        hit rate of each action; the chosen row is starred, and `summary` follows."""
        from tabulate import tabulate

        rows = [
            ["*" if t is self.chosen else "", t.describe(), *t.stats.cells()]
            + [_interval(t.fresh), quality.format_db(t.fresh.p5_low), f"{t.work:.3f}"]
            + [f"{t.hit_rates[a]:.2f}" for a in ACTIONS]
            for t in self.trials
        ]
        confidence = self.trials[0].fresh.confidence if self.trials else 0.9
        headers = ["", "settings", *quality.STATS_HEADERS]
        headers += [f"fresh dB ({confidence:.0%} interval)", "fresh p5 >= dB", "work", *ACTIONS]
        table = tabulate(rows, headers, tablefmt="github")
        return table + "\n\n" + self.summary() if self.chosen is not None else table

    def summary(self, *, rate: float = 0.05, margin_db: float = 0.5) -> str:
        """The chosen setting's estimate for fresh inputs, with its spread, and how many
        calibration inputs a tighter bound, or seeing a failure that hits a `rate` share of
        inputs, would need."""
        t = self.chosen
        if t is None:
            return "no setting was chosen (calibrate with cache='auto' and a target_psnr)"
        fresh, n = t.fresh, t.fresh.samples
        seen = 1 - (1 - rate) ** n
        lines = [
            f"chosen {t.describe()} for target {self.target_psnr:g} dB: "
            f"{t.psnr:.1f} dB on its {n} calibration inputs; on fresh inputs "
            f"{fresh.estimate:.1f} dB expected, {_interval(fresh)} ({fresh.confidence:.0%} "
            f"bootstrap interval), 5th-percentile sample >= {fresh.p5_low:.1f} dB; "
            f"block work {t.work:.3f}.",
            f"for a lower bound within {margin_db:g} dB of the estimate: about "
            f"{fresh.inputs_for_margin(margin_db)} calibration inputs. A failure that hits "
            f"1 input in {round(1 / rate)} shows up among {n} inputs with {seen:.0%} "
            f"probability; {quality.inputs_to_see(rate, fresh.confidence)} inputs see it with "
            f"{fresh.confidence:.0%} confidence.",
        ]
        return "\n".join(lines)


@dataclass
class _Search:
    """What `calibrate` ran its trials on, kept so that `Calibration.refine` can run more."""

    denoiser: Callable[..., Any]
    run: Run
    reference: torch.Tensor
    base: CacheConfig
    data_range: float
    confidence: float

    def measure(self, settings: list[CacheConfig]) -> list[Trial]:
        """Each setting as a trial on the calibration inputs, as `calibrate` ran its own."""
        with _recompile_limit():
            trials = measure(
                self.denoiser,
                self.run,
                settings,
                self.reference,
                steps=self.base.steps,
                data_range=self.data_range,
                confidence=self.confidence,
            )
        for trial in trials:
            trial.settings = _changed(trial.config, self.base)
        return trials


def _moved(plan: list[CacheAction], drop: int, add: int | None = None) -> list[CacheAction]:
    """`plan` with step `drop` reused instead of run, and step `add` run instead."""
    out = list(plan)
    out[drop] = "reuse"
    if add is not None:
        out[add] = "full"
    return out


def _recompile_limit() -> Any:
    """A model compiled often (a benchmark, repeated calibration) must not fall back to eager."""
    return torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, 64))


def _interval(fresh: quality.FreshEstimate) -> str:
    return f"{quality.format_db(fresh.low)}-{quality.format_db(fresh.high)}"


def calibrate(
    model: torch.nn.Module,
    run: Run,
    *,
    steps: int,
    cache: CacheConfig | Literal["auto"] | None = None,
    target_psnr: float | None = None,
    confidence: float = 0.9,
    data_range: float = 2.0,
    inner: InnerBackend = "eager",
) -> Calibration:
    """Calibrate cache guards for `model` on the inputs `run` samples.

    `run(denoiser)` must sample once with the given denoiser (``steps`` denoiser calls per
    guidance branch) and return the result. Without a `target_psnr`, the given (or default)
    settings get the calibrated profile. With one (and ``cache="auto"``, or settings whose
    thresholds and refresh the search then replaces, such as ``CacheConfig(check="stack")``),
    the grid is searched for the least block work that keeps the promise on inputs calibration
    never saw: at `confidence`, the bootstrap lower bound of the mean-MSE PSNR (with
    `data_range`) against the uncached run reaches `target_psnr`, and that of the
    5th-percentile sample `target_psnr - 3`. If none does, a `ConfigError` says how close it got.
    """
    # a budget searches, from the given settings when there are some (e.g. with the check on)
    auto = cache == "auto" or target_psnr is not None
    if auto and target_psnr is None:
        raise ConfigError('cache="auto" needs a quality budget, e.g. target_psnr=30')
    base = CacheConfig(steps=steps) if cache in (None, "auto") else cache
    base = dataclasses.replace(
        base, steps=steps, profile=None, curvature=None, profile_indicator=None, mode="online"
    )
    denoiser = torch.compile(model, backend="diffopt", options=Config(inner=inner, cache=base))
    with _recompile_limit():
        reference, base = _profile(denoiser, run, base, steps)
        candidates = _grid(base) if auto else [base]
        trials = measure(
            denoiser,
            run,
            candidates,
            reference,
            steps=steps,
            data_range=data_range,
            confidence=confidence,
            trial=auto,
        )
    for trial in trials:
        trial.settings = _changed(trial.config, base)
    search = _Search(denoiser, run, reference, base, data_range, confidence)
    if not auto:
        return Calibration(base, trials[0].plan, trials, search=search)
    chosen = select(trials, target_psnr)
    return Calibration(chosen.config, chosen.plan, trials, target_psnr, chosen, search)


def _profile(
    denoiser: Callable[..., Any], run: Run, base: CacheConfig, steps: int
) -> tuple[torch.Tensor, CacheConfig]:
    """One uncached run that records the indicator: the reference samples and the settings
    with the calibrated profile."""
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
    measured_on = Condition.from_recorded(calibration_run.recorded, steps)
    return reference, dataclasses.replace(
        base,
        profile=profile,
        curvature=curvature,
        profile_indicator=base.indicator,
        calibrated_on=dataclasses.asdict(measured_on),
    )


def measure(
    denoiser: Callable[..., Any],
    run: Run,
    settings: Sequence[CacheConfig],
    reference: torch.Tensor,
    *,
    steps: int,
    data_range: float = 2.0,
    confidence: float = 0.9,
    trial: bool = True,
) -> list[Trial]:
    """Run each of `settings` as one request of `denoiser` (compiled with cache guards; nothing
    recompiles) on the inputs `run` samples, and score it against the `reference` samples: the
    statistics of these inputs, and the estimate for fresh ones at `confidence`. `trial` marks
    the requests as a search's (no idle-guard warnings). Settings whose full and reuse steps
    follow from the settings alone (`diffopt.runtime.controller.open_loop_actions`) and match an
    earlier one's give the same samples: those are run once."""
    trials: list[Trial] = []
    measured: dict[tuple[Any, ...], Trial] = {}
    for config in settings:
        key = _same_samples_key(config, steps)
        if key in measured:
            trials.append(dataclasses.replace(measured[key], config=config))
            continue
        # the search's own settings: guards idle under them are its finding, not a user error
        with request(steps=steps, cache=config, trial=trial) as req:
            samples = run(denoiser)
        mse = quality.mse_per_sample(samples, reference)
        trials.append(
            Trial(
                {},
                config,
                quality.PsnrStats.from_mse(mse, data_range),
                quality.fresh_estimate(mse, data_range, confidence=confidence),
                req.compute(),
                req.hit_rates(),
                req.actions.get(0, []),
                mse.tolist(),
            )
        )
        if key is not None:
            measured[key] = trials[-1]
    return trials


def _same_samples_key(config: CacheConfig, steps: int) -> tuple[Any, ...] | None:
    """What decides `config`'s samples when its actions are known in advance and only full
    steps and reuse: the actions, and how reuse rebuilds (held, or extrapolated with its
    damping). A refresh is left out: where its guard did not apply it runs full, which restarts
    the controller's accumulators at its thresholds, so equal planned actions need not stay
    equal."""
    actions = open_loop_actions(config, steps)
    if actions is None or not set(actions) <= {"full", "reuse"}:
        return None
    return (tuple(actions), config.extrapolate, config.damping if config.extrapolate else None)


def _changed(config: CacheConfig, base: CacheConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(config).items() if v != getattr(base, k)}


def _grid(base: CacheConfig) -> list[CacheConfig]:
    """Settings ``cache="auto"`` tries: push-only, push-then-polish with each refresh, and
    fixed-interval plans (not under ``check="stack"``: a plan reads no profile, so the check
    the user asked for would not run)."""
    plans: dict[tuple[CacheAction, ...], None] = {}  # one trial per distinct plan
    if base.check == "none":
        for warmup in INTERVAL_GRID["warmup"]:
            for every in INTERVAL_GRID["every"]:
                for phase in range(every):
                    plans[tuple(interval_plan(base.steps, every, warmup, phase))] = None
    grid = [
        dataclasses.replace(base, mode="plan", plan=list(plan), extrapolate=True) for plan in plans
    ]
    pairs = [(c, extrapolate) for extrapolate, lines in CRITICAL_GRID.items() for c in lines]
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
