"""real_rotary: complex rotary embeddings rewritten as real arithmetic.

Qwen-Image, Z-Image, NucleusMoE-Image and AnyFlow rotate queries and keys by a complex product,
``view_as_real(view_as_complex(x) * freqs)``, where ``freqs`` is a complex table the model builds
from its own constants (split, index, cat and polar on complex buffers, sized by the static
latent shape). ONNX has no complex tensors and torch's exporter has no decomposition for most
ops on them, so such models could not be exported. The table depends only on constants, so
this pass evaluates it once on the capture's values, keeps its real and imaginary parts as two
constants, and writes the product in real pairs: (a + ib)(c + id) = (ac - bd) + i(ad + bc).
The complex ops that built the table leave the graph. `diffopt.export` turns the pass on.

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
    products, covered = [], set()
    for node in gm.graph.nodes:
        match = _rotary_product(node, constant)
        if match is not None:
            products.append((node, *match))
            covered.update((node, match[0]))
    leftover = [
        n for n in gm.graph.nodes if _is_complex(n) and n not in constant and n not in covered
    ]
    for node in leftover:
        if node.op == "placeholder":  # Lumina-Next: the pipeline computes the table
            why = (
                "the call passes this complex tensor, and an engine binds real tensors only: "
                "compute the rotary table inside the model (from its sizes), or export a wrapper "
                "that takes torch.view_as_real of it"
            )
        else:
            why = (
                f"complex op {node.target!r} on values computed from the call's inputs, which "
                "is not the rotary pattern view_as_real(view_as_complex(x) * table) with a "
                "constant table (a table sized by a dynamic resolution is one: export that "
                "axis static)"
            )
        report.skip(location(node), why)
    if not products:
        return graph, report
    if leftover:
        report.notes.append("no product rewritten: the graph keeps complex ops either way")
        return graph, report
    tables = {table for _, _, table in products}
    try:
        values = fold_values(gm, tables, graph.example_inputs)
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
    for product, rotated, table in products:
        real, imag = (
            add_constant(gm, f"rotary_{table.name}_{part}", getattr(folded[table], part), product)
            for part in ("real", "imag")
        )
        pairs = _real_product(gm, product, rotated.args[0], real, imag)
        for user in list(product.users):
            user.replace_all_uses_with(pairs)
            gm.graph.erase_node(user)
        gm.graph.erase_node(product)
        shape = tuple(folded[table].shape)
        report.rewrite(location(product), f"complex product by a {shape} table")
    erase_unread(gm, constant | {rotated for _, rotated, _ in products})
    report.stats["tables"] = len(folded)
    report.stats["table_bytes"] = sum(v.numel() * v.element_size() for v in folded.values())
    return graph, report


def _rotary_product(node: fx.Node, constant: set[fx.Node]) -> tuple[fx.Node, fx.Node] | None:
    """(the view_as_complex node, the constant table) if `node` is a rotary product whose
    every user takes it back to real pairs."""
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
            and table in constant
            and _is_complex(table)
        ):
            return rotated, table
    return None


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
