"""`diffopt::quant_linear` in ONNX: the same arithmetic as `kernels/reference.py`, in standard ops.

ONNX has no int4 × int4 matmul, so the op is written out (the *decomposed* form):

- the activation's group rotation is an explicit MatMul with the constant Hadamard block;
- per-token quantization is ReduceMax(|x|), a correctly rounded Div, round-half-away-from-zero
  (Floor(|v| + 0.5) · Sign(v), as the kernels round) and Clip;
- the packed int4 weight stays packed in the file (two values a byte, low nibble first); BitwiseAnd
  and BitShift unpack it (onnxruntime folds that away at load, since the weight is a constant);
- the GEMM is MatMulInteger (int8 × int8 → int32, exact), then both scales and the bias.

So an exported quantized region computes the integer parts exactly as the torch op does.
"""

from __future__ import annotations

import re
from typing import Any

from onnx import TensorProto
from onnxscript import FLOAT, INT8, INT64
from onnxscript import opset18 as op


def quant_linear(
    x: Any,
    weight: Any,
    weight_scale: Any,
    bias: Any,
    rotation: Any,
    act_bits: int,
    weight_bits: int,
    lowrank_down: Any = None,
    lowrank_up: Any = None,
    smooth: Any = None,
    lowrank_scale: Any = None,
    weight_scale_row: Any = None,
) -> Any:
    """Translation of ``torch.ops.diffopt.quant_linear`` for ``torch.onnx.export``: per token
    and channel, or with group scales (a 2-D `weight_scale`) one MatMulInteger per group, plus
    the low-rank branch as two float MatMuls; smoothing is a Mul by the constant factors.
    8-bit group scales (`weight_scale_row` given) are dequantized as the kernels do: the uint8
    multipliers cast to float, times the row's float32 scale."""
    q = float(2 ** (act_bits - 1) - 1)
    rows = _rotated_rows(x, rotation, smooth)
    stored = _unpack_int4(weight) if weight_bits == 4 else weight
    if len(weight_scale.shape) == 2:
        out = _group_gemm(rows, stored, weight_scale, q, weight_scale_row)
    else:
        values, act_scale = _quantize_rows(rows, q)
        acc = op.MatMulInteger(values, op.Transpose(stored, perm=[1, 0]))
        out = op.Mul(
            op.Mul(op.Cast(acc, to=FLOAT.dtype), act_scale),
            op.Cast(weight_scale, to=FLOAT.dtype),
        )
    if lowrank_down is not None:
        out = op.Add(out, _branch(x, smooth, lowrank_down, lowrank_up, lowrank_scale))
    return _finish(out, x, weight, bias)


def _quantize_rows(rows: Any, q: float) -> tuple[Any, Any]:
    """Symmetric quantization along the last axis (absmax / q, rounded half away from zero):
    int8 values and the scales, keeping the last axis as 1."""
    absmax = op.ReduceMax(op.Abs(rows), op.Constant(value_ints=[-1]), keepdims=1)
    positive = op.Greater(absmax, op.Constant(value_float=0.0))
    safe = op.Where(positive, absmax, op.Constant(value_float=1.0))
    inverse = op.Where(
        positive, op.Div(op.Constant(value_float=q), safe), op.Constant(value_float=0.0)
    )
    scaled = op.Mul(rows, inverse)
    rounded = op.Mul(
        op.Floor(op.Add(op.Abs(scaled), op.Constant(value_float=0.5))), op.Sign(scaled)
    )
    values = op.Cast(
        op.Clip(rounded, op.Constant(value_float=-q), op.Constant(value_float=q)), to=INT8.dtype
    )
    return values, op.Div(absmax, op.Constant(value_float=q))


def _group_gemm(rows: Any, stored: Any, weight_scale: Any, q: float, row_scale: Any) -> Any:
    """Group scales: rows [M, K] quantized per token and group of g = K / G, one exact
    MatMulInteger per group ([G, M, g] × [G, g, N]), each scaled by its two scales, summed
    (`row_scale` [N]: the weight's are uint8 multipliers of it, ``q · s_row`` in float32)."""
    n, groups = weight_scale.shape  # static: the scales are a constant
    weight_scale = op.Cast(weight_scale, to=FLOAT.dtype)
    if row_scale is not None:
        weight_scale = op.Mul(
            weight_scale,
            op.Unsqueeze(op.Cast(row_scale, to=FLOAT.dtype), op.Constant(value_ints=[1])),
        )
    grouped = op.Reshape(rows, op.Constant(value_ints=[0, groups, -1]))  # [M, G, g]
    values, act_scale = _quantize_rows(op.Transpose(grouped, perm=[1, 0, 2]), q)  # [G, M, g]
    weights = op.Transpose(
        op.Reshape(stored, op.Constant(value_ints=[n, groups, -1])), perm=[1, 2, 0]
    )  # [G, g, N]
    acc = op.Cast(op.MatMulInteger(values, weights), to=FLOAT.dtype)  # [G, M, N]
    w_scale = op.Unsqueeze(
        op.Transpose(weight_scale, perm=[1, 0]), op.Constant(value_ints=[1])
    )  # [G, 1, N]
    return op.ReduceSum(
        op.Mul(op.Mul(acc, act_scale), w_scale), op.Constant(value_ints=[0]), keepdims=0
    )


