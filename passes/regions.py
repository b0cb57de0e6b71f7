"""Region analysis: prologue · block 0..N-1 · epilogue, found from the module hierarchy.

Dynamo records on every node the stack of modules it was traced in (``nn_module_stack``).
A *block* is a module addressed by an index in its path (``transformer_blocks.3``, or
``backbone.blocks.3`` in a user model): a `ModuleList` entry. This needs no model-specific
adapter for the diffusers transformers nor for a user's embed → blocks → head model; the UNet's
``mid_block`` is found by the one extra rule below (a module called between two blocks is a block).

Rules, in order of the graph (which is program order under dynamo):
- only indexed modules at the shallowest indexed depth are blocks;
- the first contiguous run of nodes inside a block path is that block; a later run inside an
  already-finished block path is root code (DiT's head calls ``transformer_blocks[0].norm1.emb``);
- any other module run between the first and the last block is a block of its own;
- root code between blocks joins the region that follows it, so every block starts where the
  previous one ended;
- everything before the first block is the prologue, everything after the last is the epilogue;
- a functorch transform level (an inlined ``vmap``) is never cut: its nodes without a module
  stack count as code of the module that entered it, and all of it joins that node's region.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Collection

import torch
import torch.fx as fx

from diffopt.guards import pair_residuals

from .graph import (
    INPUT_KEY,
    REGION_KEY,
    DenoiserGraph,
    InputRoles,
    Region,
    TensorRole,
    collective_groups,
    example_value,
    residual_operands,
    shape_of,
)
from .report import PassReport

# a ModuleDict key may hold any character but a dot (Z-Image's all_x_embedder['2-1'] reads
# ``.2-1``): ``\w+`` took it for the index 2, and the embedder for a block
_PATH_TOKEN = re.compile(r"\['([^']*)'\]|\[(\d+)\]|\.([^.\[\]]+)")
_SKIPPED_TOKENS = {"__dict__", "_modules"}
_TIME_NAMES = ("timestep", "timesteps", "sigma", "sigmas", "t")


def module_path(source: str) -> str:
    """Dynamo's source string for a module, as the dotted path `named_modules()` would give.

    ``L['self'].__dict__['_modules']['transformer_blocks'].0`` → ``transformer_blocks.0``.
    """
    source = re.sub(r"^[A-Z]\['[^']*'\]", "", source)  # the root: L['self'], L['model'], ...
    parts = []
    for quoted, index, attr in _PATH_TOKEN.findall(source):
        part = quoted or index or attr
        if part == "__self__" and parts:
            # a bound method's module: diffusers' hooks (context parallelism) call the model
            # through ``fn_ref.forward``, so dynamo names it ``L['function_reference'].forward
            # .__self__`` and its blocks ``forward.__self__.blocks.0``
            parts.pop()
        elif part not in _SKIPPED_TOKENS:
            parts.append(part)
    return ".".join(parts)


def _module_stack(node: fx.Node) -> list[tuple[str, object]]:
    """The (path, class) of every module a node was called in, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    # the root module itself (on the stack when it was called from a frame around it) has no path
    return [(path, entry[1]) for entry in stack.values() if (path := module_path(entry[0]))]


def _module_paths(node: fx.Node) -> list[str]:
    return [path for path, _ in _module_stack(node)]


def _layer_steps(nodes: list[fx.Node]) -> set[str]:
    """Indexed modules that are the steps of one layer rather than repeated blocks.

    diffusers' `FeedForward` keeps projection, dropout and output linear in ``net``, a
    `ModuleList` like any block stack; what tells them apart is that they differ in class and
    some are leaves (nothing called inside), where blocks of different classes (the UNet's down
    blocks) each hold layers. Dynamo's fragment graphs of a block's tail after a graph break
    start inside such a layer.
    """
    classes: dict[str, object] = {}
    called: set[str] = set()
    for node in nodes:
        for path, cls in _module_stack(node):
            called.add(path)
            if path.rpartition(".")[2].isdigit():
                classes[path] = cls
    siblings: dict[str, list[str]] = {}
    for path in classes:
        siblings.setdefault(path.rpartition(".")[0], []).append(path)
    steps: set[str] = set()
    for members in siblings.values():
        leaves = [m for m in members if not any(c.startswith(m + ".") for c in called)]
        if leaves and len({classes[m] for m in members}) > 1:
            steps.update(members)
    return steps


