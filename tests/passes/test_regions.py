"""Region analysis: blocks, prologue, epilogue and input roles, found with no adapter."""

from __future__ import annotations

import pytest
import torch

import diffopt
from diffopt.evaluation import zoo
from diffopt.passes.regions import module_path

from ..caching import build, cached, denoise
from ..models import NoBlocks, sparse_attention_model, user_model

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
    # a ModuleDict key (Z-Image's all_x_embedder['2-1']) is one name, not the index 2
    assert module_path("L['self'].all_x_embedder.2-1") == "all_x_embedder.2-1"


def test_z_image_blocks_are_its_refiners_and_layers_whole():
    """Z-Image's patch embedder and final layer sit in ModuleDicts keyed "2-1": read as index 2
    they were blocks, and the step guard's span ran from the embedder to the final layer. Its
    attention switches autocast off around the rotary embedding (code outside any module):
    that closed the block there, and the last layer's second half went to the epilogue."""
    model, inputs = zoo.build("tiny-z-image")
    report = diffopt.inspect(model, inputs, {"inner": "eager", "cache": {"steps": 4}})
    assert report.graphs == 1  # the noise level and the blocks in one graph
    blocks = [r.name for r in report.regions if r.kind == "block"]
    assert blocks[0] == "noise_refiner.0" and blocks[-1] == "layers.1"
    step, block = (
        next(p for p in report.passes if p.name == n) for n in ("step_guard", "block_guard")
    )
    # the span caches the stream alone (one value; the node's name is dynamo's to choose)
    assert len(step.rewritten) == 1 and step.rewritten[0].what.count("cached value") == 1
    assert {e.where for e in block.rewritten} == {"noise_refiner.0", "layers.1"}


