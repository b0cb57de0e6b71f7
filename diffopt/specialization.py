"""One graph for an engine from a denoiser whose code branches on a tensor's value.

Dynamo cannot trace ``if <tensor>:`` (OmniGen's ``if seq_len > max_positions:``, a user's
``if (mask == 0).all():``) into one graph: it breaks there, and an engine needs one graph. While
`specialized_branches` is active, each such branch takes the way the example inputs take it and
its condition stays in the graph as ``torch._assert_async(condition, message)``;
`split_checks` moves those conditions into a graph of their own, which the engine runs on every
call and which refuses an input that would take the other way. Sizes read from data (a count
taken from a mask) are not specialized: nothing would check them, so the capture refuses them.
"""

from __future__ import annotations

import contextlib
import dis
import linecache
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


def _specializing(original: Any) -> Any:
    """A dynamo jump handler that takes a one-element tensor's branch from its real value."""
    from torch._dynamo.variables import ConstantVariable, TensorVariable

    def handler(tx: Any, inst: Any) -> None:
        value = tx.stack[-1]
        real = None
        if isinstance(value, TensorVariable):
            real = getattr(value.proxy.node.meta.get("example_value"), "real_tensor", None)
        if real is not None and real.numel() == 1:
            taken = bool(real)
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
def specialized_branches() -> Iterator[list[str]]:
    """Inside, dynamo traces ``if <tensor>:`` the way the example's values go and records the
    condition (see the module docstring). Yields a list that fills with the data-dependent sizes
    the trace fixed to their example values; the caller must refuse the graph if it is not empty.

    It patches dynamo's bytecode dispatch tables and a ShapeEnv hook process-wide for the
    duration: run nothing else under dynamo meanwhile."""
    import torch._functorch.config as functorch_config
    from torch._dynamo import symbolic_convert
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

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
    fixed: list[str] = []
    log = ShapeEnv._log_real_tensor_propagation

    def record(env: Any, expr: Any, result: Any) -> None:
        fixed.append(f"{expr} == {result}")
        log(env, expr, result)

    try:
        for cls, table in tables.items():
            patched = list(table)
            for op in opcodes:
                patched[op] = _specializing(table[op])
            cls.dispatch_table = patched
        ShapeEnv._log_real_tensor_propagation = record
        with functorch_config.patch(fake_tensor_propagate_real_tensors=True):
            yield fixed
    finally:
        for cls, table in tables.items():
            cls.dispatch_table = table
        ShapeEnv._log_real_tensor_propagation = log


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
