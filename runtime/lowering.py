"""Lowering: split the rewritten graph into one submodule per region and compile each.

`torch.fx.passes.split_module` does the cut; this file turns its parent graph into a flat
`RegionProgram` (value slots in, regions in order, value slots out) that the executor walks.
Each region is compiled by the inner backend on its own, with the fake tensors dynamo recorded
as example inputs, so dynamic shapes stay symbolic and nothing runs at compile time.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.split_module import split_module

from diffopt.config import InnerBackend
from diffopt.guards import residual_path
from diffopt.passes.graph import (
    REGION_KEY,
    DenoiserGraph,
    Region,
    example_value,
    residual_operands,
)


class LoweringError(RuntimeError):
    """A region could not be split out or compiled."""


@dataclass
class LoweredRegion:
    """One region, ready to run: its eager module, its compiled callable and its value slots."""

    region: Region
    module: fx.GraphModule
    """The region's graph as Python code (always returns a tuple)."""
    inputs: list[int]
    outputs: list[int]
    compiled: Callable[..., Any] | None = None
    """What the inner backend returned; dynamo backends take their inputs unboxed."""

    def __call__(self, *args: Any) -> Sequence[Any]:
        return (self.compiled or self.module)(*args)


@dataclass
class RegionProgram:
    """A denoiser graph as a straight line of regions over numbered value slots."""

    num_inputs: int
    num_slots: int
    regions: list[LoweredRegion]
    output: Any
    """The graph's output structure, with `Slot` where a value comes from a slot."""
    release: list[list[int]] = field(default_factory=list)
    """Slots no longer needed after region i: freed so intermediate activations do not pile up."""
    residual_operands: dict[int, list[int]] = field(default_factory=dict)
    """For each slot a region produces, the region's input slots reached from it by walking back
    through additions inside the region (`diffopt.passes.graph.residual_operands`): what the
    runtime walks across a span of regions to pair its exits with the entries they are residuals
    of where shapes alone do not (`diffopt.guards.residual_bases`). An engine's manifest carries
    it; empty (an engine written before it did): shapes alone."""


@dataclass(frozen=True)
class Slot:
    index: int


def split_regions(graph: DenoiserGraph) -> RegionProgram:
    """Cut `graph` into its regions; the regions run uncompiled until `compile_regions`."""
    gm = graph.gm
    index = {r.name: i for i, r in enumerate(graph.regions)}
    missing = [
        n.name
        for n in gm.graph.nodes
        if n.op not in ("placeholder", "output") and n.meta.get(REGION_KEY) not in index
    ]
    if missing:
        raise LoweringError(f"nodes {missing[:5]} have no region; was the graph analyzed?")

    parent = split_module(
        gm,
        None,
        lambda node: index[node.meta[REGION_KEY]],
        keep_original_order=True,
        keep_original_node_name=True,
    )
    _inline_constants(parent)
    slots: dict[fx.Node, int] = {}
    num_slots = 0
    produced: dict[fx.Node, list[int]] = {}  # region call -> the slots of its outputs
    lowered: list[LoweredRegion] = []
    output: Any = None
    for node in parent.graph.nodes:
        if node.op == "placeholder":
            slots[node] = num_slots
            num_slots += 1
        elif node.op == "call_module":
            module = getattr(parent, node.target)
            arity = _return_tuple(module)
            outputs = produced[node] = list(range(num_slots, num_slots + arity))
            num_slots += arity
            if arity == 1:  # split_module uses a single output directly, several via getitem
                slots[node] = outputs[0]
            region = graph.regions[int(node.target.removeprefix("submod_"))]
            lowered.append(LoweredRegion(region, module, [slots[a] for a in node.args], outputs))
        elif node.op == "call_function" and node.target.__name__ == "getitem":
            source, i = node.args
            slots[node] = produced[source][i]
        elif node.op == "output":
            output = fx.node.map_arg(node.args[0], lambda n: Slot(slots[n]))
        else:
            raise LoweringError(f"unexpected node {node.format_node()} between regions")

    num_inputs = sum(1 for n in parent.graph.nodes if n.op == "placeholder")
    operands = {k: v for region in lowered for k, v in _residual_operands(region).items()}
    return RegionProgram(
        num_inputs, num_slots, lowered, output, _releases(lowered, output), operands
    )


