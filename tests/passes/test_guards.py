"""The three guard passes: where they apply, what they record, and why they skip."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import diffopt
from diffopt import config as config_module
from diffopt import guards
from diffopt.config import CacheConfig, Config
from diffopt.passes import PassError
from diffopt.runtime.cache import STRATEGIES

from ..caching import build
from ..models import gated_model


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
    ("family", "says"),
    [
        # rotary tables shared by the batch, over text then image tokens (a joint sequence)
        ("tiny-flux", ["freqs_cos_3, freqs_sin_3 have no batch axis", "(8 other tokens, these 16"]),
        # joint attention: image then text, the split between them baked in at capture
        (
            "tiny-sd3",
            ["gather top tokens of hidden_states_1;", "(0 other tokens, these 16, 6 other"],
        ),
        # a video model's rotary tables [1, N, 1, D], no joint sequence (text by cross-attention)
        ("tiny-wan", ["freqs_cos, freqs_sin have no batch axis"]),
    ],
)
def test_token_guard_covers_dual_stream_and_video_models(family, says):
    reports, _ = guard_reports(family)
    what = reports["token_guard"].rewritten[0].what
    assert all(part in what for part in says), what


@pytest.mark.parametrize(
    ("family", "reason"),
    [
        ("tiny-sana", "does not run on a 16-token sequence"),  # a token grid baked into the graph
        ("tiny-ideogram4", "runs over the tokens on axes [2, 3]"),  # an attention mask
        ("tiny-unet", "no [B, N, D] token stream"),
        # its text reordered by boolean masks: the joint sequence's text length is unbacked
        ("tiny-hunyuan-video15", "a count known only at run time"),
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
    model, inputs = build("tiny-unet")
    config = Config(inner="eager", strict=True, cache=CacheConfig(steps=10, block_guard=False))
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


def test_token_axes_find_where_an_input_runs_over_tokens():
    """What a token refresh gathers, as the pass and the runtime both read it from shapes."""
    batch, tokens = 2, 16
    assert guards.token_axes((2, 16, 32), batch, tokens) == [1]  # the stream: per sample
    assert guards.token_axes((2, 32), batch, tokens) == []  # a per-sample vector
    assert guards.token_axes((1, 16, 1, 8), batch, tokens) == [1]  # Wan's rotary table
    assert not guards.per_sample((1, 16, 1, 8), batch)  # ... shared by the batch
    assert guards.token_axes((24, 8), batch, tokens) == []  # text + image: unknown layout
    assert guards.token_axes((24, 8), batch, tokens, joint=(8, 0)) == [0]  # Flux's table
    assert guards.token_axes((8, 8), batch, tokens, joint=(8, 0)) == []  # the text's own rows
    # boolean masks: over keys [B, 1, 1, N] (gathered), over token pairs (refused)
    assert guards.token_axes((2, 1, 1, 24), batch, tokens, joint=(0, 8), mask=True) == [3]
    assert guards.token_axes((2, 1, 24, 24), batch, tokens, joint=(0, 8), mask=True) == [2, 3]


def test_residual_bases_break_shape_ties_by_the_chain_of_additions():
    """Of several inputs of an output's shape, the base is the one its additions reach."""
    stream, gate, vector = (2, 10, 16), (2, 10, 16), (2, 16)
    # a unique same-shaped input wins alone, reached or not (as before the tie-break)
    assert guards.residual_bases([stream], [vector, stream]) == [1]
    assert guards.residual_bases([stream], [vector, stream], [set()]) == [1]
    # several: shapes alone give none, the path picks one, a path reaching two picks none
    assert guards.residual_bases([stream], [gate, stream]) == [None]
    assert guards.residual_bases([stream], [gate, stream], [{1}]) == [1]
    assert guards.residual_bases([stream], [gate, stream], [{0, 1}]) == [None]
    # out = x + g * f(x), walked back through additions only: x is reached, g is not
    operands = {"out": ["x", "mul"], "mul": [], "x": []}
    assert guards.residual_path(["out"], lambda v: operands[v], {"x", "g"}) == [["x"]]


