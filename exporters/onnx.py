"""The ONNX format: each region written to an ONNX file by ``torch.onnx.export`` (dynamo).

A region is written as `regions.Baked` (its weights as constants, its sizes read off its tensor
inputs), traced on its recorded inputs, with the symbolic dimensions dynamo found as dynamic axes;
diffopt's own ops are written in ONNX ops (`quant_onnx`), and so are the aten ops torch's
exporter lacks or writes in a form onnxruntime's CPU provider cannot run (``aten.sort`` as TopK,
boolean ``masked_fill`` as logical ops); attention ONNX cannot express is rewritten before tracing
(`attention`: flex_attention as dense attention, bfloat16 attention in float32), and a complex
input the call passes is bound as its ``view_as_real`` pairs (`regions.as_bound`). These files and
the manifest are the engine directory every format starts from; onnxruntime runs them
(`engine.load_engine`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .attention import attention_for_export
from .formats import ExportError, Format, register_format
from .regions import Baked, RegionInputs, as_bound
from .static_scales import with_static_scales

QUANT_FORMS = {"integer": 18, "qdq": 21, "qdq_static": 21, "custom": 18}
"""How `diffopt::quant_linear` is written, and the ONNX opset each form needs:

- ``integer``: standard ops with exact integer arithmetic (MatMulInteger on the packed int4
  weight, unpacked in the graph); the same numbers as the torch op, on any ONNX runtime. FP4
  linears (``diffopt::fp4_linear``) have only this form: table lookups and a float MatMul;
- ``qdq``: int4 / int8 weight initializers behind blocked DequantizeLinear, per-token
  QuantizeLinear / DequantizeLinear on the rotated activation and a float MatMul (opset 21);
  runtimes may fuse the pattern into integer kernels (onnxruntime CPU kept it as is here);
- ``qdq_static``: as ``qdq`` with one constant activation scale per layer, calibrated on the
  export's example inputs (the absmax of the rotated activation; larger values clip at run
  time): TensorRT's explicit quantization, which needs constant scales (INT8 activations);
- ``custom``: one ``ai.diffopt::W4A4Linear`` node per linear, with the integer form as its
  model-local function: a runtime with that kernel runs it, any other inlines the function.
"""
EXTERNAL_DATA_BYTES = 100 * 2**20
"""Regions whose constants pass this size keep their weights in a side file."""


def write_region(
    lowered: Any,
    examples: list[Any],
    plan: RegionInputs,
    path: Path,
    quant_form: str,
    calibration: list[Any] | None = None,
) -> None:
    """Export one region, traced on `examples`; ``qdq_static`` scales come from `calibration`
    (default: the examples), so a token variant keeps its full region's scales."""
    activations = tuple(as_bound(examples[i]) for i in plan.kept)
    bad = [type(v).__name__ for v in activations if not isinstance(v, torch.Tensor)]
    if bad:
        raise ExportError(
            f"region {lowered.region.name!r} takes non-tensor inputs {bad}, which an engine "
            "cannot feed; export with static shapes (dynamic_batch=False)"
        )
    inner = attention_for_export(lowered.module)
    if quant_form == "qdq_static":
        inner = with_static_scales(inner, calibration or examples)
    module = Baked(inner, examples, plan).eval()
    targets = {
        n.target
        for gm in module.modules()
        if isinstance(gm, torch.fx.GraphModule)
        for n in gm.graph.nodes
    }
    if torch.ops.diffopt.fp4_linear.default in targets and quant_form != "integer":
        raise ExportError(
            f"region {lowered.region.name!r} holds FP4 linears (quant.format nvfp4 / mxfp4): "
            "they have only the integer ONNX form (decomposed: lookups and a float MatMul), "
            f"not quant_form={quant_form!r}; export with quant_form='integer'"
        )
    quantized = bool(
        targets & {torch.ops.diffopt.quant_linear.default, torch.ops.diffopt.fp4_linear.default}
    )
    size = sum(b.numel() * b.element_size() for b in module.buffers())
    # one spec for the *activations varargs: a tuple with one entry per activation
    dynamic = (tuple(plan.dynamic.get(i) for i in plan.kept),) if plan.dynamic else None
    try:
        program = torch.onnx.export(
            module,
            activations,
            input_names=[f"slot_{lowered.inputs[i]}" for i in plan.kept],
            output_names=[f"slot_{s}" for s in lowered.outputs],
            opset_version=QUANT_FORMS[quant_form],
            dynamo=True,
            external_data=size > EXTERNAL_DATA_BYTES,
            verbose=False,
            custom_translation_table=_translations(quant_form),
            dynamic_shapes=dynamic,
            # the integer forms keep the int4 weight packed: the optimizer would fold its unpack
            # into int8 weights; the Q/DQ forms want it folded (into int4 initializers)
            optimize=not quantized or quant_form.startswith("qdq"),
        )
    except Exception as e:  # the exporter's own errors name the op; add where it sits
        raise ExportError(f"region {lowered.region.name!r} could not be exported: {e}") from e
    if quant_form == "custom" and quantized:
        import onnx

        from .quant_onnx import as_custom_nodes

        proto = program.model_proto
        if not as_custom_nodes(proto):  # never a silent integer-form file
            raise ExportError(
                f"region {lowered.region.name!r}: no ONNX nodes of its quant_linear ops were found "
                "(the exporter's pkg.torch.onnx.fx_node metadata is missing in this torch?); "
                "export with quant_form='integer'"
            )
        onnx.save(
            proto,
            str(path),
            save_as_external_data=size > EXTERNAL_DATA_BYTES,
            location=f"{path.name}.data",
        )
    else:
        program.save(str(path), external_data=size > EXTERNAL_DATA_BYTES)