def _residual_operands(lowered: LoweredRegion) -> dict[int, list[int]]:
    """Each output slot of a region → the input slots its residual path reaches in the region."""
    graph = lowered.module.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    slot = dict(zip(placeholders, lowered.inputs, strict=True))
    values = next(n for n in graph.nodes if n.op == "output").args[0]
    paths = residual_path(values, residual_operands, slot)
    return {
        out: [slot[n] for n in found] for out, found in zip(lowered.outputs, paths, strict=True)
    }


def _inline_constants(parent: fx.GraphModule) -> None:
    """Move constants a pass added (get_attr nodes, e.g. quantized weights) into the regions.

    split_module leaves them in the parent graph and passes them in as arguments; a region
    that owns its constants needs no slot for them and lets the inner compiler fold them.
    """
    for node in [n for n in parent.graph.nodes if n.op == "get_attr"]:
        value = getattr(parent, node.target)
        for user in list(node.users):
            module = getattr(parent, user.target)
            index = user.args.index(node)
            placeholder = [n for n in module.graph.nodes if n.op == "placeholder"][index]
            module.register_buffer(node.target, value)
            with module.graph.inserting_before(placeholder):
                inlined = module.graph.get_attr(node.target)
            placeholder.replace_all_uses_with(inlined)
            module.graph.erase_node(placeholder)
            module.recompile()
            user.args = tuple(a for a in user.args if a is not node)
        parent.graph.erase_node(node)


def _return_tuple(module: fx.GraphModule) -> int:
    """Make the region return a tuple (what compilers expect); returns how many values."""
    out = next(n for n in module.graph.nodes if n.op == "output")
    values = out.args[0]
    if not isinstance(values, (tuple, list)):
        values = (values,)
        out.args = (values,)
        module.recompile()
    return len(values)


def _releases(regions: list[LoweredRegion], output: Any) -> list[list[int]]:
    kept: set[int] = set()
    fx.node.map_aggregate(output, lambda v: kept.add(v.index) if isinstance(v, Slot) else None)
    last_use: dict[int, int] = {}
    for i, region in enumerate(regions):
        for slot in region.inputs:
            last_use[slot] = i
    release: list[list[int]] = [[] for _ in regions]
    for slot, i in last_use.items():
        if slot not in kept:
            release[i].append(slot)
    return release


def compile_regions(program: RegionProgram, graph: DenoiserGraph, inner: InnerBackend) -> None:
    """Compile every region with the inner backend, using the captured fake values as inputs."""
    if inner == "eager":
        return
    captured = {n.name: n for n in graph.gm.graph.nodes}
    for lowered in program.regions:
        placeholders = [n for n in lowered.module.graph.nodes if n.op == "placeholder"]
        examples = [example_value(captured[p.name]) for p in placeholders]
        lowered.compiled = compile_region(lowered, examples, inner)


def compile_region(
    lowered: LoweredRegion, examples: Sequence[Any], inner: InnerBackend
) -> Callable[..., Any]:
    """Compile one region for inputs like `examples` (fake or real tensors)."""
    if inner == "eager":
        return lowered.module
    backend = torch._dynamo.lookup_backend(inner)
    try:  # a copy: the backend may rewrite the module it is given
        return backend(copy.deepcopy(lowered.module), list(examples))
    except torch._dynamo.exc.RestartAnalysis:
        raise  # dynamo's own control flow (e.g. a float input turned symbolic): not an error
    except Exception as e:  # name the region; the backend's own error follows
        raise LoweringError(
            f"inner backend {inner!r} failed on region {lowered.region.name!r}: {e}"
        ) from e


def lower(graph: DenoiserGraph, inner: InnerBackend) -> RegionProgram:
    """Split `graph` into regions and compile each one with `inner`."""
    program = split_regions(graph)
    compile_regions(program, graph, inner)
    return program