def owning_module(node: fx.Node) -> str | None:
    """The dotted path of the innermost module a node was called in (a Linear's own path)."""
    paths = _module_paths(node)
    return paths[-1] if paths else None


def _block_path(paths: list[str], steps: Collection[str] = ()) -> str | None:
    """The outermost module in the stack that is addressed by an index (and is no `steps`)."""
    return next((p for p in paths if p.rsplit(".", 1)[-1].isdigit() and p not in steps), None)


def _block_depth(nodes: list[fx.Node], steps: Collection[str] = ()) -> int | None:
    """The shallowest depth at which indexed modules are called.

    Blocks live at this depth only: the UNet's ``down_blocks.0`` counts, the
    ``mid_block.resnets.0`` inside its mid block does not (the mid block is one block).
    """
    paths = (_block_path(_module_paths(n), steps) for n in nodes)
    return min((p.count(".") for p in paths if p is not None), default=None)


def analyze(gm: fx.GraphModule, example_inputs: list[object]) -> tuple[DenoiserGraph, PassReport]:
    """Tag every node with its region and find the timestep, token streams and side inputs."""
    report = PassReport("regions")
    _tag_inputs(gm, example_inputs)
    regions = _assign_regions(gm, report)
    graph = DenoiserGraph(gm, regions, InputRoles(), list(example_inputs))
    if graph.blocks:
        graph.roles = find_roles(graph)
        report.notes.extend(graph.roles.notes)
    else:  # a graph before a break may still read the noise level the blocks' graph needs
        graph.roles.timestep = _find_timestep(graph)
    return graph, report


def _held_by_an_object(node: fx.Node) -> bool:
    """Whether dynamo reached the tensor through an attribute (a plain tensor the model keeps,
    such as Qwen-Image's rotary table), not through the call's arguments: a constant."""
    from torch._dynamo.source import AttrSource

    source = getattr(node.meta.get("grapharg"), "source", None)
    while source is not None:
        if isinstance(source, AttrSource):
            return True
        source = getattr(source, "base", None)
    return False


def _tag_inputs(gm: fx.GraphModule, example_inputs: list[object]) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs, strict=False):
        if isinstance(value, torch.nn.Parameter):
            node.meta[INPUT_KEY] = "param"
        elif "_buffers_" in node.name or _held_by_an_object(node):
            node.meta[INPUT_KEY] = "buffer"
        else:
            node.meta[INPUT_KEY] = "user"


