"""`diffopt.inspect`: what the pipeline found in a model and what each pass did to it."""

from __future__ import annotations

import difflib
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from rich.table import Table

from diffopt.backend import Optimized, capture
from diffopt.config import Config
from diffopt.passes import InputRoles, PassReport
from diffopt.passes.graph import INPUT_KEY, example_value
from diffopt.runtime import LoweredRegion, RegionExecutor, RegionProgram
from diffopt.runtime.flops import FlopCounter

MAX_LISTED = 12  # entries per pass in the text report; the HTML page lists all


@dataclass
class RegionStats:
    name: str
    kind: str
    nodes: int
    params: int
    """Parameters the region reads (a weight shared by two regions counts in both)."""
    flops: int
    """FLOPs of one call with the example inputs (torch.utils.flop_counter)."""


@dataclass
class InspectReport:
    """The result of `diffopt.inspect`: print it, or save it as one HTML page."""

    model: str
    config: Config
    regions: list[RegionStats]
    roles: InputRoles
    passes: list[PassReport]
    """Region analysis first, then every pass that ran, in order."""
    code_before: dict[str, str]
    code_after: dict[str, str]
    cache_profile: str | None = None
    """With cache guards: whose calibrated profile this model's cached requests use."""
    graphs: int = 1
    """How many graphs dynamo split one call into; the report shows the one holding the blocks."""

    @property
    def blocks(self) -> list[RegionStats]:
        """The regions that are repeated blocks, in order."""
        return [r for r in self.regions if r.kind == "block"]

    def __str__(self) -> str:
        from rich.console import Console  # only when a report is printed

        console = Console(file=io.StringIO(), width=110, color_system=None)
        console.print(f"diffopt inspect: {self.model}  (inner={self.config.inner})")
        if self.graphs > 1:
            console.print(
                f"the call compiles to {self.graphs} graphs (graph breaks); shown: the one "
                "holding the blocks. torch.compile(backend='diffopt') runs every graph, the cache "
                "on this one; an engine needs one graph (torch._dynamo.explain lists the breaks)",
                markup=False,
            )
        console.print(_regions_table(self.regions))
        for line in _role_lines(self.roles):
            console.print(line)
        if self.cache_profile:
            console.print(f"cache profile: {self.cache_profile}", markup=False)
        for report in self.passes:
            console.print(f"\npass {report.name}: {report.summary()}")
            for entry in report.rewritten[:MAX_LISTED]:
                console.print(f"  rewrote {entry.where}: {entry.what}")
            if len(report.rewritten) > MAX_LISTED:
                console.print(f"  ... and {len(report.rewritten) - MAX_LISTED} more")
            for entry in report.skipped:
                console.print(f"  skipped {entry.where}: {entry.what}")
            for note in report.notes:
                console.print(f"  note: {note}")
        shown = self.blocks[0].name if self.blocks else self.regions[0].name
        for title, code in (("before", self.code_before), ("after", self.code_after)):
            console.print(f"\nregion {shown}, {title} passes:")
            console.print(code[shown].strip(), markup=False, highlight=False)
        return console.file.getvalue()

    def save_html(self, path: str | Path) -> Path:
        """Write one self-contained page: tables, then every region's code before and after."""
        path = Path(path)
        differ = difflib.HtmlDiff(wrapcolumn=100)
        sections = [
            f"<h3>{html.escape(name)}</h3>"
            + differ.make_table(
                self.code_before.get(name, "").splitlines(),
                code.splitlines(),
                "before passes",
                "after passes",
            )
            for name, code in self.code_after.items()
        ]
        rows = "".join(
            f"<tr><td>{html.escape(r.name)}</td><td>{r.kind}</td><td>{r.nodes}</td>"
            f"<td>{r.params:,}</td><td>{r.flops:,}</td></tr>"
            for r in self.regions
        )
        passes = "".join(_pass_html(report) for report in self.passes)
        lines = _role_lines(self.roles)
        lines += [f"cache profile: {self.cache_profile}"] if self.cache_profile else []
        roles = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
        path.write_text(
            f"<!doctype html><html><head><meta charset='utf-8'><title>diffopt inspect: "
            f"{html.escape(self.model)}</title><style>{_CSS}</style></head><body>"
            f"<h1>diffopt inspect: {html.escape(self.model)}</h1>"
            f"<pre>{html.escape(self.config.to_json())}</pre>"
            f"<h2>Regions</h2><table class='stats'><tr><th>region</th><th>kind</th>"
            f"<th>nodes</th><th>params</th><th>FLOPs</th></tr>{rows}</table>"
            f"<ul>{roles}</ul><h2>Passes</h2>{passes}"
            f"<h2>Graphs before and after</h2>{''.join(sections)}</body></html>"
        )
        return path