def test_the_block_guard_pairs_a_gated_block_with_its_stream_not_its_gates():
    """Four [B, N, D] modulation tensors enter each block beside the stream (Ernie-Image's
    layout): shapes alone left every block without a base, so the block guard skipped them and
    the step and token guards cached values; the chain of additions names the stream."""
    model, inputs = gated_model()
    config = Config(inner="eager", cache=CacheConfig(steps=10))
    report = diffopt.inspect(model, inputs, config)
    reports = {r.name: r for r in report.passes if r.name.endswith("_guard")}
    [stream] = [s.node for s in report.roles.token_streams]  # the gates are side inputs
    assert len(report.roles.per_token) == 4
    first, second = [e.what for e in reports["block_guard"].rewritten]
    assert first.endswith(f"= {stream} + cached residual"), first
    out = first.removeprefix("block guard: ").split(" = ")[0]  # block 0's output feeds block 1
    assert second.endswith(f"= {out} + cached residual"), second
    assert reports["step_guard"].rewritten[0].what.endswith(f"= {stream} + cached residual")
    token = reports["token_guard"].rewritten[0].what
    assert f"gather top tokens of {stream}, " in token and token.endswith("+ cached residual")


class _JointBlock(torch.nn.Module):
    """Two streams of one length through joint attention; the text stream leaves clamped, so its
    chain of additions breaks on an op the walk does not follow."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(dim, 2, batch_first=True)

    def forward(self, img, txt):
        joint = torch.cat([txt, img], dim=1)
        out = self.attn(joint, joint, joint, need_weights=False)[0]
        return img + out[:, txt.shape[1] :], torch.clamp(txt + out[:, : txt.shape[1]], -9, 9)


class _JointDenoiser(torch.nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed, self.time = torch.nn.Linear(4, dim), torch.nn.Linear(1, dim)
        self.blocks = torch.nn.ModuleList(_JointBlock(dim) for _ in range(2))
        self.head = torch.nn.Linear(dim, 4)

    def forward(self, hidden_states, encoder_hidden_states, timestep):
        img = self.embed(hidden_states) + self.time(timestep[:, None].float())[:, None]
        txt = encoder_hidden_states
        for block in self.blocks:
            img, txt = block(img, txt)
        return self.head(img)


def test_a_stream_whose_chain_of_additions_breaks_stays_a_stream():
    """Equal-length image and text streams: the image output's additions reach the image
    input, the clamped text output's reach nothing. Both inputs stay token streams (the review
    found the text stream dropped once another output of its shape had found its base)."""
    model = _JointDenoiser().eval()
    inputs = {
        "hidden_states": torch.randn(2, 8, 4),
        "encoder_hidden_states": torch.randn(2, 8, 16),
        "timestep": torch.tensor([500.0, 500.0]),
    }
    report = diffopt.inspect(model, inputs, Config(inner="eager", cache=CacheConfig(steps=10)))
    assert len(report.roles.token_streams) == 2, report.roles.token_streams


def test_ernie_image_gets_the_block_guard_and_its_tokens_first_stream_no_token_guard():
    """Ernie-Image's layers read the stream and six shift/scale/gate tensors of its shape; its
    stream is [S, B, H], which a token refresh (tokens on axis 1) cannot gather."""
    reports, report = guard_reports("tiny-ernie-image")
    [stream] = report.roles.token_streams
    blocks = [e.where for e in reports["block_guard"].rewritten]
    assert blocks == ["layers.0", "layers.1"] and not reports["block_guard"].skipped
    assert reports["block_guard"].rewritten[0].what.endswith(f"= {stream.node} + cached residual")
    assert reports["step_guard"].rewritten[0].what.endswith(f"= {stream.node} + cached residual")
    assert "runs tokens first" in reports["token_guard"].skipped[0].what
