"""token_guard: let the runtime refresh only the tokens that changed most.

On a token-refresh step the runtime scores each token by how much its stack residual changed
between the last two full steps, gathers the top tokens of every sample (and their per-token
side inputs) into a shorter sequence, runs the blocks on it, and scatters the results into the
cached stack output. No attention maps are needed, so fused attention keeps working.

Side inputs indexed by token without a batch axis (rotary tables shared by the batch: Flux, Wan,
Qwen-Image, HunyuanVideo) are indexed once, so on such models every sample of a batch refreshes
the same tokens (the batch's most-changed on average). Dual-stream models (Flux, SD3) refresh the
image stream and pass the text stream whole: where the blocks concatenate the streams into one
joint sequence, the pass records where the image tokens sit in it (`Guard.joint`) and rewrites
the cuts of that sequence behind them (slice bounds, split sizes, baked in at capture) to count
from its end, which is the same cut at full length and still right on a shorter sequence.

The pass checks what the runtime relies on: the span's outputs map token by token onto a
gathered input, no input runs over tokens on two axes, and the blocks run on a shorter
sequence (checked on fake tensors, so a token count baked into a ``view`` is caught here).
"""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from diffopt.config import CacheConfig
from diffopt.guards import Guard, per_sample, refresh_count, token_axes

from .graph import INPUT_KEY, REGION_KEY, DenoiserGraph, example_value, is_dtensor, shape_of
from .manager import register_pass
from .regions import (
    describe_residuals,
    guarded_span,
    region_inputs,
    region_outputs,
    residual_pairs,
    user_values,
)
from .report import PassReport

_CATS = (torch.cat, torch.concat, torch.concatenate)
_SPLITS = {"split", "split_with_sizes", torch.split, torch.Tensor.split}
_VIEWS = {"view", "reshape", torch.reshape}
_FACTORIES = {torch.ones, torch.zeros, torch.empty, torch.full}


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
    exchanged = sorted({str(n.target) for n in _span_nodes(graph, span) if _collective(n)})
    if exchanged:
        report.skip(
            where,
            f"the blocks exchange the sequence between ranks ({', '.join(exchanged)}: context "
            "parallelism), each rank holding a shard: a token refresh of the most-changed "
            "tokens would leave the ranks with different numbers of tokens for the all-to-all; "
            "use cache.polish='block' or 'none'",
        )
        return graph, report
    # a symbolic length (dynamic shapes: the stream whose size changed, the image's) ranks first
    role = max(graph.roles.token_streams, key=lambda s: _longest(s.shape[1]))
    stream = role.shape
    batch, tokens = stream[:2]
    samples = _batch_size(graph)
    if samples is not None and batch != samples and tokens == samples:
        report.skip(
            where,
            f"the token stream {role.node} {list(stream)} runs tokens first ([N, B, D], its "
            f"axis 1 the batch of {samples}: Ernie-Image's [S, B, H]); a token refresh gathers, "
            "scores and scatters a stream's tokens on axis 1 behind its batch axis, so it "
            "would take samples for tokens",
        )
        return graph, report
    if not isinstance(tokens, int):
        report.skip(where, f"the token count is symbolic ({tokens}, dynamic shapes)")
        return graph, report
    others = [s.shape[1] for s in graph.roles.token_streams if s.shape[1] != tokens]
    try:
        joint = _joint_layout(graph, span, tokens, others)
        rewrites = _sized_by_stream(graph, span, stream, joint)
    except _CannotGather as e:
        report.skip(where, str(e))
        return graph, report
    layout = (batch, tokens, joint)
    gathered = [n for n in entries if _axes(n, layout)]
    problem = _why_not(graph, entries, gathered, exits, layout, others)
    if problem is None:
        for apply in rewrites:
            apply()  # the same sizes at full length: harmless should the fake run below fail
        graph.gm.recompile()
        count = refresh_count(config.token_ratio, tokens)
        problem = _shorter_sequence_fails(graph, span, gathered, layout, count)
    if problem is not None:
        report.skip(where, problem)
        return graph, report
    why = f"gather top tokens of {', '.join(n.name for n in gathered)}; " + describe_residuals(
        exits, gathered
    )
    passing = [n.name for n in exits if _passes_whole(n, entries, gathered, others)]
    if passing:
        why += f"; {', '.join(passing)}: another stream, which a refresh runs whole"
    shared = [n.name for n in gathered if not per_sample(shape_of(n), batch)]
    if shared:
        why += (
            f"; {', '.join(shared)} have no batch axis (shared by the batch), so every sample "
            "refreshes the same tokens: the batch's most-changed"
        )
    if joint != (0, 0):
        why += (
            f"; the blocks join the streams into one sequence ({joint[0]} other tokens, these "
            f"{tokens}, {joint[1]} other tokens), where the other streams pass whole"
        )
    graph.guards.append(Guard("token", tuple(span), why, joint, tokens))
    report.rewrite(where, f"token guard over {len(span)} regions ({tokens} tokens): {why}")
    return graph, report


