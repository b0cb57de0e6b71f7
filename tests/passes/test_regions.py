"""Region analysis: blocks, prologue, epilogue and input roles, found with no adapter."""

from __future__ import annotations

import pytest
import torch

import diffopt
from diffopt.evaluation import zoo
from diffopt.passes.regions import module_path

from ..models import NoBlocks, user_model

EXPECTED_BLOCKS = {
    "tiny-flux": lambda c: c.num_layers + c.num_single_layers,
    "tiny-sd3": lambda c: c.num_layers,
    "tiny-dit": lambda c: c.num_layers,
    "tiny-pixart": lambda c: c.num_layers,
    "tiny-unet": lambda c: len(c.down_block_types) + 1 + len(c.up_block_types),
}


def test_block_count_matches_the_config(tiny):
    name, model, inputs = tiny
    report = diffopt.inspect(model, inputs, {"inner": "eager"})
    assert len(report.blocks) == EXPECTED_BLOCKS[name](model.config)
    kinds = [r.kind for r in report.regions]
    assert kinds[0] == "prologue" and kinds[-1] == "epilogue"
    assert set(kinds[1:-1]) == {"block"}


def test_flux_blocks_come_from_both_block_lists():
    model, inputs = zoo.build("tiny-flux")
    report = diffopt.inspect(model, inputs, {"inner": "eager"})
    names = [b.name for b in report.blocks]
    assert names == [
        "transformer_blocks.0",
        "transformer_blocks.1",
        "single_transformer_blocks.0",
        "single_transformer_blocks.1",
    ]
    # rotary embeddings are per-token side inputs: one row per image + text token
    assert any(role.shape[0] == 16 + 8 for role in report.roles.per_token)
    assert report.roles.timestep is not None and "timestep" in report.roles.timestep.node


def test_unet_mid_block_is_one_block():
    model, inputs = zoo.build("tiny-unet")
    names = [b.name for b in diffopt.inspect(model, inputs, {"inner": "eager"}).blocks]
    assert names == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]


@pytest.mark.parametrize("name", ["tiny-dit", "tiny-sd3", "tiny-pixart"])
def test_token_stream_and_timestep_roles(name):
    model, inputs = zoo.build(name)
    roles = diffopt.inspect(model, inputs, {"inner": "eager"}).roles
    assert roles.token_streams, "the [B, N, D] stream entering the first block"
    batch, tokens, _ = roles.token_streams[0].shape
    patch = model.config.patch_size
    assert (batch, tokens) == (2, (model.config.sample_size // patch) ** 2)
    assert roles.timestep is not None and "timestep" in roles.timestep.node


def test_user_model_needs_no_adapter():
    model, inputs = user_model(depth=4)
    report = diffopt.inspect(model, inputs, {"inner": "eager"})
    assert [b.name for b in report.blocks] == [f"blocks.{i}" for i in range(4)]
    assert report.roles.timestep.node.removeprefix("l_").rstrip("_") == "t"
    assert report.roles.token_streams[0].shape == torch.Size([2, 10, 16])


def test_no_blocks_is_reported_not_guessed():
    report = diffopt.inspect(NoBlocks(), (torch.randn(3, 4),), {"inner": "eager"})
    regions = report.passes[0]
    assert regions.name == "regions"
    assert "no repeated blocks found" in regions.skipped[0].what
    assert [r.name for r in report.regions] == ["graph"]
    assert "no repeated blocks found" in str(report)


def test_module_path_normalizes_dynamo_sources():
    source = "L['self'].__dict__['_modules']['transformer_blocks'].__dict__['_modules']['3']"
    assert module_path(source) == "transformer_blocks.3"
    assert module_path("L['self'].transformer_blocks[3].attn") == "transformer_blocks.3.attn"
