"""Values computed only from the model's constants: finding, evaluating and folding them.

The export-time passes (`real_rotary`, `fold_constants`) evaluate such values once on the
capture's own weights and put the result in the graph as a constant. A value is constant when
every input is a weight (a parameter, a buffer, a plain tensor the model holds), a constant the
graph already has, or another constant value; sizes of the call's inputs are not.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from .graph import INPUT_KEY, REGION_KEY
from .regions import level_change, owning_module


def constant_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value depends only on the model's constants (and static sizes).

    Nothing inside a functorch transform level (an inlined ``vmap``, which torch's `BlockMask`
    builds its tables with) is: its values are batched tensors of a level only the running
    graph enters, so they cannot be evaluated on their own."""
    constant: set[fx.Node] = set()
    depth = 0
    for node in gm.graph.nodes:
        change = level_change(node)
        inside = depth > 0 or change != 0
        depth = max(depth + change, 0)
        if node.op == "placeholder":
            if node.meta.get(INPUT_KEY) in ("param", "buffer"):
                constant.add(node)
        elif not inside and (
            node.op == "get_attr"
            or (
                node.op.startswith("call")
                and all(n in constant for n in node.all_input_nodes)
                and not _is_random(node)
            )
        ):
            constant.add(node)
    return constant


def add_constant(gm: fx.GraphModule, name: str, value: torch.Tensor, user: fx.Node) -> fx.Node:
    """A get_attr node of `value` (a buffer ``diffopt_<name>``) right before `user`, in its
    region."""
    attr = "diffopt_" + name
    if not hasattr(gm, attr):
        gm.register_buffer(attr, value.contiguous())
    with gm.graph.inserting_before(user):
        node = gm.graph.get_attr(attr)
    node.meta[REGION_KEY] = user.meta.get(REGION_KEY)
    node.meta["example_value"] = getattr(gm, attr)
    return node


def ancestors(nodes: set[fx.Node]) -> set[fx.Node]:
    """`nodes` and every node they are computed from."""
    found: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node not in found:
            found.add(node)
            stack.extend(node.all_input_nodes)
    return found


def op_name(node: fx.Node) -> str:
    """A node's op by name: a method's, or a function's (``torch.linalg.qr`` → ``linalg_qr``)."""
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")


def writes(node: fx.Node) -> bool:
    """An in-place write (``x[i] = v``, ``x.add_(…)``, ``out=``) or another side effect
    (entering or leaving a functorch transform level: fx does not count ``vmap``'s as one, and
    with them erased AnyFlow-FAR's mask tables were batched tensors of a level nothing entered)."""
    name = op_name(node)
    in_place = name.endswith("_") and not name.endswith("__")
    return (
        in_place
        or node.target is operator.setitem
        or "out" in node.kwargs
        or node.is_impure()
        or level_change(node) != 0
    )


def evaluate(
    gm: fx.GraphModule, needed: set[fx.Node], wanted: set[fx.Node], inputs: list[object]
) -> dict[fx.Node, torch.Tensor] | None:
    """The values of constant nodes `wanted`, run on the capture's own constants (`needed`:
    the nodes they are computed from)."""
    interpreter = fx.Interpreter(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, inputs, strict=False):
        if node in needed:
            if isinstance(value, FakeTensor):
                return None
            interpreter.env[node] = value
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node in needed and node.op != "placeholder":
                interpreter.env[node] = interpreter.run_node(node)
    return {node: interpreter.env[node] for node in wanted}


_FRESH = {"zeros", "ones", "empty", "full", "zeros_like", "ones_like", "empty_like", "full_like"}
"""Ops that make a new tensor, not a view of another."""


def erase_unread(gm: fx.GraphModule, candidates: set[fx.Node]) -> None:
    """Erase the nodes of `candidates` nothing reads any more (the tables' complex ops). A
    write goes only with the tensor it writes into, once nothing but writes uses that
    (Lumina2's per-sample rotary tables, folded); Bria-Fibo2's ``mask[...] = True`` stays, since
    the mask is read after it."""

    def unread_write(node: fx.Node) -> bool:
        target = node.args[0] if node.args else None
        return (
            isinstance(target, fx.Node)
            and target in candidates
            and op_name(target) in _FRESH  # no view: a write into one would reach its base
            and node.target is operator.setitem
            and all(writes(u) and not u.users for u in target.users)
        )

    for node in reversed(list(gm.graph.nodes)):
        if (
            node in candidates
            and node.op != "placeholder"
            and not node.users
            and (not writes(node) or unread_write(node))
        ):
            gm.graph.erase_node(node)


def _is_random(node: fx.Node) -> bool:
    return any(word in op_name(node) for word in ("rand", "normal", "bernoulli", "dropout"))


def location(node: fx.Node) -> str:
    """Where a report puts `node`: its module path (or region) and its name."""
    return f"{owning_module(node) or node.meta.get(REGION_KEY, 'graph')} / {node.name}"


class NotFoldable(Exception):
    """Constant values that cannot be evaluated at pass time: where, and why."""

    def __init__(self, where: str, why: str) -> None:
        super().__init__(f"{where}: {why}")
        self.where, self.why = where, why


def fold_values(
    gm: fx.GraphModule, wanted: set[fx.Node], inputs: list[object]
) -> dict[fx.Node, torch.Tensor]:
    """The values of the constant nodes `wanted`, evaluated on the capture's weights.

    An in-place write into what they are computed from is evaluated with them where it is
    itself constant and runs before they are done (Lumina2 fills its rotary table per sample
    with ``freqs[i, :n] = …``). `NotFoldable` when another write does (evaluating the values
    alone would miss it; the runtime keeps computing them) or the capture's inputs are fake
    tensors."""
    built = ancestors(wanted)
    constant = constant_nodes(gm)
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    while written := [u for n in built for u in n.users if u not in built and writes(u)]:
        late = max(order[n] for n in built)
        outside = [u for u in written if u not in constant or order[u] > late]
        if outside:
            raise NotFoldable(location(outside[0]), "an in-place op writes into the values' inputs")
        built |= ancestors(set(written))
    values = evaluate(gm, built, wanted, inputs)
    if values is None:
        raise NotFoldable("graph", "the capture holds fake inputs, so nothing can be evaluated")
    return values
