"""real_rotary: complex rotary embeddings rewritten as real arithmetic.

Qwen-Image, Z-Image, NucleusMoE-Image and AnyFlow rotate queries and keys by a complex product,
``view_as_real(view_as_complex(x) * freqs)``, where ``freqs`` is a complex table the model builds
from its own constants (split, index, cat and polar on complex buffers, sized by the static
latent shape). ONNX has no complex tensors and torch's exporter has no decomposition for most
ops on them, so such models could not be exported. The table depends only on constants, so
this pass evaluates it once on the capture's values, keeps its real and imaginary parts as two
constants, and writes the product in real pairs: (a + ib)(c + id) = (ac - bd) + i(ad + bc).
The complex ops that built the table leave the graph. `diffopt.export` turns the pass on.

A table the call passes (Lumina-Next's pipeline computes it: a complex input) cannot be folded;
there the graph reads its real pairs, ``view_as_real(table)``, and each layout op on the table
(slicing, flatten, unsqueeze, ``.to(device)``…) is repeated on its real and imaginary parts, which
have the table's shape, so the op's arguments stand as they are. The input stays complex, so the
call is unchanged; an engine binds it as its real view (`diffopt.exporters`).

Complex values the pattern does not cover (a table computed from the call's inputs, e.g. under
a dynamic resolution, or another complex op on activations) are reported as skips naming the op.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from diffopt.config import RealRotaryConfig

from .constants import (
    NotFoldable,
    add_constant,
    constant_nodes,
    erase_unread,
    fold_values,
    location,
)
from .graph import REGION_KEY, DenoiserGraph, example_value
from .manager import register_pass
from .report import PassReport

_MULS = (operator.mul, torch.mul)


@register_pass("real_rotary", config="rotary")
def real_rotary(graph: DenoiserGraph, config: RealRotaryConfig) -> tuple[DenoiserGraph, PassReport]:
    """Rewrite each complex rotary product into real pairs (see the module docstring)."""
    report = PassReport("real_rotary")
    gm = graph.gm
    constant = constant_nodes(gm)
    passed = _passed_tables(gm, constant)
    products, covered = [], set(passed)
    for node in gm.graph.nodes:
        match = _rotary_product(node, constant, passed)
        if match is not None:
            products.append((node, *match))
            covered.update((node, match[0]))
    leftover = [
        n for n in gm.graph.nodes if _is_complex(n) and n not in constant and n not in covered
    ]
    # an op that reads a passed table other than as a layout op or a rotary product's table
    leftover += [
        u
        for n in passed
        for u in n.users
        if u not in covered and u not in leftover and u.op != "output"
    ]
    for node in leftover:
        if any(arg in passed for arg in node.all_input_nodes):
            why = (
                f"op {node.target!r} reads the complex tensor the call passes, and only layout "
                "ops (slicing, flatten, unsqueeze, .to(device)…) and rotary products "
                "view_as_real(view_as_complex(x) * table) are written in real pairs"
            )
        else:
            why = (
                f"complex op {node.target!r} on values computed from the call's inputs, which "
                "is not the rotary pattern view_as_real(view_as_complex(x) * table) with a "
                "constant table (a table sized by a dynamic resolution is one: export that "
                "axis static)"
            )
        report.skip(location(node), why)
    if any(u.op == "output" for n in passed for u in n.users):
        report.skip("graph / output", "the graph returns the complex tensor the call passes")
        leftover.append(gm.graph.output_node())
    if not products:
        return graph, report
    if leftover:
        report.notes.append("no product rewritten: the graph keeps complex ops either way")
        return graph, report
    tables = {table for _, _, table in products if table not in passed}
    try:
        values = fold_values(gm, tables, graph.example_inputs) if tables else {}
    except NotFoldable as e:  # the runtime keeps computing them
        report.skip(e.where, f"its rotary tables cannot be folded: {e.why}")
        return graph, report
    folded = {}
    for table in tables:
        size = values[table].numel() * values[table].element_size()
        if size > config.max_table_bytes:
            report.skip(
                location(table),
                f"its complex table holds {size} bytes, over rotary.max_table_bytes="
                f"{config.max_table_bytes}; raise the limit to fold it into the engine",
            )
            return graph, report
        folded[table] = values[table]
    parts = _real_parts(gm, passed)
    for product, rotated, table in products:
        if table in parts:
            real, imag = parts[table]
        else:
            real, imag = (
                add_constant(
                    gm, f"rotary_{table.name}_{part}", getattr(folded[table], part), product
                )
                for part in ("real", "imag")
            )
        pairs = _real_product(gm, product, rotated.args[0], real, imag)
        for user in list(product.users):
            user.replace_all_uses_with(pairs)
            gm.graph.erase_node(user)
        gm.graph.erase_node(product)
        if table in parts:
            report.rewrite(location(product), "complex product by a table the call passes")
        else:
            shape = tuple(folded[table].shape)
            report.rewrite(location(product), f"complex product by a {shape} table")
    made = {part for pair in parts.values() for part in pair}
    erase_unread(gm, constant | passed | made | {rotated for _, rotated, _ in products})
    report.stats["tables"] = len(folded)
    report.stats["passed_tables"] = sum(n.op == "placeholder" for n in passed)
    report.stats["table_bytes"] = sum(v.numel() * v.element_size() for v in folded.values())
    return graph, report


def _rotary_product(
    node: fx.Node, constant: set[fx.Node], passed: set[fx.Node]
) -> tuple[fx.Node, fx.Node] | None:
    """(the view_as_complex node, the table) if `node` is a rotary product whose every user
    takes it back to real pairs, its table a constant or one the call passes (`passed`)."""
    is_mul = (node.op == "call_function" and node.target in _MULS) or (
        node.op == "call_method" and node.target == "mul"
    )
    if not is_mul or len(node.args) != 2 or node.kwargs or not _is_complex(node):
        return None
    if not node.users or any(u.target is not torch.view_as_real for u in node.users):
        return None
    for rotated, table in (node.args, node.args[::-1]):
        if (
            isinstance(rotated, fx.Node)
            and rotated.target is torch.view_as_complex
            and rotated not in constant
            and len(rotated.users) == 1
            and (table in constant or table in passed)
            and _is_complex(table)
        ):
            return rotated, table
    return None


_LAYOUT_FUNCTIONS = {
    operator.getitem,
    *(
        getattr(torch, name)
        for name in (
            "flatten",
            "unflatten",
            "unsqueeze",
            "squeeze",
            "reshape",
            "permute",
            "transpose",
            "narrow",
            "select",
            "cat",
            "stack",
            "chunk",
            "split",
            "unbind",
        )
    ),
}
_LAYOUT_METHODS = {
    "to",
    "view",
    "flatten",
    "unflatten",
    "unsqueeze",
    "squeeze",
    "reshape",
    "expand",
    "permute",
    "transpose",
    "contiguous",
    "clone",
    "detach",
    "narrow",
    "select",
    "repeat",
    "chunk",
    "split",
    "unbind",
}
"""Ops that move a complex table's elements without reading them: the same op on its real and
imaginary parts (each of the table's shape) gives the parts of its result."""


def _passed_tables(gm: fx.GraphModule, constant: set[fx.Node]) -> set[fx.Node]:
    """The complex tensors the call passes (not weights: `constant`) and the layout ops on them
    alone."""
    passed: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if _is_complex(node) and node not in constant:
                passed.add(node)
            continue
        complex_args = [a for a in node.all_input_nodes if _is_complex(a)]
        if complex_args and all(a in passed for a in complex_args) and _is_layout(node):
            passed.add(node)
    return passed


def _is_layout(node: fx.Node) -> bool:
    if node.op == "call_function":
        ok = node.target in _LAYOUT_FUNCTIONS
    else:
        ok = node.op == "call_method" and node.target in _LAYOUT_METHODS
    args = [*node.args, *node.kwargs.values()]
    # no dtype change (``.to(torch.complex128)``, ``.view(torch.float32)``, ``.to(other)``)
    return (
        ok
        and "dtype" not in node.kwargs
        and not any(isinstance(a, torch.dtype) for a in args)
        and not (node.target == "to" and any(isinstance(a, fx.Node) for a in args[1:]))
    )


def _real_parts(gm: fx.GraphModule, passed: set[fx.Node]) -> dict[fx.Node, tuple[fx.Node, ...]]:
    """Each node of `passed` → its real and imaginary parts: ``view_as_real`` of each input,
    then each layout op repeated on the parts."""
    graph, parts = gm.graph, {}
    for node in [n for n in graph.nodes if n in passed]:
        if node.op == "placeholder":
            first = min(node.users, key=lambda u: list(graph.nodes).index(u), default=None)
            if first is None:
                continue
            region = first.meta.get(REGION_KEY)
            with graph.inserting_before(first):
                pairs = graph.call_function(torch.view_as_real, (node,))
                made = [pairs] + [graph.call_function(torch.select, (pairs, -1, i)) for i in (0, 1)]
            value = example_value(node)
            pairs.meta["example_value"] = torch.view_as_real(value)
            for made_node in made:
                made_node.meta[REGION_KEY] = region
            for i, part in enumerate(made[1:]):
                part.meta["example_value"] = pairs.meta["example_value"].select(-1, i)
            parts[node] = tuple(made[1:])
            continue
        copies = []
        for i in (0, 1):
            with graph.inserting_before(node):
                copy = graph.node_copy(node, lambda n, i=i: parts[n][i] if n in parts else n)
            copy.meta = {REGION_KEY: node.meta.get(REGION_KEY)}
            copy.meta["example_value"] = _part(example_value(node), i)
            copies.append(copy)
        parts[node] = tuple(copies)
    return parts


def _part(value: object, i: int) -> object:
    """The real (`i` 0) or imaginary part of a complex example value, or of each in a tuple."""
    if isinstance(value, (list, tuple)):
        return type(value)(_part(v, i) for v in value)
    if isinstance(value, torch.Tensor) and value.is_complex():
        return torch.view_as_real(value).select(-1, i)
    return value


def _real_product(
    gm: fx.GraphModule, product: fx.Node, pairs: fx.Node, real: fx.Node, imag: fx.Node
) -> fx.Node:
    """``(a + ib)(c + id)`` on `pairs` (…, 2) as ``stack((ac - bd, ad + bc), -1)``."""
    graph = gm.graph
    with graph.inserting_before(product):
        a = graph.call_function(torch.select, (pairs, -1, 0))
        b = graph.call_function(torch.select, (pairs, -1, 1))
        ac, bd = (
            graph.call_function(operator.mul, (a, real)),
            graph.call_function(operator.mul, (b, imag)),
        )
        ad, bc = (
            graph.call_function(operator.mul, (a, imag)),
            graph.call_function(operator.mul, (b, real)),
        )
        re = graph.call_function(operator.sub, (ac, bd))
        im = graph.call_function(operator.add, (ad, bc))
        out = graph.call_function(torch.stack, ((re, im), -1))
    region = product.meta.get(REGION_KEY)
    for node in (a, b, ac, bd, ad, bc, re, im, out):
        node.meta[REGION_KEY] = region
    # the product's view_as_real user held the same shape and dtype
    out.meta["example_value"] = example_value(next(iter(product.users)))
    return out


def _is_complex(node: object) -> bool:
    value = example_value(node) if isinstance(node, fx.Node) else None
    values = value if isinstance(value, (list, tuple)) else (value,)
    return any(isinstance(v, torch.Tensor) and v.is_complex() for v in values)
