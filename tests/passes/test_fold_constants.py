"""fold_constants: a weight's QR (and kin) evaluated once, so an engine can run the model."""

from __future__ import annotations

import copy

import pytest
import torch

from diffopt.backend import capture
from diffopt.config import Config, FoldConfig
from diffopt.evaluation import families
from diffopt.runtime.executor import RegionExecutor
from tests.test_families import tensors

pytest.importorskip("onnxruntime")
from diffopt.exporters import export, load_engine


def _qr_nodes(gm: torch.fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.target is torch.linalg.qr]


class Orthogonalized(torch.nn.Module):
    """Blocks that project on an orthogonalized weight, and one QR of an activation."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)])
        self.direction = torch.nn.Parameter(torch.randn(8, 4))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        basis = torch.linalg.qr(self.direction)[0]  # weights only: foldable
        for block in self.blocks:
            hidden_states = block(hidden_states) + hidden_states @ basis @ basis.T
        return hidden_states + torch.linalg.qr(hidden_states[0])[0].sum()  # an activation's


def test_a_weights_qr_is_folded_and_an_activations_is_not():
    model, inputs = Orthogonalized(), {"hidden_states": torch.randn(2, 8, 8)}
    torch._dynamo.reset()
    captured = capture(model, inputs, Config(inner="eager", fold=FoldConfig()))
    report = next(r for r in captured.result.reports if r.name == "fold_constants")
    assert len(report.rewritten) == 1 and "linalg_qr" in report.rewritten[0].what
    assert len(_qr_nodes(captured.result.graph.gm)) == 1  # the activation's stays
    with torch.no_grad():
        out = RegionExecutor(captured.result.program)(*captured.inputs)
        torch.testing.assert_close(tensors(out)[0], model(**inputs), atol=1e-6, rtol=1e-6)
    torch._dynamo.reset()
    kept = capture(model, inputs, Config(inner="eager"))  # the backend keeps the model's ops
    assert len(_qr_nodes(kept.result.graph.gm)) == 2


class OrthogonalizedWithVmap(Orthogonalized):
    """`Orthogonalized`, scaled by a table built with ``torch.vmap`` from a weight, as torch's
    `BlockMask` builds its tables (AnyFlow-FAR's, in its prologue)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        scale = torch.vmap(lambda row: row.abs().sum())(self.direction)
        return super().forward(hidden_states) * scale


def test_folding_keeps_a_vmap_of_constants_whole():
    # fx counts vmap's level changes as pure: unread, the cleanup after folding erased them,
    # and the graph made batched tensors of a level nothing entered ("your tensor may have
    # escaped from inside a function being vmapped")
    torch.manual_seed(0)
    model, inputs = OrthogonalizedWithVmap(), {"hidden_states": torch.randn(2, 8, 8)}
    torch._dynamo.reset()
    captured = capture(model, inputs, Config(inner="eager", fold=FoldConfig()))
    report = next(r for r in captured.result.reports if r.name == "fold_constants")
    assert len(report.rewritten) == 1
    names = [n.name for n in captured.result.graph.gm.graph.nodes]
    assert any("_vmap_increment_nesting" in n for n in names)
    assert any("_vmap_decrement_nesting" in n for n in names)
    with torch.no_grad():
        out = RegionExecutor(captured.result.program)(*captured.inputs)
        # the folded QR rounds as the eager one does, the scale (~2) doubles its last bits
        torch.testing.assert_close(tensors(out)[0], model(**inputs), atol=1e-5, rtol=1e-5)


def test_wan_animate_exports_with_its_motion_encoders_qr_folded(tmp_path):
    """Its motion encoder orthogonalizes a weight with linalg_qr on every call, which torch's
    ONNX exporter has no function for."""
    model, inputs = families.build("tiny-wan-animate")
    with torch.no_grad():
        expected = tensors(model(**copy.deepcopy(inputs)))
    torch._dynamo.reset()
    engine = load_engine(export(model, copy.deepcopy(inputs), out=tmp_path))
    for got, want in zip(tensors(engine(**copy.deepcopy(inputs))), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
