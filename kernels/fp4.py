"""FP4 formats for GPUs with FP4 tensor cores: NVFP4 and MXFP4 (``QuantConfig(format=...)``).

Both store values as e2m1 (a sign, 2 exponent bits, 1 mantissa bit: ±{0, 0.5, 1, 1.5, 2, 3, 4,
6}) in blocks along K that share one scale:

- ``nvfp4``: blocks of 16, each scale an FP8 e4m3 number, times one float32 scale per tensor
  (weights) or per token (activations) that brings the largest block scale to e4m3's 448;
- ``mxfp4`` (OCP microscaling): blocks of 32, each scale a power of two stored as its E8M0
  exponent, ``2^(floor(log2(absmax)) - 2)`` so that the block's largest value lands in [4, 8)
  (clipped to 6).

Values round to the nearest e2m1 level, ties to the even code, by comparisons with the
midpoints; scales round to nearest even e4m3. Both are plain float arithmetic written the same
way in `exporters/quant_onnx.py`, so the ONNX form computes what this reference does.

``diffopt::fp4_linear`` rotates x (the format's group Hadamard, as the ``int`` format does),
quantizes it per block, and multiplies the dequantized operands in float32: an emulation on
every device, for quality and memory; no FP4 tensor-core kernel yet.
"""

# No `from __future__ import annotations`: torch.library reads the schema from real annotations.
import math
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import register_flop_formula

from .formats import (
    BIAS,
    Constant,
    QuantFormat,
    QuantizedLinear,
    Unsupported,
    X,
    prepare_weight,
    register_quant_format,
)
from .hadamard import rotate
from .ops import linear_flops, linear_output
from .reference import low_rank_branch, pack_int4

E2M1_LEVELS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""The magnitudes of codes 0–7; bit 3 of a code is the sign."""
E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIES_UP = (False, True, False, True, False, True, False)
"""Whether a value exactly on a midpoint goes up: to the even code, as round-to-nearest-even."""
E4M3_MAX = 448.0
E2M1_MAX = 6.0


@dataclass(frozen=True)
class Fp4Kind:
    """One FP4 format: its block along K and how its block scales are stored."""

    name: str
    block: int
    scale: str
    """``e4m3`` (NVFP4, with a second-level float32 scale) or ``e8m0`` (MXFP4: a power of two)."""

    @property
    def scale_table(self) -> torch.Tensor:
        """float32 [256]: the value of each stored scale byte (decoding is one lookup)."""
        if self.scale == "e4m3":
            return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        table = torch.exp2(torch.arange(256, dtype=torch.float32) - 127)
        table[255] = math.nan
        return table


KINDS = {"nvfp4": Fp4Kind("nvfp4", 16, "e4m3"), "mxfp4": Fp4Kind("mxfp4", 32, "e8m0")}


def e2m1_codes(v: torch.Tensor) -> torch.Tensor:
    """uint8 codes (0–15) of float32 `v` already divided by its scale: nearest level, ties to
    the even code, magnitudes past 6 clipped to 6."""
    a = v.abs()
    magnitude = torch.zeros_like(a, dtype=torch.uint8)
    for mid, up in zip(E2M1_MIDPOINTS, _TIES_UP, strict=True):
        magnitude += (a >= mid if up else a > mid).to(torch.uint8)
    return magnitude | ((v < 0).to(torch.uint8) << 3)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of uint8 codes (0–15)."""
    levels = torch.tensor(E2M1_LEVELS, device=codes.device)
    table = torch.cat((levels, -levels))
    return table[codes.long()]


def floor_log2(v: torch.Tensor) -> torch.Tensor:
    """floor(log2(v)) for positive float32 `v`, exact: log2's rounding is corrected by comparing
    with the power of two itself."""
    e = torch.floor(torch.log2(v))
    e = torch.where(torch.exp2(e) > v, e - 1, e)
    return torch.where(torch.exp2(e + 1) <= v, e + 1, e)


def round_e4m3(v: torch.Tensor) -> torch.Tensor:
    """Non-negative float32 `v` rounded to the nearest FP8 e4m3 value (ties to even, saturating
    at 448): 3 mantissa bits, exponents from -6 (below that, subnormal steps of 2^-9)."""
    v = v.clamp(max=E4M3_MAX)
    step = torch.exp2(floor_log2(v.clamp(min=2.0**-6)) - 3)
    return torch.round(v / step) * step


