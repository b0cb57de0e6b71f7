"""remove_noops: drop ops that provably return their input unchanged.

Dynamo keeps eval-mode dropout, casts to the current dtype and views to the current shape in
the graph. They cost a kernel launch or an allocation in eager regions, and some export badly:
a ``squeeze(dim)`` on a dimension that is not 1 becomes a real ONNX Squeeze that onnxruntime
rejects (seen with PixArt). Each rule is a function that returns the node's input when the node
is a no-op, judged from the shapes and dtypes recorded at capture.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from diffopt.config import CleanupConfig

from .graph import REGION_KEY, DenoiserGraph, example_value
from .manager import register_pass
from .report import PassReport

Rule = Callable[[fx.Node], "fx.Node | None"]


def _arg(node: fx.Node, index: int, name: str, default: object) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _static_tensor(value: object) -> torch.Tensor | None:
    """The captured tensor, if its shape is fully known (not symbolic)."""
    if isinstance(value, torch.Tensor) and all(isinstance(d, int) for d in value.shape):
        return value
    return None


def noop_dropout(node: fx.Node) -> fx.Node | None:
    if node.op == "call_function" and node.target in (F.dropout, torch.dropout):
        p, training = _arg(node, 1, "p", 0.5), _arg(node, 2, "training", True)
        if p == 0 or training is False:
            return node.args[0]
    return None


def noop_squeeze(node: fx.Node) -> fx.Node | None:
    is_squeeze = (node.op == "call_method" and node.target == "squeeze") or (
        node.op == "call_function" and node.target is torch.squeeze
    )
    dim = _arg(node, 1, "dim", None)
    if not is_squeeze or not isinstance(dim, int):
        return None
    # only the squeezed dimension matters, and a symbolic one (dynamic shapes) counts when its
    # range excludes 1: dynamo marks dynamic sizes as >= 2
    source = example_value(node.args[0])
    if (
        isinstance(source, torch.Tensor)
        and -source.ndim <= dim < source.ndim
        and statically_known_true(source.shape[dim] != 1)
    ):
        return node.args[0]
    return None


def noop_view(node: fx.Node) -> fx.Node | None:
    is_view = (node.op == "call_method" and node.target in ("view", "reshape")) or (
        node.op == "call_function" and node.target is torch.reshape
    )
    if not is_view:
        return None
    source = _static_tensor(example_value(node.args[0]))
    result = _static_tensor(example_value(node))
    if source is not None and result is not None and source.shape == result.shape:
        return node.args[0]
    return None


def noop_cast(node: fx.Node) -> fx.Node | None:
    if node.op != "call_method" or node.target not in ("to", "type"):
        return None
    # Only the pure dtype form: .to(dtype) / .type(dtype). Device moves and copies stay.
    if len(node.args) != 2 or node.kwargs or not isinstance(node.args[1], torch.dtype):
        return None
    source = example_value(node.args[0])
    if isinstance(source, torch.Tensor) and source.dtype == node.args[1]:
        return node.args[0]
    return None


RULES: dict[str, Rule] = {
    "dropout": noop_dropout,
    "squeeze": noop_squeeze,
    "same_shape_views": noop_view,
    "same_dtype_casts": noop_cast,
}
"""Each rule is switched by the `CleanupConfig` field of the same name."""


@register_pass("remove_noops", config="cleanup")
def remove_noops(graph: DenoiserGraph, config: CleanupConfig) -> tuple[DenoiserGraph, PassReport]:
    """Replace every no-op node with its input and erase it."""
    report = PassReport("remove_noops")
    rules = {name: rule for name, rule in RULES.items() if getattr(config, name)}
    for node in list(graph.gm.graph.nodes):
        for name, rule in rules.items():
            source = rule(node)
            if isinstance(source, fx.Node):
                node.replace_all_uses_with(source)
                graph.gm.graph.erase_node(node)
                report.rewrite(
                    f"{node.meta.get(REGION_KEY)} / {node.name}", f"removed no-op {name}"
                )
                break
    return graph, report