_CSS = """
body { font-family: sans-serif; margin: 2em; }
table.stats td, table.stats th { padding: 2px 10px; text-align: right; }
table.stats td:first-child { text-align: left; }
table.diff { font-family: monospace; font-size: 12px; border: 1px solid #ccc; }
.diff_add { background: #cfc; } .diff_chg { background: #ffa; } .diff_sub { background: #fcc; }
.diff_header, .diff_next { background: #eee; }
"""


def _pass_html(report: PassReport) -> str:
    items = [f"rewrote {e.where}: {e.what}" for e in report.rewritten]
    items += [f"skipped {e.where}: {e.what}" for e in report.skipped]
    items += [f"note: {n}" for n in report.notes]
    lis = "".join(f"<li>{html.escape(i)}</li>" for i in items)
    return f"<h3>{html.escape(report.name)}: {report.summary()}</h3><ul>{lis}</ul>"


def _regions_table(regions: Sequence[RegionStats]) -> Table:
    from rich.table import Table

    table = Table(title="regions")
    for column in ("region", "kind", "nodes", "params", "MFLOPs"):
        table.add_column(column, justify="left" if column in ("region", "kind") else "right")
    for r in regions:
        table.add_row(r.name, r.kind, str(r.nodes), f"{r.params:,}", f"{r.flops / 1e6:,.3f}")
    table.add_row(
        "total",
        "",
        str(sum(r.nodes for r in regions)),
        "",
        f"{sum(r.flops for r in regions) / 1e6:,.3f}",
    )
    return table


def _role_lines(roles: InputRoles) -> list[str]:
    lines = []
    if roles.timestep:
        lines.append(f"timestep input: {roles.timestep.node} {list(roles.timestep.shape)}")
    for s in roles.token_streams:
        lines.append(f"token stream: {s.node} {list(s.shape)} ({s.why})")
    for s in roles.per_token:
        lines.append(f"per-token side input: {s.node} {list(s.shape)} ({s.why})")
    return lines


class _CountingExecutor(RegionExecutor):
    """Runs the regions eagerly once, counting each region's FLOPs."""

    def __init__(self, program: RegionProgram) -> None:
        super().__init__(program)
        self.flops: dict[str, int] = {}

    def run_region(self, index: int, region: LoweredRegion, inputs: list[Any]) -> Sequence[Any]:
        with FlopCounter(display=False) as counter:
            outputs = region(*inputs)
        self.flops[region.region.name] = counter.get_total_flops()
        return outputs


def inspect(
    model: torch.nn.Module,
    example_inputs: dict[str, Any] | tuple[Any, ...],
    config: Config | dict[str, Any] | None = None,
) -> InspectReport:
    """Capture `model` on `example_inputs`, run diffopt's passes, and report what happened.

    `example_inputs` are the arguments of one call: a dict of keyword arguments or a tuple of
    positional ones. Regions run eagerly here (inspect compiles nothing with the inner backend).
    """
    config = Config.coerce(config)
    captured = capture(model, example_inputs, config, keep_before=True, one_graph=False)
    result = captured.result
    executor = _CountingExecutor(result.program)
    with torch.no_grad():
        executor(*captured.inputs)
    return InspectReport(
        model=type(model).__name__,
        config=config,
        regions=_region_stats(result, executor.flops),
        roles=result.graph.roles,
        passes=result.reports,
        code_before={r.region.name: r.module.code for r in result.before.regions},
        code_after={r.region.name: r.module.code for r in result.program.regions},
        cache_profile=_cache_profile(model, config),
        graphs=captured.graphs,
    )


def _cache_profile(model: torch.nn.Module, config: Config) -> str | None:
    """Whose calibrated profile `model`'s cached requests use, in words."""
    from diffopt.runtime import profiles

    cache = config.cache
    name = type(model).__name__
    if cache is None:
        return None
    if cache.mode == "plan":
        return "none needed (mode='plan' follows its plan)"
    if cache.profile:
        return (
            f"the one in the config ({len(cache.profile)} steps, from diffopt.calibrate): every "
            "model compiled with this config uses it"
        )
    found = profiles.profile_of(model)
    if found is None:
        return (
            f"none yet: this {name}'s first cached request runs in full and calibrates; the "
            "profile then belongs to these weights (kept across recompiles; another instance "
            "calibrates on its own)"
        )
    return f"this {name}'s own: {found.describe()}; kept across recompiles"


def _region_stats(result: Optimized, flops: dict[str, int]) -> list[RegionStats]:
    captured = {n.name: n for n in result.graph.gm.graph.nodes}
    stats = []
    for lowered in result.program.regions:
        nodes = [n for n in lowered.module.graph.nodes if n.op not in ("placeholder", "output")]
        params = 0
        for placeholder in lowered.module.graph.find_nodes(op="placeholder"):
            node = captured[placeholder.name]
            value = example_value(node)
            if node.meta.get(INPUT_KEY) == "param" and isinstance(value, torch.Tensor):
                params += value.numel()
        stats.append(
            RegionStats(
                lowered.region.name,
                lowered.region.kind,
                len(nodes),
                params,
                flops.get(lowered.region.name, 0),
            )
        )
    return stats
