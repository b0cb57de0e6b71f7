"""quantize: replace eligible linears with the op of a quantization format (`QuantConfig.format`).

Offline, the format stores each weight (`diffopt.kernels.formats`); what it stores becomes
constants of the graph, and the linear becomes one call of the format's op. With the default
``int`` format that is ``diffopt::quant_linear``: the weight is rotated along K with the group
Hadamard and quantized per output channel (packed two 4-bit values a byte); online, the op
rotates the activation in the same groups, quantizes it per token, multiplies in integers and
dequantizes (`kernels/`).

Which linears: by default those inside the repeated blocks, minus AdaLN modulation and
time-embedding projections (`QuantConfig.exclude`). A layer whose output SQNR on the
capture's inputs falls below `min_sqnr` stays in high precision, reported as a skip. The same
run on the capture's inputs hands each layer's input rows to the format, for the settings that
calibrate on them (`smooth_alpha`, `gptq`).

Under diffusers' tensor parallelism a weight is a DTensor sharded along N (colwise) or K
(rowwise): each rank stores its own shard with its own scales, calibrated on the rows that shard
sees, and the op runs on local tensors between the DTensor the parallel plan hands the layer and
the one it expects back (`_Sharded`).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from fnmatch import fnmatch
from functools import partial
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

from diffopt.config import QuantConfig
from diffopt.kernels import Constant, LinearInputs, QuantizedLinear, Unsupported, quant_format

from .constants import add_constant
from .graph import (
    INPUT_KEY,
    REGION_KEY,
    DenoiserGraph,
    is_dtensor,
    process_group,
    sequence_group,
)
from .manager import register_pass
from .regions import owning_module
from .report import PassReport

_LINEARS = (torch._C._nn.linear, F.linear)


@dataclass
class _Candidate:
    """A linear the config selects, with its weight already stored by the format."""

    where: str
    weight: torch.Tensor
    quantized: QuantizedLinear
    sharded: _Sharded | None = None
    """How tensor parallelism split the weight (None: a plain tensor)."""


@register_pass("quantize", config="quant")
def quantize(graph: DenoiserGraph, config: QuantConfig) -> tuple[DenoiserGraph, PassReport]:
    """Replace each linear the config selects with its format's op (see the module docstring)."""
    report = PassReport("quantize")
    selected = _eligible_linears(graph, config, report)
    chosen, sqnr = _prepare(graph, selected, config, report)
    quantized_bytes = fp16_bytes = 0
    for node, c in chosen.items():
        quality = sqnr.get(node)
        if quality is not None and quality < config.min_sqnr:
            report.skip(
                c.where,
                f"output SQNR {quality:.1f} dB < quant.min_sqnr={config.min_sqnr}: kept in high "
                "precision (exclude it, or lower min_sqnr to quantize it anyway)",
            )
            continue
        q = c.quantized
        with graph.gm.graph.inserting_before(node):
            add = partial(_add_constant, graph.gm, where=c.where, user=node)
            if c.sharded is None:
                op = graph.gm.graph.call_function(q.op, q.bind(node.args[0], _bias(node), add))
                op.meta = dict(node.meta)  # same region, module stack and output value
            else:
                op = c.sharded.call(graph.gm.graph, node, q, add)
        node.replace_all_uses_with(op)
        graph.gm.graph.erase_node(node)
        quantized_bytes += q.stored_bytes
        fp16_bytes += _local(c.weight).numel() * 2
        shown = f", SQNR {quality:.1f} dB" if quality is not None else ""
        report.rewrite(c.where, f"{q.summary}{shown}")
    report.stats.update(
        layers=len(report.rewritten), weight_bytes=quantized_bytes, fp16_weight_bytes=fp16_bytes
    )
    if fp16_bytes:
        report.notes.append(
            f"quantized weights {quantized_bytes / 2**10:.1f} KiB (scales included) vs "
            f"{fp16_bytes / 2**10:.1f} KiB in fp16: {fp16_bytes / quantized_bytes:.2f}× smaller"
        )
    return graph, report


def _bias(node: fx.Node) -> fx.Node | None:
    return node.kwargs.get("bias", node.args[2] if len(node.args) > 2 else None)