def quantize_fp4(
    rows: torch.Tensor, kind: Fp4Kind, outer: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [R, K] → e2m1 codes uint8 [R, K] and scale bytes uint8 [R, K / block].

    `outer` (NVFP4 only): the second-level scale, [R] or one value, by which the e4m3 block
    scales are multiplied."""
    blocks = rows.unflatten(-1, (-1, kind.block))
    absmax = blocks.abs().amax(dim=-1)
    if kind.scale == "e4m3":
        stored = round_e4m3(absmax / E2M1_MAX / outer.reshape(-1, 1))
        scale_bytes = stored.to(torch.float8_e4m3fn).view(torch.uint8)
    else:
        exponent = torch.where(absmax > 0, floor_log2(absmax) - 2, -127.0).clamp(-127, 127)
        scale_bytes = (exponent + 127).to(torch.uint8)
    scale = block_scales(scale_bytes, kind, outer)
    scaled = torch.where(scale[..., None] > 0, blocks / scale[..., None], 0.0)
    return e2m1_codes(scaled).flatten(-2), scale_bytes


def block_scales(
    scale_bytes: torch.Tensor, kind: Fp4Kind, outer: torch.Tensor | None
) -> torch.Tensor:
    """float32 [R, K / block]: each block's scale (times `outer` for NVFP4)."""
    scale = kind.scale_table.to(scale_bytes.device)[scale_bytes.long()]
    return scale * outer.reshape(-1, 1) if outer is not None else scale


def dequantize_fp4(
    codes: torch.Tensor, scale_bytes: torch.Tensor, kind: Fp4Kind, outer: torch.Tensor | None
) -> torch.Tensor:
    """float32 [R, K]: each value times its block's scale."""
    values = e2m1_values(codes).unflatten(-1, (-1, kind.block))
    return (values * block_scales(scale_bytes, kind, outer)[..., None]).flatten(-2)


def outer_scale(rows: torch.Tensor) -> torch.Tensor:
    """NVFP4's second-level scale of each row of [R, K] (absmax / (6 · 448)), 1 for a zero row,
    so that the largest block scale is e4m3's largest value."""
    absmax = rows.abs().amax(dim=-1)
    return torch.where(absmax > 0, absmax / (E2M1_MAX * E4M3_MAX), 1.0)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [R, K/2] → uint8 codes [R, K] (low nibble first, as `pack_int4` packs)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def fp4_rows(x: torch.Tensor, rotation: torch.Tensor | None, kind: Fp4Kind) -> torch.Tensor:
    """x's rows rotated, quantized to `kind` per block (and token) and dequantized: float32."""
    rows = rotate(x.reshape(-1, x.shape[-1]), rotation)
    outer = outer_scale(rows) if kind.scale == "e4m3" else None
    return dequantize_fp4(*quantize_fp4(rows, kind, outer), kind, outer)


@torch.library.custom_op("diffopt::fp4_linear", mutates_args=())
def fp4_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_outer: torch.Tensor | None,
    bias: torch.Tensor | None,
    rotation: torch.Tensor | None,
    kind: str,
    lowrank_down: torch.Tensor | None = None,
    lowrank_up: torch.Tensor | None = None,
    smooth: torch.Tensor | None = None,
    lowrank_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with W stored by the `kind` FP4 format (packed codes [N, K/2],
    scale bytes [N, K / block], NVFP4's per-tensor float32 scale) and x rotated and quantized
    the same way inside; the branch and smoothing as in ``diffopt::quant_linear``."""
    fmt = KINDS[kind]
    if smooth is not None:
        x = x * smooth.to(x.dtype)
    w = dequantize_fp4(unpack_codes(weight), weight_scale, fmt, weight_outer)
    out = fp4_rows(x, rotation, fmt) @ w.T
    if lowrank_down is not None and lowrank_up is not None:
        branch = low_rank_branch(x, lowrank_down, lowrank_up, lowrank_scale)
        out = out + branch.reshape(out.shape)
    if bias is not None:
        out = out + bias.float()
    return out.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)


fp4_linear.register_fake(linear_output)
register_flop_formula(torch.ops.diffopt.fp4_linear)(linear_flops)


def _prepare(kind: Fp4Kind):
    def prepare(weight: torch.Tensor, config, inputs) -> QuantizedLinear:
        """An FP4 format: the weight (`prepare_weight`) rotated along K, stored as packed e2m1
        codes in blocks with their scale bytes (and NVFP4's per-tensor scale)."""
        k = weight.shape[1]
        if config.gptq or config.scale_group:
            raise Unsupported(
                f"quant.format={kind.name!r} fixes its blocks ({kind.block}) and rounds to "
                "nearest: unset quant.scale_group and quant.gptq (they are for format='int')"
            )
        if k % kind.block:
            raise Unsupported(f"K={k} is not a multiple of {kind.name}'s block of {kind.block}")
        prepared = prepare_weight(weight, config, inputs)
        rows = rotate(prepared.weight.detach(), prepared.rotation)
        outer = outer_scale(rows.reshape(1, -1)) if kind.scale == "e4m3" else None
        codes, scale_bytes = quantize_fp4(rows, kind, outer)
        args = (
            X,
            Constant("qweight", pack_int4(codes)),
            Constant("qscale", scale_bytes),
            Constant("qscale_outer", outer),
            BIAS,
            prepared.rotation_constant(config),
            kind.name,
            *prepared.tail(),
        )
        extras = "".join(f", {e}" for e in prepared.describe(config))
        return QuantizedLinear(
            torch.ops.diffopt.fp4_linear.default,
            args,
            f"{config.label} linear {tuple(weight.shape)}, group {prepared.group or '-'}, "
            f"blocks of {kind.block} ({kind.scale} scales){extras}",
        )

    return prepare


for _kind in KINDS.values():
    register_quant_format(QuantFormat(_kind.name, _prepare(_kind)))
