"""The three guard passes: where they apply, what they record, and why they skip."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import diffopt
from diffopt import config as config_module
from diffopt import guards
from diffopt.config import CacheConfig, Config
from diffopt.passes import PassError
from diffopt.runtime.cache import STRATEGIES

from ..caching import build


def guard_reports(name: str, **settings):
    model, inputs = build(name)
    config = Config(inner="eager", cache=CacheConfig(steps=10, **settings))
    report = diffopt.inspect(model, inputs, config)
    return {r.name: r for r in report.passes if r.name.endswith("_guard")}, report


def test_dit_gets_all_three_guards():
    reports, report = guard_reports("tiny-dit")
    step = reports["step_guard"].rewritten[0]
    assert step.where == "transformer_blocks.0 … transformer_blocks.1"
    assert "+ cached residual" in step.what
    assert [e.where for e in reports["block_guard"].rewritten] == [
        "transformer_blocks.0",
        "transformer_blocks.1",
    ]
    assert "gather top tokens of hidden_states" in reports["token_guard"].rewritten[0].what
    assert "step guard over 2 regions" in str(report)


def test_block0_indicator_keeps_the_first_block_out_of_the_span():
    reports, _ = guard_reports("tiny-dit", indicator="block0")
    assert reports["step_guard"].rewritten[0].where.startswith("transformer_blocks.1")
    assert len(reports["block_guard"].rewritten) == 1


@pytest.mark.parametrize(
    ("family", "reason"),
    [
        ("tiny-flux", "not as [B, N, ...]"),  # rotary embeddings shared by the batch
        ("tiny-sd3", "does not run on a 4-token sequence"),  # a token count baked into the graph
        ("tiny-unet", "no [B, N, D] token stream"),
    ],
)
def test_token_guard_says_why_it_cannot_apply(family, reason):
    reports, _ = guard_reports(family)
    assert reports["step_guard"].rewritten
    assert reason in reports["token_guard"].skipped[0].what


def test_unet_blocks_without_a_residual_are_skipped_with_the_reason():
    reports, _ = guard_reports("tiny-unet")
    skipped = {e.where: e.what for e in reports["block_guard"].skipped}
    assert "up_blocks.1" in skipped
    assert "no output has a same-shaped input" in skipped["up_blocks.1"]


def test_strict_turns_a_skipped_guard_into_an_error():
    model, inputs = build("tiny-flux")
    config = Config(inner="eager", strict=True, cache=CacheConfig(steps=10))
    with pytest.raises(Exception, match="pass 'token_guard' could not apply") as info:
        diffopt.inspect(model, inputs, config)
    assert isinstance(getattr(info.value, "inner_exception", info.value), PassError)


def test_guards_can_be_switched_off():
    reports, _ = guard_reports("tiny-dit", token_guard=False, block_guard=False)
    assert not reports["token_guard"].rewritten and not reports["block_guard"].rewritten
    assert "off" in reports["token_guard"].notes[0]


def test_cache_auto_in_options_points_to_calibrate():
    with pytest.raises(diffopt.ConfigError, match=r"diffopt\.calibrate"):
        Config(cache="auto")


# ---- the cache contract (diffopt.guards) ----------------------------------------------------


def test_every_action_has_a_guard_and_a_strategy():
    assert set(guards.ACTION_GUARD) == set(guards.ACTIONS) == set(STRATEGIES)
    assert {g for g in guards.ACTION_GUARD.values() if g} <= set(guards.GUARD_KINDS)
    assert guards.ACTIONS[0] == "full" and guards.ACTIONS[-1] == "reuse"  # most to least compute
    assert {STRATEGIES[a].guard for a in guards.ACTIONS} == {None, *guards.GUARD_KINDS}


def test_the_contract_imports_nothing_from_diffopt():
    """config.py imports CacheAction from it: an import back would be a cycle."""
    tree = ast.parse(Path(guards.__file__).read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.split(".")[0] == "diffopt"]
    assert config_module.CacheAction is guards.CacheAction  # one definition, used by config