def _branch(x: Any, smooth: Any, down: Any, up: Any, scale: Any) -> Any:
    """The low-rank branch ``((x down) · scale) up`` as float MatMuls (`scale`: int8 factors')."""
    rows = op.MatMul(_rotated_rows(x, None, smooth), op.Cast(down, to=FLOAT.dtype))
    if scale is not None:
        rows = op.Mul(rows, op.Cast(scale, to=FLOAT.dtype))
    return op.MatMul(rows, op.Cast(up, to=FLOAT.dtype))


def _rotated_rows(x: Any, rotation: Any, smooth: Any = None) -> Any:
    """x as float32 rows [M, K] (times the smoothing factors), rotated in groups by the
    constant Hadamard block."""
    k = op.Shape(x, start=-1)
    rows = op.Cast(
        op.Reshape(x, op.Concat(op.Constant(value_ints=[-1]), k, axis=0)), to=FLOAT.dtype
    )
    if smooth is not None:
        rows = op.Mul(rows, op.Cast(smooth, to=FLOAT.dtype))
    if rotation is None:
        return rows
    group = op.Shape(rotation, start=-1)
    grouped = op.Reshape(rows, op.Concat(op.Constant(value_ints=[-1]), group, axis=0))
    return op.Reshape(
        op.MatMul(grouped, rotation), op.Concat(op.Constant(value_ints=[-1]), k, axis=0)
    )


def _finish(out: Any, x: Any, weight: Any, bias: Any) -> Any:
    """Add the bias, restore x's leading dims and dtype."""
    if bias is not None:
        out = op.Add(out, op.Cast(bias, to=FLOAT.dtype))
    shape = op.Concat(op.Shape(x, end=-1), op.Shape(weight, start=0, end=1), axis=0)
    return op.CastLike(op.Reshape(out, shape), x)


def _unpack_int4(packed: Any) -> Any:
    """uint8 [N, K/2] (low nibble = even k) → int8 [N, K], sign-extended."""
    nibbles = _nibbles(packed)
    signed = op.Where(
        op.GreaterOrEqual(nibbles, op.Constant(value_int=8)),
        op.Sub(nibbles, op.Constant(value_int=16)),
        nibbles,
    )
    return op.Cast(signed, to=INT8.dtype)


def _nibbles(packed: Any) -> Any:
    """uint8 [N, K/2] (low nibble = even k) → int64 [N, K] in 0–15."""
    low = op.BitwiseAnd(packed, op.Constant(value=_uint8(15)))
    high = op.BitShift(packed, op.Constant(value=_uint8(4)), direction="RIGHT")
    pairs = op.Concat(
        op.Unsqueeze(low, op.Constant(value_ints=[-1])),
        op.Unsqueeze(high, op.Constant(value_ints=[-1])),
        axis=-1,
    )
    shape = op.Concat(op.Shape(packed, start=0, end=1), op.Constant(value_ints=[-1]), axis=0)
    return op.Reshape(op.Cast(pairs, to=INT64.dtype), shape)


def _uint8(value: int) -> Any:
    import numpy as np
    import onnx

    return onnx.numpy_helper.from_array(np.array(value, dtype=np.uint8))


def quant_linear_custom(
    x: Any,
    weight: Any,
    weight_scale: Any,
    bias: Any,
    rotation: Any,
    act_bits: int,
    weight_bits: int,
    lowrank_down: Any = None,
    lowrank_up: Any = None,
    smooth: Any = None,
    lowrank_scale: Any = None,
    weight_scale_row: Any = None,
) -> Any:
    """`quant_linear` for the *custom* form, which wraps per-token layers only."""
    integer_form_only("custom", weight_scale, lowrank_down, smooth)
    return quant_linear(x, weight, weight_scale, bias, rotation, act_bits, weight_bits)


