"""The object every pass takes and returns: a captured FX graph plus what analysis found in it.

Region membership lives on the nodes themselves (``node.meta[REGION_KEY]``), so a pass that
rewrites nodes keeps it by construction; the region list only records names and order.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx as fx

from diffopt.guards import Guard

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


_ADDITIONS = {operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__iadd__"}
_CASTS = {"to", "float", "half", "bfloat16", "double", "type", "type_as", "contiguous", "clone"}
_ADDED_TO = {torch.addcmul, torch.addcdiv, "addcmul", "addcmul_", "addcdiv", "addcdiv_"}
"""``x + v * a * b`` and ``x + v * a / b``: the first operand is the one added to."""


def residual_operands(node: fx.Node) -> list[fx.Node]:
    """The values a residual stream passes through at `node`: both summands of an addition,
    the input of a cast (``.float()``, ``.to(dtype)``) or of ``addcmul``; none elsewhere.

    Walking back from a block's output through these (`diffopt.guards.residual_path`) reaches
    the input the block adds its residual to, and not a gate or a shift of the same shape,
    which enter through a product or a norm (``x + gate * attn(norm(x) * (1 + scale) + shift)``).
    """
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return []  # a graph input, a parameter, a constant among a region's outputs
    if node.target in _ADDITIONS:
        return [a for a in node.args[:2] if isinstance(a, fx.Node)]
    if node.target in _CASTS or node.target in _ADDED_TO:
        first = node.args[0] if node.args else None
        return [first] if isinstance(first, fx.Node) else []
    return []


def collective_groups(gm: fx.GraphModule) -> tuple[str, ...]:
    """The process groups the graph's collectives run over, by name, in first-use order.

    A graph that communicates was sharded: diffusers' context parallelism
    (``model.enable_parallelism(config=ContextParallelConfig(...))``) splits the sequence between
    ranks and its attention exchanges it with ``_c10d_functional`` collectives (all-to-all for
    Ulysses, all-gather for ring and for the output), which dynamo records with their group's name.
    """
    groups: dict[str, None] = {}
    for node in gm.graph.nodes:
        # torch.ops._c10d_functional.<op> (a packet; its .default overload prints the same)
        if node.op != "call_function" or not str(node.target).startswith("_c10d_functional."):
            continue
        names = [a for a in (*node.args, node.kwargs.get("group_name")) if isinstance(a, str)]
        if names:  # the group is the op's last string argument (wait_tensor has none)
            groups[names[-1]] = None
    return tuple(groups)


def is_dtensor(value: object) -> bool:
    """Whether `value` is a DTensor: a weight that diffusers' tensor parallelism
    (``TensorParallelConfig``) sharded over ranks, or an activation its plan wraps."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def shape_of(node: fx.Node) -> tuple[int | str, ...] | None:
    """The captured shape; a symbolic dimension (dynamic shapes) appears as its name, ``"s0"``."""
    value = example_value(node)
    if isinstance(value, torch.Tensor):
        return tuple(d if isinstance(d, int) else str(d) for d in value.shape)
    return None


def sequence_group(graph: DenoiserGraph) -> str | None:
    """The process group whose ranks hold shards of the sequence (context parallelism), by
    name; None for a graph that does not communicate. Of several groups (a ring × Ulysses mesh
    communicates over each axis), the largest: the output's all-gather spans them all."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    groups = collective_groups(graph.gm)
    if not groups:
        return None
    return max(groups, key=lambda name: dist.get_world_size(_resolve_process_group(name)))


def process_group(name: str | None) -> Any:
    """The process group dynamo recorded by `name` on a graph's collectives (None: no group)."""
    if name is None:
        return None
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)