def _batch_size(graph: DenoiserGraph) -> int | str | None:
    """How many samples a call holds: the length of a per-sample timestep, else the leading
    size most of the user's inputs of two or more dimensions share (latents, text embeddings;
    position ids lead with their tokens); None where neither says."""
    timestep = graph.roles.timestep
    if timestep is not None and len(timestep.shape) == 1 and timestep.shape[0] != 1:
        return timestep.shape[0]
    leading = [
        shape[0]
        for node in graph.gm.graph.nodes
        if node.op == "placeholder"
        and node.meta.get(INPUT_KEY) == "user"
        and (shape := shape_of(node)) is not None
        and len(shape) >= 2
    ]
    counts = {size: leading.count(size) for size in leading}
    ranked = sorted(counts.values(), reverse=True)
    if not ranked or (len(ranked) > 1 and ranked[0] == ranked[1]):
        return None
    return max(counts, key=counts.__getitem__)


def _axes(node: fx.Node, layout: tuple) -> list[int]:
    """`token_axes` of a captured value; `layout`: (batch, tokens, joint)."""
    value = example_value(node)
    mask = isinstance(value, torch.Tensor) and value.dtype == torch.bool
    return token_axes(shape_of(node), *layout, mask=mask)


class _CannotGather(Exception):
    """Why the token guard cannot apply (the message is the report's reason)."""


def _collective(node: fx.Node) -> bool:
    """A collective between ranks (``torch.ops._c10d_functional``), other than waiting on one."""
    name = str(node.target)
    return name.startswith("_c10d_functional.") and "wait_tensor" not in name


def _span_nodes(graph: DenoiserGraph, span: list[str]) -> list[fx.Node]:
    return [n for region in span for n in graph.nodes_of(region)]


def _joint_layout(
    graph: DenoiserGraph, span: list[str], tokens: int, others: list[int]
) -> tuple[int, int]:
    """How many other streams' tokens precede and follow the refreshed stream where the blocks
    concatenate the streams along a token axis; (0, 0) where they never do."""
    layouts: dict[tuple[int, int], fx.Node] = {}
    for node in _span_nodes(graph, span):
        if node.op != "call_function" or node.target not in _CATS:
            continue
        parts, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        shapes = [shape_of(p) if isinstance(p, fx.Node) else None for p in parts]
        if any(s is None for s in shapes) or dim % len(shapes[0]) == len(shapes[0]) - 1:
            continue  # channels, not tokens
        sizes = [s[dim] for s in shapes]
        if sizes.count(tokens) != 1 or not all(s == tokens or s in others for s in sizes):
            continue
        at = sizes.index(tokens)
        symbolic = [size for size in sizes if not isinstance(size, int)]
        if symbolic:  # a cut behind the stream would have to count from a size known at run time
            raise _CannotGather(
                f"the blocks join the refreshed {tokens} tokens with a stream of {symbolic[0]} "
                f"tokens ({node.name}), a count known only at run time (taken from data, or "
                "dynamic): the cuts of the joint sequence cannot be made to follow a shorter "
                "stream; use cache.polish='block' or 'none'"
            )
        layouts.setdefault((sum(sizes[:at]), sum(sizes[at + 1 :])), node)
    if len(layouts) > 1:
        found = ", ".join(f"{n.name}: {b} before, {a} after" for (b, a), n in layouts.items())
        raise _CannotGather(
            f"the blocks join the streams in different orders ({found}), so the refreshed "
            f"{tokens} tokens have no one place in the joint sequence"
        )
    return next(iter(layouts), (0, 0))


