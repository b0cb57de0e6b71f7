"""Triton kernels of the rotated low-bit linear: fused rotate + quantize + pack, and int GEMM.

The formulas are the reference's (`kernels/reference.py`), step for step. Two ideas keep the
kernels short:

- Even and odd K columns are kept apart. Packing puts k = 2i and 2i + 1 in one byte, so the
  rotation is computed as two dots, one against the even and one against the odd columns of
  the (block-diagonal) Hadamard tile, and the two halves are packed without any shuffle.
- The GEMM never interleaves the nibbles back: ``Σ_k a_k b_k`` is the even sum plus the odd
  sum, so it unpacks each operand to two int8 tiles in registers and issues two int8 dots into
  one int32 accumulator. This is 4-bit memory with int8-class compute (H100/H200 have no
  int4 tensor cores).

Set ``TRITON_INTERPRET=1`` before importing this module to run the kernels on CPU tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

from .reference import qmax

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _round_half_away(v):
    return tl.where(v >= 0, tl.floor(v + 0.5), -tl.floor(-v + 0.5))


@triton.jit
def _activation_tile(x_ptr, rows, row_mask, k0, K, stride_xm, BLOCK_K: tl.constexpr):
    """The [BLOCK_M, BLOCK_K] activation tile at k0 (zeros past K)."""
    ks = k0 + tl.arange(0, BLOCK_K)
    return tl.load(
        x_ptr + rows[:, None] * stride_xm + ks[None, :],
        mask=row_mask[:, None] & (ks[None, :] < K),
        other=0.0,
    )


@triton.jit
def _rotated_chunk(
    x,
    x_ptr,
    rows,
    row_mask,
    k0,
    c0,
    K,
    stride_xm,
    h_even_ptr,
    h_odd_ptr,
    ROTATE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Rotated values of the tile at k0 at k = k0 + 2c (even) and k0 + 2c + 1 (odd) for c in
    [c0, c0 + CHUNK), in float32. `x` is that tile, loaded once per K tile, when rotating;
    without rotation the values are read straight from `x_ptr` and `x` is unused.

    CHUNK column pairs at a time keep each dot's Hadamard operand at [BLOCK_K, CHUNK]: a whole
    256-group tile ([256, 128] twice) would not fit in shared memory next to the activations.
    """
    cols = c0 + tl.arange(0, CHUNK)
    if ROTATE:
        # The block-diagonal Hadamard tile is the same for every K tile (it stays in cache).
        h = tl.arange(0, BLOCK_K)[:, None] * (BLOCK_K // 2) + cols[None, :]
        even = tl.dot(x, tl.load(h_even_ptr + h), input_precision=PRECISION)
        odd = tl.dot(x, tl.load(h_odd_ptr + h), input_precision=PRECISION)
    else:
        ks = k0 + 2 * cols
        base = x_ptr + rows[:, None] * stride_xm + ks[None, :]
        even = tl.load(base, mask=row_mask[:, None] & (ks[None, :] < K), other=0.0)
        odd = tl.load(base + 1, mask=row_mask[:, None] & (ks[None, :] + 1 < K), other=0.0)
        even, odd = even.to(tl.float32), odd.to(tl.float32)
    return even, odd


@triton.jit
def _store_codes(
    even,
    odd,
    inv,
    out_ptr,
    rows,
    row_mask,
    k0,
    c0,
    K,
    KH,
    stride_om,
    QMAX: tl.constexpr,
    PACK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Quantize a chunk's even and odd values by `inv` (per row) and store them; at 4 bits two
    a byte, the even k in the low nibble (byte kh holds k = 2·kh and 2·kh + 1)."""
    q_even = tl.clamp(_round_half_away(even * inv[:, None]), -QMAX, QMAX).to(tl.int8)
    q_odd = tl.clamp(_round_half_away(odd * inv[:, None]), -QMAX, QMAX).to(tl.int8)
    if PACK:
        kh = k0 // 2 + c0 + tl.arange(0, CHUNK)
        tl.store(
            out_ptr + rows[:, None] * stride_om + kh[None, :],
            (q_even & 0xF) | (q_odd << 4),
            mask=row_mask[:, None] & (kh[None, :] < KH),
        )
    else:
        ks = k0 + 2 * (c0 + tl.arange(0, CHUNK))
        base = out_ptr + rows[:, None] * stride_om + ks[None, :]
        tl.store(base, q_even, mask=row_mask[:, None] & (ks[None, :] < K))
        tl.store(base + 1, q_odd, mask=row_mask[:, None] & (ks[None, :] + 1 < K))


@triton.jit
def _inverse_scale(absmax, scale_ptr, offsets, mask, QMAX: tl.constexpr):
    """Store absmax / QMAX at `offsets`; return QMAX / absmax (0 for an all-zero span).
    Correctly rounded divisions, as torch's: the compiled default is approximate."""
    q = tl.full(absmax.shape, QMAX, tl.float32)
    safe = tl.where(absmax > 0, absmax, 1.0)
    tl.store(scale_ptr + offsets, tl.div_rn(absmax, q), mask=mask)
    return tl.where(absmax > 0, tl.div_rn(q, safe), 0.0)


@triton.jit
def _rotate_quantize_kernel(
    x_ptr,
    h_even_ptr,
    h_odd_ptr,
    out_ptr,
    scale_ptr,
    down_ptr,
    branch_ptr,
    M,
    K,
    KH,
    R,
    stride_xm,
    stride_om,
    QMAX: tl.constexpr,
    PACK: tl.constexpr,
    ROTATE: tl.constexpr,
    LOAD_X: tl.constexpr,
    GROUPED: tl.constexpr,
    RANK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CHUNK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Rotate, quantize and pack rows of x: per token (two passes over K), or with GROUPED per
    token and group of 2·CHUNK values (one pass: a chunk is a group). With RANK > 0 the first
    pass also computes the low-rank branch's down projection ``x · down`` [M, R] (R ≤ RANK)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    ranks = tl.arange(0, RANK if RANK > 0 else 16)
    branch = tl.zeros([BLOCK_M, RANK if RANK > 0 else 16], dtype=tl.float32)

    # Pass 1: the per-token absmax of the rotated row (recomputing the rotation in pass 2 is
    # cheaper than holding a whole row of K values in registers); grouped, the whole job. The
    # chunk loops are real loops, not unrolled, so every chunk reuses one set of shared-memory
    # operand buffers.
    absmax = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = _activation_tile(x_ptr, rows, row_mask, k0, K, stride_xm, BLOCK_K) if LOAD_X else k0
        if RANK > 0:  # SVDQuant's down projection rides the pass over x
            ks = k0 + tl.arange(0, BLOCK_K)
            down = tl.load(
                down_ptr + ks[:, None] * R + ranks[None, :],
                mask=(ks[:, None] < K) & (ranks[None, :] < R),
                other=0.0,
            )
            branch += tl.dot(x.to(tl.float32), down.to(tl.float32), input_precision=PRECISION)
        for c0 in range(0, BLOCK_K // 2, CHUNK):
            even, odd = _rotated_chunk(
                x,
                x_ptr,
                rows,
                row_mask,
                k0,
                c0,
                K,
                stride_xm,
                h_even_ptr,
                h_odd_ptr,
                ROTATE,
                BLOCK_K,
                CHUNK,
                PRECISION,
            )
            chunk_max = tl.maximum(tl.max(tl.abs(even), axis=1), tl.max(tl.abs(odd), axis=1))
            if GROUPED:  # this chunk is one scale group: quantize it now
                groups = K // (2 * CHUNK)
                g = (k0 // 2 + c0) // CHUNK
                inv = _inverse_scale(
                    chunk_max,
                    scale_ptr,
                    rows * groups + g,
                    row_mask & (rows * 0 + g < groups),
                    QMAX,
                )
                _store_codes(
                    even, odd, inv, out_ptr, rows, row_mask, k0, c0, K, KH, stride_om,
                    QMAX, PACK, CHUNK,
                )  # fmt: skip
            else:
                absmax = tl.maximum(absmax, chunk_max)
    if RANK > 0:
        tl.store(
            branch_ptr + rows[:, None] * R + ranks[None, :],
            branch,
            mask=row_mask[:, None] & (ranks[None, :] < R),
        )
    if not GROUPED:
        inv = _inverse_scale(absmax, scale_ptr, rows, row_mask, QMAX)
        # Pass 2: quantize and pack.
        for k0 in range(0, K, BLOCK_K):
            x = _activation_tile(x_ptr, rows, row_mask, k0, K, stride_xm, BLOCK_K) if ROTATE else k0
            for c0 in range(0, BLOCK_K // 2, CHUNK):
                even, odd = _rotated_chunk(
                    x,
                    x_ptr,
                    rows,
                    row_mask,
                    k0,
                    c0,
                    K,
                    stride_xm,
                    h_even_ptr,
                    h_odd_ptr,
                    ROTATE,
                    BLOCK_K,
                    CHUNK,
                    PRECISION,
                )
                _store_codes(
                    even, odd, inv, out_ptr, rows, row_mask, k0, c0, K, KH, stride_om,
                    QMAX, PACK, CHUNK,
                )  # fmt: skip


@triton.jit
def _load_pair(ptr, rows, kh, row_mask, K, KH, stride, PACKED: tl.constexpr):
    """The int8 values at k = 2·kh and 2·kh + 1 of a row-major [rows, K] operand.

    `rows` and `kh` broadcast against each other ([R, 1] with [1, KH], or transposed), so the
    same loader gives the GEMM's A tile and its transposed B tile.
    """
    if PACKED:
        # `kh < KH` (KH = ceil(K / 2), an argument, so the compiler knows when it divides 16),
        # not `2·kh < K`: a mask uniform over aligned runs of bytes lets the compiler issue
        # wide async copies and pipeline the K loop
        byte = tl.load(ptr + rows * stride + kh, mask=row_mask & (kh < KH), other=0)
        even = (byte << 4) >> 4  # arithmetic shifts sign-extend each nibble
        odd = byte >> 4
    else:
        base = ptr + rows * stride + 2 * kh
        even = tl.load(base, mask=row_mask & (2 * kh < K), other=0)
        odd = tl.load(base + 1, mask=row_mask & (2 * kh + 1 < K), other=0)
    return even, odd


@triton.jit
def _int_gemm_kernel(
    a_ptr,
    b_ptr,
    a_scale_ptr,
    b_scale_ptr,
    b_row_ptr,
    bias_ptr,
    branch_ptr,
    up_ptr,
    out_ptr,
    M,
    N,
    K,
    KH,
    R,
    stride_am,
    stride_bn,
    stride_om,
    A_PACKED: tl.constexpr,
    B_PACKED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RANK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    JOIN_K: tl.constexpr,
    GROUPS: tl.constexpr,
    ROW_SCALED: tl.constexpr,
):
    """``(A Bᵀ) · s_a · s_b (+ bias)``; with GROUPS > 0 the scales are [M, GROUPS] and
    [N, GROUPS], one group per K tile (BLOCK_KH = half a group): each tile's int32 sum is
    scaled and added in float32 before the next tile starts. With ROW_SCALED the B group
    scales are uint8 multipliers of a float32 scale per row ([N] at `b_row_ptr`), folded into
    ``q · s_row`` at load. With RANK > 0 the epilogue adds the low-rank branch's up projection
    ``branch · up`` ([M, R] · [R, N], R ≤ RANK)."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = rm < M, rn < N
    if ROW_SCALED:  # double-quantized group scales: the rows' own scale, read once
        b_row = tl.load(b_row_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    grouped = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, KH, BLOCK_KH):
        kh = k0 + tl.arange(0, BLOCK_KH)
        a_even, a_odd = _load_pair(
            a_ptr, rm[:, None], kh[None, :], m_mask[:, None], K, KH, stride_am, A_PACKED
        )
        b_even, b_odd = _load_pair(
            b_ptr, rn[None, :], kh[:, None], n_mask[None, :], K, KH, stride_bn, B_PACKED
        )
        if JOIN_K:  # one dot over K = 2·BLOCK_KH: re-interleave even and odd in registers
            a = tl.reshape(tl.join(a_even, a_odd), [BLOCK_M, 2 * BLOCK_KH])
            b = tl.reshape(tl.permute(tl.join(b_even, b_odd), (0, 2, 1)), [2 * BLOCK_KH, BLOCK_N])
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        else:  # two dots, no shuffle
            acc += tl.dot(a_even, b_even, out_dtype=tl.int32)
            acc += tl.dot(a_odd, b_odd, out_dtype=tl.int32)
        if GROUPS > 0:  # the tile is one scale group: scale its sum now, start the next
            g = k0 // BLOCK_KH
            a_scale = tl.load(a_scale_ptr + rm * GROUPS + g, mask=m_mask, other=0.0)
            b_scale = tl.load(b_scale_ptr + rn * GROUPS + g, mask=n_mask, other=0.0)
            if ROW_SCALED:
                b_scale = b_scale.to(tl.float32) * b_row
            grouped += (
                acc.to(tl.float32)
                * a_scale.to(tl.float32)[:, None]
                * b_scale.to(tl.float32)[None, :]
            )
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)

    if GROUPS > 0:
        out = grouped
    else:
        a_scale = tl.load(a_scale_ptr + rm, mask=m_mask, other=0.0).to(tl.float32)
        b_scale = tl.load(b_scale_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        out = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if RANK > 0:
        ranks = tl.arange(0, RANK)
        branch = tl.load(
            branch_ptr + rm[:, None] * R + ranks[None, :],
            mask=m_mask[:, None] & (ranks[None, :] < R),
            other=0.0,
        )
        up = tl.load(
            up_ptr + ranks[:, None] * N + rn[None, :],
            mask=(ranks[:, None] < R) & n_mask[None, :],
            other=0.0,
        )
        out += tl.dot(branch, up.to(tl.float32), input_precision="ieee")
    tl.store(
        out_ptr + rm[:, None] * stride_om + rn[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


@dataclass(frozen=True)
class Tiles:
    """Tile sizes and launch settings of both kernels (`benchmarks/w4a4_gpu.py --sweep` times
    a grid of them on a GPU)."""

    block_m: int = 128
    block_n: int = 128
    block_kh: int = 64
    """The GEMM's K tile in bytes of a packed row: 2·block_kh values, two int8 dots."""
    join_k: bool = False
    """The GEMM issues one dot over the re-interleaved K tile instead of two (for the sweep)."""
    quant_block_m: int = 32
    """The rotate-quantize kernel's rows per program."""
    block_k: int = 64
    """The rotate-quantize kernel's K tile (raised to the rotation group when smaller)."""
    chunk: int = 32
    """Column pairs per rotation dot in the rotate-quantize kernel (at most block_k / 2)."""
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        # Triton's aranges need powers of two, and its dots at least 16 along every side
        names = ("block_m", "block_n", "block_kh", "quant_block_m", "block_k", "chunk")
        sizes = {name: getattr(self, name) for name in names}
        bad = [f"{name}={size}" for name, size in sizes.items() if size < 16 or size & (size - 1)]
        if bad:
            raise ValueError(f"Tiles sizes must be powers of two of at least 16, not {bad}")


INTERPRETER_TILES = Tiles(
    block_m=64, block_n=64, block_kh=64, quant_block_m=64, block_k=128, chunk=64
)
"""The interpreter pays per program, a GPU per register: big tiles there, MMA-sized on GPU."""


def _tiles(device: torch.device, tiles: Tiles | None) -> Tiles:
    if tiles is not None:
        return tiles
    return INTERPRETER_TILES if INTERPRETED or device.type != "cuda" else Tiles()


_COLUMNS: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""rotation tensor → {(block_k, dtype, device, version): (even, odd) columns}."""


def hadamard_columns(
    rotation: torch.Tensor, block_k: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The even and odd columns of the block-diagonal [block_k, block_k] tile of `rotation`, in
    the activations' dtype. Built once per rotation tensor (and per in-place change of it):
    rebuilding them every call would cost three small launches per linear on a GPU."""
    group = rotation.shape[0]

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        tile = torch.block_diag(*[rotation] * (block_k // group)).to(device, dtype)
        return tile[:, 0::2].contiguous(), tile[:, 1::2].contiguous()

    if rotation.is_inference():  # no version counter to notice an in-place change: no cache
        return build()
    built = _COLUMNS.setdefault(rotation, {})
    key = (block_k, dtype, torch.device(device), rotation._version)
    if key not in built:
        for stale in [k for k in built if k[3] != rotation._version]:
            del built[stale]
        built[key] = build()
    return built[key]


def rotate_quantize(
    x: torch.Tensor,
    bits: int,
    rotation: torch.Tensor | None,
    tiles: Tiles | None = None,
    scale_group: int | None = None,
    down: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Rotate each row of [M, K] in groups, quantize per row (or per row and `scale_group`
    values along K); pack two values a byte at 4 bits. With `down` [K, r], also ``x · down``.

    Returns uint8 [M, ceil(K/2)] (4-bit) or int8 [M, K] (8-bit), float32 scales [M] (or
    [M, K / scale_group]), and the float32 [M, r] down projection (None without `down`).
    """
    m, k = x.shape
    x = x.contiguous()
    tiles = _tiles(x.device, tiles)
    group = None if rotation is None else rotation.shape[0]
    rank = 0 if down is None else down.shape[1]
    settings = rotate_quantize_settings(bits, group, x.dtype, tiles, scale_group, rank)
    if rotation is not None:
        h_even, h_odd = hadamard_columns(rotation, settings["BLOCK_K"], x.dtype, x.device)
    else:
        h_even = h_odd = x  # unused
    out = torch.empty(m, (k + 1) // 2 if bits == 4 else k, dtype=torch.int8, device=x.device)
    scale_shape = (m, k // scale_group) if scale_group else (m,)
    scale = torch.empty(scale_shape, dtype=torch.float32, device=x.device)
    branch = torch.empty(m, rank, dtype=torch.float32, device=x.device) if rank else None
    _rotate_quantize_kernel[(triton.cdiv(m, tiles.quant_block_m),)](
        x,
        h_even,
        h_odd,
        out,
        scale,
        x if down is None else down.contiguous(),
        scale if branch is None else branch,
        m,
        k,
        (k + 1) // 2,
        rank,
        x.stride(0),
        out.stride(0),
        **settings,
    )
    return (out.view(torch.uint8) if bits == 4 else out), scale, branch


def _rank_tile(rank: int) -> int:
    """The branch's tile width: a power of two of at least 16 (a dot's least side); 0: none."""
    return 0 if rank == 0 else max(16, triton.next_power_of_2(rank))


def rotate_quantize_settings(
    bits: int,
    group: int | None,
    dtype: torch.dtype,
    tiles: Tiles,
    scale_group: int | None = None,
    rank: int = 0,
) -> dict[str, object]:
    """The rotate-quantize kernel's compile-time constants and launch options (shared with
    benchmarks/kernel_resources.py, which compiles the same launch for sm_90). With
    `scale_group` a chunk of column pairs is one scale group."""
    block_k = max(tiles.block_k, group or 0, scale_group or 0)  # whole groups a tile
    return dict(
        QMAX=qmax(bits),
        PACK=bits == 4,
        ROTATE=group is not None,
        LOAD_X=group is not None or rank > 0,  # pass 1 reads x tiles (else chunks read x)
        GROUPED=scale_group is not None,
        RANK=_rank_tile(rank),
        BLOCK_M=tiles.quant_block_m,
        BLOCK_K=block_k,
        CHUNK=scale_group // 2 if scale_group else min(tiles.chunk, block_k // 2),
        PRECISION="ieee" if dtype == torch.float32 else "tf32",
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        enable_fp_fusion=False,  # v·inv + 0.5 rounds twice, as the reference does, not one FMA
    )


def int_gemm_settings(
    a_bits: int,
    b_bits: int,
    has_bias: bool,
    tiles: Tiles,
    groups: int = 0,
    scale_group: int | None = None,
    rank: int = 0,
    row_scaled: bool = False,
) -> dict[str, object]:
    """The GEMM kernel's compile-time constants and launch options; with `groups` scale groups
    of `scale_group` values, the K tile is one group (`row_scaled`: 8-bit ones times a scale
    per row)."""
    return dict(
        A_PACKED=a_bits == 4,
        B_PACKED=b_bits == 4,
        HAS_BIAS=has_bias,
        RANK=_rank_tile(rank),
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_KH=scale_group // 2 if groups else tiles.block_kh,
        JOIN_K=tiles.join_k,
        GROUPS=groups,
        ROW_SCALED=row_scaled,
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        enable_fp_fusion=False,  # the epilogue rounds as the reference: multiply, then add bias
    )


def int_gemm(
    a: torch.Tensor,
    a_bits: int,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_bits: int,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    out_dtype: torch.dtype,
    tiles: Tiles | None = None,
    branch: torch.Tensor | None = None,
    up: torch.Tensor | None = None,
    b_scale_row: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(A Bᵀ) · s_a · s_b (+ bias) (+ branch · up)`` for int4-packed or int8 A [M, K] and
    B [N, K]; scales [M] and [N], or group scales [M, G] and [N, G] (G groups of K / G values;
    with `b_scale_row` [N], B's are uint8 multipliers of it); `branch` [M, r] and `up` [r, N]:
    the low-rank branch, added in the epilogue."""
    m, n = a.shape[0], b.shape[0]
    groups = b_scale.shape[1] if b_scale.dim() == 2 else 0
    if b_scale_row is not None and not groups:
        raise ValueError("a scale per row (b_scale_row) goes with 8-bit group scales only")
    rank = 0 if branch is None else branch.shape[1]
    a, b = a.contiguous().view(torch.int8), b.contiguous().view(torch.int8)
    out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    tiles = _tiles(a.device, tiles)
    grid = (triton.cdiv(m, tiles.block_m), triton.cdiv(n, tiles.block_n))
    _int_gemm_kernel[grid](
        a,
        b,
        a_scale,
        b_scale.contiguous(),
        b_scale if b_scale_row is None else b_scale_row.contiguous(),
        b_scale if bias is None else bias,
        a_scale if branch is None else branch.contiguous(),
        a_scale if up is None else up.contiguous(),
        out,
        m,
        n,
        k,
        (k + 1) // 2,
        rank,
        a.stride(0),
        b.stride(0),
        out.stride(0),
        **int_gemm_settings(
            a_bits,
            b_bits,
            bias is not None,
            tiles,
            groups,
            k // groups if groups else None,
            rank,
            b_scale_row is not None,
        ),
    )
    return out


def rotated_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    rotation: torch.Tensor | None,
    act_bits: int,
    weight_bits: int,
    lowrank_down: torch.Tensor | None = None,
    lowrank_up: torch.Tensor | None = None,
    tiles: Tiles | None = None,
    weight_scale_row: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fused path of `reference.rotated_linear` (plus `reference.low_rank_branch`): two
    kernel launches. The rotate-quantize kernel quantizes per token, or per token and group
    for group scales (a 2-D `weight_scale`), and computes the branch's down projection in its
    pass over x; the GEMM scales (group by group) and adds the bias and the up projection in
    its epilogue. With `weight_scale_row` [N] the group scales are uint8 multipliers of it
    (``quant.scale_bits=8``), folded in the GEMM as it loads them."""
    rows = x.reshape(-1, x.shape[-1])
    scale_group = rows.shape[1] // weight_scale.shape[1] if weight_scale.dim() == 2 else None
    values, act_scale, branch = rotate_quantize(
        rows, act_bits, rotation, tiles, scale_group, lowrank_down
    )
    out = int_gemm(
        values,
        act_bits,
        act_scale,
        weight,
        weight_bits,
        weight_scale,
        bias,
        rows.shape[1],
        x.dtype,
        tiles,
        branch,
        lowrank_up,
        weight_scale_row,
    )
    return out.reshape(*x.shape[:-1], weight.shape[0])
