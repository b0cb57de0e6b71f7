"""`diffopt.unroll`: the schedule as one module, equal to the step loop; fractional steps."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
    PixArtTransformer2DModel,
    TCDScheduler,
)
from torch import nn

import diffopt
from diffopt import ConfigError
from diffopt.evaluation import zoo
from diffopt.evaluation.families import FAMILIES
from diffopt.fewstep.compensation import Compensation, load_compensation, save_compensation
from diffopt.fewstep.sampler import guidance_batch, sample
from diffopt.fewstep.unroll import parse_schedule

SCHEDULERS = {
    "flow-match": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
    "euler": lambda: EulerDiscreteScheduler(),
    "ddim": lambda: DDIMScheduler(clip_sample=False),
    "lcm": lambda: LCMScheduler(),
    "tcd": lambda: TCDScheduler(),
}


def tiny_dit():
    model, inputs = zoo.build("tiny-dit", batch=2)
    labels = inputs["class_labels"]
    return model, inputs["hidden_states"], {"class_labels": labels}, {"class_labels": labels * 0}


def step_loop(model, scheduler, steps, latents, cond, uncond, guidance, seed, batched=None):
    """The usual diffusers loop, one scheduler.step per denoiser call; `batched`: the guidance
    batch of nested conditioning, built by hand as a pipeline does."""
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = latents
    inputs = batched if batched is not None else {k: torch.cat([cond[k], uncond[k]]) for k in cond}
    for t in scheduler.timesteps:
        model_in = (
            scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        )
        batch = torch.cat([model_in, model_in])
        out = model(batch, timestep=t.expand(len(batch)).float(), **inputs, return_dict=False)[0]
        v_cond, v_uncond = out[:, : x.shape[1]].chunk(2)
        out = v_uncond + guidance * (v_cond - v_uncond)
        x = scheduler.step(out, t, x, generator=generator, return_dict=False)[0]
    return x


def tiny_pixart(sizes: bool):
    """tiny-pixart with PixArt's nested ``added_cond_kwargs``: None (the zoo's model), or with
    `sizes` PixArt-α's resolution and aspect-ratio tensors (a model that embeds them; its width
    is a multiple of 3, the embedding splits it in three). Returns the model, latents, cond,
    uncond and the guidance batch built by hand, as PixArt's pipeline does."""
    model, inputs = zoo.build("tiny-pixart", batch=2)
    text = inputs["encoder_hidden_states"]
    empty = torch.zeros_like(text)
    if not sizes:
        extra = {"resolution": None, "aspect_ratio": None}
        cond = {"encoder_hidden_states": text, "added_cond_kwargs": extra}
        uncond = {"encoder_hidden_states": empty, "added_cond_kwargs": dict(extra)}
        batched = {"encoder_hidden_states": torch.cat([text, empty]), "added_cond_kwargs": extra}
        return model, inputs["hidden_states"], cond, uncond, batched
    torch.manual_seed(0)
    config = {**model.config, "num_attention_heads": 3, "cross_attention_dim": 24}
    model = PixArtTransformer2DModel(**{**config, "use_additional_conditions": True}).eval()
    resolution, aspect = torch.tensor([[64.0, 64.0], [32.0, 64.0]]), torch.tensor([[1.0], [2.0]])
    cond = {
        "encoder_hidden_states": text,
        "added_cond_kwargs": {"resolution": resolution, "aspect_ratio": aspect},
    }
    uncond = {
        "encoder_hidden_states": empty,
        "added_cond_kwargs": {"resolution": resolution, "aspect_ratio": aspect},
    }
    batched = {
        "encoder_hidden_states": torch.cat([text, empty]),
        "added_cond_kwargs": {
            "resolution": resolution.repeat(2, 1),
            "aspect_ratio": aspect.repeat(2, 1),
        },
    }
    return model, inputs["hidden_states"], cond, uncond, batched


