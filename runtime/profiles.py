"""Calibrated profiles, kept per model: keyed by the model's weights, not by a compiled graph.

Dynamo shares one compiled graph (and with it one `CachingExecutor`) between instances of a class
with different weights, since it lifts parameters to graph inputs; and it compiles a new graph
(a new executor) for a new batch size of the same model. A profile kept on the executor would be
wrong in the first case and lost in the second. So the profile an uncached request measures is
stored here under the parameter tensors the executor was called with: another model gets its own
calibration, and a recompile of the same model finds its profile again.

Weights changed in place (``load_state_dict``) bump the tensors' version counters: the stored
profile then no longer matches and the next request calibrates again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

SPEED_TOLERANCE = 0.06
"""How much faster than at calibration the early token stream may move, in a batch of 8 or more
inputs, before a request counts as another guidance scale or sampler (ref-dit: +7 % at guidance
2.5, +16-23 % at 4, against 1.5; batches of 12 and 16 other inputs agree within 1 %). One
input's speed varies by about 5 % (ref-dit), so fewer inputs get a tolerance that grows as one
over the square root of their number. Inputs, not rows: a classifier-free-guidance batch repeats
each input's stream (counted as rows, a 2-clip ref-wan request was held to 8.5 %)."""

SCHEDULE_TOLERANCE = 0.02
"""How far (as a share of the first timestep) a request's timesteps may sit from the calibrated
schedule, resampled to its step count, before it counts as another scheduler or shift."""