def integer_form_only(form: str, weight_scale: Any, lowrank_down: Any, smooth: Any) -> None:
    """Refuse a layer with group scales (a 2-D `weight_scale`), a branch or smoothing in
    another form."""
    from .formats import ExportError

    if len(weight_scale.shape) == 2 or lowrank_down is not None or smooth is not None:
        raise ExportError(
            "quantized linears with group scales, a low-rank branch or smoothing have only the "
            f"integer ONNX form, not quant_form={form!r}; export with quant_form='integer'"
        )


def quant_linear_qdq(
    x: Any,
    weight: Any,
    weight_scale: Any,
    bias: Any,
    rotation: Any,
    act_bits: int,
    weight_bits: int,
    lowrank_down: Any = None,
    lowrank_up: Any = None,
    smooth: Any = None,
    lowrank_scale: Any = None,
    weight_scale_row: Any = None,
) -> Any:
    """The *Q/DQ* form (opset 21), for runtimes that fuse QuantizeLinear / DequantizeLinear
    around a float MatMul into integer kernels.

    The weight is an int4 (or int8) [K, N] constant behind a blocked DequantizeLinear (one block
    per output channel: ``block_size=K``); the activation's rotation is the same constant MatMul,
    then a per-token QuantizeLinear / DequantizeLinear pair. Same arithmetic as the integer form
    except QuantizeLinear's rounding (ties to even, not away from zero): a value exactly halfway
    between two levels can land one level apart.
    """
    integer_form_only("qdq", weight_scale, lowrank_down, smooth)
    q = float(2 ** (act_bits - 1) - 1)
    rows = _rotated_rows(x, rotation)
    absmax = op.ReduceMax(op.Abs(rows), op.Constant(value_ints=[-1]), keepdims=0)
    positive = op.Greater(absmax, op.Constant(value_float=0.0))
    act_scale = op.Where(
        positive, op.Div(absmax, op.Constant(value_float=q)), op.Constant(value_float=1.0)
    )
    return _qdq_matmul(rows, act_scale, 0, x, weight, weight_scale, bias, act_bits, weight_bits)


def quant_linear_qdq_static(
    x: Any,
    weight: Any,
    weight_scale: Any,
    bias: Any,
    rotation: Any,
    act_scale: float,
    act_bits: int,
    weight_bits: int,
) -> Any:
    """The *static Q/DQ* form (opset 21) of ``diffopt::quant_linear_static``: as `quant_linear_qdq`
    but with one constant activation scale, calibrated at export; the form TensorRT's explicit
    quantization builds (INT8 activations; INT4 only as weight-only, so not the A4 layers)."""
    # clip to ±qmax·scale first: QuantizeLinear saturates to [-qmax-1, qmax], the op to ±qmax
    limit = act_scale * (2 ** (act_bits - 1) - 1)
    rows = op.Clip(
        _rotated_rows(x, rotation), op.Constant(value_float=-limit), op.Constant(value_float=limit)
    )
    scale = op.Constant(value_float=act_scale)
    return _qdq_matmul(rows, scale, 1, x, weight, weight_scale, bias, act_bits, weight_bits)


def _qdq_matmul(
    rows: Any,
    act_scale: Any,
    axis: int,
    x: Any,
    weight: Any,
    weight_scale: Any,
    bias: Any,
    act_bits: int,
    weight_bits: int,
) -> Any:
    """Q/DQ of the rotated rows with `act_scale` (per token, or one scalar), times the blocked-DQ
    weight, plus the bias."""
    from onnxscript import opset21 as op21

    low_bits = {4: TensorProto.INT4, 8: TensorProto.INT8}
    act = op21.DequantizeLinear(
        op21.QuantizeLinear(rows, act_scale, axis=axis, output_dtype=low_bits[act_bits]),
        act_scale,
        axis=axis,
    )
    stored = _unpack_int4(weight) if weight_bits == 4 else weight
    k = weight.shape[1] * (2 if weight_bits == 4 else 1)  # static: the weight is a constant
    # [K, N], one block of K per output channel: the layout onnxruntime's DQ→MatMulNBits fusion
    # looks for (in our check it did not fire on the tiny DiT)
    w_scale = op.Unsqueeze(op.Cast(weight_scale, to=FLOAT.dtype), op.Constant(value_ints=[0]))
    values = op.Transpose(op21.Cast(stored, to=low_bits[weight_bits]), perm=[1, 0])
    out = op.MatMul(act, op21.DequantizeLinear(values, w_scale, axis=0, block_size=k))
    return _finish(out, x, weight, bias)


CUSTOM_DOMAIN = "ai.diffopt"
"""The domain of the custom-form node: ``ai.diffopt::W4A4Linear``."""