def _eligible_linears(
    graph: DenoiserGraph, config: QuantConfig, report: PassReport
) -> dict[fx.Node, tuple[str, torch.Tensor]]:
    """Linears the config selects: their module path and weight."""
    kinds = {r.name: r.kind for r in graph.regions}
    values = _constant_values(graph)
    selected = {}
    kept: dict[str, list[str]] = {
        "outside the blocks (quant.scope='blocks')": [],
        "by quant.include / quant.exclude": [],
    }
    for node in graph.gm.graph.nodes:
        if node.op != "call_function" or node.target not in _LINEARS:
            continue
        where = owning_module(node) or node.name
        if config.scope == "blocks" and kinds.get(node.meta.get(REGION_KEY)) != "block":
            kept["outside the blocks (quant.scope='blocks')"].append(where)
            continue
        if not any(fnmatch(where, p) for p in config.include) or any(
            fnmatch(where, p) for p in config.exclude
        ):
            kept["by quant.include / quant.exclude"].append(where)
            continue
        weight = values.get(node.args[1])
        if weight is None:
            report.skip(where, "its weight is computed in the graph, not a parameter")
            continue
        selected[node] = (where, weight)
    for why, places in kept.items():
        if places:
            report.notes.append(
                f"{len(places)} linears kept in high precision {why}, e.g. {places[0]}"
            )
    return selected


def _prepare(
    graph: DenoiserGraph,
    selected: dict[fx.Node, tuple[str, torch.Tensor]],
    config: QuantConfig,
    report: PassReport,
) -> tuple[dict[fx.Node, _Candidate], dict[fx.Node, float]]:
    """Each selected weight stored by the format (once, here), and with `min_sqnr` its output
    SQNR (dB) under quantization. Both need the layer's inputs when the capture has real ones:
    one run of the graph on them hands each layer its input rows (for calibrated formats) and
    runs the format's op beside it (on CPU its PyTorch reference)."""
    fmt = quant_format(config.format)
    chosen: dict[fx.Node, _Candidate] = {}
    found: dict[fx.Node, float] = {}

    def prepare(node: fx.Node, inputs: LinearInputs | None) -> None:
        where, weight = selected[node]
        try:
            sharded = _Sharded.of(weight)
            stored = fmt.prepare(_local(weight), config, inputs)
            chosen[node] = _Candidate(where, weight, stored, sharded)
        except Unsupported as why:
            report.skip(where, str(why))

    calibrated = (
        config.smooth_alpha is not None or config.gptq or config.weight_clip in ("auto", "output")
    )
    real = _has_real_inputs(graph)
    if not real or not (calibrated or config.min_sqnr is not None):
        if not real and config.min_sqnr is not None:
            report.skip("graph", "no real example inputs to measure SQNR on; set min_sqnr=None")
        for node in selected:
            prepare(node, None)
        return chosen, found

    # under context parallelism each rank sees a shard of the sequence: statistics and SQNRs
    # are reduced over its group, so every rank prepares and keeps the same layers
    group = process_group(sequence_group(graph))

    class Calibrate(fx.Interpreter):
        def run_node(self, node: fx.Node):
            out = super().run_node(node)
            if node in selected:
                x = _local(self.env[node.args[0]])  # a tensor-parallel shard sees its rows
                prepare(node, LinearInputs(x.detach().reshape(-1, x.shape[-1]).float(), group))
                if node in chosen and config.min_sqnr is not None:
                    c, bias = chosen[node], _bias(node)
                    bias, exact = bias and self.env[bias], out
                    if c.sharded is not None:  # each shard's own output, summed over the shards
                        bias = _local(bias) if c.sharded.colwise else None
                        exact = F.linear(x, _local(c.weight), bias)
                    args = c.quantized.bind(x, bias, lambda k: k.value)
                    shards = c.sharded and c.sharded.group
                    found[node] = _sqnr(exact, c.quantized.op(*args), group or shards)
            return out

    # dynamic shapes pass sizes as SymInts: run at the sizes the capture saw
    inputs = [v.node.hint if isinstance(v, torch.SymInt) else v for v in graph.example_inputs]
    with torch.no_grad():
        Calibrate(graph.gm).run(*inputs)
    return chosen, found


