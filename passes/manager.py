"""The pass manager: a registry of named passes, run in their declared order.

A pass is a stateless function ``(graph, settings) -> (graph, report)``; `settings` is the
dataclass found on `Config` under the pass's `config` field (``None`` there disables the pass).
State that must live across denoiser calls belongs to the runtime, never to a pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from diffopt.config import Config

from .graph import REGION_KEY, DenoiserGraph
from .report import PassReport

PassFn = Callable[[DenoiserGraph, Any], tuple[DenoiserGraph, PassReport]]


@dataclass(frozen=True)
class PassSpec:
    name: str
    order: int
    """Passes run in ascending order: cache guards before quantization before cleanups, say."""
    config: str
    """The `Config` field that holds this pass's settings."""
    run: PassFn


_REGISTRY: dict[str, PassSpec] = {}


def register_pass(name: str, *, order: int, config: str) -> Callable[[PassFn], PassFn]:
    """Register `fn` as pass `name`, configured by `Config.<config>`, run at `order`."""
    if config not in Config.__dataclass_fields__:
        raise ValueError(f"pass {name!r} names config field {config!r}, which Config lacks")

    def decorate(fn: PassFn) -> PassFn:
        if name in _REGISTRY:
            raise ValueError(f"a pass named {name!r} is already registered")
        _REGISTRY[name] = PassSpec(name, order, config, fn)
        return fn

    return decorate


def registered_passes() -> list[PassSpec]:
    """All registered passes in the order they run."""
    return sorted(_REGISTRY.values(), key=lambda spec: (spec.order, spec.name))


def run_passes(graph: DenoiserGraph, config: Config) -> tuple[DenoiserGraph, list[PassReport]]:
    """Run every enabled pass over `graph`; under `config.strict`, a skip raises `PassError`."""
    reports = []
    for spec in registered_passes():
        settings = getattr(config, spec.config)
        if settings is None:
            continue
        graph, report = spec.run(graph, settings)
        _inherit_regions(graph)
        graph.gm.graph.lint()
        graph.gm.recompile()
        reports.append(report)
        if config.strict:
            report.raise_if_skipped()
    return graph, reports


def _inherit_regions(graph: DenoiserGraph) -> None:
    """Nodes a pass inserted without a region join the region of the node before them."""
    region = graph.regions[0].name
    for node in graph.gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        region = node.meta.setdefault(REGION_KEY, region)