@dataclass(frozen=True)
class Condition:
    """What a request ran under, as the executor sees it: what a profile was measured at.

    Guidance is applied outside the denoiser, so it is seen only through its effect: the
    early-trajectory `speed` of the token stream entering the blocks."""

    steps: int
    """Denoiser calls per guidance branch."""
    batch: int
    """Samples per call (a classifier-free-guidance batch counts both halves)."""
    tokens: int | None
    """Length of the token stream entering the guarded span (the resolution), if it has one."""
    timesteps: tuple[float, ...] = ()
    """The timestep of each step, as the model received it (the scheduler and its shift)."""
    speed: float | None = None
    """Mean relative change per step of the stream entering the blocks over the first third of
    the steps, times the step count (so step counts compare); larger under stronger guidance."""
    inputs: int | None = None
    """Distinct inputs in the batch (a classifier-free-guidance batch holds each twice), if
    measured: how far `speed` can move by chance."""
    stream: tuple[float | None, ...] = ()
    """The stream's change at each early step `speed` averages (None where a reuse made it
    inexact), so that a request is compared on the steps both measured."""

    def describe(self) -> str:
        """``28 steps, batch 20, 64 tokens``."""
        tokens = f", {self.tokens} tokens" if self.tokens is not None else ""
        return f"{self.steps} steps, batch {self.batch}{tokens}"

    @classmethod
    def from_recorded(cls, recorded: dict[str, list[float]], steps: int) -> Condition:
        """The condition a calibrating request recorded (`Request.recorded`)."""
        tokens = recorded.get("tokens", [0])[0]
        return cls(
            steps=steps,
            batch=int(recorded.get("batch", [0])[0]),
            tokens=int(tokens) if tokens else None,
            timesteps=tuple(recorded.get("timestep", ())),
            speed=early_speed(recorded.get("stream", []), steps),
            inputs=int(recorded.get("inputs", [0])[0]) or None,
            stream=tuple(recorded.get("stream", ())),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Condition:
        """Inverse of `dataclasses.asdict` (a config's `calibrated_on`, read from JSON)."""
        tuples = {key: tuple(data.get(key, ())) for key in ("timesteps", "stream")}
        return cls(**{**data, **tuples})

    def schedule_at(self, step: int, steps: int) -> float | None:
        """The calibrated timestep at `step` of a `steps`-step request (linear in the position
        along the trajectory), or None when no schedule was recorded."""
        if len(self.timesteps) < 2:
            return None
        position = step / max(steps - 1, 1) * (len(self.timesteps) - 1)
        low = min(int(position), len(self.timesteps) - 2)
        share = position - low
        return self.timesteps[low] * (1 - share) + self.timesteps[low + 1] * share

    def differences(self, now: Condition) -> dict[str, str]:
        """How the request `now` (as far as it has run) differs from this calibration in ways
        that move the quality the calibration measured: kind -> what differs."""
        found = {}
        if now.steps != self.steps:
            found["steps"] = f"{now.steps} steps instead of {self.steps}"
        if now.tokens != self.tokens and None not in (now.tokens, self.tokens):
            found["tokens"] = f"{now.tokens} tokens (another resolution) instead of {self.tokens}"
        if self.timesteps and now.timesteps:
            span = max(abs(self.timesteps[0]), 1e-12)
            off = max(
                abs(t - self.schedule_at(i, now.steps)) / span for i, t in enumerate(now.timesteps)
            )
            if off > SCHEDULE_TOLERANCE:
                found["schedule"] = (
                    f"another timestep schedule (scheduler or shift: {off:.0%} of the range off)"
                )
        inputs = now.inputs or now.batch
        tolerance = SPEED_TOLERANCE * max(1.0, (8 / max(inputs, 1)) ** 0.5)
        faster = self.speed_ratio(now)
        if faster is not None and faster > 1 + tolerance:
            found["speed"] = (
                f"a stream moving {faster - 1:.0%} faster early on (a higher "
                "guidance scale or another sampler)"
            )
        return found

    def speed_ratio(self, now: Condition) -> float | None:
        """How much faster `now`'s early stream moves than this calibration's. At the same step
        count, over the early steps both measured exactly: a request that reuses early measures
        only some of them, and the change per step is not flat (on ref-wan at 50 steps the first
        steps move more than the third's mean). Else by `speed`."""
        if now.steps == self.steps and self.stream and now.stream:
            third = max(now.steps // 3, 2)
            pairs = [
                (mine, theirs)
                for mine, theirs in zip(self.stream[1:third], now.stream[1:third], strict=False)
                if mine is not None and theirs is not None
            ]
            if len(pairs) >= 2:
                return sum(t for _, t in pairs) / sum(m for m, _ in pairs)
        return now.speed / self.speed if self.speed and now.speed else None


def early_speed(stream: list[float | None], steps: int) -> float | None:
    """`Condition.speed` from per-step stream changes over the first third of `steps`: None
    until that third ran, or when fewer than two of its steps followed a full step (a change
    after a reused step carries the reuse's own error; those are recorded as None)."""
    third = max(steps // 3, 2)
    if len(stream) < third:
        return None
    exact = [v for v in stream[1:third] if v is not None]
    return sum(exact) / len(exact) * steps if len(exact) >= 2 else None


@dataclass
class ModelProfile:
    """A model's calibrated indicator, and whose and what it was measured on."""

    recorded: dict[str, list[float]]
    """Per-step indicator by key (``"stack"``, ``"curvature"``, ``"block0"``)."""
    condition: Condition
    weights: dict[int, int] = field(repr=False)
    """id -> version of each parameter tensor at calibration: a changed weight invalidates it."""
    owner: str = ""
    """Which model, in words."""

    def matches(self, weights: Iterable[torch.Tensor]) -> bool:
        """Whether `weights` still hold what this profile was measured with (every stored
        tensor present, none modified in place since)."""
        current = fingerprint(weights)
        return all(current.get(i) == version for i, version in self.weights.items())

    def describe(self) -> str:
        """Whose profile this is and what it was measured on."""
        return f"measured on an uncached request of {self.owner} ({self.condition.describe()})"


_PROFILES: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""parameter tensor -> the `ModelProfile` of the model that owns it (weak: dies with the model)."""


def model_weights(values: Iterable[Any]) -> list[torch.Tensor]:
    """The parameters among a call's graph inputs (buffers may be shared between models)."""
    return [v for v in values if isinstance(v, torch.nn.Parameter)]


def fingerprint(weights: Iterable[torch.Tensor]) -> dict[int, int]:
    """id -> version counter of each tensor (in-place writes such as ``load_state_dict`` bump
    the version)."""
    return {id(w): w._version for w in weights}


def lookup(weights: list[torch.Tensor]) -> ModelProfile | None:
    """The profile stored for the model these weights belong to, if it still matches them."""
    found = _PROFILES.get(weights[0]) if weights else None
    return found if found is not None and found.matches(weights) else None


def store(weights: list[torch.Tensor], profile: ModelProfile) -> None:
    """Keep `profile` for the model these weights belong to (under each of them, so the model
    can be found from any of its parameters)."""
    for weight in weights:
        _PROFILES[weight] = profile


def forget(model: torch.nn.Module) -> None:
    """Drop `model`'s calibrated profile: its next cached request calibrates again."""
    for weight in model.parameters():
        _PROFILES.pop(weight, None)


def profile_of(model: torch.nn.Module) -> ModelProfile | None:
    """The profile `model`'s cached requests use (measured on one of its own uncached
    requests), or None when it has none yet (its next cached request calibrates)."""
    weights = list(model.parameters())
    found = next((_PROFILES[w] for w in weights if w in _PROFILES), None)
    return found if found is not None and found.matches(weights) else None