def _assign_regions(gm: fx.GraphModule, report: PassReport) -> list[Region]:
    body = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]

    # Runs of consecutive nodes with the same owner: ("block", path), ("module", path) or root.
    runs: list[tuple[str | None, str | None, list[fx.Node]]] = []
    finished: set[str] = set()
    steps = _layer_steps(body)
    depth = _block_depth(body, steps)
    scoped = _scoped_paths(body)
    current: str | None = None  # the block the last node run inside a module belongs to
    for node in body:
        paths = scoped[node]
        block = _block_path(paths, steps)
        if block is not None and block.count(".") != depth:
            block = None
        if block is not None and block != current and block in finished:
            block = None  # a finished block's submodule called again later: root code
        if block is not None:
            kind, owner = "block", block
        elif paths:
            kind, owner = "module", paths[0]
        else:
            kind, owner = None, None
        # code outside any module (Z-Image's autocast around the rotary embedding inside its
        # attention) leaves the block open: the block's nodes after it are still the block's
        if kind is not None:
            if current is not None and owner != current:
                finished.add(current)
            current = owner if kind == "block" else None
        if runs and runs[-1][:2] == (kind, owner):
            runs[-1][2].append(node)
        else:
            runs.append((kind, owner, [node]))

    block_runs = [i for i, run in enumerate(runs) if run[0] == "block"]
    if not block_runs:
        report.skip(
            "graph",
            "no repeated blocks found (no module addressed by an index, such as blocks.0, "
            "was called); the graph runs as one region",
        )
        for node in body:
            node.meta[REGION_KEY] = "graph"
        _tag_get_attrs(gm)
        return [Region("graph", "prologue")]

    first, last = block_runs[0], block_runs[-1]
    regions = [Region("prologue", "prologue")]
    pending: list[fx.Node] = []  # root code waiting for the region that follows it
    for i, (kind, owner, nodes) in enumerate(runs):
        if i < first:
            name = "prologue"
        elif i > last:
            name = "epilogue"
        elif kind is None:
            pending.extend(nodes)
            continue
        else:
            name = owner
            group = owner.rsplit(".", 1)[0] if kind == "block" else None
            if all(r.name != name for r in regions):
                regions.append(Region(name, "block", group))
        for node in pending + nodes:
            node.meta[REGION_KEY] = name
        pending = []
    regions.append(Region("epilogue", "epilogue"))
    _keep_transform_levels_whole(body)
    shards = _sequence_split_to_prologue(gm, regions[1].name)
    if shards:
        report.notes.append(
            f"the sequence is split between ranks at the start of {regions[1].name} "
            f"({', '.join(shards)}: context parallelism); the split runs in the prologue"
        )
    _tag_get_attrs(gm)
    report.notes.append(
        f"{len(regions) - 2} blocks in "
        + ", ".join(sorted({r.group or r.name for r in regions if r.kind == "block"}))
    )
    return regions


def level_change(node: fx.Node) -> int:
    """+1 where a node enters a functorch transform level (vmap, grad, jvp), -1 where it leaves.

    Dynamo inlines ``torch.vmap`` (torch's `BlockMask` builds its tables with it, Kandinsky 6
    SR's NABLA mask inside every attention block) as ``_vmap_increment_nesting``,
    ``_add_batch_dim`` ... ``_remove_batch_dim``, ``_vmap_decrement_nesting``; in between, values
    are batched tensors of that level.
    """
    name = getattr(node.target, "__name__", "") if node.op == "call_function" else ""
    if name.endswith("_increment_nesting"):
        return 1
    if name.endswith("_decrement_nesting"):
        return -1
    return 0


def _scoped_paths(body: list[fx.Node]) -> dict[fx.Node, list[str]]:
    """Each node's module paths, where a node dynamo recorded no module for inside a functorch
    transform level (its ``_vmap_decrement_nesting``) takes those of the node that entered it.

    Dynamo writes no ``nn_module_stack`` on the nodes that close a ``vmap``; read as root code,
    they ended the block's run, and the rest of that block (its attention) became root code of a
    finished block: after the last block, the epilogue, with the region cut inside the vmap.
    """
    paths: dict[fx.Node, list[str]] = {}
    levels: list[list[str]] = []  # the paths of the node that entered each open level
    for node in body:
        own = _module_paths(node)
        if not own and levels:
            own = levels[-1]
        change = level_change(node)
        if change > 0:
            levels.append(own)
        elif change < 0 and levels:
            levels.pop()
        paths[node] = own
    return paths


def _keep_transform_levels_whole(body: list[fx.Node]) -> None:
    """Put every node of an outermost functorch transform level into the region of the node
    that entered it: a region boundary inside would hand the next region batched tensors of a
    level it does not hold (a cache keeping them fails on their first use: "your tensor may have
    escaped from inside a function being vmapped"), and its compiled pieces would be traced
    outside the transform."""
    depth, region = 0, None
    for node in body:
        change = level_change(node)
        if depth == 0 and change > 0:
            region = node.meta.get(REGION_KEY)
        if depth > 0 or change > 0:
            node.meta[REGION_KEY] = region
        depth = max(depth + change, 0)