def _translations(quant_form: str) -> dict[Any, Any]:
    """diffopt's own ops, and the aten ops written our way (sort, boolean masked_fill), in ONNX
    ops."""
    import diffopt.kernels  # noqa: F401  (registers torch.ops.diffopt)

    from .quant_onnx import (
        fp4_linear,
        quant_linear,
        quant_linear_custom,
        quant_linear_qdq,
        quant_linear_qdq_static,
    )

    linear = {"qdq": quant_linear_qdq, "custom": quant_linear_custom}.get(quant_form, quant_linear)
    return {
        torch.ops.diffopt.quant_linear.default: linear,
        torch.ops.diffopt.quant_linear_static.default: quant_linear_qdq_static,
        torch.ops.diffopt.fp4_linear.default: fp4_linear,
        torch.ops.aten.masked_fill.Scalar: masked_fill,
        torch.ops.aten.sort.default: sort,
        torch.ops.aten.sort.stable: sort,
    }


def masked_fill(x: Any, mask: Any, value: Any) -> Any:
    """``aten.masked_fill`` with a scalar: Where(mask, value, x), except on booleans, for which
    onnxruntime's CPU provider has no Where kernel (HunyuanVideo's attention mask): there the
    logical form, x OR mask to fill True, x AND NOT mask to fill False."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    if x.dtype == ir.DataType.BOOL:
        return op.Or(x, mask) if value else op.And(x, op.Not(mask))
    return op.Where(mask, op.CastLike(value, x), x)


def sort(x: Any, dim: int = -1, descending: bool = False, stable: bool | None = None) -> Any:
    """``aten.sort``, both overloads (torch's exporter has none for ``stable``, which
    ``Tensor.sort`` and ``argsort`` trace to, and its plain one fails on booleans): TopK over the
    whole axis, which returns the values in order with their indices. TopK breaks ties by the
    lower index, ascending and descending (the ONNX spec; onnxruntime's CPU kernel does), so this
    is a stable sort whatever `stable` says: torch's order where ``stable=True``, and a valid one
    where ``stable=False`` leaves ties in any order (torch's CPU sort may order them otherwise).
    Booleans, which TopK does not take, are sorted as int32, bfloat16 as float32 and uint32 as
    int64 (each exact), the values cast back. Kandinsky 6 SR's NABLA mask sorts a softmax map
    and argsorts a boolean block mask."""
    from onnxscript import ir
    from onnxscript import opset18 as op

    rank = len(x.shape)
    if rank == 0:
        return op.Identity(x), op.Constant(value=ir.tensor(0, dtype=ir.DataType.INT64))
    dim %= rank
    t = ir.DataType
    wider = {t.BOOL: t.INT32, t.BFLOAT16: t.FLOAT, t.UINT32: t.INT64}.get(x.dtype)
    keys = x if wider is None else op.Cast(x, to=wider)
    size = op.Shape(x, start=dim, end=dim + 1)
    values, indices = op.TopK(keys, size, axis=dim, largest=int(descending), sorted=1)
    return (values if wider is None else op.CastLike(values, x)), indices


@register_format("onnx")
class Onnx(Format):
    """ONNX files run by onnxruntime (`engine.load_engine`): the engine directory as written,
    nothing added."""
