"""token_guard: let the runtime refresh only the tokens that changed most.

On a token-refresh step the runtime scores each token by how much its stack residual changed
between the last two full steps, gathers the top tokens of every sample (and their per-token
side inputs) into a shorter sequence, runs the blocks on it, and scatters the results into the
cached stack output. No attention maps are needed, so fused attention keeps working.

The pass checks what the runtime relies on: the span's outputs map token by token onto a
gathered input, per-token side inputs have a batch dimension, and the blocks run on a shorter
sequence (checked on meta tensors, so a token count baked into a ``view`` is caught here).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from diffopt.config import CacheConfig
from diffopt.guards import Guard, refresh_count, token_indexed

from .graph import DenoiserGraph, example_value, shape_of
from .manager import register_pass
from .regions import describe_residuals, guarded_span, region_inputs, region_outputs, user_values
from .report import PassReport


@register_pass("token_guard", config="cache")
def token_guard(graph: DenoiserGraph, config: CacheConfig) -> tuple[DenoiserGraph, PassReport]:
    report = PassReport("token_guard")
    if not config.token_guard:
        report.notes.append("off (cache.token_guard=False)")
        return graph, report
    if not graph.blocks or not graph.roles.token_streams:
        report.skip("graph", "no [B, N, D] token stream enters the blocks; nothing to gather")
        return graph, report
    span = guarded_span(graph, keep_first_block=config.indicator == "block0")
    where = f"{span[0]} … {span[-1]}"
    entries = user_values(region_inputs(graph, span))
    exits = region_outputs(graph, span)
    batch, tokens = max((s.shape[:2] for s in graph.roles.token_streams), key=lambda s: s[1])
    gathered = [n for n in entries if token_indexed(shape_of(n), batch, tokens)]
    problem = _why_not(graph, span, entries, gathered, exits, tokens)
    if problem is None:
        problem = _shorter_sequence_fails(
            graph, span, gathered, refresh_count(config.token_ratio, tokens)
        )
    if problem is not None:
        report.skip(where, problem)
        return graph, report
    why = f"gather top tokens of {', '.join(n.name for n in gathered)}; " + describe_residuals(
        exits, gathered
    )
    graph.guards.append(Guard("token", tuple(span), why))
    report.rewrite(where, f"token guard over {len(span)} regions ({tokens} tokens): {why}")
    return graph, report


def _why_not(
    graph: DenoiserGraph,
    span: list[str],
    entries: list[fx.Node],
    gathered: list[fx.Node],
    exits: list[fx.Node],
    tokens: int,
) -> str | None:
    per_token = {r.node for r in graph.roles.per_token}
    for node in entries:
        shape = shape_of(node)
        indexed = shape is not None and (node.name in per_token or tokens in shape[:-1])
        if node not in gathered and indexed:
            return (
                f"input {node.name} {list(shape)} is indexed by token but not as [B, N, ...] "
                "(e.g. rotary embeddings shared by the batch), so per-sample token sets "
                "cannot be gathered from it"
            )
    gathered_shapes = [shape_of(n) for n in gathered]
    for node in exits:
        if gathered_shapes.count(shape_of(node)) != 1:
            return (
                f"output {node.name} {list(shape_of(node) or [])} does not map token by token "
                "onto one gathered input (streams concatenated or split inside the blocks?)"
            )
    return None


def _shorter_sequence_fails(
    graph: DenoiserGraph, span: list[str], gathered: list[fx.Node], tokens: int
) -> str | None:
    """Run the span on fake tensors with `tokens` tokens; the error, if it fails."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        return _run_span(graph, span, gathered, tokens)


def _run_span(
    graph: DenoiserGraph, span: list[str], gathered: list[fx.Node], tokens: int
) -> str | None:
    from diffopt.runtime.lowering import split_regions  # lowering imports passes

    program = split_regions(graph)
    captured = {n.name: n for n in graph.gm.graph.nodes}
    shorter = {n.name for n in gathered}
    values: dict[int, object] = {}
    for lowered in program.regions:
        if lowered.region.name not in span:
            continue
        placeholders = [n for n in lowered.module.graph.nodes if n.op == "placeholder"]
        for node, slot in zip(placeholders, lowered.inputs, strict=True):
            if slot not in values:
                values[slot] = _fake(
                    example_value(captured[node.name]), node.name in shorter, tokens
                )
        try:
            outputs = lowered.module(*[values[s] for s in lowered.inputs])
        except Exception as e:  # the reason is the message: the pass reports it as a skip
            return (
                f"region {lowered.region.name} does not run on a {tokens}-token sequence "
                f"({type(e).__name__}: {str(e).splitlines()[0][:160]})"
            )
        values.update(zip(lowered.outputs, outputs, strict=True))
    return None


def _fake(value: object, shorten: bool, tokens: int) -> object:
    if not isinstance(value, torch.Tensor):
        return value
    shape = list(value.shape)
    if shorten:
        shape[1] = tokens
    return torch.empty(shape, dtype=value.dtype, device=value.device)
