"""step_guard: let the runtime skip the whole block stack and re-add its cached residual.

On a reused step the prologue runs (so the fresh latents and timestep enter), the blocks are
skipped, and the epilogue sees the prologue's output plus the residual the blocks added at the
last computed step. The pass marks the span and says how each value leaving it is rebuilt; the
runtime's controller decides, per step, whether to use it.
"""

from __future__ import annotations

from diffopt.config import CacheConfig
from diffopt.guards import Guard

from .graph import DenoiserGraph
from .manager import register_pass
from .regions import describe_residuals, guarded_span, region_inputs, region_outputs, user_values
from .report import PassReport


@register_pass("step_guard", config="cache")
def step_guard(graph: DenoiserGraph, config: CacheConfig) -> tuple[DenoiserGraph, PassReport]:
    report = PassReport("step_guard")
    if not config.step_guard:
        report.notes.append("off (cache.step_guard=False)")
        return graph, report
    probe = config.indicator == "block0"
    if len(graph.blocks) < 1 + probe:
        report.skip(
            "graph",
            "no blocks to skip"
            + (" after the probe block 0" if probe and graph.blocks else "")
            + "; a step guard needs a model with repeated blocks",
        )
        return graph, report
    span = guarded_span(graph, keep_first_block=probe)
    why = describe_residuals(region_outputs(graph, span), user_values(region_inputs(graph, span)))
    graph.guards.append(Guard("step", tuple(span), why))
    report.rewrite(f"{span[0]} … {span[-1]}", f"step guard over {len(span)} regions: {why}")
    return graph, report
