"""`diffopt::w4a4_linear` in ONNX: the same arithmetic as `kernels/reference.py`, in standard ops.

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

from typing import Any

from onnxscript import FLOAT, INT8, INT64
from onnxscript import opset18 as op


def w4a4_linear(
    x: Any,
    weight: Any,
    weight_scale: Any,
    bias: Any,
    rotation: Any,
    act_bits: int,
    weight_bits: int,
) -> Any:
    """Translation of ``torch.ops.diffopt.w4a4_linear`` for ``torch.onnx.export``."""
    q = float(2 ** (act_bits - 1) - 1)
    k = op.Shape(x, start=-1)
    rows = op.Cast(
        op.Reshape(x, op.Concat(op.Constant(value_ints=[-1]), k, axis=0)), to=FLOAT.dtype
    )
    if rotation is not None:
        group = op.Shape(rotation, start=-1)
        grouped = op.Reshape(rows, op.Concat(op.Constant(value_ints=[-1]), group, axis=0))
        rows = op.Reshape(op.MatMul(grouped, rotation),
                          op.Concat(op.Constant(value_ints=[-1]), k, axis=0))  # fmt: skip
    absmax = op.ReduceMax(op.Abs(rows), op.Constant(value_ints=[-1]), keepdims=1)
    positive = op.Greater(absmax, op.Constant(value_float=0.0))
    safe = op.Where(positive, absmax, op.Constant(value_float=1.0))
    inverse = op.Where(positive, op.Div(op.Constant(value_float=q), safe),
                       op.Constant(value_float=0.0))  # fmt: skip
    scaled = op.Mul(rows, inverse)
    rounded = op.Mul(op.Floor(op.Add(op.Abs(scaled), op.Constant(value_float=0.5))),
                     op.Sign(scaled))  # fmt: skip
    values = op.Cast(op.Clip(rounded, op.Constant(value_float=-q), op.Constant(value_float=q)),
                     to=INT8.dtype)  # fmt: skip
    stored = _unpack_int4(weight) if weight_bits == 4 else weight
    acc = op.MatMulInteger(values, op.Transpose(stored, perm=[1, 0]))
    out = op.Mul(op.Mul(op.Cast(acc, to=FLOAT.dtype), op.Div(absmax, op.Constant(value_float=q))),
                 op.Cast(weight_scale, to=FLOAT.dtype))  # fmt: skip
    if bias is not None:
        out = op.Add(out, op.Cast(bias, to=FLOAT.dtype))
    shape = op.Concat(op.Shape(x, end=-1), op.Shape(weight, start=0, end=1), axis=0)
    return op.CastLike(op.Reshape(out, shape), x)


def _unpack_int4(packed: Any) -> Any:
    """uint8 [N, K/2] (low nibble = even k) → int8 [N, K], sign-extended."""
    low = op.BitwiseAnd(packed, op.Constant(value=_uint8(15)))
    high = op.BitShift(packed, op.Constant(value=_uint8(4)), direction="RIGHT")
    pairs = op.Concat(op.Unsqueeze(low, op.Constant(value_ints=[-1])),
                      op.Unsqueeze(high, op.Constant(value_ints=[-1])), axis=-1)  # fmt: skip
    nibbles = op.Cast(pairs, to=INT64.dtype)
    signed = op.Where(op.GreaterOrEqual(nibbles, op.Constant(value_int=8)),
                      op.Sub(nibbles, op.Constant(value_int=16)), nibbles)  # fmt: skip
    shape = op.Concat(op.Shape(packed, start=0, end=1), op.Constant(value_ints=[-1]), axis=0)
    return op.Cast(op.Reshape(signed, shape), to=INT8.dtype)


def _uint8(value: int) -> Any:
    import numpy as np
    import onnx

    return onnx.numpy_helper.from_array(np.array(value, dtype=np.uint8))
