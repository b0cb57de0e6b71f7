"""The pass manager: a registry of named passes, run in the order `PIPELINE` lists.

A pass is a stateless function ``(graph, settings) -> (graph, report)``; `settings` is the
dataclass found on `Config` under the pass's `config` section (``None`` there disables the pass).
State that must live across denoiser calls belongs to the runtime, never to a pass.

A pass from outside diffopt registers with its place and, if it needs one, its own section::

    @register_pass("fuse_qkv", config="fuse", section=FuseConfig, after="quantize")
    def fuse_qkv(graph: DenoiserGraph, settings: FuseConfig) -> tuple[DenoiserGraph, PassReport]:
        ...

and runs whenever ``Config(fuse=FuseConfig(...))`` (or ``{"fuse": {...}}``) turns it on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from diffopt.config import Config, config_sections, register_section

from .graph import REGION_KEY, DenoiserGraph
from .report import PassReport

PassFn = Callable[[DenoiserGraph, Any], tuple[DenoiserGraph, PassReport]]


PIPELINE: tuple[str, ...] = (
    "fold_constants",
    "real_rotary",
    "step_guard",
    "block_guard",
    "token_guard",
    "quantize",
    "remove_noops",
)
"""diffopt's passes in the order they run: for export, the constant values an engine cannot
compute folded and complex rotary products in real pairs; the cache guards (whole block stack,
single blocks, tokens), quantization, then the cleanup. A pass from outside takes its place
relative to these (`register_pass`); `pipeline()` gives the order with such passes in it."""


@dataclass(frozen=True)
class PassSpec:
    name: str
    config: str
    """The `Config` section that holds this pass's settings."""
    run: PassFn


_REGISTRY: dict[str, PassSpec] = {}
_ORDER: list[str] = list(PIPELINE)
"""`PIPELINE` with the outside passes inserted where they asked to run."""


def register_pass(
    name: str,
    *,
    config: str,
    section: type | None = None,
    after: str | None = None,
    before: str | None = None,
) -> Callable[[PassFn], PassFn]:
    """Register `fn` as pass `name`, configured by the `Config` section `config`.

    diffopt's own passes run where `PIPELINE` lists them. A pass from outside names its place:
    right `after` or right `before` a pass of the pipeline (outside ones included). `section`, a
    dataclass, makes `config` a new `Config` section (`diffopt.config.register_section`);
    without it, `config` must name an existing section (several passes may share one).
    """
    if name in PIPELINE and (after or before):
        raise ValueError(f"pass {name!r} is one of diffopt's; its place is PIPELINE's")
    if name not in PIPELINE and (after is None) == (before is None):
        raise ValueError(
            f"pass {name!r} must say where it runs: after= or before= one of {pipeline()}"
        )
    anchor = after or before
    if anchor is not None and anchor not in _ORDER:
        where = "after" if after else "before"
        raise ValueError(
            f"pass {name!r} runs {where} {anchor!r}, which is no pass; the pipeline: {pipeline()}"
        )

    def decorate(fn: PassFn) -> PassFn:
        if name in _REGISTRY:
            raise ValueError(f"a pass named {name!r} is already registered")
        if section is not None:
            register_section(config, section)
        if config not in config_sections():
            raise ValueError(
                f"pass {name!r} names config section {config!r}, which Config lacks; give its "
                f"settings dataclass as section=, or use one of {sorted(config_sections())}"
            )
        if anchor is not None:
            _ORDER.insert(_ORDER.index(anchor) + (after is not None), name)
        _REGISTRY[name] = PassSpec(name, config, fn)
        return fn

    return decorate


def pipeline() -> list[str]:
    """Every pass name in the order the passes run (`PIPELINE` plus the outside passes)."""
    return list(_ORDER)


def registered_passes() -> list[PassSpec]:
    """All registered passes in the order they run."""
    return [_REGISTRY[name] for name in _ORDER if name in _REGISTRY]


def run_passes(graph: DenoiserGraph, config: Config) -> tuple[DenoiserGraph, list[PassReport]]:
    """Run every enabled pass over `graph`; under `config.strict`, a skip raises `PassError`."""
    reports = []
    for spec in registered_passes():
        settings = getattr(config, spec.config)
        if settings is None:
            continue
        graph, report = spec.run(graph, settings)
        _inherit_regions(graph)
        _drop_emptied_blocks(graph, report)
        graph.gm.graph.lint()
        graph.gm.recompile()
        reports.append(report)
        if config.strict:
            report.raise_if_skipped()
    return graph, reports


def _drop_emptied_blocks(graph: DenoiserGraph, report: PassReport) -> None:
    """Blocks a pass left without an op (an eval-mode dropout once `remove_noops` erased it)
    leave the region list and the guards: nothing runs there, so lowering makes no region of them
    and a guard must not name them."""
    held = {node.meta.get(REGION_KEY) for node in graph.gm.graph.nodes}
    empty = {r.name for r in graph.blocks if r.name not in held}
    if not empty:
        return
    graph.regions = [r for r in graph.regions if r.name not in empty]
    guards = []
    for guard in graph.guards:
        kept = tuple(name for name in guard.regions if name not in empty)
        if kept:
            guards.append(dataclasses.replace(guard, regions=kept))
    graph.guards = guards
    report.notes.append(
        f"blocks left without an op, dropped from regions and guards: {sorted(empty)}"
    )


def _inherit_regions(graph: DenoiserGraph) -> None:
    """Nodes a pass inserted without a region join the region of the node before them."""
    region = graph.regions[0].name
    for node in graph.gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        region = node.meta.setdefault(REGION_KEY, region)
