"""The pass pipeline: its order in one place, and passes from outside with their own sections."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import diffopt
import diffopt.config
from diffopt.config import Config, ConfigError
from diffopt.evaluation import zoo
from diffopt.passes import PIPELINE, PassReport, manager, pipeline, register_pass, registered_passes


@pytest.fixture
def isolated(monkeypatch):
    """Passes and sections a test registers end with the test."""
    monkeypatch.setattr(manager, "_REGISTRY", dict(manager._REGISTRY))
    monkeypatch.setattr(manager, "_ORDER", list(manager._ORDER))
    monkeypatch.setattr(diffopt.config, "_SECTIONS", dict(diffopt.config._SECTIONS))


@dataclass
class CountConfig:
    """Settings of a pass this test defines: it counts the linears left in the graph."""

    key: str = "linears"
    """The stat the count is reported under."""


def count_linears(graph, settings: CountConfig):
    report = PassReport("count_linears")
    targets = (torch._C._nn.linear, F.linear)
    report.stats[settings.key] = sum(n.target in targets for n in graph.gm.graph.nodes)
    return graph, report


def passes_run(report) -> dict[str, PassReport]:
    """The reports of the passes that ran, by name, in order (not the region analysis)."""
    return {p.name: p for p in report.passes if p.name != "regions"}


def nothing(graph, settings):
    return graph, PassReport("nothing")


def test_pipeline_lists_diffopt_passes_in_the_order_they_run():
    expected = [
        *("fold_constants", "real_rotary"),
        *("step_guard", "block_guard", "token_guard", "quantize", "remove_noops"),
    ]
    assert list(PIPELINE) == expected and pipeline() == expected
    assert [spec.name for spec in registered_passes()] == list(PIPELINE)


def test_outside_pass_with_its_own_section_runs_reports_and_round_trips(isolated, tmp_path):
    register_pass("count_linears", config="count", section=CountConfig, after="quantize")(
        count_linears
    )
    assert pipeline() == [*PIPELINE[:-1], "count_linears", "remove_noops"]
    model, inputs = zoo.build("tiny-dit")

    off = diffopt.inspect(model, inputs, Config(inner="eager"))  # no section: the pass is off
    assert list(passes_run(off)) == ["remove_noops"]
    alone = diffopt.inspect(model, inputs, Config(inner="eager", count=CountConfig()))
    total = passes_run(alone)["count_linears"].stats["linears"]

    config = Config(inner="eager", quant="w4a4", count=CountConfig(key="left"))
    report = diffopt.inspect(model, inputs, config)
    ran = passes_run(report)
    assert list(ran) == ["quantize", "count_linears", "remove_noops"]
    quantized, counted = ran["quantize"].stats["layers"], ran["count_linears"].stats["left"]
    assert quantized > 0 and counted == total - quantized  # it ran after quantize
    assert "pass count_linears" in str(report)

    assert config.to_dict()["count"] == {"key": "left"}
    config.save(tmp_path / "config.json")
    loaded = Config.load(tmp_path / "config.json")
    assert loaded == config and loaded.count == CountConfig(key="left")
    assert Config.from_dict({"count": {"key": "k"}}).count == CountConfig(key="k")
    with pytest.raises(ConfigError, match=r"\['cout'\].*valid keys are: \['cache', .*'count'"):
        Config.from_dict({"cout": {}})
    with pytest.raises(ConfigError, match=r"\['ky'\] in options\.count; valid keys are: \['key'\]"):
        Config.from_dict({"count": {"ky": "x"}})
    with pytest.raises(ConfigError, match="count must be a CountConfig"):
        Config(count=3)


def test_outside_passes_go_right_before_or_after_their_anchor(isolated):
    register_pass("first", config="cleanup", before="fold_constants")(nothing)
    register_pass("last", config="cleanup", after="remove_noops")(nothing)
    register_pass("after_first", config="cleanup", after="first")(nothing)
    assert pipeline() == ["first", "after_first", *PIPELINE, "last"]
    assert [spec.name for spec in registered_passes()] == pipeline()


def test_a_pass_must_name_a_place_that_exists_and_a_section_config_has(isolated):
    with pytest.raises(ValueError, match=r"runs after 'quantise', which is no pass; the pipeline"):
        register_pass("mine", config="cleanup", after="quantise")
    with pytest.raises(ValueError, match="must say where it runs"):
        register_pass("mine", config="cleanup")
    with pytest.raises(ValueError, match="must say where it runs"):
        register_pass("mine", config="cleanup", after="quantize", before="remove_noops")
    with pytest.raises(ValueError, match="one of diffopt's; its place is PIPELINE's"):
        register_pass("quantize", config="quant", after="step_guard")
    with pytest.raises(ValueError, match=r"config section 'nope', which Config lacks"):
        register_pass("mine", config="nope", after="quantize")(nothing)
    with pytest.raises(ValueError, match="already registered"):
        register_pass("step_guard", config="cache")(nothing)
    assert pipeline() == list(PIPELINE)
