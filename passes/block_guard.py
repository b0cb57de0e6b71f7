"""block_guard: let the runtime reuse single blocks' cached residuals instead of running them.

Used by the controller's block-refresh polish: the blocks whose residual changed most since the
last full step run, the others re-add their cached residual to their fresh input.
"""

from __future__ import annotations

from diffopt.config import CacheConfig
from diffopt.guards import Guard

from .graph import DenoiserGraph
from .manager import register_pass
from .regions import describe_residuals, guarded_span, region_inputs, region_outputs, user_values
from .report import PassReport


@register_pass("block_guard", config="cache")
def block_guard(graph: DenoiserGraph, config: CacheConfig) -> tuple[DenoiserGraph, PassReport]:
    report = PassReport("block_guard")
    if not config.block_guard:
        report.notes.append("off (cache.block_guard=False)")
        return graph, report
    if not graph.blocks:
        report.skip("graph", "no repeated blocks found; a block guard needs blocks")
        return graph, report
    block_names = {r.name for r in graph.blocks}
    span = guarded_span(graph, keep_first_block=config.indicator == "block0")
    for name in (n for n in span if n in block_names):
        outputs = region_outputs(graph, name)
        why = describe_residuals(outputs, user_values(region_inputs(graph, name)))
        if "cached value" in why and "residual" not in why:
            report.skip(name, f"no output has a same-shaped input to be a residual of ({why})")
            continue
        graph.guards.append(Guard("block", (name,), why))
        report.rewrite(name, f"block guard: {why}")
    return graph, report