def _sequence_split_to_prologue(gm: fx.GraphModule, first: str) -> list[str]:
    """Under context parallelism, move the first block's split of its inputs into the prologue.

    diffusers' context-parallel plan may split a model's sequence at the first block's input
    (Wan: ``"blocks.0": {"hidden_states": ContextParallelInput(split_dim=1)}``); the hook runs
    inside that block's call, so dynamo records the ``chunk(world)[rank]`` as block 0's. Left
    there, the stream enters the blocks whole and leaves them split: no block-stack residual, no
    token stream. Only graphs that communicate (`collective_groups`) are touched, and only the
    block's leading chunks of values from before it (Qwen-Image's plan also splits its token
    mask and modulation index there), along a non-batch axis, and their items:
    views, so moving them changes no value. Returns the names of the values split."""
    if not collective_groups(gm):
        return []
    chunks = {"chunk", torch.chunk, torch.Tensor.chunk}
    moved: dict[fx.Node, str] = {}
    for node in [n for n in gm.graph.nodes if n.meta.get(REGION_KEY) == first]:
        if node.target is operator.getitem and node.args[0] in moved:
            node.meta[REGION_KEY] = "prologue"  # an item of a chunk moved already
            continue
        source = node.args[0] if node.args else None
        value = example_value(source) if isinstance(source, fx.Node) else None
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
        before = isinstance(source, fx.Node) and (
            source.op == "placeholder" or source.meta.get(REGION_KEY) == "prologue"
        )
        if not (
            node.target in chunks
            and before
            and isinstance(value, torch.Tensor)
            and value.dim() >= 2  # a token mask [B, N] too (Qwen-Image splits it per block)
            and dim not in (0, -value.dim())
            and all(user.target is operator.getitem for user in node.users)
        ):
            break  # the block's own code starts here
        node.meta[REGION_KEY] = "prologue"
        moved[node] = source.name
    return list(moved.values())


