"""The PyTorch reference of the rotated low-bit linear: also the CPU path of the op.

Every numerical step is written once here; the Triton kernels follow the same formulas (same
rounding, same order of scale multiplications) so the integer parts agree exactly.

Layout: a 4-bit tensor packs two signed values per byte along K, the even index in the low
nibble; an 8-bit tensor is plain int8. Scales are symmetric: ``absmax / qmax``.
"""

from __future__ import annotations

import torch

from .hadamard import rotate

SCALE_DTYPE = torch.float16
"""Weight scales are stored in half precision: 2 bytes per output channel."""


def qmax(bits: int) -> int:
    """The largest magnitude of a symmetric signed integer of `bits` bits (7 for int4)."""
    if bits not in (4, 8):
        raise ValueError(f"only 4- and 8-bit quantization is supported, not {bits}-bit")
    return 2 ** (bits - 1) - 1


def round_half_away(v: torch.Tensor, max_magnitude: float | None = None) -> torch.Tensor:
    """Round to nearest, ties away from zero (what the Triton kernels do, bit for bit), then
    clip the magnitude to `max_magnitude` if given. One new tensor, updated in place."""
    rounded = v.abs().add_(0.5).floor_()
    if max_magnitude is not None:
        rounded.clamp_(max=max_magnitude)
    return rounded.copysign_(v)


def quantize_rows(v: torch.Tensor, bits: int, scale: torch.Tensor | None = None):
    """Symmetric per-row quantization of float32 `v` [R, K]: int8 values and float32 scales [R].

    With `scale` given (a stored, rounded scale), quantize against it instead of the absmax.
    """
    q = qmax(bits)
    if scale is None:
        absmax = v.abs().amax(dim=-1)
        # torch.full_like(...) / absmax, not q / absmax: a scalar numerator becomes a multiply by
        # the reciprocal, which is not correctly rounded and flips ties against the kernels.
        inv = torch.where(absmax > 0, torch.full_like(absmax, q) / absmax, 0.0)
        scale = absmax / q
    else:
        scale = scale.float()
        inv = torch.where(scale > 0, torch.ones_like(scale) / scale, 0.0)
    values = round_half_away(v * inv[:, None], max_magnitude=q).to(torch.int8)
    return values, scale


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in [-8, 7] of shape [R, K] (K even) into uint8 [R, K/2]."""
    if values.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even K, got {values.shape[-1]}")
    nibbles = values.to(torch.uint8) & 0xF
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`: uint8 [R, K/2] → sign-extended int8 [R, K]."""
    signed = packed.view(torch.int8)
    low = (signed << 4) >> 4  # arithmetic shift sign-extends the low nibble
    high = signed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


CLIP_RATIOS = torch.linspace(1.0, 0.5, 26).tolist()
"""Candidate per-channel clipping ratios (× absmax) that `quantize_weight` may search."""


def quantize_weight(
    weight: torch.Tensor,
    bits: int,
    rotation: torch.Tensor | None,
    clip: bool = False,
    scale_group: int | None = None,
    hessian: torch.Tensor | None = None,
    clip_hessian: torch.Tensor | None = None,
    scale_bits: int = 16,
) -> tuple[torch.Tensor, ...]:
    """Offline: rotate [N, K] along K in float32, quantize per output channel (or per group of
    `scale_group` along K), pack if 4-bit.

    With `clip`, each channel's (group's) scale is the `CLIP_RATIOS` multiple of absmax / qmax
    with the least squared error (clipping a few large weights buys resolution for the others):
    of the weight, or with `clip_hessian` (XᵀX [K, K] of the rotated inputs) of the layer's
    output on those inputs, δᵀ H δ for the error δ (per group: H's diagonal block).
    With `hessian` (XᵀX [K, K] of the *rotated* inputs), the values are rounded by GPTQ's error
    feedback against those scales (`gptq.gptq_round`) instead of to nearest.
    Returns the stored weight (uint8 [N, K/2] or int8 [N, K]) and its scales (float16, [N], or
    [N, K / scale_group] with group scales). With ``scale_bits=8`` (group scales only) the
    scales are double-quantized (`double_quantized_scales`): uint8 multipliers [N, G] and a
    float32 scale per row [N] come back instead, three tensors; every candidate scale of the
    clipping search is the stored one, ``q_g · s_row``, so the values are quantized (and the
    error scored) against exactly what the kernels dequantize with.
    """
    if scale_bits not in (8, 16) or (scale_bits == 8 and not scale_group):
        raise ValueError(f"scale_bits={scale_bits}: 16, or 8 with group scales")
    rotated = rotate(weight.detach(), rotation)
    rows = _groups(rotated, scale_group)
    absmax = rows.abs().amax(dim=-1)
    blocks = None if clip_hessian is None else _diagonal_blocks(clip_hessian, rows.shape[1])
    row_scale = None
    if scale_bits == 8:  # from the unclipped scales: every candidate below fits in 8 bits
        row_scale = (absmax / qmax(bits)).reshape(rotated.shape[0], -1).amax(1) / GROUP_SCALE_MAX
    best_scale, best_error, multiplier, best_multiplier = None, None, None, None
    for ratio in CLIP_RATIOS if clip else [1.0]:
        scale = absmax * ratio / qmax(bits)
        if row_scale is None:
            scale = scale.to(SCALE_DTYPE)
        else:  # the multiplier, rounded up: the candidate never clips more than its ratio says
            multiplier = double_quantized_scales(scale.reshape(len(row_scale), -1), row_scale)
            scale = group_scales(multiplier, row_scale).reshape(-1)
            multiplier = multiplier.reshape(-1)
        values, _ = quantize_rows(rows, bits, scale=scale)
        delta = values * scale.float()[:, None] - rows
        if blocks is None:
            error = delta.pow(2).sum(dim=-1)
        else:  # δᵀ H δ group by group: [N, G, g] against [G, g, g]
            d = delta.reshape(-1, *blocks.shape[:2])
            error = (torch.einsum("ngi,gij->ngj", d, blocks) * d).sum(dim=-1).reshape(-1)
        if best_scale is None:
            best_scale, best_error, best_multiplier = scale, error, multiplier
        else:
            better = error < best_error
            best_scale = torch.where(better, scale, best_scale)
            best_error = torch.where(better, error, best_error)
            if multiplier is not None:
                best_multiplier = torch.where(better, multiplier, best_multiplier)
    if hessian is None:
        values = quantize_rows(rows, bits, scale=best_scale)[0].reshape(rotated.shape)
    else:
        from .gptq import gptq_round  # here: gptq builds on this module's rounding

        per_value = best_scale.reshape(rotated.shape[0], -1).repeat_interleave(
            scale_group or rotated.shape[1], dim=1
        )
        values = gptq_round(rotated, per_value, bits, hessian)
    stored = pack_int4(values) if bits == 4 else values
    if scale_group:
        best_scale = best_scale.reshape(rotated.shape[0], -1)
    if row_scale is not None:
        return stored, best_multiplier.reshape(best_scale.shape), row_scale
    return stored, best_scale


