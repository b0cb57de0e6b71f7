"""Engine formats: the registry `export(..., format=NAME)` looks a format up in.

Every engine directory is written the same way: one ONNX file per region and the manifest (see
`manifest`). A format is a `Format` subclass registered under its name by `register_format`; it
checks the request before the export work starts and adds its own files to the directory once the
ONNX engine is written (TensorRT builds its plans from the ONNX files). Each format lives in its
own file and registers itself there: a new format is one new file, named in `BUILTIN` when it
ships with diffopt, or imported before `export` when it comes from elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from pathlib import Path
from typing import TypeVar

from diffopt.config import Config, ConfigError

BUILTIN = ("onnx", "tensorrt")
"""diffopt's own format modules (``exporters/<name>.py``), imported on the first lookup; each
registers its format. They import their runtimes (onnx, tensorrt) only when they run."""


class ExportError(ValueError):
    """The graph holds something the exporter cannot express; the message names it."""


class Format:
    """An engine format. The defaults add nothing to the ONNX engine directory."""

    name = ""
    """The name `export(..., format=...)` takes, set by `register_format`."""

    def check(self, config: Config, quant_form: str) -> None:
        """Refuse, before any export work, what this format cannot build (a missing runtime, a
        quantized form it cannot parse): raise with the reason and what to do instead."""

    def build(self, folder: Path) -> None:
        """Add this format's files to the engine directory `folder`, which holds the ONNX files
        and the manifest; record their hashes in the manifest."""


_FORMATS: dict[str, Format] = {}

F = TypeVar("F", bound=type[Format])


def register_format(name: str) -> Callable[[F], F]:
    """A class decorator registering a `Format` subclass under `name`:
    ``@register_format("tensorrt")``. Another class under a registered name is an error (the
    same class again, as when its module is reloaded, replaces it)."""

    def register(cls: F) -> F:
        known = _FORMATS.get(name)
        if known is not None and _where(type(known)) != _where(cls):
            raise ValueError(f"format {name!r} is already registered by {_where(type(known))}")
        cls.name = name
        _FORMATS[name] = cls()
        return cls

    return register


def _where(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def registered() -> list[str]:
    """The names of the registered formats, diffopt's own included."""
    for module in BUILTIN:
        import_module(f".{module}", __package__)
    return sorted(_FORMATS)


def get_format(name: str) -> Format:
    """The format registered as `name`; a ConfigError listing the registered ones otherwise."""
    names = registered()
    if name not in _FORMATS:
        raise ConfigError(f"format must be one of {names}, not {name!r}")
    return _FORMATS[name]
