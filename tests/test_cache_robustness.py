"""benchmarks/cache_robustness.py's conditions per reference model."""

from __future__ import annotations

import sys

import pytest


def test_each_reference_has_its_conditions_and_a_wrong_name_is_refused(
    benchmark_script, monkeypatch, capsys
):
    script = benchmark_script("cache_robustness")
    assert script.MODEL_CONDITIONS["ref-dit"] is script.CONDITIONS
    for model in ("ref-flux", "ref-wan"):
        names = [c.name for c in script.MODEL_CONDITIONS[model]]
        assert len(names) >= 3 and len(set(names)) == len(names)
    # a ref-dit condition asked of ref-flux: refused before any sampling, naming the valid ones
    argv = ["cache_robustness.py", "--model", "ref-flux", "--conditions", "euler-20 g2 s1 b16"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit):
        script.main()
    assert "euler-28 g2 s1 b4" in capsys.readouterr().err