def noise_like_the_loop(sampler, latents, seed):
    """The noises a seeded scheduler draws, in order, for the unrolled sampler's `noise`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.stack(
        [torch.randn(latents.shape, generator=generator) for _ in range(sampler.noisy_steps)]
    )


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_matches_the_step_loop_eager_and_compiled(name):
    model, latents, cond, uncond = tiny_dit()
    steps = 4
    with torch.no_grad():
        expected = step_loop(model, SCHEDULERS[name](), steps, latents, cond, uncond, 2.0, seed=7)
        sampler = diffopt.unroll(model, SCHEDULERS[name](), steps, guidance=2.0)
        noise = noise_like_the_loop(sampler, latents, seed=7) if sampler.noisy_steps else None
        assert (sampler.noisy_steps > 0) == (name in ("lcm", "tcd"))
        eager = sampler(latents, cond, uncond, noise)
        compiled = torch.compile(
            sampler, backend="diffopt", options={"inner": "eager"}, fullgraph=True
        )(latents, cond, uncond, noise)
    # float32 through 4 steps of guidance 2: the inlined affine maps are measured from the
    # scheduler, so a few ulps of rounding differ (Euler: 2.6e-5 relative, diffusers 0.42.1)
    torch.testing.assert_close(eager, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(compiled, expected, atol=1e-4, rtol=1e-4)
    if noise is not None:
        with pytest.raises(ConfigError, match="this schedule adds noise at"):
            sampler(latents, cond, uncond, noise[:1])


def test_schedulers_that_are_not_affine_are_refused():
    model = zoo.build("tiny-dit")[0]
    with pytest.raises(ConfigError, match=r"clip_sample=True.*clip_sample=False"):
        diffopt.unroll(model, DDIMScheduler(clip_sample=True), 2)
    with pytest.raises(ConfigError, match="not an affine map"):
        diffopt.unroll(model, DPMSolverMultistepScheduler(), 3)


def test_schedule_parsing():
    full, partial = diffopt.full, diffopt.partial
    assert parse_schedule(2, None) == [full, full]
    assert parse_schedule("1.67", 8) == [full, partial(5)]
    assert parse_schedule(2.5, 8) == [full, full, partial(4)]
    assert parse_schedule([full, partial(blocks=0)], 8) == [full, partial(0)]
    with pytest.raises(ConfigError, match="first step must be full"):
        parse_schedule([partial(2), full], 8)
    with pytest.raises(ConfigError, match="between 0 and 7 of 8 blocks"):
        parse_schedule([full, partial(8)], 8)
    with pytest.raises(ConfigError, match="at least one full step"):
        parse_schedule("0.5", 8)


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, h):
        return h + torch.tanh(self.linear(h))


class Toy(nn.Module):
    """embed → blocks → head, the shape of a user model; residual blocks we can follow by hand."""

    def __init__(self, width: int = 8, depth: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(2, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 2)

    def forward(self, hidden_states, timestep, return_dict=False):
        h = self.embed(hidden_states) + timestep[:, None, None] / 1000
        for block in self.blocks:
            h = block(h)
        return (self.head(h),)


def test_a_partial_step_reuses_the_last_full_steps_deep_residual():
    toy, k = Toy(), 1
    scheduler = FlowMatchEulerDiscreteScheduler()
    sampler = diffopt.unroll(
        toy, scheduler, [diffopt.full, diffopt.partial(blocks=k)], sigmas=[1.0, 0.5]
    )
    x = torch.randn(3, 5, 2)

    def stack(h, blocks):
        for block in blocks:
            h = block(h)
        return h

    with torch.no_grad():
        h0 = toy.embed(x) + 1.0
        shallow = stack(h0, toy.blocks[:k])
        residual = stack(shallow, toy.blocks[k:]) - shallow
        x1 = x - 0.5 * toy.head(shallow + residual)
        shallow1 = stack(toy.embed(x1) + 0.5, toy.blocks[:k])
        expected = x1 - 0.5 * toy.head(shallow1 + residual)
        torch.testing.assert_close(sampler(x, {}), expected)
        # matmul FLOPs per token: embed 2·8, a block 8·8, head 8·2; the partial step skips 3 blocks
        assert sampler.effective_nfe(x, {}) == pytest.approx(1 + (16 + 64 + 16) / (16 + 256 + 16))


def test_fit_compensation_on_ref_dit_reduces_the_residual_error(tmp_path):
    teacher = zoo.load("ref-dit")
    labels = torch.arange(6) % 10
    latents = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    cond, uncond = {"class_labels": labels}, {"class_labels": torch.full_like(labels, 10)}
    sampler = diffopt.unroll(
        teacher.model,
        teacher.scheduler,
        "1.5",
        sigmas=[1.0, 0.5],
        guidance=1.5,
        compensation="lowrank",
        rank=4,
    )
    assert sampler.schedule == [diffopt.full, diffopt.partial(4)]
    assert 1.45 < sampler.effective_nfe(latents, cond, uncond) < 1.55
    with torch.no_grad():
        before = sampler(latents, cond, uncond)
    fit = diffopt.fit_compensation(sampler, latents, cond, uncond)
    (error_before, error_after) = fit.steps[1]
    assert error_after < 0.95 * error_before
    assert "error after" in fit.table()
    with torch.no_grad():
        assert not torch.equal(sampler(latents, cond, uncond), before)

    path = save_compensation(sampler, tmp_path / "comp.safetensors")
    again = diffopt.unroll(
        teacher.model,
        teacher.scheduler,
        "1.5",
        sigmas=[1.0, 0.5],
        guidance=1.5,
        compensation="lowrank",
        rank=4,
    )
    load_compensation(again, path)
    with torch.no_grad():
        torch.testing.assert_close(again(latents, cond, uncond), sampler(latents, cond, uncond))
    other = diffopt.unroll(
        teacher.model, teacher.scheduler, "1.25", sigmas=[1.0, 0.5], compensation="lowrank", rank=4
    )
    with pytest.raises(ConfigError, match=r"fit for another sampler.*schedule: fit for"):
        load_compensation(other, path)
    affine = diffopt.unroll(
        teacher.model, teacher.scheduler, "1.5", sigmas=[1.0, 0.5], guidance=1.5
    )
    with pytest.raises(ConfigError, match="compensation: fit for 'lowrank, rank 4'"):
        load_compensation(affine, path)


@pytest.mark.parametrize("kind", ["affine", "lowrank"])
def test_compensation_recovers_a_map_it_can_express(kind):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 50, 6, generator=gen)
    y = x * torch.linspace(0.5, 2, 6) + 0.3
    if kind == "lowrank":
        y = y + x @ torch.randn(6, 1, generator=gen) @ torch.randn(1, 6, generator=gen)
    compensation = Compensation(6, kind=kind, rank=1)
    torch.testing.assert_close(compensation(x), x)  # the identity until fit
    compensation.fit(x, y, ridge=0.0)
    torch.testing.assert_close(compensation(x), y, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize(
    ("name", "stack"),
    [
        ("tiny-flux", "single_transformer_blocks"),  # run last, read by the head
        ("tiny-lumina2", "layers"),  # longer than its refiners
        ("tiny-kandinsky5", "visual_transformer_blocks"),
        ("tiny-latte", None),  # spatial and temporal stacks run interleaved
        ("tiny-wan-animate", None),  # as many face-adapter blocks as blocks (tiny config)
        ("tiny-unet", None),  # down and up blocks resample the stream
        ("tiny-stable-cascade", None),  # stacks of lists
    ],
)
def test_partial_steps_cut_the_stack_the_head_reads_or_ask_which(name, stack):
    model = zoo.build(name)[0]
    if stack is None:
        with pytest.raises(ConfigError, match="pass blocks="):
            diffopt.unroll(model, FlowMatchEulerDiscreteScheduler(), "1.5")
        diffopt.unroll(model, FlowMatchEulerDiscreteScheduler(), 2)  # full steps need no blocks
    else:
        assert diffopt.unroll(model, FlowMatchEulerDiscreteScheduler(), "1.5").stack == stack


def dual_stream(name: str, batch: int = 2):
    """A zoo dual-stream model, its latents and its conditioning (Flux: ids included)."""
    model, inputs = zoo.build(name, batch=batch)
    skip = ("hidden_states", "timestep", "return_dict")
    return model, inputs["hidden_states"], {k: v for k, v in inputs.items() if k not in skip}


@pytest.mark.parametrize(
    "name",
    [
        "tiny-dit",  # its forward reads block 0's norm1.emb: the tap on block 0 must pass it on
        "tiny-lumina-next",  # its blocks' last linear writes 4× the hidden size
        "tiny-ideogram4",
        "tiny-kandinsky6",  # its query projection is to_query
        "tiny-prx",  # a fused qkv projection; the last linear is a modulation (6× the width)
        "tiny-qwenimage21",  # its forward reads every block's attn.processor, skipped ones too
    ],
)
def test_a_partial_step_given_the_true_residual_is_the_full_step(name):
    """Blocks whose parts the model reads, or whose last linear is not the stream's width:
    a partial step handed the residual its skipped block produces on this very step must give
    the full step's output."""
    family = FAMILIES[name]
    model, inputs = family.build()
    x = inputs[family.latents]
    skip = (family.latents, family.timestep, "return_dict")
    cond = {k: v for k, v in inputs.items() if k not in skip}
    sampler = diffopt.unroll(
        model,
        FlowMatchEulerDiscreteScheduler(),
        "1.5",
        timestep_scale=family.timestep_scale / 1000,
    )
    t = x.new_full((x.shape[0],), 0.5 * family.timestep_scale)
    with torch.no_grad():
        full = sampler._call(sampler._views[0], x, t, cond)
        sampler._reuse[1].residual = sampler._residual(sampler.schedule[1].blocks)
        partial = sampler._call(sampler._views[1], x, t, cond)
        sampler._reuse[1].residual = None
    torch.testing.assert_close(partial, full, atol=1e-5, rtol=1e-4)