def _sized_by_stream(
    graph: DenoiserGraph, span: list[str], stream: tuple[int, ...], joint: tuple[int, int]
) -> list:
    """The rewrites (callables) that let the span follow a shorter stream.

    Capture bakes sizes in as numbers. A cut of the joint sequence behind the stream (SD3's
    ``hidden_states[:, :image_tokens]``, Flux's ``split_with_sizes([text, image])``) is made to
    count from the sequence's end, where it stays when the stream shrinks; a cut inside the
    stream is the reason. A view's one size of a token length is inferred (-1) instead, and a
    new tensor's (Qwen-Image's image mask) is read off the stream entering its region.
    """
    tokens = stream[1]
    before, after = joint
    length = before + tokens + after

    def moved(node: fx.Node, cut: int | None, stop: bool) -> int | None:
        if cut is None:
            return None
        at = cut if cut >= 0 else length + cut
        if at <= before:
            return at
        if at >= before + tokens:
            return None if stop and at == length else at - length
        raise _CannotGather(
            f"{node.name} cuts the joint sequence ({before} + {tokens} + {after} tokens) "
            "inside the refreshed stream; a shorter stream would move that cut"
        )

    rewrites: list = []
    for node in _span_nodes(graph, span):
        if node.target in _VIEWS:
            rewrites += _view_rewrite(node, {tokens, length})
        elif node.target in _FACTORIES:
            rewrites += _factory_rewrite(graph, node, stream)
        elif length == tokens:
            continue  # no joint sequence to cut
        elif node.op == "call_function" and node.target is operator.getitem:
            rewrites += _slice_rewrite(node, length, moved)
        elif node.target in _SPLITS:
            rewrites += _split_rewrite(graph, node, length, moved)
    return rewrites


def _slice_rewrite(node: fx.Node, length: int, moved) -> list:
    value, index = node.args
    shape = shape_of(value) if isinstance(value, fx.Node) else None
    index = index if isinstance(index, tuple) else (index,)
    if shape is None:
        return []
    new = list(index)
    for position, axis in _indexed_axes(index, len(shape)):
        entry = index[position]
        if isinstance(entry, slice) and shape[axis] == length and axis != len(shape) - 1:
            new[position] = slice(moved(node, entry.start, False), moved(node, entry.stop, True))
    if new == list(index):
        return []
    return [lambda: setattr(node, "args", (value, tuple(new)))]


def _indexed_axes(index: tuple, ndim: int) -> list[tuple[int, int]]:
    """(position in `index`, tensor axis) of each entry of an indexing tuple that takes an axis."""
    taking = [i for i, e in enumerate(index) if e is not None and e is not Ellipsis]
    if Ellipsis in index:
        ellipsis = index.index(Ellipsis)
        tail = [i for i in taking if i > ellipsis]
        return [(i, k) for k, i in enumerate(i for i in taking if i < ellipsis)] + [
            (i, ndim - len(tail) + k) for k, i in enumerate(tail)
        ]
    return [(i, k) for k, i in enumerate(taking)]