@dataclass(frozen=True)
class _Sharded:
    """A weight that diffusers' tensor parallelism split over a 1-D mesh: along N (colwise,
    ``Shard(0)``: the output's features are sharded) or along K (rowwise, ``Shard(1)``: each
    rank's output is a partial sum over its slice of the input's features)."""

    colwise: bool
    group: Any
    """The mesh's process group: what a layer's SQNR is summed over."""

    @staticmethod
    def of(weight: torch.Tensor) -> _Sharded | None:
        """How `weight` is sharded; None for a plain tensor; `Unsupported` for other layouts."""
        if not is_dtensor(weight):
            return None
        from torch.distributed.tensor import Shard

        placements = tuple(weight.placements)
        if len(placements) != 1 or placements[0] not in (Shard(0), Shard(1)):
            raise Unsupported(
                f"its weight is a DTensor placed {placements}; only a 1-D mesh's colwise "
                "(Shard(0)) or rowwise (Shard(1)) split is quantized"
            )
        return _Sharded(placements[0] == Shard(0), weight.device_mesh.get_group())

    def call(self, graph: fx.Graph, node: fx.Node, q: QuantizedLinear, add: Any) -> fx.Node:
        """The nodes that replace `node`: the op on this rank's shard, between the DTensors the
        parallel plan passes in and expects back (a rowwise bias is added once, after the
        partial sums are reduced)."""
        x, bias = node.args[0], _bias(node)
        local = dict(node.meta)
        local.pop("val", None)  # the shard's value, not the DTensor's
        local.pop("example_value", None)

        def call(target: Any, args: tuple, meta: dict) -> fx.Node:
            new = graph.call_function(target, args)
            new.meta = dict(meta)
            return new

        x = call(_local, (x,), local)
        own_bias = call(_local, (bias,), local) if bias is not None and self.colwise else None
        y = call(q.op, q.bind(x, own_bias, add), local)
        out = call(_as_dtensor, (y, node.args[0], self.colwise), node.meta)
        if bias is not None and not self.colwise:
            out = call(operator.add, (out, bias), node.meta)
        return out


def _local(value: Any) -> Any:
    """This rank's shard of a DTensor; anything else as it is."""
    return value.to_local() if is_dtensor(value) else value


def _as_dtensor(y: torch.Tensor, like: Any, colwise: bool) -> Any:
    """A shard's output as the DTensor the parallel plan expects, on `like`'s mesh (the layer's
    input): features sharded (colwise), or the partial sums reduced (rowwise)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    mesh = like.device_mesh
    if colwise:
        return DTensor.from_local(y, mesh, [Shard(y.dim() - 1)], run_check=False)
    partial_sums = DTensor.from_local(y, mesh, [Partial()], run_check=False)
    return partial_sums.redistribute(mesh, [Replicate()])


def _constant_values(graph: DenoiserGraph) -> dict[fx.Node, torch.Tensor]:
    """The real tensors behind parameter placeholders and get_attr constants."""
    placeholders = [n for n in graph.gm.graph.nodes if n.op == "placeholder"]
    values: dict[fx.Node, torch.Tensor] = {}
    for node, value in zip(placeholders, graph.example_inputs, strict=False):
        if node.meta.get(INPUT_KEY) in ("param", "buffer") and _is_real(value):
            values[node] = value
    for node in graph.gm.graph.nodes:
        if node.op == "get_attr" and _is_real(value := _attr(graph.gm, node.target)):
            values[node] = value
    return values


def _has_real_inputs(graph: DenoiserGraph) -> bool:
    """Whether the capture's example inputs are real tensors (not fake ones) to run on."""
    return all(_is_real(v) or not isinstance(v, torch.Tensor) for v in graph.example_inputs)


def _sqnr(reference: torch.Tensor, approx: torch.Tensor, group: Any = None) -> float:
    """10·log10(signal / noise) in dB, both summed over the group's ranks when given."""
    signal = reference.double().pow(2).sum()
    noise = (reference.double() - approx.double()).pow(2).sum()
    if group is not None:
        both = torch.stack((signal, noise))
        torch.distributed.all_reduce(both, group=group)
        signal, noise = both
    signal, noise = signal.item(), noise.item()
    return math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)


def _add_constant(
    gm: fx.GraphModule, constant: Constant, where: str, user: fx.Node
) -> fx.Node | None:
    """A get_attr node of `constant`, a buffer named after it (and `where` unless shared)."""
    if constant.value is None:
        return None
    name = constant.name if constant.shared else f"{where}.{constant.name}"
    return add_constant(gm, name.replace(".", "_"), constant.value, user)


def _attr(gm: fx.GraphModule, target: str) -> object:
    value: object = gm
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def _is_real(value: object) -> bool:
    return isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor)
