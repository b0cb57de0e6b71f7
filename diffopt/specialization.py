"""One graph for an engine from a denoiser whose code reads a tensor's value into Python.

Dynamo cannot trace ``if <tensor>:`` (OmniGen's ``if seq_len > max_positions:``, HunyuanVideo
1.5's ``if is_t2v:``) into one graph, nor Python computed from ``tensor.tolist()`` (Wan-Animate
2's ``grid_sizes.tolist()``, Lumina2's text lengths): it breaks there, or keeps a size it cannot
decide on, and an engine needs one graph. While `specialized` is active, each such read gives
the value it gave in one eager run of the example (`recorded_reads`), and its condition stays in
the graph as ``torch._assert_async(condition, message)``; `split_checks` moves those conditions
into a graph of their own, which the engine runs on every call and which refuses an input that
reads otherwise. A line that read different values in the one run (a loop over differing
blocks, MoE routing) is left as it was: the graph breaks there and the export says where.
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
_VALUE_READS = ("tolist", "item")
"""The tensor methods whose values are specialized on request (`specialized`'s `values`)."""
_READS = ("__bool__", *_VALUE_READS)
"""The tensor methods whose values are recorded."""


@dataclass
class Checks:
    """The specialized reads' conditions, as a graph over some of the model graph's inputs."""

    gm: fx.GraphModule
    """Returns one boolean tensor per condition: True where the call reads as the example did."""
    inputs: list[int]
    """The positions, among the model graph's inputs, of this graph's inputs."""
    messages: list[str]
    """Per condition: the model's line and the value the engine was exported with."""


Reads = dict[tuple[str, str, int], set[Any]]
"""(method, file, line) → the values (lists as tuples) the reads there gave in an eager run."""


def _frozen(value: Any) -> Any:
    return tuple(map(_frozen, value)) if isinstance(value, list) else value


def _thawed(value: Any) -> Any:
    return list(map(_thawed, value)) if isinstance(value, tuple) else value


@contextlib.contextmanager
def recorded_reads() -> Iterator[Reads]:
    """Inside, every truth test of a tensor (an ``if``, ``and``, ``not``), ``tolist()`` and
    ``item()`` is recorded by the line that made it, into the yielded dict; run the model
    eagerly in it."""
    reads: Reads = {}
    originals = {name: getattr(torch.Tensor, name) for name in _READS}
    own = {name for name in _READS if name in vars(torch.Tensor)}  # the rest come from C

    def recording(name: str) -> Any:
        def read(tensor: torch.Tensor) -> Any:
            value = originals[name](tensor)
            caller = sys._getframe(1)
            key = (name, caller.f_code.co_filename, caller.f_lineno)
            reads.setdefault(key, set()).add(_frozen(value))
            return value

        return read

    for name in _READS:
        setattr(torch.Tensor, name, recording(name))
    try:
        yield reads
    finally:
        for name, method in originals.items():
            if name in own:
                setattr(torch.Tensor, name, method)
            else:  # as it was: inherited, not an attribute of torch.Tensor's own
                delattr(torch.Tensor, name)


def _one_value(reads: Reads, name: str, tx: Any) -> tuple[bool, Any]:
    """Whether the line `tx` is tracing read one value only with `name`, and that value."""
    seen = reads.get((name, tx.f_code.co_filename, tx.lineno), set())
    return len(seen) == 1, _thawed(next(iter(seen), None))


def _check(tx: Any, condition: Any, read: str) -> None:
    """Keep `condition` (a proxy of a boolean tensor) in the graph as a specialized read."""
    line = linecache.getline(tx.f_code.co_filename, tx.lineno).split("  #")[0].strip()
    where = tx.f_code.co_filename.split("site-packages/")[-1]
    message = f"{CHECK_PREFIX}`{line}` {read} ({where}:{tx.lineno})"
    tx.output.create_proxy("call_function", torch._assert_async, (condition, message), {})


def _specialized_jump(original: Any, reads: Reads) -> Any:
    """A dynamo jump handler that takes a tensor's branch the way the eager run took it."""
    from torch._dynamo.variables import ConstantVariable, TensorVariable

    def handler(tx: Any, inst: Any) -> None:
        value = tx.stack[-1]
        one, taken = _one_value(reads, "__bool__", tx)
        if isinstance(value, TensorVariable) and one:
            condition = value.as_proxy()
            if not taken:
                condition = tx.output.create_proxy(
                    "call_function", torch.logical_not, (condition,), {}
                )
            _check(tx, condition, f"being {taken}")
            tx.pop()
            tx.push(ConstantVariable.create(taken))
        original(tx, inst)

    return handler


def _specialized_read(original: Any, name: str, reads: Reads) -> Any:
    """A dynamo handler of ``tensor.tolist()`` / ``.item()`` that gives the eager run's value."""
    from torch._dynamo.variables import VariableTracker

    def handler(self: Any, tx: Any, *args: Any, **kwargs: Any) -> Any:
        one, value = _one_value(reads, name, tx)
        if not one or args or kwargs:
            return original(self, tx, *args, **kwargs)
        tensor = self.as_proxy()
        fake = tensor.node.meta["example_value"]
        expected = tx.output.create_proxy(
            "call_function",
            torch.tensor,
            (value,),
            {"dtype": fake.dtype, "device": fake.device},
        )
        equal = tx.output.create_proxy("call_function", torch.eq, (tensor, expected), {})
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        every = tx.output.create_proxy("call_function", torch.all, (equal,), {})
        _check(tx, every, f"reading {shown}")
        return VariableTracker.build(tx, value)

    return handler


@contextlib.contextmanager
def specialized(reads: Reads, values: bool = False) -> Iterator[None]:
    """Inside, dynamo traces ``if <tensor>:`` the way `reads` (`recorded_reads`) says its line
    went, and with `values` ``tolist()`` and ``item()`` as the values they read, keeping each
    condition in the graph (see the module docstring).

    It patches dynamo's bytecode dispatch tables and tensor handlers process-wide for the
    duration: run nothing else under dynamo meanwhile."""
    from torch._dynamo import symbolic_convert
    from torch._dynamo.variables import TensorVariable

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
    methods = {f"method_{name}": name for name in _VALUE_READS} if values else {}
    # dynamo's tensor handlers by name; a torch without one leaves that read unspecialized
    handlers = {a: getattr(TensorVariable, a) for a in methods if hasattr(TensorVariable, a)}
    try:
        for cls, table in tables.items():
            patched = list(table)
            for op in opcodes:
                patched[op] = _specialized_jump(table[op], reads)
            cls.dispatch_table = patched
        for attr, handler in handlers.items():
            setattr(TensorVariable, attr, _specialized_read(handler, methods[attr], reads))
        yield
    finally:
        for cls, table in tables.items():
            cls.dispatch_table = table
        for attr, handler in handlers.items():
            setattr(TensorVariable, attr, handler)


def split_checks(gm: fx.GraphModule) -> Checks | None:
    """Move the specialized reads' conditions out of `gm` into a `Checks` graph (None: `gm`
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