def _view_rewrite(node: fx.Node, lengths: set[int]) -> list:
    """Infer (-1) the one size of a token length in a view, and spell out the size it inferred
    (from the captured output): the same view at full length, and one that follows a shorter
    sequence (the rotary code's ``x.reshape(*x.shape[:-1], -1, 2)`` bakes the length in)."""
    out, sizes = shape_of(node), list(node.args[1:])
    if len(sizes) == 1 and isinstance(sizes[0], list | tuple):
        sizes = list(sizes[0])
    if out is None or len(sizes) != len(out) or sum(size in lengths for size in out) != 1:
        return []
    if any(s == -1 and not isinstance(o, int) for s, o in zip(sizes, out, strict=True)):
        return []  # the inferred size is symbolic (dynamic shapes)
    sizes = [-1 if o in lengths else o if s == -1 else s for s, o in zip(sizes, out, strict=True)]
    return [lambda: setattr(node, "args", (node.args[0], tuple(sizes)))]


def _factory_rewrite(graph: DenoiserGraph, node: fx.Node, stream: tuple[int, ...]) -> list:
    """A new tensor with one size of the stream's token count takes that size from the stream
    entering its region (its token axis), which a refresh shortens."""
    listed = isinstance(node.args[0], list | tuple)
    sizes, rest = (list(node.args[0]), node.args[1:]) if listed else (list(node.args), ())
    region = node.meta.get(REGION_KEY)
    source = [n for n in region_inputs(graph, region) if shape_of(n) == stream]
    if sizes.count(stream[1]) != 1 or len(source) != 1:
        return []

    def apply() -> None:
        with graph.gm.graph.inserting_before(node):
            size = graph.gm.graph.call_method("size", (source[0], 1))
        size.meta = {REGION_KEY: region, "example_value": stream[1]}
        sizes[sizes.index(stream[1])] = size
        node.args = (tuple(sizes), *rest)

    return [apply]


def _split_rewrite(graph: DenoiserGraph, node: fx.Node, length: int, moved) -> list:
    """A split of the joint sequence into pieces, as one slice per piece (a split's sizes cannot
    count from the end)."""
    value = node.args[0]
    sizes = node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size")
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    shape = shape_of(value) if isinstance(value, fx.Node) else None
    users = list(node.users)
    if (
        shape is None
        or not isinstance(sizes, list | tuple)
        or shape[dim] != length
        or dim % len(shape) == len(shape) - 1
        or not all(u.target is operator.getitem for u in users)
    ):
        return []
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    pieces = {
        u: slice(moved(node, bounds[u.args[1]], False), moved(node, bounds[u.args[1] + 1], True))
        for u in users
    }

    def apply() -> None:
        for user, piece in pieces.items():
            index = (slice(None),) * (dim % len(shape)) + (piece,)
            with graph.gm.graph.inserting_before(user):
                cut = graph.gm.graph.call_function(operator.getitem, (value, index))
            cut.meta = dict(user.meta)
            user.replace_all_uses_with(cut)
            graph.gm.graph.erase_node(user)
        graph.gm.graph.erase_node(node)

    return [apply]


def _why_not(
    graph: DenoiserGraph,
    entries: list[fx.Node],
    gathered: list[fx.Node],
    exits: list[fx.Node],
    layout: tuple,
    others: list[int],
) -> str | None:
    per_token = {r.node for r in graph.roles.per_token}
    tokens = layout[1]
    combined = tokens + sum(others)
    for node in entries:
        shape = shape_of(node)
        axes = _axes(node, layout)
        if len(axes) > 1:
            return (
                f"input {node.name} {list(shape)} runs over the tokens on axes {axes} (an "
                "attention mask over token pairs?), which a refresh cannot gather; a mask "
                "built inside the blocks from a per-token one would be"
            )
        if not axes and node.name in per_token and combined in shape[:-1]:
            return (
                f"input {node.name} {list(shape)} is indexed by the {combined} tokens of all "
                "streams, but no concatenation of the streams in the blocks says where the "
                f"refreshed {tokens} tokens sit among them, so it cannot be gathered"
            )
    entry_shapes = [shape_of(n) for n in entries]
    joint_length = tokens + sum(layout[2])
    bases = residual_pairs(exits, gathered)
    for node, base in zip(exits, bases, strict=True):
        shape = shape_of(node)
        # Flux2, Chroma: the span joins the streams itself and hands on the joint sequence
        joined = (
            joint_length != tokens
            and shape[1] == joint_length
            and _axes(node, layout) == [1]
            and shape not in entry_shapes
        )
        if base is None and not joined and not _passes_whole(node, entries, gathered, others):
            return (
                f"output {node.name} {list(shape or [])} does not map token by token onto one "
                "gathered input nor onto the joint sequence of the streams (streams "
                "concatenated or split inside the blocks?)"
            )
    return None


