"""The PyTorch reference (also the CPU path): packing, quantization, integer GEMM, the op."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import diffopt.kernels  # noqa: F401  (registers the op)
from diffopt.kernels import hadamard, pack_int4, quantize_weight, rotate, unpack_int4
from diffopt.kernels.reference import (
    dequantized_branch,
    group_scales,
    int_matmul,
    low_rank_branch,
    low_rank_split,
    quantize_activation,
    quantize_rows,
    rotated_linear,
    round_half_away,
)


def sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return (10 * torch.log10(reference.pow(2).sum() / (reference - approx).pow(2).sum())).item()


def test_pack_unpack_round_trip_covers_every_nibble():
    values = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)  # [3, 32]
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 16)
    assert torch.equal(unpack_int4(packed), values)
    assert packed[0, 0].item() == ((-7 & 0xF) << 4) | (-8 & 0xF)  # even k in the low nibble
    with pytest.raises(ValueError, match="even K"):
        pack_int4(torch.zeros(2, 5, dtype=torch.int8))


def test_rounding_is_half_away_from_zero():
    v = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 0.49, -2.51])
    assert round_half_away(v).tolist() == [1, 2, 3, -1, -2, 0, -3]


@pytest.mark.parametrize("bits", [4, 8])
def test_activation_quantization_is_symmetric_per_token(bits):
    x = torch.randn(6, 64) * torch.arange(1, 7)[:, None]
    h = hadamard("regular", 64)
    values, scale = quantize_activation(x, bits, h)
    limit = 2 ** (bits - 1) - 1
    assert values.dtype == torch.int8
    assert (values.abs().amax(dim=1) == limit).all()  # each token's absmax hits the top code
    assert torch.allclose(scale, rotate(x, h).abs().amax(dim=1) / limit)  # absmax / qmax


@pytest.mark.parametrize("k", [70, 1024, 3072])  # float32 sums below 2^24, float64 above
def test_int_matmul_is_exact(k):
    a = torch.randint(-128, 128, (33, k), dtype=torch.int8)
    b = torch.randint(-128, 128, (17, k), dtype=torch.int8)
    a[0], b[0] = -128, -128  # the largest sum: K · 2^14
    assert torch.equal(int_matmul(a, b), a.int() @ b.int().T)
    assert torch.equal(int_matmul(a, b), torch._int_mm(a, b.T.contiguous()))


@pytest.mark.parametrize(
    ("act_bits", "weight_bits", "rotation", "min_db"),
    [
        (4, 4, "regular", 14),
        (4, 4, "none", 12),
        (4, 8, "regular", 14),
        (8, 4, "regular", 18),
        (8, 8, "regular", 36),
        (8, 8, "none", 36),
    ],
)
def test_rotated_linear_approximates_the_linear(act_bits, weight_bits, rotation, min_db):
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 9, 256) + 0.5, torch.randn(48, 256) / 16, torch.randn(48)
    h = hadamard(rotation, 64)
    stored, scale = quantize_weight(w, weight_bits, h)
    assert scale.dtype == torch.float16 and stored.shape[1] == 256 * weight_bits // 8
    y = rotated_linear(x, stored, scale, b, h, act_bits, weight_bits)
    assert y.shape == (2, 9, 48) and y.dtype == x.dtype
    assert sqnr(F.linear(x, w, b), y) > min_db


def test_regular_rotation_tames_a_channel_outlier():
    torch.manual_seed(0)
    x, w = torch.randn(64, 256), torch.randn(32, 256) / 16
    x[:, 3] *= 40  # one outlier channel, as in real DiT activations
    reference = F.linear(x, w)
    plain = rotated_linear(x, *quantize_weight(w, 4, None), None, None, 4, 4)
    h = hadamard("regular", 256)
    rotated = rotated_linear(x, *quantize_weight(w, 4, h), None, h, 4, 4)
    assert sqnr(reference, rotated) > sqnr(reference, plain) + 3


def test_op_survives_compile_export_and_opcheck():
    torch.manual_seed(0)
    w, h = torch.randn(24, 64), hadamard("regular", 64)
    stored, scale = quantize_weight(w, 4, h)
    op = torch.ops.diffopt.quant_linear.default

    def run(x):
        return op(x, stored, scale, None, h, 4, 4)

    x = torch.randn(3, 5, 64)
    eager = run(x)
    assert torch.equal(torch.compile(run, backend="aot_eager", fullgraph=True)(x), eager)
    torch.library.opcheck(op, (x, stored, scale, torch.randn(24), h, 4, 4))

    class Linear(torch.nn.Module):
        def forward(self, x):
            return run(x)

    exported = torch.export.export(Linear(), (x,))
    assert "diffopt.quant_linear" in str(exported.graph)
    assert torch.equal(exported.module()(x), eager)


def test_a_static_activation_scale_clips_beyond_it_and_matches_per_token_at_the_absmax():
    torch.manual_seed(0)
    w, h = torch.randn(24, 64), hadamard("regular", 64)
    stored, scale = quantize_weight(w, 8, h)
    static = torch.ops.diffopt.quant_linear_static.default
    x = torch.randn(1, 64)  # one token: its own absmax is the static scale
    absmax = float(rotate(x, h).abs().max())
    per_token = torch.ops.diffopt.quant_linear(x, stored, scale, None, h, 8, 8)
    torch.testing.assert_close(static(x, stored, scale, None, h, absmax / 127, 8, 8), per_token)
    clipped = static(x * 4, stored, scale, None, h, absmax / 127, 8, 8)  # beyond the scale: clips
    assert (clipped - 4 * per_token).abs().max() > 0.1 * per_token.abs().max()
    torch.library.opcheck(static, (x, stored, scale, torch.randn(24), h, absmax / 127, 8, 8))


def test_weight_clip_search_never_increases_the_error():
    torch.manual_seed(0)
    w = torch.randn(32, 256)
    w[:, 7] *= 8  # a heavy column: clipping pays off in most rows
    errors = []
    for clip in (False, True):
        stored, scale = quantize_weight(w, 4, None, clip=clip)
        restored = unpack_int4(stored).float() * scale.float()[:, None]
        errors.append((restored - w).pow(2).sum(dim=1))
    assert (errors[1] <= errors[0] + 1e-6).all() and errors[1].sum() < errors[0].sum()


def test_clipping_scored_on_the_output_has_the_least_output_error_per_channel():
    """δᵀ XᵀX δ is each output channel's squared error on X: the search keeps, channel by
    channel, the candidate with the least of it, so it beats clipping on the weight error and
    no clipping on those inputs (strictly, where a few input channels carry most of the signal);
    with scale groups each group is scored on its diagonal block of XᵀX."""
    torch.manual_seed(0)
    x = torch.randn(512, 256)
    x[:, :8] *= 10  # loud input channels: their weights' errors cost the output most
    w = torch.randn(32, 256)
    w[:, 100] *= 8  # a heavy weight column, where clipping on the weight error pays off
    gram = x.double().T @ x.double()
    for group in (None, 64):

        def output_error(group=group, **kw):
            stored, scale = quantize_weight(w, 4, None, scale_group=group, **kw)
            per_value = scale.float().reshape(32, -1).repeat_interleave(group or 256, dim=1)
            restored = unpack_int4(stored).float() * per_value
            return (x @ (restored - w).T).pow(2).sum(dim=0)  # per output channel

        by_output = output_error(clip=True, clip_hessian=gram)
        by_weight, plain = output_error(clip=True), output_error(clip=False)
        if group is None:  # exact per channel
            assert (by_output <= by_weight * (1 + 1e-5)).all()
            assert (by_output <= plain * (1 + 1e-5)).all()
        assert by_output.sum() < 0.9 * min(by_weight.sum(), plain.sum()), group


def test_group_scales_quantize_each_group_against_its_own_absmax():
    torch.manual_seed(0)
    x = torch.randn(5, 256)
    x[:, :64] *= 30  # one loud group: with a scale per token it would flatten the others
    values, scale = quantize_activation(x, 4, None, scale_group=64)
    assert values.shape == (5, 256) and scale.shape == (5, 4)
    groups = values.reshape(5, 4, 64)
    assert (groups.abs().amax(dim=-1) == 7).all()  # every group uses the full int4 range
    torch.testing.assert_close(scale, x.reshape(5, 4, 64).abs().amax(dim=-1) / 7)
    w = torch.randn(32, 256) / 16
    w[:, :64] /= 30  # every group adds as much to the output
    stored, w_scale = quantize_weight(w, 4, None, scale_group=64)
    assert stored.shape == (32, 128) and w_scale.shape == (32, 4)
    restored = unpack_int4(stored).float() * w_scale.float().repeat_interleave(64, dim=1)
    y = rotated_linear(x, stored, w_scale, None, None, 4, 4)
    expected = (values.float() * scale.repeat_interleave(64, dim=1)) @ restored.T
    torch.testing.assert_close(y, expected)
    per_channel = rotated_linear(x, *quantize_weight(w, 4, None), None, None, 4, 4)
    assert sqnr(F.linear(x, w), y) > sqnr(F.linear(x, w), per_channel) + 3


def test_8_bit_group_scales_store_exactly_what_the_op_dequantizes_with():
    """``scale_bits=8``: each group scale a uint8 multiple of a float32 scale per row, rounded
    up, and the 4-bit values quantized against that stored scale: re-quantizing the rotated
    weight against ``q · s_row`` gives the stored values back, the op computes with those same
    scales, and no value clips (without the clipping search)."""
    torch.manual_seed(0)
    w = torch.randn(32, 256) / 16
    w[:, 64:128] /= 40  # a quiet group: its multiplier is small, rounded up by up to 1 / q
    w[3] = 0  # an all-zero row and an all-zero group: scale 0, values 0, no NaN
    w[5, :64] = 0
    h = hadamard("regular", 64)  # a rotation group per scale group: the quiet one stays so
    x = torch.randn(3, 7, 256)
    stored16, scale16 = quantize_weight(w, 4, h, scale_group=64)
    stored, q, row = quantize_weight(w, 4, h, scale_group=64, scale_bits=8)
    assert (q.dtype, q.shape, row.dtype, row.shape) == (torch.uint8, (32, 4), torch.float32, (32,))
    # a byte a group and 4 a row against 2 a group: equal at K = 256 (4 groups of 64), 22
    # against 36 bytes a row at DiT-XL/2's K = 1152
    assert (q.nbytes, row.nbytes, scale16.nbytes) == (32 * 4, 32 * 4, 32 * 4 * 2)
    rotated = rotate(w, h).reshape(-1, 64)
    scale = group_scales(q, row)
    assert (scale.reshape(-1) >= rotated.abs().amax(-1) / 7 * (1 - 1e-6)).all()  # rounded up
    assert (q[row > 0].amax(-1) == 255).all() and row[3] == 0 and q[5, 0] == 0
    assert q[:, 1].float().mean() < 20  # the quiet group's multiplier
    again, _ = quantize_rows(rotated, 4, scale=scale.reshape(-1))
    assert torch.equal(pack_int4(again.reshape(32, 256)), stored)
    restored = unpack_int4(stored).float() * scale.repeat_interleave(64, dim=1)  # the weight
    op = torch.ops.diffopt.quant_linear.default
    y = op(x, stored, q, None, h, 4, 4, None, None, None, None, row)
    assert torch.equal(y, rotated_linear(x, stored, scale, None, h, 4, 4))
    values, act_scale = quantize_activation(x.reshape(-1, 256), 4, h, scale_group=64)
    expected = (values.float() * act_scale.repeat_interleave(64, dim=1)) @ restored.T
    torch.testing.assert_close(y.reshape(-1, 32), expected)
    assert not y.isnan().any()
    y16 = op(x, stored16, scale16, None, h, 4, 4)
    assert sqnr(F.linear(x, w), y) > sqnr(F.linear(x, w), y16) - 0.3
    for clip, gram in ((True, None), (True, torch.eye(256) * 3)):  # every clipping candidate
        stored, q, row = quantize_weight(w, 4, h, clip, 64, None, gram, scale_bits=8)
        again, _ = quantize_rows(rotated, 4, scale=group_scales(q, row).reshape(-1))
        assert torch.equal(pack_int4(again.reshape(32, 256)), stored)
    torch.library.opcheck(op, (x, stored, q, torch.randn(32), h, 4, 4, None, None, None, None, row))
    with pytest.raises(ValueError, match="8 with group scales"):
        quantize_weight(w, 4, h, scale_bits=8)


def test_a_row_scale_without_8_bit_group_scales_is_refused_on_every_device():
    """``weight_scale_row`` goes with uint8 group multipliers [N, G] only: beside per-channel
    scales [N] the CPU path broadcast ``q · s_row`` into an [N, N] table of group scales and
    returned a wrong output (CUDA refused), and beside float16 group scales it multiplied
    them again."""
    torch.manual_seed(0)
    w, h, x = torch.randn(32, 256), hadamard("regular", 64), torch.randn(3, 256)
    op = torch.ops.diffopt.quant_linear.default
    per_channel = quantize_weight(w, 4, h)
    float16_groups = quantize_weight(w, 4, h, scale_group=64)
    stored, q, row = quantize_weight(w, 4, h, scale_group=64, scale_bits=8)
    for weight, scale, row_scale in (
        (*per_channel, row),
        (*float16_groups, row),
        (stored, q, row[:16]),
    ):
        with pytest.raises(ValueError, match=r"weight_scale_row .* scale_bits=8"):
            op(x, weight, scale, None, h, 4, 4, None, None, None, None, row_scale)
    op(x, stored, q, None, h, 4, 4, None, None, None, None, row)  # the stored form runs


def test_the_low_rank_branch_keeps_the_top_singular_part_and_quantizes_the_rest():
    torch.manual_seed(0)
    w = torch.randn(64, 256) / 16 + torch.randn(64, 1) @ torch.randn(1, 256)  # one strong direction
    down, up, _, residual = low_rank_split(w, 8)
    assert down.shape == (256, 8) and up.shape == (8, 64) and down.dtype == torch.float16
    torch.testing.assert_close((down.float() @ up.float()).T + residual, w)
    singular = torch.linalg.svdvals(w)
    assert torch.linalg.matrix_norm(residual, ord=2) < 1.01 * singular[8]  # what SVD leaves
    x, h = torch.randn(3, 7, 256), hadamard("regular", 256)
    stored, scale = quantize_weight(residual, 4, h)
    op = torch.ops.diffopt.quant_linear.default
    y = op(x, stored, scale, None, h, 4, 4, down, up)
    without = op(x, stored, scale, None, h, 4, 4)
    torch.testing.assert_close(y, without + low_rank_branch(x, down, up))
    plain = op(x, *quantize_weight(w, 4, h), None, h, 4, 4)
    assert sqnr(F.linear(x, w), y) > sqnr(F.linear(x, w), plain) + 3
    torch.library.opcheck(op, (x, stored, scale, torch.randn(64), h, 4, 4, down, up))
    grouped = quantize_weight(residual, 4, h, scale_group=64)
    torch.library.opcheck(op, (x, *grouped, None, h, 4, 4, down, up))


def test_an_int8_branch_halves_the_bytes_and_the_residual_absorbs_its_rounding():
    torch.manual_seed(0)
    w = torch.randn(64, 256) / 16 + torch.randn(64, 4) @ torch.randn(4, 256)
    down16, up16, none, _ = low_rank_split(w, 8)
    down, up, scale, residual = low_rank_split(w, 8, bits=8)
    assert none is None and (down.dtype, up.dtype, scale.shape) == (torch.int8, torch.int8, (8,))
    assert down.nbytes + up.nbytes + scale.nbytes < 0.6 * (down16.nbytes + up16.nbytes)
    # the rounded branch plus the residual is the weight again: no error before the 4-bit step
    torch.testing.assert_close(low_rank_branch(torch.eye(256), down, up, scale).T + residual, w)
    x, h = torch.randn(3, 7, 256), hadamard("regular", 256)
    op = torch.ops.diffopt.quant_linear.default
    y8 = op(x, *quantize_weight(residual, 4, h), None, h, 4, 4, down, up, None, scale)
    _, _, _, residual16 = low_rank_split(w, 8)
    y16 = op(x, *quantize_weight(residual16, 4, h), None, h, 4, 4, down16, up16)
    assert sqnr(F.linear(x, w), y8) > sqnr(F.linear(x, w), y16) - 0.5
    without = op(x, *quantize_weight(residual, 4, h), None, h, 4, 4)
    torch.testing.assert_close(y8, without + low_rank_branch(x, down, up, scale))
    # what the Triton kernels take, also for small weights (folded in float16 the scales of a
    # weight of std 2e-4 would be subnormals)
    for tiny in (1.0, 1e-4):
        d8, u8, s8, _ = low_rank_split(w * tiny, 8, bits=8)
        folded = dequantized_branch(d8, u8, s8, torch.float32)
        expected = low_rank_branch(x, d8, u8, s8)
        assert sqnr(expected, low_rank_branch(x, *folded)) > 90, tiny  # float16: 39 dB at 1e-4
    stored8 = quantize_weight(residual, 4, h)
    torch.library.opcheck(op, (x, *stored8, torch.randn(64), h, 4, 4, down, up, None, scale))