GROUP_SCALE_MAX = 255
"""The largest multiplier of a double-quantized group scale (``quant.scale_bits=8``: uint8)."""


def double_quantized_scales(scale: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """Group scales [N, G] as uint8 multipliers of `row_scale` [N] (float32): ``ceil(scale /
    row_scale)`` in [0, 255], so ``q · row_scale >= scale`` up to float32 rounding (a value is
    never clipped further than its scale says); 0 for an all-zero row or group."""
    ratio = scale.float() / torch.where(row_scale > 0, row_scale, 1.0)[:, None]
    return ratio.ceil_().clamp_(0, GROUP_SCALE_MAX).to(torch.uint8)


def group_scales(multiplier: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """Double-quantized group scales as float32 [N, G]: ``q · s_row``, one float32 product (as
    the GEMM kernel folds them at load, so both dequantize with the same scales, bit for bit).
    """
    return multiplier.float() * row_scale.float()[:, None]


def _diagonal_blocks(hessian: torch.Tensor, g: int) -> torch.Tensor:
    """The [G, g, g] diagonal blocks of a [K, K] matrix (G = K / g): the part of XᵀX each
    scale group's values meet."""
    k = hessian.shape[0]
    blocks = hessian.float().reshape(k // g, g, k // g, g).diagonal(dim1=0, dim2=2)
    return blocks.permute(2, 0, 1)


def _groups(rows: torch.Tensor, scale_group: int | None) -> torch.Tensor:
    """[R, K] as one row per scale: itself, or [R · K/g, g] with a scale per group of g."""
    return rows.reshape(-1, scale_group) if scale_group else rows


def low_rank_split(
    weight: torch.Tensor, rank: int, bits: int = 16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """SVDQuant's split of [N, K]: the top-`rank` SVD part as ``down`` [K, r] and ``up`` [r, N]
    (each carries the square root of the singular values), ``scale`` and the residual [N, K]
    the low-bit weight stores: ``x Wᵀ = ((x down) · scale) up + x residualᵀ``.

    16 bits: float16 factors, ``scale`` None. 8 bits: int8 factors, each rank's column of
    ``down`` and row of ``up`` scaled by its absmax, ``scale`` [r] float32 the two scales'
    product; the residual is taken against the rounded branch, so the low-bit weight absorbs
    the rounding instead of the output."""
    u, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    root = s[:rank].sqrt()
    down, up = vh[:rank].T * root, (u[:, :rank] * root).T
    scale = None
    if bits == 16:
        down, up = down.to(torch.float16), up.to(torch.float16)
    else:
        down_t, down_scale = quantize_rows(down.T.contiguous(), 8)  # a scale per rank
        up, up_scale = quantize_rows(up, 8)
        down, scale = down_t.T, down_scale * up_scale
    folded, _ = dequantized_branch(down, up, scale, torch.float32)
    residual = weight.float() - (folded.float() @ up.float()).T
    return down.contiguous(), up.contiguous(), scale, residual


def low_rank_branch(
    x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``((x down) · scale) up`` in float32: the branch beside the integer GEMM (`scale` [r]
    for int8 factors, None for float16 ones)."""
    rows = x.reshape(-1, x.shape[-1]).float() @ down.float()
    if scale is not None:
        rows = rows * scale.float()
    return (rows @ up.float()).reshape(*x.shape[:-1], up.shape[1])


def dequantized_branch(
    down: torch.Tensor, up: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The branch's factors as `dtype` ones, ``scale`` folded into ``down``: what the fused
    Triton kernels take."""
    if scale is None:
        return down, up
    return (down.float() * scale.float()).to(dtype), up.to(dtype)


def stored_values(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The int8 [N, K] values of a stored weight."""
    return unpack_int4(weight) if bits == 4 else weight


def quantize_activation(
    x: torch.Tensor, bits: int, rotation: torch.Tensor | None, scale_group: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Online: rotate rows of [M, K] in float32, quantize per token (or per token and group of
    `scale_group` along K). int8 [M, K], scales [M] (or [M, K / scale_group])."""
    rows = rotate(x, rotation)
    values, scale = quantize_rows(_groups(rows, scale_group), bits)
    if scale_group:
        scale = scale.reshape(rows.shape[0], -1)
    return values.reshape(rows.shape), scale


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] × int8 [N, K]ᵀ → exact int32 [M, N].

    Off CUDA it is a float matmul, exact all the same: every partial sum is an integer of at
    most K · 128² in magnitude, which float32 holds exactly below 2²⁴ (K ≤ 1024) and float64
    below 2⁵³. On CPU that is about 50× faster than ``torch._int_mm`` (measured 0.18 s against
    8.6 s for 10400 × 256 × 1024 at one thread, torch 2.13)."""
    if a.is_cuda:
        return torch._int_mm(a.contiguous(), b.t().contiguous())
    exact = torch.float32 if a.shape[1] * 128 * 128 < 2**24 else torch.float64
    return (a.to(exact) @ b.to(exact).T).to(torch.int32)


def dequantize(
    acc: torch.Tensor,
    act_scale: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """int32 [M, N] → ``acc · s_act · s_weight (+ bias)`` in `dtype`."""
    out = (
        acc.to(torch.float32, copy=True)
        .mul_(act_scale[:, None])
        .mul_(weight_scale.float()[None, :])
    )
    if bias is not None:
        out.add_(bias.float())
    return out.to(dtype)


def dequantize_groups(
    values: torch.Tensor,
    act_scale: torch.Tensor,
    weight_values: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Group scales: int8 [M, K] with scales [M, G] times int8 [N, K] with scales [N, G] →
    ``Σ_g acc_g · s_act[:, g] · s_weight[:, g] (+ bias)`` in `dtype`: one exact integer GEMM
    per group of K / G, scaled and summed in float32 group by group (the Triton kernel's order).
    """
    groups = act_scale.shape[1]
    size = values.shape[1] // groups
    out = torch.zeros(values.shape[0], weight_values.shape[0], device=values.device)
    for g in range(groups):
        part = slice(g * size, (g + 1) * size)
        acc = int_matmul(values[:, part], weight_values[:, part]).to(torch.float32)
        out += acc.mul_(act_scale[:, g, None]).mul_(weight_scale[:, g].float()[None, :])
    if bias is not None:
        out.add_(bias.float())
    return out.to(dtype)


def rotated_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    rotation: torch.Tensor | None,
    act_bits: int,
    weight_bits: int,
    act_scale: float | None = None,
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with W stored by `quantize_weight`: rotate, quantize, GEMM.

    The activation is quantized per token (absmax / qmax), or with one static `act_scale` for
    every token (calibrated offline; values beyond it clip), as TensorRT's INT8 layers need.
    A 2-D `weight_scale` [N, G] means group scales: the activation is quantized per token and
    group too, and each group's products are scaled on their own (`dequantize_groups`).
    """
    rows = x.reshape(-1, x.shape[-1])
    groups = weight_scale.shape[1] if weight_scale.dim() == 2 else None
    if groups is not None:
        if act_scale is not None:
            raise ValueError("a static activation scale has no group form; export per token")
        values, scale = quantize_activation(rows, act_bits, rotation, rows.shape[1] // groups)
        stored = stored_values(weight, weight_bits)
        out = dequantize_groups(values, scale, stored, weight_scale, bias, x.dtype)
        return out.reshape(*x.shape[:-1], weight.shape[0])
    if act_scale is None:
        values, act_scale = quantize_activation(rows, act_bits, rotation)
    else:
        static = torch.full(rows.shape[:1], act_scale, dtype=torch.float32, device=x.device)
        values, act_scale = quantize_rows(rotate(rows, rotation), act_bits, scale=static)
    acc = int_matmul(values, stored_values(weight, weight_bits))
    out = dequantize(acc, act_scale, weight_scale, bias, x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])