DUAL_STREAM = [
    ("tiny-flux", "transformer_blocks"),  # the single-stream blocks after it read the text
    ("tiny-flux", "single_transformer_blocks"),  # Flux's and ref-flux's 1.x stack
    ("tiny-sd3", "transformer_blocks"),  # its last block returns None for the text
]


@pytest.mark.parametrize(("name", "blocks"), DUAL_STREAM)
@pytest.mark.parametrize("k", [0, 1])
def test_a_partial_step_on_dual_stream_blocks_is_the_full_step_given_the_true_residuals(
    name, blocks, k
):
    """The pair plumbing: a partial step handed the residuals its skipped blocks produce on
    this very step (both streams) must give the full step's output, whichever order the block
    returns its streams in and whatever later blocks read."""
    model, x, cond = dual_stream(name)
    sampler = diffopt.unroll(
        model, FlowMatchEulerDiscreteScheduler(), [diffopt.full, diffopt.partial(k)], blocks=blocks
    )
    t = x.new_full((x.shape[0],), 500.0)
    with torch.no_grad():
        full = sampler._call(sampler._views[0], x, t, cond)
        sampler._reuse[1].residual = sampler._residual(k)  # both streams, this step's
        partial = sampler._call(sampler._views[1], x, t, cond)
        sampler._reuse[1].residual = None
    torch.testing.assert_close(partial, full, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("blocks", ["transformer_blocks", "single_transformer_blocks"])
def test_a_fractional_schedule_on_flux_skips_blocks_and_fits_its_compensation(blocks):
    flux, x, cond = dual_stream("tiny-flux", batch=4)
    schedule = [diffopt.full, diffopt.partial(1)]
    kw = {"sigmas": [1.0, 0.5], "timestep_scale": 1e-3}
    sampler = diffopt.unroll(flux, FlowMatchEulerDiscreteScheduler(), schedule, blocks=blocks, **kw)
    two_full = diffopt.unroll(flux, FlowMatchEulerDiscreteScheduler(), 2, **kw)
    calls = {}
    hooks = [
        block.register_forward_hook(
            lambda *_, key=(stack, i): calls.update({key: calls.get(key, 0) + 1})
        )
        for stack in ("transformer_blocks", "single_transformer_blocks")
        for i, block in enumerate(getattr(flux, stack))
    ]
    try:
        with torch.no_grad():
            unfit = sampler(x, cond)
    finally:
        for hook in hooks:
            hook.remove()
    assert unfit.shape == x.shape and unfit.isfinite().all()
    # the full step runs every block, the partial step block 0 of `blocks` and the other stack
    other = "single_transformer_blocks" if blocks == "transformer_blocks" else "transformer_blocks"
    assert calls == {(blocks, 0): 2, (blocks, 1): 1, (other, 0): 2, (other, 1): 2}
    assert 1.5 < sampler.effective_nfe(x, cond) < 1.8

    fit = diffopt.fit_compensation(sampler, x, cond)
    error_before, error_after = fit.steps[1]  # the image stream's residual, on the fit inputs
    assert error_after < 0.85 * error_before  # measured: 0.49 → 0.35 and 0.54 → 0.39
    with torch.no_grad():
        target, fitted = two_full(x, cond), sampler(x, cond)
        compiled = torch.compile(
            sampler, backend="diffopt", options={"inner": "eager"}, fullgraph=True
        )(x, cond)
    # the fit brings the 1.x sampler closer to the 2-step one it approximates
    assert (fitted - target).norm() < 0.9 * (unfit - target).norm()
    torch.testing.assert_close(compiled, fitted)


class DualBlock(nn.Module):
    """A dual-stream block in diffusers' MMDiT convention: (text, image) out."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.image, self.text = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, hidden_states, encoder_hidden_states):
        mixed = torch.tanh(self.image(hidden_states)).mean(1, keepdim=True)
        return encoder_hidden_states + mixed, hidden_states + torch.tanh(self.text(mixed))


class DualToy(Toy):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(DualBlock(8) for _ in range(3))

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
        h = self.embed(hidden_states) + timestep[:, None, None] / 1000
        text = encoder_hidden_states
        for block in self.blocks:
            text, h = block(h, text)
        return (self.head(h),)


def test_dual_stream_blocks_whose_streams_cannot_be_told_apart_are_refused():
    sampler = diffopt.unroll(DualToy(), FlowMatchEulerDiscreteScheduler(), "1.67")
    with torch.no_grad():
        sampler(torch.randn(2, 5, 2), {"encoder_hidden_states": torch.randn(2, 3, 8)})
        with pytest.raises(ConfigError, match="other than the image's"):
            sampler(torch.randn(2, 5, 2), {"encoder_hidden_states": torch.randn(2, 5, 8)})


def test_the_compensation_fit_does_not_depend_on_the_residuals_scale():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 50, 6, generator=gen)
    y = 0.8 * x + 0.1 * torch.randn(4, 50, 6, generator=gen)
    scales = []
    for size in (1.0, 1e-2):  # tiny-flux's residuals have a variance of 4e-4
        compensation = Compensation(6)
        compensation.fit(size * x, size * y)
        scales.append(compensation.scale.clone())
    torch.testing.assert_close(scales[1], scales[0])


def test_the_step_loop_version_runs_the_same_schedule():
    toy = Toy()
    sampler = diffopt.unroll(toy, FlowMatchEulerDiscreteScheduler(), "2.5", sigmas=[1, 0.6, 0.3])
    loop = sampler.as_step_loop(
        lambda step: torch.compile(step, backend="diffopt", options={"inner": "eager"})
    )
    x = torch.randn(3, 5, 2)
    with torch.no_grad():
        torch.testing.assert_close(loop(x, {}), sampler(x, {}))


def test_a_fractional_sampler_exports_as_one_onnx_file(tmp_path):
    pytest.importorskip("onnxruntime")
    teacher = zoo.load("ref-dit")
    sampler = diffopt.unroll(teacher.model, teacher.scheduler, "1.67", sigmas=[1.0, 0.5])
    latents, cond = torch.randn(3, 1, 16, 16), {"class_labels": torch.tensor([1, 4, 7])}
    out = diffopt.export(sampler, (latents, cond), out=tmp_path, dynamic_batch=True)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx"]
    engine = diffopt.load_engine(out)
    for batch in (3, 5):  # exported at 3
        latents, cond = torch.randn(batch, 1, 16, 16), {"class_labels": torch.arange(batch)}
        with torch.no_grad():
            expected = sampler(latents, cond)
        torch.testing.assert_close(
            engine(latents=latents, cond=cond), expected, atol=1e-4, rtol=1e-4
        )


def test_a_guidance_distilled_model_gets_the_scale_as_an_input():
    seen = []

    class Distilled(Toy):
        def forward(self, hidden_states, timestep, guidance, return_dict=False):
            seen.append(guidance)
            return super().forward(hidden_states, timestep)

    sampler = diffopt.unroll(
        Distilled(), FlowMatchEulerDiscreteScheduler(), 2, guidance=3.5, guidance_input="guidance"
    )
    with torch.no_grad():
        sampler(torch.randn(3, 5, 2), {}, uncond={})  # no batch of two: the scale is an input
    assert [g.tolist() for g in seen] == [[3.5] * 3] * 2


def test_flux_timesteps_unets_and_schedule_inputs():
    flux, inputs = zoo.build("tiny-flux")
    cond = {
        k: v for k, v in inputs.items() if k not in ("hidden_states", "timestep", "return_dict")
    }
    scheduler = FlowMatchEulerDiscreteScheduler()
    sampler = diffopt.unroll(
        flux, scheduler, [diffopt.full, diffopt.full], sigmas=[1.0, 0.5], timestep_scale=1e-3
    )
    x = inputs["hidden_states"]
    with torch.no_grad():
        expected = x
        for sigma, nxt in ((1.0, 0.5), (0.5, 0.0)):  # diffusers' Flux takes t / 1000 = sigma
            t = torch.full((2,), sigma)
            v = flux(hidden_states=expected, timestep=t, **cond, return_dict=False)[0]
            expected = expected + (nxt - sigma) * v
        got = sampler(x, cond)
    torch.testing.assert_close(got, expected)
    assert [c.timestep for c in sampler.coefficients] == [1.0, 0.5]

    unet, inputs = zoo.build("tiny-unet")  # latents go in as `sample`
    cond = {"encoder_hidden_states": inputs["encoder_hidden_states"]}
    with torch.no_grad():
        assert diffopt.unroll(unet, scheduler, 2)(inputs["sample"], cond).isfinite().all()
    with pytest.raises(ValueError, match="takes a step count, not explicit sigmas"):
        diffopt.unroll(unet, DDIMScheduler(clip_sample=False), 2, sigmas=[1.0, 0.5])


@pytest.mark.parametrize("sizes", [False, True], ids=["added-cond-none", "added-cond-tensors"])
def test_nested_conditioning_matches_the_step_loop(sizes):
    model, latents, cond, uncond, batched = tiny_pixart(sizes)
    with torch.no_grad():
        expected = step_loop(
            model, DDIMScheduler(clip_sample=False), 3, latents, cond, uncond, 2.0, 0, batched
        )
        sampler = diffopt.unroll(model, DDIMScheduler(clip_sample=False), 3, guidance=2.0)
        eager = sampler(latents, cond, uncond)
        compiled = torch.compile(
            sampler, backend="diffopt", options={"inner": "eager"}, fullgraph=True
        )(latents, cond, uncond)
        looped = sample(
            model, DDIMScheduler(clip_sample=False), latents, cond, uncond, steps=3, guidance=2.0
        )
    torch.testing.assert_close(eager, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(compiled, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(looped, expected, atol=1e-4, rtol=1e-4)
    if sizes:  # the sizes reach the model: another aspect ratio, other latents
        extra = {**cond["added_cond_kwargs"], "aspect_ratio": torch.tensor([[3.0], [0.5]])}
        cond, uncond = ({**c, "added_cond_kwargs": extra} for c in (cond, uncond))
        with torch.no_grad():
            assert not torch.allclose(sampler(latents, cond, uncond), eager, atol=1e-3)


def test_guidance_batches_of_nested_conditioning_that_do_not_pair_are_refused():
    text = torch.ones(2, 3)
    cond = {"text": text, "extra": {"resolution": torch.ones(2, 2), "aspect_ratio": None}}
    with pytest.raises(ConfigError, match=r"only cond has \['extra'\]\['resolution'\]"):
        guidance_batch(cond, {"text": text, "extra": {"aspect_ratio": None}})
    uncond = {"text": text, "extra": {"resolution": None, "aspect_ratio": None}}
    with pytest.raises(ConfigError, match=r"cond\['extra'\]\['resolution'\] is a tensor"):
        guidance_batch(cond, uncond)
    with pytest.raises(ConfigError, match="the same non-tensor value"):
        guidance_batch({"scale": 1.0}, {"scale": 0.5})
    batched = guidance_batch({"x": [text, None, 2]}, {"x": [text * 0, None, 2]})
    assert batched["x"][0].shape == (4, 3) and batched["x"][1:] == [None, 2]


def test_a_sampler_with_nested_conditioning_exports_as_one_onnx_file(tmp_path):
    pytest.importorskip("onnxruntime")
    model, latents, cond, uncond, _ = tiny_pixart(sizes=True)
    sampler = diffopt.unroll(model, DDIMScheduler(clip_sample=False), 2, guidance=2.0)
    out = diffopt.export(sampler, (latents, cond, uncond), out=tmp_path)
    engine = diffopt.load_engine(out)
    with torch.no_grad():
        expected = sampler(latents, cond, uncond)
    got = engine(latents=latents, cond=cond, uncond=uncond)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_flux_with_guidance_shares_the_ids_that_have_no_batch_axis():
    """Flux's img_ids and txt_ids are one row per token: the guidance batch passes them once."""
    flux, inputs = zoo.build("tiny-flux")
    cond = {
        k: v for k, v in inputs.items() if k not in ("hidden_states", "timestep", "return_dict")
    }
    uncond = {
        **cond,
        "encoder_hidden_states": torch.zeros_like(cond["encoder_hidden_states"]),
        "pooled_projections": torch.zeros_like(cond["pooled_projections"]),
    }
    sampler = diffopt.unroll(
        flux,
        FlowMatchEulerDiscreteScheduler(),
        2,
        sigmas=[1.0, 0.5],
        timestep_scale=1e-3,
        guidance=3.0,
    )
    x = inputs["hidden_states"]
    with torch.no_grad():
        expected = x
        for sigma, nxt in ((1.0, 0.5), (0.5, 0.0)):  # FluxPipeline's true CFG: two calls
            t = torch.full((x.shape[0],), sigma)
            v_c, v_u = (
                flux(hidden_states=expected, timestep=t, **c, return_dict=False)[0]
                for c in (cond, uncond)
            )
            expected = expected + (nxt - sigma) * (v_u + 3.0 * (v_c - v_u))
        eager = sampler(x, cond, uncond)
        compiled = torch.compile(
            sampler, backend="diffopt", options={"inner": "eager"}, fullgraph=True
        )(x, cond, uncond)
    torch.testing.assert_close(eager, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled, expected, atol=1e-5, rtol=1e-5)
    shifted = {**uncond, "img_ids": cond["img_ids"] + 1}
    with pytest.raises(ConfigError, match=r"cond\['img_ids'\] and uncond\['img_ids'\] differ"):
        sampler(x, cond, shifted)


def test_train_schedule_moves_a_fractional_schedule_toward_its_targets():
    """End to end through the partial step: the student's weights and the compensation both
    get gradients, the loss on the training pairs falls below where the closed-form fit left
    it, and afterwards nothing requires grad."""
    import copy

    student = zoo.load("ref-dit-2step")
    model = copy.deepcopy(student.model)
    labels = torch.arange(16) % 10
    latents = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    cond = {"class_labels": labels}
    with torch.no_grad():  # targets the schedule can reach: the 2-step student's own output
        targets = diffopt.unroll(model, student.scheduler, 2, sigmas=[1.0, 0.5])(latents, cond)
    sampler = diffopt.unroll(model, student.scheduler, "1.5", sigmas=[1.0, 0.5])
    diffopt.fit_compensation(sampler, latents, cond)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    scale = sampler.compensation["1"].scale.clone()

    def loss() -> float:
        with torch.no_grad():
            return (sampler(latents, cond) - targets).pow(2).mean().item()

    fitted = loss()
    losses = diffopt.train_schedule(
        sampler, latents, cond, targets, steps=30, lr=1e-4, batch=8, progress=False, ema=0.5
    )
    assert len(losses) == 30 and loss() < 0.5 * fitted
    assert not torch.equal(sampler.compensation["1"].scale, scale)
    assert any(not torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert not any(p.requires_grad for p in sampler.parameters())
    with pytest.raises(ConfigError, match="must be the final latents"):
        diffopt.train_schedule(sampler, latents, cond, targets[:3], steps=1)


def test_a_feature_term_pulls_the_samples_features_toward_the_targets():
    """With the classifier's features in the loss, the same training lands nearer the targets
    in that feature space than the squared distance in latents alone does."""
    import copy

    from diffopt.evaluation import metrics

    student = zoo.load("ref-dit-2step")
    classify = metrics.classifier()

    def features(latents: torch.Tensor) -> torch.Tensor:
        return classify.features(latents.clamp(-1, 1))

    labels = torch.arange(16) % 10
    latents = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    cond = {"class_labels": labels}
    with torch.no_grad():  # another class's images from the same noises: far in features
        targets = diffopt.unroll(student.model, student.scheduler, 2, sigmas=[1.0, 0.5])(
            latents, {"class_labels": (labels + 1) % 10}
        )
    distance = {}
    for name, term in (("latents", {}), ("features", {"features": features})):
        sampler = diffopt.unroll(
            copy.deepcopy(student.model), student.scheduler, 2, sigmas=[1.0, 0.5]
        )
        diffopt.train_schedule(
            sampler,
            latents,
            cond,
            targets,
            steps=8,
            lr=1e-3,
            batch=16,
            ema=0.0,
            progress=False,
            **term,
        )
        with torch.no_grad():
            distance[name] = (features(sampler(latents, cond)) - features(targets)).pow(2).mean()
    assert distance["features"] < 0.8 * distance["latents"]
    with pytest.raises(ConfigError, match="feature_weight must be positive"):
        diffopt.train_schedule(
            sampler, latents, cond, targets, steps=1, features=features, feature_weight=0
        )


def test_a_cosine_learning_rate_moves_the_weights_less_than_a_constant_one():
    """Adam moves each weight by about the learning rate per step: over 2 steps, the cosine
    schedule (lr, then lr / 2) moves them about 3/4 as far as the constant one."""
    import copy

    student = zoo.load("ref-dit-2step")
    latents = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    cond = {"class_labels": torch.arange(8) % 10}
    targets = torch.randn_like(latents)
    moved = {}
    for schedule in ("constant", "cosine"):
        model = copy.deepcopy(student.model)
        before = [p.clone() for p in model.parameters()]
        sampler = diffopt.unroll(model, student.scheduler, 2, sigmas=[1.0, 0.5])
        diffopt.train_schedule(
            sampler,
            latents,
            cond,
            targets,
            steps=2,
            lr=1e-3,
            lr_schedule=schedule,
            batch=8,
            ema=0.0,
            progress=False,
        )
        moved[schedule] = sum(
            (p - b).abs().sum().item() for p, b in zip(model.parameters(), before, strict=True)
        )
    assert 0.6 < moved["cosine"] / moved["constant"] < 0.9
    with pytest.raises(ConfigError, match="lr_schedule must be"):
        diffopt.train_schedule(sampler, latents, cond, targets, steps=1, lr_schedule="linear")


def test_image_to_video_channels_join_the_latents_at_every_step():
    """Wan I2V's pipeline joins its condition channels onto the latents before each call and
    the model predicts the latents' channels only: `concat=` does that inside the sampler."""
    from diffusers import WanTransformer3DModel

    from diffopt.evaluation.families import _WAN_SIZES

    torch.manual_seed(0)
    model = WanTransformer3DModel(**{**_WAN_SIZES, "in_channels": 8}).eval()
    generator = torch.Generator().manual_seed(1)
    latents, image = torch.randn(2, 2, 4, 2, 8, 8, generator=generator)
    cond = {"encoder_hidden_states": torch.randn(2, 6, 16, generator=generator)}
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(3)
    x = latents
    with torch.no_grad():
        for t in scheduler.timesteps:
            joined = torch.cat([x, image], dim=1)
            out = model(joined, timestep=t.expand(2), **cond, return_dict=False)[0]
            x = scheduler.step(out, t, x, return_dict=False)[0]
        sampler = diffopt.unroll(model, FlowMatchEulerDiscreteScheduler(shift=3.0), 3)
        torch.testing.assert_close(sampler(latents, cond, concat=image), x)
        with pytest.raises(ConfigError, match="predicts 4 channels for latents of 8"):
            sampler(torch.cat([latents, image], dim=1), cond)
