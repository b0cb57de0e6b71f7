"""Regions as an engine sees them, whatever format writes them.

Weights dynamo lifted into graph inputs are baked back in as constants of the region that reads
them, so an engine's inputs are the denoiser's own; the sizes dynamo passes a region under dynamic
shapes are read off its tensor inputs, whose symbolic dimensions become dynamic axes. A graph with
nothing for a runtime to decide between regions becomes one region. One eager run records every
region's inputs, the examples each is exported on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from diffopt.passes.graph import Region, example_value
from diffopt.runtime.executor import RegionExecutor
from diffopt.runtime.lowering import LoweredRegion, RegionProgram, Slot
from diffopt.specialization import Checks

from .formats import ExportError
from .manifest import bind, binding, unbind


class RecordingExecutor(RegionExecutor):
    """Runs the regions eagerly once, keeping each region's inputs as export examples."""

    def __init__(self, program: RegionProgram) -> None:
        super().__init__(program)
        self.examples: dict[int, list[Any]] = {}

    def run_region(self, index: int, region: Any, inputs: list[Any]) -> Sequence[Any]:
        self.examples[index] = list(inputs)
        return region(*inputs)


class Baked(nn.Module):
    """A region as an engine sees it: its weight inputs become constants, and the sizes dynamo
    passed it (dynamic shapes) are read off its tensor inputs; only real tensors come in: a
    complex input comes as its ``view_as_real`` pairs (`as_bound`)."""

    def __init__(self, module: nn.Module, inputs: list[Any], plan: RegionInputs) -> None:
        super().__init__()
        self.module, self.plan = module, plan
        for i in sorted(plan.weights):
            self.register_buffer(f"w{i}", inputs[i].detach())
        self.bindings = {i: binding(inputs[i]) for i in plan.kept}  # the manifest's rule

    def forward(self, *activations: torch.Tensor) -> Any:
        by_position = dict(zip(self.plan.kept, activations, strict=True))
        args = []
        for i in range(self.plan.count):
            if i in self.plan.weights:
                args.append(getattr(self, f"w{i}"))
            elif i in self.plan.sizes:
                tensor, dim = self.plan.sizes[i]
                args.append(by_position[tensor].shape[dim])
            else:  # a complex input back from its real pairs
                args.append(unbind(by_position[i], self.bindings[i]))
        return self.module(*args)


def as_bound(value: Any) -> Any:
    """A value as an engine binds it: a complex tensor as its real pairs, ``view_as_real``
    (the manifest's rule, `manifest.binding`)."""
    return bind(value, binding(value))


@dataclasses.dataclass
class RegionInputs:
    """Which of a region's inputs are weights, which are sizes of another input, which stay."""

    count: int
    weights: set[int]
    sizes: dict[int, tuple[int, int]]
    """Input position → (position of a tensor input, dimension) it is the size of."""
    dynamic: dict[int, dict[int, Any]]
    """Kept position → {dimension: Dim.DYNAMIC} for its symbolic dimensions."""

    @property
    def kept(self) -> list[int]:
        return [i for i in range(self.count) if i not in self.weights and i not in self.sizes]


def graph_module(module: nn.Module) -> torch.fx.GraphModule:
    """A region's fx graph module (a single-region engine wraps it in `FlatOutputs`)."""
    return module if isinstance(module, torch.fx.GraphModule) else module.gm


def plan_inputs(lowered: Any, weights: set[int]) -> RegionInputs:
    """How region `lowered` takes its inputs in an engine; `weights`: the graph's weight slots."""
    graph = graph_module(lowered.module).graph
    fakes = [example_value(n) for n in graph.nodes if n.op == "placeholder"]
    positions = {i for i, s in enumerate(lowered.inputs) if s in weights}
    sizes, dynamic = {}, {}
    for i, fake in enumerate(fakes):
        if i in positions:
            continue
        if isinstance(fake, torch.Tensor):
            symbolic = {
                d: torch.export.Dim.DYNAMIC
                for d, n in enumerate(fake.shape)
                if isinstance(n, torch.SymInt)
            }
            if symbolic:
                dynamic[i] = symbolic
        elif isinstance(fake, torch.SymInt):
            sizes[i] = next(
                (
                    (j, d)
                    for j, other in enumerate(fakes)
                    if j not in positions and isinstance(other, torch.Tensor)
                    for d, n in enumerate(other.shape)
                    if isinstance(n, torch.SymInt) and n.node.expr == fake.node.expr
                ),
                None,
            )
            if sizes[i] is None:
                raise ExportError(
                    f"region {lowered.region.name!r} takes the size {fake} that is no dimension "
                    "of its tensor inputs; export with static shapes (dynamic_batch=False)"
                )
    return RegionInputs(len(fakes), positions, sizes, dynamic)


def single_region(program: RegionProgram, gm: torch.fx.GraphModule, inputs: int) -> RegionProgram:
    """The whole graph as one region over the same input slots."""
    output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    count = len(torch.utils._pytree.tree_leaves(output))
    outputs = list(range(inputs, inputs + count))
    slots = iter(outputs)
    structure = torch.utils._pytree.tree_map(lambda _: Slot(next(slots)), output)
    whole = LoweredRegion(Region("model", "block"), FlatOutputs(gm), list(range(inputs)), outputs)
    return RegionProgram(inputs, inputs + count, [whole], structure, [[]])


def checks_region(checks: Checks, num_slots: int) -> LoweredRegion:
    """The specialized reads' conditions as a region over the graph's input slots; its
    outputs get slots past the program's, so their names never meet an input's."""
    outputs = list(range(num_slots, num_slots + len(checks.messages)))
    return LoweredRegion(Region("checks", "block"), FlatOutputs(checks.gm), checks.inputs, outputs)


class FlatOutputs(nn.Module):
    """A graph module whose outputs are flattened to a tuple, as a region's are."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, *args: Any) -> tuple[Any, ...]:
        return tuple(torch.utils._pytree.tree_leaves(self.gm(*args)))
