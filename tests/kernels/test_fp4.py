"""The FP4 formats (`kernels/fp4.py`): e2m1 and e4m3 rounding, block scales, the op in the
quantize pass, and its ONNX form."""

from __future__ import annotations

import pytest
import torch

from diffopt.config import Config, QuantConfig
from diffopt.evaluation import zoo
from diffopt.kernels.fp4 import (
    E2M1_LEVELS,
    E2M1_MIDPOINTS,
    KINDS,
    dequantize_fp4,
    e2m1_codes,
    e2m1_values,
    outer_scale,
    quantize_fp4,
    round_e4m3,
)

from ..conftest import first_output


def test_e2m1_rounds_to_the_nearest_level_and_ties_to_the_even_code():
    levels = torch.tensor(E2M1_LEVELS)
    v = torch.linspace(-7, 7, 1401) + 0.003  # off every midpoint
    nearest = levels[(v.abs()[:, None] - levels).abs().argmin(1)] * v.sign()
    assert torch.equal(e2m1_values(e2m1_codes(v)), nearest)
    ties = e2m1_values(e2m1_codes(torch.tensor(E2M1_MIDPOINTS)))
    assert ties.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]  # codes 0, 2, 2, 4, 4, 6, 6
    assert e2m1_values(e2m1_codes(torch.tensor([9.0, -100.0]))).tolist() == [6.0, -6.0]


def test_e4m3_rounding_is_torchs_float8_cast():
    g = torch.Generator().manual_seed(0)
    v = torch.cat(
        (
            torch.rand(20000, generator=g) * 600,
            torch.rand(20000, generator=g) * 0.03,  # subnormals
            torch.exp2(torch.arange(-12.0, 9.0)),
            torch.tensor([0.0, 448.0, 464.0]),
        )
    )
    expected = v.clamp(max=448).to(torch.float8_e4m3fn).float()
    assert torch.equal(round_e4m3(v), expected)


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4"])
def test_block_scales(name):
    kind = KINDS[name]
    rows = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * 3
    rows[1] = 0  # a zero row quantizes to zeros
    outer = outer_scale(rows) if kind.scale == "e4m3" else None
    codes, scale_bytes = quantize_fp4(rows, kind, outer)
    assert codes.shape == rows.shape and scale_bytes.shape == (4, 64 // kind.block)
    back = dequantize_fp4(codes, scale_bytes, kind, outer)
    assert torch.equal(back[1], torch.zeros(64))
    error = (back - rows).pow(2).sum() / rows.pow(2).sum()
    assert error < 10 ** (-1.6), error  # about 17 dB or better on Gaussian rows
    blockmax = rows.unflatten(-1, (-1, kind.block)).abs().amax(-1)
    scale = kind.scale_table[scale_bytes.long()]
    if name == "mxfp4":  # a power of two putting the block's largest value in [4, 8)
        live = blockmax > 0
        assert torch.equal(scale.log2(), scale.log2().round())
        ratio = blockmax[live] / scale[live]
        assert (ratio >= 4).all() and (ratio < 8).all()
    else:  # e4m3 block scales of at most 448, the largest about 448
        assert scale.max() <= 448 and scale.max() > 400


@pytest.mark.parametrize("preset", ["nvfp4", "mxfp4", "nvfp4-r32"])
def test_fp4_formats_in_the_quantize_pass(preset):
    model, inputs = zoo.build("tiny-sd3")  # K = 32 in its blocks
    quant = {**Config(quant=preset).to_dict()["quant"], "rank": 4 if "r32" in preset else 0}
    with torch.no_grad():
        expected = first_output(model(**inputs))
        compiled = torch.compile(
            model, backend="diffopt", options={"inner": "eager", "quant": quant}
        )
        got = first_output(compiled(**inputs))
    sqnr = 10 * torch.log10(expected.pow(2).sum() / (expected - got).pow(2).sum())
    assert sqnr > 15, sqnr
    assert QuantConfig(**quant).label.startswith(preset.split("-")[0] + "-regular")


def test_fp4_settings_that_do_not_apply_are_reported():
    import diffopt

    model, inputs = zoo.build("tiny-sd3")
    config = Config(inner="eager", quant={"format": "mxfp4", "scale_group": 32})
    report = next(p for p in diffopt.inspect(model, inputs, config).passes if p.name == "quantize")
    assert not report.rewritten
    assert "unset quant.scale_group and quant.gptq" in report.skipped[0].what


def test_fp4_linear_counts_its_gemm_and_branch_flops():
    from torch.utils.flop_counter import FlopCounterMode

    from diffopt.kernels.reference import pack_int4

    x, codes = torch.randn(4, 32), torch.zeros(8, 32, dtype=torch.uint8)
    scales, down, up = (
        torch.full((8, 2), 56, dtype=torch.uint8),
        torch.zeros(32, 2),
        torch.zeros(2, 8),
    )
    with FlopCounterMode(display=False) as counted:
        torch.ops.diffopt.fp4_linear(
            x, pack_int4(codes), scales, torch.ones(1), None, None, "nvfp4", down, up
        )
    assert counted.get_total_flops() == 2 * 4 * (32 * 8 + 2 * (32 + 8))