def _tag_get_attrs(gm: fx.GraphModule) -> None:
    """Constants belong to the region of their first user."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.users:
            node.meta[REGION_KEY] = next(iter(node.users)).meta.get(REGION_KEY)


def region_inputs(graph: DenoiserGraph, regions: str | Collection[str]) -> list[fx.Node]:
    """Values one region (or a span of regions) reads from outside it, in first-use order."""
    inside = {regions} if isinstance(regions, str) else set(regions)
    inputs: dict[fx.Node, None] = {}
    for node in graph.gm.graph.nodes:
        if node.meta.get(REGION_KEY) in inside:
            for arg in node.all_input_nodes:
                if arg.meta.get(REGION_KEY) not in inside:
                    inputs[arg] = None
    return list(inputs)


def region_outputs(graph: DenoiserGraph, regions: str | Collection[str]) -> list[fx.Node]:
    """Values one region (or a span of regions) produces that are read outside it."""
    inside = {regions} if isinstance(regions, str) else set(regions)
    return [
        n
        for n in graph.gm.graph.nodes
        if n.meta.get(REGION_KEY) in inside
        and any(user.meta.get(REGION_KEY) not in inside for user in n.users)
    ]


def user_values(nodes: list[fx.Node]) -> list[fx.Node]:
    """The nodes that are not parameters or buffers."""
    return [n for n in nodes if n.meta.get(INPUT_KEY) not in ("param", "buffer")]


def guarded_span(graph: DenoiserGraph, *, keep_first_block: bool) -> list[str]:
    """The regions cache guards can skip: first (or second) block through the last block.

    With `keep_first_block` (the block-0 indicator) block 0 always runs, so the span starts after.
    """
    names = [r.name for r in graph.regions]
    blocks = [r.name for r in graph.blocks]
    first = blocks[1] if keep_first_block else blocks[0]
    return names[names.index(first) : names.index(blocks[-1]) + 1]


def residual_pairs(outputs: list[fx.Node], inputs: list[fx.Node]) -> list[int | None]:
    """For each of a region's `outputs`, the index of the input among `inputs` it is a residual
    of (`diffopt.guards.residual_bases`: the one input of its shape, or of several, the one its
    chain of additions starts from); None: none, it is cached as a value."""
    shapes = [shape_of(n) for n in outputs], [shape_of(n) for n in inputs]
    return pair_residuals(outputs, inputs, *shapes, residual_operands)


def describe_residuals(outputs: list[fx.Node], inputs: list[fx.Node]) -> str:
    """How a guard rebuilds `outputs` from `inputs`: residual re-add or cached value."""
    bases = residual_pairs(outputs, inputs)
    return "; ".join(
        f"{out.name} = {inputs[b].name} + cached residual"
        if b is not None
        else f"{out.name} = cached value"
        for out, b in zip(outputs, bases, strict=True)
    )


def find_roles(graph: DenoiserGraph) -> InputRoles:
    """Timestep input, token streams entering the first block, and per-token side inputs."""
    roles = InputRoles()
    first = graph.blocks[0].name
    entering = user_values(region_inputs(graph, first))
    outputs = region_outputs(graph, first)
    leaving = {shape_of(n) for n in outputs}
    # where several inputs have an output's shape (per-token gates beside the stream) and the
    # chains of additions of *every* output of that shape pick their inputs, those are the streams
    # and the others are side inputs (one unresolved output keeps all of them streams: a text
    # stream whose chain breaks on an op the walk does not follow must not be dropped)
    bases = residual_pairs(outputs, entering)
    based = {entering[b] for b in bases if b is not None}
    resolved = {shape_of(out) for out in outputs} - {
        shape_of(out) for out, b in zip(outputs, bases, strict=True) if b is None
    }

    for node in entering:
        shape = shape_of(node)
        if shape in resolved and node not in based:
            continue
        if shape is not None and len(shape) == 3 and shape in leaving:
            roles.token_streams.append(
                TensorRole(node.name, shape, "[B, N, D] in and out of the first block")
            )
    if not roles.token_streams:
        roles.notes.append(
            "no [B, N, D] token stream enters the first block (a convolutional feature map?): "
            "token-level passes will not apply"
        )

    lengths = {s.shape[1] for s in roles.token_streams}
    if len(lengths) > 1 and all(isinstance(n, int) for n in lengths):
        # joint attention over the concatenated streams (a symbolic length has no sum to match)
        lengths.add(sum(lengths))
    streams = {s.node for s in roles.token_streams}
    for node in entering:
        shape = shape_of(node)
        if node.name in streams or shape is None or len(shape) < 2:
            continue
        if any(dim in lengths for dim in shape[:-1]):
            roles.per_token.append(TensorRole(node.name, shape, "has a token-length dimension"))

    roles.timestep = _find_timestep(graph)
    if roles.timestep is None:
        roles.notes.append("no timestep input found (no user input feeds a sin/cos embedding)")
    return roles


def _find_timestep(graph: DenoiserGraph) -> TensorRole | None:
    """The user input whose values reach a sinusoidal embedding; names break ties."""
    trig = {torch.sin, torch.cos, "sin", "cos"}
    candidates = []
    for node in graph.gm.graph.nodes:
        if node.op != "placeholder" or node.meta.get(INPUT_KEY) != "user":
            continue
        shape = shape_of(node)
        if shape is None or len(shape) > 1:
            continue
        if _reaches(node, lambda n: n.target in trig):
            candidates.append(node)
    if not candidates:
        return None

    def name_rank(node: fx.Node) -> int:
        bare = node.name.removeprefix("l_").rstrip("_")
        return 0 if bare in _TIME_NAMES else 1

    best = min(candidates, key=name_rank)
    return TensorRole(best.name, shape_of(best), "user input that feeds a sin/cos embedding")


def _reaches(start: fx.Node, predicate) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if predicate(node):
            return True
        todo.extend(node.users)
    return False
