"""One graph for an engine from a denoiser whose code branches on a tensor's value.

Dynamo cannot trace ``if <tensor>:`` (OmniGen's ``if seq_len > max_positions:``, a user's
``if (mask == 0).all():``) into one graph: it breaks there, and an engine needs one graph. While
`specialized_branches` is active, each such branch takes the way the example inputs take it and
its condition stays in the graph as ``torch._assert_async(condition, message)``;
`split_checks` moves those conditions into a graph of their own, which the engine runs on every
call and which refuses an input that would take the other way. Which way each line went comes
from one eager run (`recorded_branches`). Sizes read from data (a count taken from a mask) are
not specialized: they stay sizes known only at run time, or the capture refuses them.
"""

from __future__ import annotations

import contextlib
import dis
import linecache
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

CHECK_PREFIX = "diffopt specialized the engine on "
_JUMPS = (  # opcodes that pop a condition and jump on it (3.11 has forward/backward forms)
    "POP_JUMP_IF_FALSE",
    "POP_JUMP_IF_TRUE",
    "POP_JUMP_FORWARD_IF_FALSE",
    "POP_JUMP_FORWARD_IF_TRUE",
    "POP_JUMP_BACKWARD_IF_FALSE",
    "POP_JUMP_BACKWARD_IF_TRUE",
)


@dataclass
class Checks:
    """The specialized branches' conditions, as a graph over some of the model graph's inputs."""

    gm: fx.GraphModule
    """Returns one boolean tensor per condition: True where the call takes the exported way."""
    inputs: list[int]
    """The positions, among the model graph's inputs, of this graph's inputs."""
    messages: list[str]
    """Per condition: the model's line and the way the engine was exported with."""


Branches = dict[tuple[str, int], set[bool]]
"""(file, line) → the values ``if <tensor>:`` took there while the model ran eagerly."""


@contextlib.contextmanager
def recorded_branches() -> Iterator[Branches]:
    """Inside, every truth test of a tensor (``Tensor.__bool__``: an ``if``, ``and``, ``not``)
    is recorded by the line that made it, into the yielded dict; run the model eagerly in it."""
    values: Branches = {}
    truth = torch.Tensor.__bool__

    def recording(tensor: torch.Tensor) -> bool:
        value = truth(tensor)
        caller = sys._getframe(1)
        values.setdefault((caller.f_code.co_filename, caller.f_lineno), set()).add(value)
        return value

    torch.Tensor.__bool__ = recording  # type: ignore[method-assign]
    try:
        yield values
    finally:
        torch.Tensor.__bool__ = truth  # type: ignore[method-assign]


def _specializing(original: Any, branches: Branches) -> Any:
    """A dynamo jump handler that takes a tensor's branch the way the eager run took it, where
    that line always went one way; any other jump is left to `original` (a graph break)."""
    from torch._dynamo.variables import ConstantVariable, TensorVariable

    def handler(tx: Any, inst: Any) -> None:
        value = tx.stack[-1]
        seen = branches.get((tx.f_code.co_filename, tx.lineno), set())
        if isinstance(value, TensorVariable) and len(seen) == 1:
            (taken,) = seen
            line = linecache.getline(tx.f_code.co_filename, tx.lineno).split("  #")[0].strip()
            where = tx.f_code.co_filename.split("site-packages/")[-1]
            message = f"{CHECK_PREFIX}`{line}` being {taken} ({where}:{tx.lineno})"
            condition = value.as_proxy()
            if not taken:
                condition = tx.output.create_proxy(
                    "call_function", torch.logical_not, (condition,), {}
                )
            tx.output.create_proxy("call_function", torch._assert_async, (condition, message), {})
            tx.pop()
            tx.push(ConstantVariable.create(taken))
        original(tx, inst)

    return handler


@contextlib.contextmanager
def specialized_branches(branches: Branches) -> Iterator[None]:
    """Inside, dynamo traces ``if <tensor>:`` the way `branches` (`recorded_branches`) says the
    line went and records the condition in the graph (see the module docstring). A line that
    went both ways (a loop over blocks that differ) still breaks the graph.

    It patches dynamo's bytecode dispatch tables process-wide for the duration: run nothing
    else under dynamo meanwhile."""
    from torch._dynamo import symbolic_convert

    def translators(cls: type) -> Iterator[type]:
        yield cls
        for sub in cls.__subclasses__():
            yield from translators(sub)

    tables = {
        cls: cls.dispatch_table
        for cls in translators(symbolic_convert.InstructionTranslatorBase)
        if "dispatch_table" in vars(cls)
    }
    opcodes = [dis.opmap[name] for name in _JUMPS if name in dis.opmap]
    try:
        for cls, table in tables.items():
            patched = list(table)
            for op in opcodes:
                patched[op] = _specializing(table[op], branches)
            cls.dispatch_table = patched
        yield
    finally:
        for cls, table in tables.items():
            cls.dispatch_table = table


def split_checks(gm: fx.GraphModule) -> Checks | None:
    """Move the specialized branches' conditions out of `gm` into a `Checks` graph (None: `gm`
    specialized nothing). `gm` keeps what it needs; the conditions' own ops leave with them."""
    asserts = [
        n
        for n in gm.graph.nodes
        if n.target is torch._assert_async
        and len(n.args) > 1
        and str(n.args[1]).startswith(CHECK_PREFIX)
    ]
    if not asserts:
        return None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    needed: set[fx.Node] = set()
    todo = [a.args[0] for a in asserts]
    while todo:
        node = todo.pop()
        if node not in needed:
            needed.add(node)
            todo.extend(node.all_input_nodes)
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    inputs = [i for i, p in enumerate(placeholders) if p in needed]
    for i in inputs:
        copies[placeholders[i]] = graph.node_copy(placeholders[i])
    for node in gm.graph.nodes:
        if node in needed and node.op != "placeholder":
            copies[node] = graph.node_copy(node, copies.__getitem__)
    conditions = [graph.call_function(torch.Tensor.bool, (copies[a.args[0]],)) for a in asserts]
    graph.output(tuple(conditions))
    checks = Checks(fx.GraphModule(gm, graph), inputs, [str(a.args[1]) for a in asserts])
    for node in asserts:
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return checks
