"""remove_noops: each rule removes exactly the no-ops it names, and outputs do not change."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import diffopt


class Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = F.dropout(block(x), p=0.1, training=False)  # no-op
            x = x.view(x.shape).to(torch.float32)  # both no-ops
            x = x.squeeze(1)  # dim 1 has size 3: no-op
            x = x.unsqueeze(0).squeeze(0)  # a real squeeze of a size-1 dim: kept
        return x


def cleanup_report(**rules):
    report = diffopt.inspect(Noisy(), (torch.randn(2, 3, 4),), {"inner": "eager", "cleanup": rules})
    return next(p for p in report.passes if p.name == "remove_noops"), report


def test_every_rule_fires_per_block_and_real_ops_stay():
    cleanup, report = cleanup_report()
    kinds = sorted(e.what.removeprefix("removed no-op ") for e in cleanup.rewritten)
    assert kinds == sorted(["dropout", "same_shape_views", "same_dtype_casts", "squeeze"] * 2)
    after = "".join(report.code_after.values())
    assert after.count(".squeeze(0)") == 2  # the real squeezes stay
    assert "dropout" not in after and "dropout" in "".join(report.code_before.values())


def test_rules_switch_off_one_by_one():
    cleanup, _ = cleanup_report(dropout=False, squeeze=False)
    kinds = {e.what.removeprefix("removed no-op ") for e in cleanup.rewritten}
    assert kinds == {"same_shape_views", "same_dtype_casts"}


def test_outputs_are_unchanged():
    model, x = Noisy().eval(), torch.randn(2, 3, 4)
    compiled = torch.compile(model, backend="diffopt", options={"inner": "eager"})
    torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
