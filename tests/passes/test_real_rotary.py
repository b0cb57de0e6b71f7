"""real_rotary: complex rotary products rewritten in real pairs, so ONNX can hold them."""

from __future__ import annotations

import copy
import operator

import pytest
import torch

from diffopt.backend import capture
from diffopt.config import Config, ConfigError, RealRotaryConfig
from diffopt.evaluation import families
from diffopt.passes.graph import example_value
from diffopt.runtime.executor import RegionExecutor
from tests.test_families import tensors


def _complex(node: torch.fx.Node) -> bool:
    return isinstance(v := example_value(node), torch.Tensor) and v.is_complex()


def _complex_nodes(gm: torch.fx.GraphModule) -> list[str]:
    return [
        n.name
        for n in gm.graph.nodes
        if isinstance(v := example_value(n), torch.Tensor)
        and v.is_complex()
        and (n.op != "placeholder" or n.users)  # a complex weight may stay, unread
    ]


@pytest.mark.parametrize(
    "name",
    [
        "tiny-qwenimage",
        "tiny-z-image",
        "tiny-anyflow",
        "tiny-bria-fibo2",  # its mask is written in place: a dead-code sweep must keep the write
    ],
)
def test_a_complex_rotary_family_runs_without_complex_ops(name):
    model, inputs = families.build(name)
    with torch.no_grad():
        expected = tensors(model(**copy.deepcopy(inputs)))  # Z-Image builds its table here
    torch._dynamo.reset()
    captured = capture(
        model, copy.deepcopy(inputs), Config(inner="eager", rotary=RealRotaryConfig())
    )
    gm = captured.result.graph.gm
    assert _complex_nodes(gm) == []
    assert not any(
        n.target in (torch.view_as_complex, torch.view_as_real, torch.polar) for n in gm.graph.nodes
    )
    report = next(r for r in captured.result.reports if r.name == "real_rotary")
    assert report.rewritten and not report.skipped
    assert report.stats["table_bytes"] > 0
    with torch.no_grad():
        out = tensors(RegionExecutor(captured.result.program)(*captured.inputs))
    for got, want in zip(out, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_backend_keeps_complex_ops_unless_asked():
    model, inputs = families.build("tiny-qwenimage")
    torch._dynamo.reset()
    captured = capture(model, copy.deepcopy(inputs), Config(inner="eager"))
    assert _complex_nodes(captured.result.graph.gm)
    assert all(r.name != "real_rotary" for r in captured.result.reports)


class Rotate(torch.nn.Module):
    def forward(self, hidden_states: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        pairs = hidden_states.float().reshape(*hidden_states.shape[:-1], -1, 2)
        return torch.view_as_real(torch.view_as_complex(pairs) * table).flatten(-2)


class RotaryFromInput(torch.nn.Module):
    """A rotary table computed from the call's positions: not a constant, so not foldable."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([Rotate(), Rotate()])

    def forward(self, hidden_states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        table = torch.polar(torch.ones_like(positions), positions)  # [S, D/2] complex
        for block in self.blocks:
            hidden_states = block(hidden_states, table)
        return hidden_states


def test_a_table_from_the_inputs_is_reported_and_strict_refuses_it():
    inputs = {"hidden_states": torch.randn(2, 6, 8), "positions": torch.randn(6, 4)}
    torch._dynamo.reset()
    captured = capture(RotaryFromInput(), inputs, Config(inner="eager", rotary={}))
    report = next(r for r in captured.result.reports if r.name == "real_rotary")
    assert not report.rewritten
    assert any("polar" in e.what for e in report.skipped)
    assert all("export that axis static" in e.what for e in report.skipped)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="pass 'real_rotary' could not apply"):
        capture(RotaryFromInput(), inputs, Config(inner="eager", strict=True, rotary={}))


class RotaryFromCall(torch.nn.Module):
    """A rotary table the call passes as a complex tensor (Lumina-Next's pipeline computes it),
    cut to the tokens and broadcast over the batch; `misuse` also reads it as magnitudes."""

    def __init__(self, misuse: bool = False) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([Rotate(), Rotate()])
        self.misuse = misuse

    def forward(self, hidden_states: torch.Tensor, rotary_emb: torch.Tensor) -> torch.Tensor:
        table = rotary_emb.to(hidden_states.device)[: hidden_states.shape[1]].unsqueeze(0)
        for block in self.blocks:
            hidden_states = block(hidden_states, table)
        return hidden_states * table.abs().mean() if self.misuse else hidden_states


def _call_inputs() -> dict[str, torch.Tensor]:
    angles = torch.randn(10, 4)
    return {"hidden_states": torch.randn(2, 6, 8), "rotary_emb": torch.polar(angles.cos(), angles)}


def test_a_table_the_call_passes_is_read_as_real_pairs():
    """The input stays complex (the call is unchanged); the graph reads view_as_real of it, its
    slicing and unsqueeze repeated on the real and imaginary parts."""
    model, inputs = RotaryFromCall(), _call_inputs()
    torch._dynamo.reset()
    captured = capture(model, dict(inputs), Config(inner="eager", rotary={}))
    gm = captured.result.graph.gm
    report = next(r for r in captured.result.reports if r.name == "real_rotary")
    assert len(report.rewritten) == 2 and not report.skipped
    assert report.stats["passed_tables"] == 1
    (table,) = _complex_nodes(gm)
    (read,) = next(n for n in gm.graph.nodes if n.name == table).users
    assert read.target is torch.view_as_real
    assert not any(
        n.target in (torch.view_as_complex, operator.mul) and _complex(n) for n in gm.graph.nodes
    )
    with torch.no_grad():
        out = RegionExecutor(captured.result.program)(*captured.inputs)
        torch.testing.assert_close(tensors(out)[0], model(**inputs), atol=1e-6, rtol=1e-6)


def test_a_table_the_call_passes_read_otherwise_is_reported_and_refused(tmp_path):
    pytest.importorskip("onnxruntime")
    from diffopt.exporters import ExportError, export

    torch._dynamo.reset()
    captured = capture(
        RotaryFromCall(misuse=True), _call_inputs(), Config(inner="eager", rotary={})
    )
    report = next(r for r in captured.result.reports if r.name == "real_rotary")
    assert not report.rewritten
    assert any("reads the complex tensor the call passes" in e.what for e in report.skipped)
    torch._dynamo.reset()
    with pytest.raises(ExportError, match=r"pass 'real_rotary' .*abs.* reads the complex tensor"):
        export(RotaryFromCall(misuse=True), _call_inputs(), out=tmp_path)


def test_an_engine_binds_a_complex_input_as_its_real_pairs(tmp_path):
    pytest.importorskip("onnxruntime")
    import json

    from diffopt.exporters import export, load_engine

    model, inputs = RotaryFromCall(), _call_inputs()
    torch._dynamo.reset()
    engine = load_engine(export(model, dict(inputs), out=tmp_path))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    spec = next(s for s in manifest["inputs"] if s["path"] == ["rotary_emb"])
    assert spec["dtype"] == "complex64" and spec["shape"] == [10, 4]
    assert spec["bind"] == "view_as_real"
    torch.testing.assert_close(engine(**inputs), model(**inputs), atol=1e-6, rtol=1e-6)
    with pytest.raises(TypeError, match="complex64"):  # its real pairs are not what it takes
        engine(**{**inputs, "rotary_emb": torch.view_as_real(inputs["rotary_emb"])})
    spec["bind"] = "planar"  # a binding this diffopt does not know: refused, not passed through
    engine.manifest["inputs"] = manifest["inputs"]
    with pytest.raises(ConfigError, match=r"rotary_emb as 'planar'.*re-export the engine"):
        engine(**inputs)


def test_bind_refuses_a_binding_it_does_not_know():
    from diffopt.exporters.manifest import bind, binding, unbind

    table = torch.polar(torch.ones(3), torch.randn(3))
    assert bind(table, binding(table)).shape == (3, 2)
    assert torch.equal(unbind(bind(table, binding(table)), binding(table)), table)
    real = torch.randn(3)
    assert binding(real) == {} and bind(real, {}) is real and unbind(real, {}) is real
    for rule in (bind, unbind):
        with pytest.raises(ConfigError, match=r"'planar', which diffopt .* does not know"):
            rule(real, {"bind": "planar", "path": ["rotary_emb"]})


class RotaryWrittenInPlace(RotaryFromInput):
    """A table whose angles are written in place: with a constant (Lumina2 fills its tables per
    sample), or with a value of the call's inputs, which folding would miss."""

    def __init__(self, from_inputs: bool) -> None:
        super().__init__()
        self.register_buffer("angles", torch.randn(6, 4))
        self.from_inputs = from_inputs

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        angles = torch.zeros(6, 4)
        angles[1:] = self.angles[1:]
        angles[0] = hidden_states.mean() if self.from_inputs else 0.5
        table = torch.polar(torch.ones_like(angles), angles)
        for block in self.blocks:
            hidden_states = block(hidden_states, table)
        return hidden_states


def test_export_refuses_a_table_from_the_inputs_with_the_passs_reason(tmp_path):
    pytest.importorskip("onnxruntime")
    from diffopt.exporters import ExportError, export

    inputs = {"hidden_states": torch.randn(2, 6, 8), "positions": torch.randn(6, 4)}
    torch._dynamo.reset()
    with pytest.raises(ExportError, match=r"pass 'real_rotary' .*complex op .*polar"):
        export(RotaryFromInput(), inputs, out=tmp_path)


@pytest.mark.parametrize("from_inputs", [False, True], ids=["constant", "from-inputs"])
def test_a_table_written_in_place_is_folded_with_constant_writes_and_else_reported(from_inputs):
    model = RotaryWrittenInPlace(from_inputs)
    inputs = {"hidden_states": torch.randn(2, 6, 8)}
    torch._dynamo.reset()
    captured = capture(model, inputs, Config(inner="eager", rotary={}))
    report = next(r for r in captured.result.reports if r.name == "real_rotary")
    if from_inputs:
        assert not report.rewritten
        assert "in-place op" in report.skipped[0].what
    else:  # folded with its writes, which go with the table nothing reads any more
        assert report.rewritten and not report.skipped
        gm = captured.result.graph.gm
        assert not _complex_nodes(gm)
        assert not [n for n in gm.graph.nodes if n.target is operator.setitem]
    with torch.no_grad():
        out = RegionExecutor(captured.result.program)(*captured.inputs)
        torch.testing.assert_close(tensors(out)[0], model(**inputs))


def test_a_table_over_the_size_limit_is_a_skip_naming_the_setting():
    model, inputs = families.build("tiny-qwenimage")
    torch._dynamo.reset()
    config = Config(inner="eager", rotary=RealRotaryConfig(max_table_bytes=16))
    captured = capture(model, copy.deepcopy(inputs), config)
    report = next(r for r in captured.result.reports if r.name == "real_rotary")
    assert not report.rewritten
    assert "rotary.max_table_bytes=16" in report.skipped[0].what
    assert _complex_nodes(captured.result.graph.gm)  # untouched
