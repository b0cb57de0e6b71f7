"""``diffopt::quant_linear``: the rotated low-bit linear (the ``int`` quantization format) as
one torch.library op.

One op for every bit width (W4A4, W4A8, W8A8) and rotation (``none`` included): the bits are
arguments, the rotation block an optional tensor. CUDA tensors run the Triton kernels; every
other device runs the PyTorch reference (an integer matmul on CPU). The fake implementation gives
torch.compile and torch.export the output's shape without running.
"""

# No `from __future__ import annotations`: torch.library reads the schema from real annotations.
import math

import torch
from torch.utils.flop_counter import register_flop_formula

from . import reference


@torch.library.custom_op("diffopt::quant_linear", mutates_args=())
def quant_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    rotation: torch.Tensor | None,
    act_bits: int,
    weight_bits: int,
    lowrank_down: torch.Tensor | None = None,
    lowrank_up: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    lowrank_scale: torch.Tensor | None = None,
    weight_scale_row: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with W rotated and quantized offline by
    `reference.quantize_weight`, x rotated by `rotation` and quantized per token inside.

    A 2-D `weight_scale` [N, K/g] holds group scales (x is then quantized per token and group):
    float16, or with `weight_scale_row` [N] (float32) uint8 multipliers of it, double-quantized
    scales ``q · s_row``; `lowrank_down` [K, r] and `lowrank_up` [r, N] add SVDQuant's 16-bit
    branch ``(x down) up`` to the low-bit GEMM of the residual (int8 factors with
    `lowrank_scale` [r] between them); `smooth` [K] multiplies x's channels first
    (SmoothQuant's 1 / s, whose s the stored weight carries)."""
    if weight_scale_row is not None:
        _check_row_scale(weight_scale, weight_scale_row)
    if smooth is not None:  # unfused on every device: one elementwise pass over x
        x = x * smooth.to(x.dtype)
    if x.is_cuda:  # the branch fused into both kernels, 8-bit group scales folded at load
        from .triton_quant import rotated_linear  # imported on first use: CPU never needs triton

        if lowrank_down is not None:  # int8 factors as float ones (the kernels compute in
            # float32; the scales folded in float16 would fall into subnormals for small weights)
            lowrank_down, lowrank_up = reference.dequantized_branch(
                lowrank_down, lowrank_up, lowrank_scale, torch.float32
            )
        return rotated_linear(
            x,
            weight,
            weight_scale,
            bias,
            rotation,
            act_bits,
            weight_bits,
            lowrank_down,
            lowrank_up,
            weight_scale_row=weight_scale_row,
        )
    if weight_scale_row is not None:
        weight_scale = reference.group_scales(weight_scale, weight_scale_row)
    out = reference.rotated_linear(x, weight, weight_scale, bias, rotation, act_bits, weight_bits)
    if lowrank_down is not None and lowrank_up is not None:
        branch = reference.low_rank_branch(x, lowrank_down, lowrank_up, lowrank_scale)
        out = out + branch.to(out.dtype)
    return out


def _check_row_scale(weight_scale: torch.Tensor, weight_scale_row: torch.Tensor) -> None:
    """Refuse a scale per row beside anything but the uint8 group multipliers it scales (on
    CPU, per-channel scales [N] would broadcast against it into [N, N] group scales)."""
    if (
        weight_scale.dim() != 2
        or weight_scale.dtype != torch.uint8
        or tuple(weight_scale_row.shape) != (weight_scale.shape[0],)
    ):
        raise ValueError(
            f"weight_scale_row {list(weight_scale_row.shape)} scales 8-bit group scales only "
            f"(uint8 [N, K / g], one row scale per output row N), not weight_scale "
            f"{weight_scale.dtype} {list(weight_scale.shape)}: pass the three tensors "
            "quantize_weight(..., scale_group=g, scale_bits=8) returns, or no weight_scale_row "
            "for float16 scales"
        )


def linear_output(x: torch.Tensor, weight: torch.Tensor, *_: object) -> torch.Tensor:
    """The quantized linear ops' fake (here and `fp4.py`): x's leading dims, one column per
    output channel."""
    return x.new_empty(*x.shape[:-1], weight.shape[0])


quant_linear.register_fake(linear_output)


@torch.library.custom_op("diffopt::quant_linear_static", mutates_args=())
def quant_linear_static(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    rotation: torch.Tensor | None,
    act_scale: float,
    act_bits: int,
    weight_bits: int,
) -> torch.Tensor:
    """`quant_linear` with one calibrated activation scale instead of per-token ones: the form
    the exporter writes for TensorRT (``quant_form="qdq_static"``). PyTorch reference only."""
    return reference.rotated_linear(
        x, weight, weight_scale, bias, rotation, act_bits, weight_bits, act_scale
    )


quant_linear_static.register_fake(linear_output)


def linear_flops(
    x_shape, weight_shape, *args, lowrank_down_shape=None, out_shape=None, **kwargs
) -> int:
    """Integer multiply-adds count like float ones: FLOP ratios stay comparable. The low-rank
    branch adds its two thin matmuls. Shared with ``diffopt::fp4_linear`` (`fp4.py`): in both
    schemas the branch's down projection is the eighth argument."""
    if len(args) > 5:  # the branch passed positionally (smoothing adds no multiply-adds)
        lowrank_down_shape = args[5]
    tokens, k, n = math.prod(x_shape[:-1]), x_shape[-1], weight_shape[0]
    rank = lowrank_down_shape[1] if lowrank_down_shape is not None else 0
    return 2 * tokens * (k * n + rank * (k + n))


# registered without decorating: the registration wraps the function, and fp4.py registers it too
register_flop_formula(torch.ops.diffopt.quant_linear)(linear_flops)
