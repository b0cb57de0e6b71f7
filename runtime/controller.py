"""The push-then-polish controller: per-step decisions from an accumulated change indicator.

Two lines on the change accumulated since the last full step: below `early` the whole block stack
is reused (push); between `early` and `critical` the step is polished with a block or token
refresh; past `critical` a full step runs and the accumulator restarts. The first `warmup` steps
and the last step always compute, and no more than `max_reuse` steps in a row skip the full stack.
A calibrated plan (``mode="plan"``) decides every step after the warm-up, the last included: its
quality was measured with that action, while the online controller cannot know what an unprotected
last step would cost.

Every sample keeps its own accumulator. A batch runs the most compute any of its samples asks
for, so no sample is ever skipped because its batch mates changed little; a sample that receives
a full step because of a batch mate restarts its accumulator, since its cache is fresh. A full
step the online check adds restarts none: the check adds full steps, never moves the profile's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from diffopt.config import CacheConfig, ConfigError
from diffopt.guards import ACTIONS, CacheAction, polish_action


def resample_profile(profile: Sequence[float], steps: int) -> list[float]:
    """A per-step change profile calibrated at one step count, re-cut for `steps` steps.

    The cumulative change over the normalized trajectory is interpolated, so the resampled
    profile keeps the same total and the same shape over time.
    """
    if len(profile) == steps:
        return list(profile)
    cumulative = np.concatenate([[0.0], np.cumsum(profile)])
    source = np.linspace(0.0, 1.0, len(cumulative))
    target = np.interp(np.linspace(0.0, 1.0, steps + 1), source, cumulative)
    return np.diff(target).tolist()


def share(values: Sequence[float], step: int) -> float:
    """`values[step]` as a share of their total: what the controller reads from a calibrated
    profile (or curvature) at `step`."""
    return values[step] / max(sum(values), 1e-12)


def load_plan(plan: Sequence[str] | str, steps: int) -> list[CacheAction]:
    """A plan as a list of actions, read from JSON if it is a path, checked against `steps`."""
    if isinstance(plan, str):
        try:
            plan = json.loads(Path(plan).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cache.plan {plan!r} is not a readable JSON list: {e}") from e
    plan = list(plan)
    unknown = sorted({a for a in plan if a not in ACTIONS})
    if unknown:
        raise ConfigError(f"cache.plan has unknown action(s) {unknown}; use {ACTIONS}")
    if len(plan) != steps:
        raise ConfigError(
            f"cache.plan has {len(plan)} actions but the request runs {steps} steps; "
            "calibrate a plan for this step count"
        )
    return plan


def interval_plan(steps: int, every: int, warmup: int, phase: int = 0) -> list[CacheAction]:
    """A fixed schedule (FORA's and TaylorSeer's shape): the first `warmup` steps full, then a
    full step at ``warmup + phase`` and every `every` steps after it, reuse between. The last
    step follows the pattern too, as in TaylorSeer: on ref-flux at 28 steps (8 seeds), letting
    it reuse saved 0.036 of the work and moved PSNR by -0.23 to +0.12 dB (calibration tries
    every phase, so one of them ends on a full step)."""
    if every < 1 or warmup < 0 or not 0 <= phase < every:
        raise ConfigError(
            f"an interval plan needs every >= 1, warmup >= 0 and 0 <= phase < every, got "
            f"every={every}, warmup={warmup}, phase={phase}"
        )
    first = warmup + phase
    return [
        "full" if s < warmup or (s >= first and (s - first) % every == 0) else "reuse"
        for s in range(steps)
    ]


class Controller:
    """Decisions for one guidance branch of one request: one call per denoiser step."""

    def __init__(
        self, config: CacheConfig, steps: int, polish: CacheAction, start: int = 0
    ) -> None:
        self.config = config
        self.steps = steps
        self.start = start
        """The request's step this branch's first call ran at: a model that takes over half-way
        (Wan 2.2's second expert) has nothing cached, so its warm-up counts from there."""
        self.polish = polish
        """What the polish band runs: "token" or "block", "reuse" for ``polish="none"``."""
        self.plan = load_plan(config.plan, steps) if config.mode == "plan" else None
        self.reads_indicator = self.plan is None
        """Whether `decide` uses the change it is given (a plan does not: it needs no profile)."""
        self.accumulated: torch.Tensor | None = None
        self.since_full: torch.Tensor | None = None

    def decide(
        self,
        step: int,
        change: torch.Tensor,
        curvature: torch.Tensor | None = None,
        veto: torch.Tensor | None = None,
    ) -> CacheAction:
        """The batch's action at `step`, given each sample's indicator `change` [B].

        With `curvature` (for extrapolated reuse), the accumulated quantity is the error a linear
        extrapolation makes instead: each step's curvature weighs by its distance from the
        last full step. `veto` [B] marks samples a measured check found drifting: they get a
        full step whatever the indicator says, on top of the full steps the indicator asks for.
        """
        if self.accumulated is None:
            self.accumulated = torch.zeros_like(change)
            self.since_full = torch.zeros_like(change)
        config = self.config
        if step < self.start + config.warmup:
            action: CacheAction = "full"
        elif self.plan is not None:
            action = self.plan[step]  # the last step too: the plan was measured with it
        elif step >= self.steps - 1:
            action = "full"
        else:
            self.accumulated += change if curvature is None else curvature * (self.since_full + 1)
            # Per sample: 0 reuse, 1 polish, 2 full; the batch runs the most anyone needs.
            want = (self.accumulated >= config.early).to(torch.int8)
            want += self.accumulated >= config.critical
            want[self.since_full >= config.max_reuse] = 2
            # the one host read per step: the profile's rank, and whether the check vetoed
            if veto is None:
                rank, vetoed = int(want.max()), False
            else:
                both = torch.stack([want.max(), veto.any().to(want.device, torch.int8)])
                rank, vetoed = both.tolist()
            if vetoed and rank < 2:
                # the check adds this full step; the profile's schedule goes on as if it had
                # reused, so the check never moves a full step the profile would run (moved
                # later, the costly last steps were reused: ref-dit, 28 steps, guidance 4, median
                # sample -4.8 dB)
                self.since_full += 1
                return "full"
            action = ("reuse", self.polish, "full")[rank]
        if action == "full":
            self.accumulated.zero_()
            self.since_full.zero_()
        else:
            self.since_full += 1
        return action


def open_loop_actions(config: CacheConfig, steps: int) -> list[CacheAction] | None:
    """The action `config`'s controller picks at each step of a `steps`-step request when they
    follow from the settings alone: a plan, or the calibrated profile read open-loop
    (``indicator="profile"``, no check). A strategy that cannot run yet (nothing cached) still
    falls back to a full step at run time. None where the choice depends on what the run
    measures."""
    if config.indicator != "profile" or config.check != "none":
        return None
    controller = Controller(config, steps, polish_action(config.polish))
    if controller.reads_indicator and not config.profile:
        return None
    profile = resample_profile(config.profile, steps) if controller.reads_indicator else None
    bends = config.curvature if config.extrapolate and controller.reads_indicator else None
    curvature = resample_profile(bends, steps) if bends else None
    actions = []
    for step in range(steps):
        change = torch.tensor([share(profile, step) if profile else 0.0])
        bend = torch.tensor([share(curvature, step)]) if curvature else None
        actions.append(controller.decide(step, change, bend))
    return actions
