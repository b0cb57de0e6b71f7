"""Static activation scales for quantized layers: the ``qdq_static`` form's calibration.

TensorRT's explicit quantization needs one constant activation scale per layer. Before a region
is written in that form, it runs on calibration inputs (the export's examples; a token variant
uses its full region's) and each ``quant_linear`` becomes a ``quant_linear_static`` holding the
absmax of its rotated input over qmax: larger values clip at run time.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .regions import graph_module


def with_static_scales(module: nn.Module, examples: list[Any]) -> nn.Module:
    """A copy of a region whose `quant_linear` ops become `quant_linear_static`, each with one
    activation scale: the absmax of its rotated input on `examples`, over qmax."""
    from diffopt.kernels import rotate
    from diffopt.kernels.reference import qmax

    from .quant_onnx import integer_form_only

    linear = torch.ops.diffopt.quant_linear.default
    if not any(n.target is linear for n in graph_module(module).graph.nodes):
        return module  # nothing quantized in this region: no calibration run
    module = copy.deepcopy(module)
    gm = graph_module(module)
    absmax: dict[str, float] = {}

    class Calibrate(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node) -> Any:
            if node.target is linear:
                branch, smooth = (node.args[i] if len(node.args) > i else None for i in (7, 9))
                integer_form_only("qdq_static", self.env[node.args[2]], branch, smooth)
                x, rotation = self.env[node.args[0]], node.args[4] and self.env[node.args[4]]
                rows = x.detach().reshape(-1, x.shape[-1]).float()
                absmax[node.name] = float(rotate(rows, rotation).abs().max())
            return super().run_node(node)

    with torch.no_grad():
        Calibrate(gm).run(*examples)
    for node in gm.graph.nodes:
        if node.target is linear:
            x, weight, scale, bias, rotation, act_bits, weight_bits = node.args
            act_scale = max(absmax[node.name], 1e-12) / qmax(act_bits)
            node.target = torch.ops.diffopt.quant_linear_static.default
            node.args = (x, weight, scale, bias, rotation, act_scale, act_bits, weight_bits)
    gm.recompile()
    return module
