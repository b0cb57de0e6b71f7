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

    def __post_init__(self) -> None:
        allowed = typing.get_args(InnerBackend)
        if self.inner not in allowed:
            raise ConfigError(f"inner={self.inner!r} is not a known backend; use one of {allowed}")

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
