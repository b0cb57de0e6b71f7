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


QUANT_PRESETS: dict[str, dict[str, Any]] = {
    "w4a4": {},
    "w4a4-rht": {},  # rotated (regular Hadamard transform): DESIGN.md's name for the default
    "w4a4-rtn": {"rotation": "none"},
    "w4a4-sylvester": {"rotation": "sylvester"},
    "w4a8": {"act_bits": 8},
    "w8a8": {"weight_bits": 8, "act_bits": 8},
}
"""Named settings accepted as ``quant="w4a4"`` etc. (rotation ``regular`` unless named)."""


@dataclass
class QuantConfig:
    """Rotated low-bit linears: group-wise Hadamard rotation, symmetric int weights and
    per-token int activations, integer GEMM, dequantization (the `w4a4` pass).

    Each eligible linear becomes one ``diffopt::w4a4_linear`` op. Weights are rotated and
    quantized once, at compile time; activations are rotated and quantized inside the op.
    """

    weight_bits: Literal[4, 8] = 4
    act_bits: Literal[4, 8] = 4
    rotation: Literal["regular", "sylvester", "none"] = "regular"
    """``regular``: the Kronecker power of the 4×4 Hadamard whose rows sum to 1 (ConvRot);
    ``sylvester``: the classic Hadamard; ``none``: plain round-to-nearest."""
    group: int | None = None
    """Rotation group along K (a power of 4); ``None``: the largest of 256 / 64 / 16 dividing K."""
    weight_clip: bool = True
    """Search each output channel's clipping ratio (0.5–1 × absmax) for the least squared
    weight error, instead of plain absmax / qmax."""
    scope: Literal["blocks", "all"] = "blocks"
    """``blocks``: only linears inside the repeated blocks, so embedders and the final norm and
    projection (which live outside them) stay in high precision; ``all``: every linear."""
    include: list[str] = field(default_factory=lambda: ["*"])
    """fnmatch patterns on a linear's module path (``transformer_blocks.0.attn1.to_q``)."""
    exclude: list[str] = field(default_factory=lambda: ["*norm*", "*emb*"])
    """Patterns kept in high precision: by default the AdaLN modulation linears (under
    ``norm1`` etc.) and time-embedding projections (``time_emb_proj``)."""
    min_sqnr: float | None = 10.0
    """Per-layer fallback: a layer whose output SQNR (dB) on the capture's inputs falls below
    this stays in high precision, and the report says so. ``None`` skips the measurement."""

    def __post_init__(self) -> None:
        _check_choice("quant.weight_bits", self.weight_bits, (4, 8))
        _check_choice("quant.act_bits", self.act_bits, (4, 8))
        _check_choice("quant.rotation", self.rotation, ("regular", "sylvester", "none"))
        _check_choice("quant.scope", self.scope, ("blocks", "all"))
        if self.group is not None and self.group not in (16, 64, 256):
            raise ConfigError(f"quant.group must be 16, 64 or 256 (a power of 4), not {self.group}")

    @property
    def label(self) -> str:
        """``w4a4-regular``: bits and rotation, as tables and reports show them."""
        return f"w{self.weight_bits}a{self.act_bits}-{self.rotation}"

    @classmethod
    def preset(cls, name: str) -> QuantConfig:
        """The settings behind ``quant="w4a4"``, ``"w4a4-rtn"``, ``"w4a8"``, ``"w8a8"`` ..."""
        if name not in QUANT_PRESETS:
            raise ConfigError(
                f"quant={name!r} is not a known preset; use one of {sorted(QUANT_PRESETS)} "
                "or a dict of QuantConfig fields"
            )
        return cls(**QUANT_PRESETS[name])


def _check_choice(name: str, value: object, allowed: tuple[object, ...]) -> None:
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
    quant: QuantConfig | None = None
    """Rotated low-bit linears (a `QuantConfig`, or a preset name such as ``"w4a4"``)."""

    def __post_init__(self) -> None:
        _check_choice("inner", self.inner, typing.get_args(InnerBackend))
        if self.cache == "auto":
            raise ConfigError(
                'cache="auto" searches settings on calibration inputs, which a compile call does '
                "not have: run diffopt.calibrate(model, run, target_psnr=...) and pass its .config"
            )
        if isinstance(self.quant, str):
            self.quant = QuantConfig.preset(self.quant)
        for name, kind in (
            ("cleanup", CleanupConfig),
            ("cache", CacheConfig),
            ("quant", QuantConfig),
        ):
            value = getattr(self, name)
            if isinstance(value, dict):  # what the error below promises: a dict of its fields
                value = _from_dict(kind, value, path=name)
                setattr(self, name, value)
            if value is not None and not isinstance(value, kind):
                raise ConfigError(
                    f"{name} must be a {kind.__name__}, a dict of its fields or None, not {value!r}"
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
        """Nested dicts of plain values: `from_dict` rebuilds the same Config."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """`to_dict` as indented JSON with sorted keys."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, path: str | Path) -> None:
        """Write `to_json` to `path` (what ``diffopt export --config`` reads)."""
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Config:
        """Read a Config saved by `save`; bad JSON and unknown keys are errors."""
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
        if sub is not None and isinstance(value, dict):
            value = _from_dict(sub, value, f"{path}.{name}")
        kwargs[name] = value
    return cls(**kwargs)


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass in a hint such as ``CleanupConfig | None``, if there is one."""
    candidates = typing.get_args(hint) or (hint,)
    return next((c for c in candidates if dataclasses.is_dataclass(c)), None)
