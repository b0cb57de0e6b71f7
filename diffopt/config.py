"""The configuration tree: plain dataclasses that round-trip through dicts and JSON.

An engine directory or a benchmark row records the exact `Config` that produced it, so every
field is a JSON-friendly value and unknown keys are errors, never ignored.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

InnerBackend = Literal["eager", "aot_eager", "inductor"]


class ConfigError(ValueError):
    """A configuration value or key that diffopt cannot accept."""


@dataclass
class CleanupConfig:
    """Options of the `remove_noops` pass (drops ops that provably return their input)."""

    dropout: bool = True
    """Drop `dropout` calls that run with `training=False` or `p=0`."""
    squeeze: bool = True
    """Drop `squeeze(dim)` on a dimension whose size is not 1 (it exports as a failing Squeeze)."""
    same_shape_views: bool = True
    """Drop `view`/`reshape` to the shape the tensor already has."""
    same_dtype_casts: bool = True
    """Drop `.to(dtype)` / `.type(dtype)` to the dtype the tensor already has."""


CacheAction = Literal["full", "block", "token", "reuse"]
"""What one denoiser call does under cache guards, from most to least compute."""


@dataclass
class CacheConfig:
    """Cache-reuse guards and the dual-threshold "push then polish" controller.

    The controller adds up a per-step change indicator since the last full step. Below `early`
    it reuses the whole block stack (step guard); between `early` and `critical` it polishes
    (recomputes some blocks, or the most-changed tokens); past `critical` it runs a full step.
    Thresholds are fractions of the whole run's calibrated change, so they transfer across
    models and step counts. Without a `profile`, the first request runs in full and calibrates.
    """

    steps: int | None = None
    """Denoiser calls per request; or give it per request with `diffopt.request(steps=...)`."""
    mode: Literal["online", "plan"] = "online"
    """``online``: decide each step from the indicator; ``plan``: follow `plan` step by step."""
    indicator: Literal["profile", "block0"] = "profile"
    """``profile``: the calibrated per-step change of the block stack's residual (free at run
    time); ``block0``: the measured change of block 0's residual, per sample (block 0 always
    runs)."""
    early: float = 0.25
    """Early-warning line: reuse whole steps while the accumulated change stays below it."""
    critical: float = 0.5
    """Critical line: run a full step (and restart the accumulator) once the change reaches it."""
    polish: Literal["token", "block", "none"] = "token"
    """How steps between the two lines are refreshed."""
    token_ratio: float = 0.25
    """Token refresh: the fraction of tokens (highest recent change) that are recomputed."""
    block_ratio: float = 0.5
    """Block refresh: the fraction of blocks (highest recent change) that are recomputed."""
    extrapolate: bool = True
    """Reused residuals are extended linearly from the last two full steps (else held); the
    controller then accumulates the calibrated curvature, weighted by the distance from the last
    full step (the error a linear extrapolation makes), instead of the change."""
    warmup: int = 1
    """The first steps always compute (the last step always does too)."""
    max_reuse: int = 8
    """Cap on consecutive steps that are not full."""
    profile: list[float] | None = None
    """The calibrated per-step indicator (from `diffopt.calibrate`), resampled to `steps`."""
    curvature: list[float] | None = None
    """The calibrated per-step second difference of the stack residual: with `extrapolate`, the
    controller accumulates the error of a linear extrapolation from it instead of `profile`."""
    plan: list[CacheAction] | str | None = None
    """For ``mode="plan"``: one action per step, or the path of a JSON file holding the list."""
    step_guard: bool = True
    block_guard: bool = True
    token_guard: bool = True

    def __post_init__(self) -> None:
        _check_choice("cache.mode", self.mode, ("online", "plan"))
        _check_choice("cache.indicator", self.indicator, ("profile", "block0"))
        _check_choice("cache.polish", self.polish, ("token", "block", "none"))
        if not 0 <= self.early <= self.critical:
            raise ConfigError(
                f"cache thresholds need 0 <= early <= critical, got early={self.early}, "
                f"critical={self.critical}"
            )
        for name in ("token_ratio", "block_ratio"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"cache.{name} must be in (0, 1], got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"cache.steps must be a positive step count, got {self.steps}")
        if self.mode == "plan" and self.plan is None:
            raise ConfigError(
                'cache.mode="plan" needs cache.plan: a list of actions per step or a JSON file '
                "(diffopt.calibrate(...).plan writes one)"
            )


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not a known choice; use one of {allowed}")


@dataclass
class Config:
    """Everything that decides what diffopt does to a denoiser.

    Pass configs set to ``None`` disable that pass. Build one directly, from a dict
    (`Config.from_dict`), or from JSON (`Config.load`); `torch.compile(..., options=...)` accepts
    either a `Config` or a dict of the same keys.
    """

    inner: InnerBackend = "inductor"
    """How each region is finally compiled: ``"eager"``, ``"aot_eager"`` or ``"inductor"``."""
    strict: bool = False
    """Turn every skipped rewrite (a pass that could not apply somewhere) into an error."""
    cleanup: CleanupConfig | None = field(default_factory=CleanupConfig)
    """The `remove_noops` pass; ``None`` disables it."""
    cache: CacheConfig | None = None
    """Cache-reuse guards (step, block and token granularity); ``None`` disables them."""

    def __post_init__(self) -> None:
        _check_choice("inner", self.inner, typing.get_args(InnerBackend))
        if self.cache == "auto":
            raise ConfigError(
                'cache="auto" searches settings on calibration inputs, which a compile call does '
                "not have: run diffopt.calibrate(model, run, target_psnr=...) and pass its .config"
            )

    @classmethod
    def coerce(cls, options: Config | dict[str, Any] | None) -> Config:
        """Accept what `torch.compile(options=...)` may carry: None, a dict or a Config."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if isinstance(options, dict):
            return cls.from_dict(options)
        raise ConfigError(
            f"options must be a dict or a diffopt.Config, not {type(options).__name__}"
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Build a Config from nested dicts; unknown keys raise and list the valid ones."""
        return _from_dict(cls, data, path="options")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Config:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(data)


def _from_dict(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a dict of {cls.__name__} fields, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {path}; valid keys are: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        sub = _dataclass_in(hints[name])
        if sub is not None and value is not None and not dataclasses.is_dataclass(value):
            value = _from_dict(sub, value, f"{path}.{name}")
        kwargs[name] = value
    return cls(**kwargs)


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass in a hint such as ``CleanupConfig | None``, if there is one."""
    candidates = typing.get_args(hint) or (hint,)
    return next((c for c in candidates if dataclasses.is_dataclass(c)), None)