class _FeedForwardTail(torch.nn.Module):
    """What dynamo captures after a graph break inside a diffusers block: its feed-forward tail,
    whose ``net`` is a ModuleList of projection, dropout and linear."""

    def __init__(self) -> None:
        super().__init__()
        from diffusers.models.attention import FeedForward

        self.ff = FeedForward(16, mult=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ff(x)


def test_the_layers_of_one_feed_forward_are_not_blocks():
    report = diffopt.inspect(
        _FeedForwardTail().eval(), (torch.randn(2, 5, 16),), {"inner": "eager"}
    )
    assert [r.name for r in report.regions] == ["graph"]
    assert "no repeated blocks found" in report.passes[0].skipped[0].what


class _Step(torch.nn.Module):
    def __init__(self, cast_only: bool) -> None:
        super().__init__()
        self.cast_only, self.linear = cast_only, torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(x.dtype) if self.cast_only else x + self.linear(x)


class _NoopBlockInStack(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Step(cast_only) for cast_only in (False, True, False))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = x * t[:, None, None]
        for block in self.blocks:
            x = block(x)
        return x


def _planned_request(model, inputs, plan):
    options = {"inner": "eager", "cache": {"mode": "plan", "plan": plan, "steps": len(plan)}}
    compiled = torch.compile(model, backend="diffopt", options=options)
    with torch.no_grad(), diffopt.request(steps=len(plan)) as request:
        for step in range(len(plan)):
            compiled(inputs[0], torch.full((2,), 0.9 - 0.2 * step))
    return options, request


def test_a_block_left_empty_by_cleanup_leaves_regions_and_guards():
    # a block of no-ops (a same-dtype cast; Mochi's dropout) is erased by remove_noops: no region
    # runs it, so no guard may name it (the cache executor looked every guard region up in the
    # lowered program: KeyError 'ff.net.1')
    model, inputs = _NoopBlockInStack().eval(), (torch.randn(2, 5, 16), torch.rand(2))
    plan = ["full", "full", "reuse", "full"]
    options, request = _planned_request(model, inputs, plan)
    assert [a for actions in request.actions.values() for a in actions] == plan
    report = diffopt.inspect(model, inputs, options)
    assert "blocks.1" not in [r.name for r in report.regions]
    assert any("blocks.1" in note for p in report.passes for note in p.notes)


def test_a_block_that_builds_a_flex_attention_mask_keeps_its_vmap_and_its_attention():
    # BlockMask.from_kv_blocks runs a vmap, which dynamo inlines into the block with no module
    # stack on the nodes closing it: they ended the last block's run, its attention went to the
    # epilogue and the cut fell inside the vmap (Kandinsky 6 SR's NABLA attention)
    model, inputs = sparse_attention_model()
    report = diffopt.inspect(model, inputs, {"inner": "eager"})
    assert [b.name for b in report.blocks] == ["blocks.0", "blocks.1"]
    for block in report.blocks:
        code = report.code_after[block.name]
        assert code.count("flex_attention(") == 1
        assert code.count("_vmap_increment_nesting(") == code.count("_vmap_decrement_nesting(") > 0
        # counted: torch's FLOP counter alone does not run flex attention's higher-order op
        # ("no implementation found ... TransformGetItemToIndex"); its formula counts it
        assert block.flops >= 4 * 2 * 2 * 128 * 128 * 8  # dense attention: B, heads, N², head dim
    assert "flex_attention" not in report.code_after["epilogue"]
    assert "_vmap" not in report.code_after["epilogue"]


def test_flex_attention_blocks_run_cached():
    # the last block's region handed the epilogue batched tensors of its unfinished vmap: the
    # cache kept them, and a reused step failed on them ("your tensor may have escaped from
    # inside a function being vmapped")
    model, (x, _) = sparse_attention_model()
    plan = ["full", "full", "reuse", "full"]
    options = {"inner": "eager", "cache": {"mode": "plan", "plan": plan, "steps": 4}}
    compiled = torch.compile(model, backend="diffopt", options=options)
    with torch.no_grad(), diffopt.request(steps=4) as request:
        for step in range(4):
            timestep = torch.full((2,), 900.0 - 200 * step)
            out, ref = compiled(x, timestep), model(x, timestep)
            if plan[step] == "full":
                torch.testing.assert_close(out, ref, rtol=0, atol=0)
            else:
                assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert [a for actions in request.actions.values() for a in actions] == plan


def test_kandinsky6_sr_runs_its_blocks_through_the_guards_and_the_cache():
    """Its NABLA attention builds a BlockMask in every block (the model above, in diffusers)."""
    from diffopt.evaluation import families

    model, inputs = families.build("tiny-kandinsky6-sr")
    scale = families.FAMILIES["tiny-kandinsky6-sr"].timestep_scale
    report = diffopt.inspect(model, inputs, {"inner": "eager", "cache": {"steps": 4}})
    assert [b.name for b in report.blocks] == [
        "visual_transformer_blocks.0",
        "visual_transformer_blocks.1",
    ]
    assert all(report.code_after[b.name].count("flex_attention(") == 1 for b in report.blocks)
    ran = {p.name for p in report.passes}
    assert {"step_guard", "block_guard"} <= ran
    plan = ["full", "full", "reuse", "full"]
    options = {"inner": "eager", "cache": {"mode": "plan", "plan": plan, "steps": 4}}
    compiled = torch.compile(model, backend="diffopt", options=options)
    with torch.no_grad(), diffopt.request(steps=4) as request:
        for step in range(4):
            timestep = torch.full_like(inputs["timestep"], scale * (0.9 - 0.2 * step))
            out = compiled(**{**inputs, "timestep": timestep})[0]
            if plan[step] == "full":
                torch.testing.assert_close(out, model(**{**inputs, "timestep": timestep})[0])
    assert [a for actions in request.actions.values() for a in actions] == plan


class _BreakBeforeTheStack(_NoopBlockInStack):
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = x * t[:, None, None]
        torch._dynamo.graph_break()  # the stack runs in a graph of its own, after this one
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("model_class", [_NoopBlockInStack, _BreakBeforeTheStack])
def test_outside_a_request_a_model_without_a_timestep_input_ignores_another_models(model_class):
    """As below, with no request scope: the noise level another model's call left behind was
    read as this call's (every call another guidance branch of step 0: nothing reused). The
    graph that starts a call clears it, whether it holds the stack or runs before a break."""
    other, other_inputs = build()
    denoise(cached(other, 12), other_inputs, 12)
    model, x = model_class().eval(), torch.randn(2, 5, 16)
    plan = ["full", "full", "reuse", "full"]
    options = {"inner": "eager", "cache": {"mode": "plan", "plan": plan, "steps": len(plan)}}
    compiled = torch.compile(model, backend="diffopt", options=options)
    with torch.no_grad():
        for step, action in enumerate(plan):
            t = torch.full((2,), 0.9 - 0.2 * step)
            assert torch.equal(compiled(x, t), model(x, t)) == (action == "full"), step


def test_a_model_without_a_timestep_input_ignores_the_noise_level_another_model_left():
    """This stack's noise level is no graph input (it scales the stream), so each call is a
    step. Another model run before, outside a scope, left its own noise level behind; read in
    the next request, it made every call another guidance branch of step 0 (nothing reused)."""
    other, other_inputs = build()
    denoise(cached(other, 12), other_inputs, 12)
    model, inputs = _NoopBlockInStack().eval(), (torch.randn(2, 5, 16), torch.rand(2))
    plan = ["full", "full", "reuse", "full"]
    _, request = _planned_request(model, inputs, plan)
    assert request.actions == {0: plan}