def _passes_whole(
    node: fx.Node, entries: list[fx.Node], gathered: list[fx.Node], others: list
) -> bool:
    """Whether exit `node` is another stream of its own length that enters the span whole and
    leaves it so (LTX-2's audio beside its video): a refresh runs it on all its tokens."""
    shape = shape_of(node)
    whole = [shape_of(n) for n in entries if n not in gathered]
    return shape is not None and len(shape) == 3 and shape[1] in others and shape in whole


def _shorter_sequence_fails(
    graph: DenoiserGraph, span: list[str], gathered: list[fx.Node], layout: tuple, count: int
) -> str | None:
    """Run the span on fake tensors with `count` of the stream's tokens; the error, if it fails.
    `layout`: (batch, tokens, joint)."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        return _run_span(graph, span, {n.name for n in gathered}, layout, count)


def _run_span(
    graph: DenoiserGraph, span: list[str], gathered: set[str], layout: tuple, count: int
) -> str | None:
    from diffopt.runtime.lowering import split_regions  # lowering imports passes

    program = split_regions(graph)
    captured = {n.name: n for n in graph.gm.graph.nodes}
    values: dict[int, object] = {}
    for lowered in program.regions:
        if lowered.region.name not in span:
            continue
        placeholders = [n for n in lowered.module.graph.nodes if n.op == "placeholder"]
        for node, slot in zip(placeholders, lowered.inputs, strict=True):
            if slot not in values:
                node = captured[node.name]
                axes = _axes(node, layout) if node.name in gathered else []
                values[slot] = _fake(example_value(node), axes, layout[1] - count)
        try:
            outputs = lowered.module(*[values[s] for s in lowered.inputs])
        except Exception as e:  # the reason is the message: the pass reports it as a skip
            return (
                f"region {lowered.region.name} does not run on a {count}-token sequence "
                f"({type(e).__name__}: {str(e).splitlines()[0][:160]})"
            )
        values.update(zip(lowered.outputs, outputs, strict=True))
    return None


def _fake(value: object, axes: list[int], fewer: int) -> object:
    """An empty tensor like `value`, with `fewer` tokens on its token `axes` (a gathered one)."""
    if not isinstance(value, torch.Tensor):
        return value
    if is_dtensor(value):  # a tensor-parallel weight: its shard, on its mesh
        from torch.distributed.tensor import DTensor

        local = _fake(value.to_local(), axes, fewer)
        return DTensor.from_local(local, value.device_mesh, value.placements, run_check=False)
    shape = list(value.shape)
    for axis in axes:
        shape[axis] -= fewer
    return torch.empty(shape, dtype=value.dtype, device=value.device)


def _longest(length: int | str) -> tuple[int, int]:
    """Sort key of a stream's token count: symbolic (a name: the axis marked dynamic) above any
    fixed count, and a count taken from data (an unbacked ``u0``: HunyuanVideo 1.5's text
    reordered by its masks) below them, since the image stream is the one to refresh."""
    if isinstance(length, int):
        return (1, length)
    return (0, 0) if re.search(r"\bu\d+", length) else (2, 0)
