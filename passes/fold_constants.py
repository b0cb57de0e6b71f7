"""fold_constants: values computed from the model's weights with ops an engine cannot run.

WanAnimate's motion encoder orthogonalizes a weight on every call (``torch.linalg.qr(weight)``),
and torch's ONNX exporter has no function for QR, SVD and their kin. Such a value depends only on
the model's constants, so this pass evaluates it once on the capture's weights and the graph
reads the result as a constant: the result of each of `FoldConfig.ops` whose inputs are all
constants. What the model computes from that result stays in the graph, as does the rest.
`diffopt.export` turns it on.
"""

from __future__ import annotations

import operator

import torch

from diffopt.config import FoldConfig

from .constants import (
    NotFoldable,
    add_constant,
    ancestors,
    constant_nodes,
    erase_unread,
    fold_values,
    location,
    op_name,
)
from .graph import DenoiserGraph, example_value
from .manager import register_pass
from .report import PassReport


@register_pass("fold_constants", config="fold")
def fold_constants(graph: DenoiserGraph, config: FoldConfig) -> tuple[DenoiserGraph, PassReport]:
    """Fold the constant values computed with `config.ops` (see the module docstring)."""
    report = PassReport("fold_constants")
    gm = graph.gm
    constant = constant_nodes(gm)
    # each listed op's result (each tensor of a tuple such as QR's); what is computed from it
    # (a transpose, a cast) stays in the graph, on the constant
    wanted = set()
    for node in constant:
        if node.op.startswith("call") and op_name(node) in config.ops:
            if isinstance(example_value(node), torch.Tensor):
                wanted.add(node)
            else:
                wanted.update(u for u in node.users if u.target is operator.getitem)
    if not wanted:
        return graph, report
    try:
        values = fold_values(gm, wanted, graph.example_inputs)
    except NotFoldable as e:
        report.skip(e.where, f"cannot be folded: {e.why}")
        return graph, report
    for node in sorted(wanted, key=lambda n: n.name):
        value = values[node]
        if not isinstance(value, torch.Tensor):
            report.skip(location(node), f"it is a {type(value).__name__}, not a tensor")
            continue
        op = next(op_name(a) for a in ancestors({node}) if op_name(a) in config.ops)
        for reader in list(node.users):
            reader.replace_input_with(node, add_constant(gm, f"folded_{node.name}", value, reader))
        report.rewrite(location(node), f"{op} of weights, folded: {tuple(value.shape)}")
    erase_unread(gm, constant)
    report.stats["folded_bytes"] = sum(
        v.numel() * v.element_size() for v in values.values() if isinstance(v, torch.Tensor)
    )
    return graph, report
