"""The w4a4 pass: which linears it rewrites, what stays in high precision, and parity."""

from __future__ import annotations

import pytest
import torch

import diffopt
from diffopt.config import Config, ConfigError, QuantConfig
from diffopt.evaluation import zoo
from diffopt.passes import PassError

from ..conftest import first_output


def w4a4_report(model, inputs, quant):
    report = diffopt.inspect(model, inputs, Config(inner="eager", quant=quant))
    return next(p for p in report.passes if p.name == "w4a4"), report


def sqnr(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return (10 * torch.log10(reference.pow(2).sum() / (reference - approx).pow(2).sum())).item()


def quantized_output(model, inputs, quant, inner="eager"):
    compiled = torch.compile(model, backend="diffopt", options={"inner": inner, "quant": quant})
    with torch.no_grad():
        return first_output(compiled(**inputs))


@pytest.mark.parametrize(("quant", "min_db"), [("w4a4", 20), ("w8a8", 45)])
def test_parity_on_every_family(tiny, quant, min_db):
    name, model, inputs = tiny
    with torch.no_grad():
        expected = first_output(model(**inputs))
    assert sqnr(expected, quantized_output(model, inputs, quant)) > min_db, name


def test_dit_keeps_embedders_and_modulation_in_high_precision():
    model, inputs = zoo.build("tiny-dit")
    report, inspected = w4a4_report(model, inputs, "w4a4")
    rewritten = [e.where for e in report.rewritten]
    assert "transformer_blocks.0.attn1.to_q" in rewritten
    assert "transformer_blocks.1.ff.net.2" in rewritten
    assert not any("norm" in w or "emb" in w or "proj_out" in w for w in rewritten)
    assert "w4a4-regular linear (16, 16), group 16, SQNR" in report.rewritten[0].what
    assert any("kept in high precision by quant.include / quant.exclude" in n for n in report.notes)
    assert any("smaller" in n for n in report.notes)
    stats = report.stats  # 12 layers: weights at 4 bits plus 2-byte scales, against fp16
    assert stats["layers"] == 12 and 3.0 < stats["fp16_weight_bytes"] / stats["weight_bytes"] < 4
    after = "\n".join(inspected.code_after.values())
    assert "torch.ops.diffopt.w4a4_linear.default" in after
    assert "diffopt_transformer_blocks_0_attn1_to_q_qweight" in after


def test_include_exclude_and_scope():
    model, inputs = zoo.build("tiny-dit")
    only_q = QuantConfig(include=["*.to_q"])
    report, _ = w4a4_report(model, inputs, only_q)
    assert [e.where.rsplit(".", 1)[-1] for e in report.rewritten] == ["to_q", "to_q"]
    everything = QuantConfig(scope="all", exclude=[])
    report, _ = w4a4_report(model, inputs, everything)
    assert any("proj_out" in e.where for e in report.rewritten)


def test_low_sqnr_layers_fall_back_and_strict_refuses():
    model, inputs = zoo.build("tiny-dit")
    report, _ = w4a4_report(model, inputs, QuantConfig(min_sqnr=60))
    assert not report.rewritten and report.skipped
    assert "output SQNR" in report.skipped[0].what and "min_sqnr=60" in report.skipped[0].what
    strict = Config(inner="eager", strict=True, quant=QuantConfig(min_sqnr=60))
    with pytest.raises(Exception, match="pass 'w4a4' could not apply at transformer_blocks"):
        diffopt.inspect(model, inputs, strict)
    assert issubclass(PassError, RuntimeError)


def test_groups_that_do_not_divide_k_are_reported():
    model, inputs = zoo.build("tiny-unet")  # its attention projections have K = 8
    report, _ = w4a4_report(model, inputs, "w4a4")
    assert report.rewritten
    assert any("K=8 is not a multiple of the rotation group" in e.what for e in report.skipped)
    report, _ = w4a4_report(model, inputs, "w4a4-rtn")  # no rotation: nothing to divide
    assert not any("rotation group" in e.what for e in report.skipped)


def test_presets_and_bad_settings():
    assert Config(quant="w4a4-sylvester").quant.label == "w4a4-sylvester"
    assert Config(quant="w4a4-rht").quant == Config(quant="w4a4").quant
    assert Config.from_dict({"quant": "w4a8"}).quant.act_bits == 8
    with pytest.raises(ConfigError, match="not a known preset"):
        Config(quant="w2a2")
    with pytest.raises(ConfigError, match=r"quant\.group must be 16, 64 or 256"):
        QuantConfig(group=32)
    with pytest.raises(ConfigError, match=r"quant\.rotation"):
        QuantConfig(rotation="walsh")


@pytest.mark.inductor
def test_w4a4_under_inductor_matches_eager_regions():
    model, inputs = zoo.build("tiny-dit")
    eager = quantized_output(model, inputs, "w4a4")
    torch._dynamo.reset()
    compiled = quantized_output(model, inputs, "w4a4", inner="inductor")
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_dynamic_batch_measures_at_the_captured_sizes():
    model, inputs = zoo.build("tiny-dit")
    options = {"inner": "eager", "quant": "w4a4"}
    compiled = torch.compile(model, backend="diffopt", options=options, dynamic=True)
    for batch in (2, 3):
        inputs = zoo.example_inputs(model, batch=batch)
        with torch.no_grad():
            expected, got = first_output(model(**inputs)), first_output(compiled(**inputs))
        assert got.shape[0] == batch and sqnr(expected, got) > 20
