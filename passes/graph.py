"""The object every pass takes and returns: a captured FX graph plus what analysis found in it.

Region membership lives on the nodes themselves (``node.meta[REGION_KEY]``), so a pass that
rewrites nodes keeps it by construction; the region list only records names and order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx as fx

REGION_KEY = "diffopt_region"
"""``node.meta`` key naming the region a node belongs to."""

INPUT_KEY = "diffopt_input"
"""``placeholder.meta`` key: ``"param"``, ``"buffer"`` or ``"user"``."""

RegionKind = Literal["prologue", "block", "epilogue"]


@dataclass(frozen=True)
class Region:
    """A contiguous span of the graph that runs as one unit: prologue, one block, or epilogue."""

    name: str
    """``"prologue"``, ``"epilogue"``, or the block's module path (``"transformer_blocks.3"``)."""
    kind: RegionKind
    group: str | None = None
    """For blocks: the container they belong to (``"transformer_blocks"``)."""


@dataclass(frozen=True)
class TensorRole:
    """A graph value the analysis gave a meaning to (the timestep, a token stream, ...)."""

    node: str
    """The FX node's name."""
    shape: tuple[int, ...]
    why: str


@dataclass
class InputRoles:
    """What analysis found at the blocks' boundary."""

    timestep: TensorRole | None = None
    token_streams: list[TensorRole] = field(default_factory=list)
    """[B, N, D] tensors entering the first block and flowing through the blocks."""
    per_token: list[TensorRole] = field(default_factory=list)
    """Side inputs of the first block indexed by token (e.g. rotary embeddings)."""
    notes: list[str] = field(default_factory=list)


GuardKind = Literal["step", "block", "token"]


@dataclass(frozen=True)
class Guard:
    """A place where the runtime may reuse cached results instead of running regions.

    Guards are data, not code: the runtime reads them to know what it may skip, `inspect` lists
    them, and exporters carry them into the engine manifest.
    """

    kind: GuardKind
    regions: tuple[str, ...]
    """The regions the guard can skip (step and token guards: a contiguous span of blocks)."""
    why: str
    """What is cached and how it is re-added, in words."""


@dataclass
class DenoiserGraph:
    """A captured denoiser: the FX graph, its regions in execution order, and input roles."""

    gm: fx.GraphModule
    regions: list[Region]
    roles: InputRoles
    example_inputs: list[object] = field(default_factory=list)
    """The graph's inputs as the capture saw them (real tensors for parameters)."""
    guards: list[Guard] = field(default_factory=list)

    @property
    def blocks(self) -> list[Region]:
        return [r for r in self.regions if r.kind == "block"]

    def nodes_of(self, region: str) -> list[fx.Node]:
        return [n for n in self.gm.graph.nodes if n.meta.get(REGION_KEY) == region]


def example_value(node: fx.Node) -> object:
    """The value a node held during capture (a fake tensor under dynamo), if recorded."""
    return node.meta.get("example_value", node.meta.get("val"))


def shape_of(node: fx.Node) -> tuple[int | str, ...] | None:
    """The captured shape; a symbolic dimension (dynamic shapes) appears as its name, ``"s0"``."""
    value = example_value(node)
    if isinstance(value, torch.Tensor):
        return tuple(d if isinstance(d, int) else str(d) for d in value.shape)
    return None


def residual_bases(
    outputs: Sequence[tuple[int, ...] | None], inputs: Sequence[tuple[int, ...] | None]
) -> list[int | None]:
    """For each output shape, the index of the one input of the same shape, if exactly one.

    A cached region output is stored as a residual against that input (re-added to the fresh
    input on reuse, which tracks the step far better than the stale value); an output with no
    unique partner is cached as a value.
    """
    bases: list[int | None] = []
    for shape in outputs:
        matches = [i for i, s in enumerate(inputs) if shape is not None and s == shape]
        bases.append(matches[0] if len(matches) == 1 else None)
    return bases