def as_custom_nodes(model: Any) -> int:
    """The *custom* form: each `quant_linear`'s integer decomposition in `model` (an exported
    ``onnx.ModelProto``, edited in place) becomes one ``ai.diffopt::W4A4Linear`` node.

    The node's inputs are the op's (x, packed weight, weight scales[, bias][, rotation]); its
    attributes the bit widths. The decomposition stays in the file as a model-local function of
    the same name, so a runtime with a W4A4Linear kernel runs its own, and any other (onnxruntime
    included) inlines the function: the fallback. Variants (bits, bias, rotation) are function
    overloads. Returns how many nodes were replaced.
    """
    import onnx

    from .onnx import ExportError

    graph = model.graph
    groups: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        origin = next(
            (p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.fx_node"), ""
        )
        if "diffopt.quant_linear" in origin:
            groups.setdefault(origin, []).append(i)
    functions: dict[str, Any] = {}
    replacements: dict[int, Any] = {}
    dropped: set[int] = set()
    for origin, indices in groups.items():
        body = [graph.node[i] for i in indices]
        *_, bias, rotation, act_bits, weight_bits = _op_args(origin)
        # `quant_linear` above reads its inputs first in this order
        roles = [
            "x",
            *(["rotation"] * (rotation is not None)),
            "weight",
            "scale",
            *(["bias"] * (bias is not None)),
        ]
        external = _inputs(body)
        if len(external) != len(roles):
            raise ExportError(f"the ONNX form of {origin!r} reads {external}, expected {roles}")
        named = dict(zip(roles, external, strict=True))
        inputs = [named[r] for r in ("x", "weight", "scale", "bias", "rotation") if r in named]
        outputs = _outputs(body, graph, set(indices))
        overload = f"a{act_bits}w{weight_bits}" + "".join(
            f"_{role}" for role in ("bias", "rotation") if role in named
        )
        if overload not in functions:
            functions[overload] = onnx.helper.make_function(
                CUSTOM_DOMAIN,
                "W4A4Linear",
                inputs,
                outputs,
                body,
                opset_imports=list(model.opset_import),
            )
            functions[overload].overload = overload
        call = onnx.helper.make_node(
            "W4A4Linear",
            inputs,
            outputs,
            name=f"w4a4_{len(replacements)}",
            domain=CUSTOM_DOMAIN,
            act_bits=act_bits,
            weight_bits=weight_bits,
        )
        call.overload = overload
        replacements[indices[-1]] = call  # after every node the group reads from
        dropped.update(indices)
    nodes = [
        replacements.get(i, n)
        for i, n in enumerate(graph.node)
        if i in replacements or i not in dropped
    ]
    del graph.node[:]
    graph.node.extend(nodes)
    model.functions.extend(functions.values())
    if functions:
        model.opset_import.append(onnx.helper.make_opsetid(CUSTOM_DOMAIN, 1))
    return len(replacements)


def _op_args(origin: str) -> list[Any]:
    """The op's arguments from the exporter's record of its fx node: names (``%add_3``), None
    for an absent one, ints for the bit widths."""
    listed = re.search(r"args = \((.*)\), kwargs", origin).group(1).split(", ")
    return [None if a == "None" else int(a) if a.isdigit() else a for a in listed]


def _inputs(body: list[Any]) -> list[str]:
    """Values `body` reads but does not produce, in order of first use."""
    produced = {o for node in body for o in node.output}
    return list(dict.fromkeys(n for node in body for n in node.input if n and n not in produced))


def _outputs(body: list[Any], graph: Any, inside: set[int]) -> list[str]:
    """Values `body` produces that the rest of `graph` reads."""
    produced = [o for node in body for o in node.output]
    read = {o.name for o in graph.output} | {
        name for i, node in enumerate(graph.node) if i not in inside for name in node.input
    }
    return [o for o in produced if o in read]


def fp4_linear(
    x: Any,
    weight: Any,
    weight_scale: Any,
    weight_outer: Any,
    bias: Any,
    rotation: Any,
    kind: str,
    lowrank_down: Any = None,
    lowrank_up: Any = None,
    smooth: Any = None,
    lowrank_scale: Any = None,
) -> Any:
    """Translation of ``torch.ops.diffopt.fp4_linear`` (`kernels/fp4.py`, same formulas): the
    activation's block scales and e2m1 rounding by comparisons, the stored codes and scale bytes
    decoded by table lookups, a float MatMul."""
    from diffopt.kernels.fp4 import E2M1_LEVELS, KINDS

    fmt = KINDS[kind]
    rows = _rotated_rows(x, rotation, smooth)
    blocks = op.Reshape(rows, op.Constant(value_ints=[0, -1, fmt.block]))  # [M, K/b, b]
    absmax = op.ReduceMax(op.Abs(blocks), op.Constant(value_ints=[-1]), keepdims=1)
    zero, two = op.Constant(value_float=0.0), op.Constant(value_float=2.0)
    if fmt.scale == "e4m3":
        rowmax = op.ReduceMax(op.Abs(rows), op.Constant(value_ints=[-1]), keepdims=1)
        outer = op.Where(
            op.Greater(rowmax, zero),
            op.Div(rowmax, op.Constant(value_float=6.0 * 448.0)),
            op.Constant(value_float=1.0),
        )
        outer = op.Unsqueeze(outer, op.Constant(value_ints=[-1]))  # [M, 1, 1]
        scale = op.Mul(
            _round_e4m3(op.Div(op.Div(absmax, op.Constant(value_float=6.0)), outer)), outer
        )
    else:
        exponent = op.Where(
            op.Greater(absmax, zero),
            op.Sub(_floor_log2(absmax), two),
            op.Constant(value_float=-127.0),
        )
        clipped = op.Clip(exponent, op.Constant(value_float=-127.0), op.Constant(value_float=127.0))
        scale = op.Pow(two, clipped)
    scaled = op.Where(op.Greater(scale, zero), op.Div(blocks, scale), zero)
    magnitude = op.Abs(scaled)
    levels = op.Constant(value_floats=list(E2M1_LEVELS))
    index = op.Constant(value=_int64(0))
    for mid, up in zip(*_midpoints(), strict=True):
        edge = op.Constant(value_float=mid)
        hit = op.GreaterOrEqual(magnitude, edge) if up else op.Greater(magnitude, edge)
        index = op.Add(index, op.Cast(hit, to=INT64.dtype))
    value = op.Gather(levels, index)
    signed = op.Where(op.Less(scaled, zero), op.Neg(value), value)
    x_rows = op.Reshape(op.Mul(signed, scale), op.Shape(rows))
    table = op.Constant(value_floats=fmt.scale_table.tolist())
    w_scale = op.Gather(table, op.Cast(weight_scale, to=INT64.dtype))  # [N, K/b]
    if weight_outer is not None:
        w_scale = op.Mul(w_scale, weight_outer)
    codes = op.Reshape(
        _nibbles(weight),
        op.Concat(op.Shape(weight_scale), op.Constant(value_ints=[fmt.block]), axis=0),
    )
    signed_levels = op.Concat(levels, op.Neg(levels), axis=0)
    w_rows = op.Mul(
        op.Gather(signed_levels, codes), op.Unsqueeze(w_scale, op.Constant(value_ints=[-1]))
    )
    w_rows = op.Reshape(
        w_rows,
        op.Concat(op.Shape(weight_scale, start=0, end=1), op.Constant(value_ints=[-1]), axis=0),
    )
    out = op.MatMul(x_rows, op.Transpose(w_rows, perm=[1, 0]))
    if lowrank_down is not None:
        out = op.Add(out, _branch(x, smooth, lowrank_down, lowrank_up, lowrank_scale))
    return _finish(out, x, weight, bias)


def _midpoints() -> tuple[tuple[float, ...], tuple[bool, ...]]:
    from diffopt.kernels.fp4 import _TIES_UP, E2M1_MIDPOINTS

    return E2M1_MIDPOINTS, _TIES_UP


def _floor_log2(v: Any) -> Any:
    """`kernels.fp4.floor_log2`: floor(log2 v), corrected against the power of two itself."""
    two = op.Constant(value_float=2.0)
    one = op.Constant(value_float=1.0)
    e = op.Floor(op.Div(op.Log(v), op.Constant(value_float=0.6931471805599453)))
    e = op.Where(op.Greater(op.Pow(two, e), v), op.Sub(e, one), e)
    return op.Where(op.LessOrEqual(op.Pow(two, op.Add(e, one)), v), op.Add(e, one), e)


def _round_e4m3(v: Any) -> Any:
    """`kernels.fp4.round_e4m3`: to the nearest e4m3 value, ties to even, saturating at 448."""
    v = op.Min(v, op.Constant(value_float=448.0))
    smallest = op.Constant(value_float=2.0**-6)
    step = op.Pow(
        op.Constant(value_float=2.0),
        op.Sub(_floor_log2(op.Max(v, smallest)), op.Constant(value_float=3.0)),
    )
    return op.Mul(op.Round(op.Div(v, step)), step)


def _int64(value: int) -> Any:
    import numpy as np
    import onnx

    return onnx.numpy_helper.from_array(np.array(value, dtype=np.int64))
