"""Peer adapters: each one really caches on ref-dit, ref-flux and a Wan video transformer, and a
reset makes runs repeatable."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from diffopt.evaluation import families, metrics, peers, ref_wan, zoo

STEPS = 20


@pytest.fixture(scope="module")
def ref():
    return zoo.load("ref-dit")


def _check(ref, variant):
    labels, seeds = torch.arange(4), [0, 1, 2, 3]
    denoiser = variant.build(copy.deepcopy(ref.model), "eager")

    def once():
        variant.reset(denoiser)
        return ref.sample(labels, seeds, denoiser=denoiser, steps=STEPS)

    first, flops = metrics.count_flops(once)
    _, base_flops = metrics.count_flops(lambda: ref.sample(labels, seeds, steps=STEPS))
    assert flops < 0.95 * base_flops, f"{variant.name} skipped no work"
    torch.testing.assert_close(once(), first, rtol=0, atol=0)  # reset: a cold start every run


@pytest.mark.parametrize(
    "make",
    [
        peers.first_block_cache,
        peers.taylorseer_cache,
        peers.faster_cache,
        peers.pyramid_attention_broadcast,
    ],
)
def test_diffusers_hook_peers(ref, make):
    _check(ref, make())


def test_taylorseer_of_order_two_extrapolates_differently(ref):
    labels, seeds = torch.arange(2), [0, 1]
    outs = []
    for order in (1, 2):
        variant = peers.taylorseer_cache(4, max_order=order)
        denoiser = variant.build(copy.deepcopy(ref.model), "eager")
        variant.reset(denoiser)
        outs.append(ref.sample(labels, seeds, denoiser=denoiser, steps=STEPS))
    assert variant.name == "diffusers TaylorSeer 4 order 2"
    assert not torch.allclose(outs[0], outs[1])


def test_mag_cache_calibrates_itself(ref):
    labels, seeds = torch.arange(4), [0, 1, 2, 3]
    _check(
        ref, peers.mag_cache(lambda d: ref.sample(labels, seeds, denoiser=d, steps=STEPS), STEPS)
    )


def test_cache_dit_dbcache(ref):
    pytest.importorskip("cache_dit")
    _check(ref, peers.db_cache(STEPS, threshold=0.2))


@pytest.mark.parametrize(
    "make",
    [
        lambda select, run: peers.convrot_quant(select),
        lambda select, run: peers.torchao_quant("w8a8", select),
        lambda select, run: peers.torchao_quant("w4a8", select),
        lambda select, run: peers.quanto_quant("w8a8", select, run),
    ],
    ids=["convrot", "torchao-w8a8", "torchao-w4a8", "quanto-w8a8"],
)
def test_quant_peers_quantize_only_the_selected_linears(ref, make):
    inputs = ref.make_inputs(batch=2)
    chosen = {"transformer_blocks.0.attn1.to_q", "transformer_blocks.3.ff.net.2"}
    variant = make(chosen.__contains__, lambda model: model(**inputs))
    model = copy.deepcopy(ref.model)
    denoiser = variant.build(model, "eager")
    changed = {
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and type(module.weight) is not torch.nn.Parameter
    } or {name for name, module in model.named_modules() if type(module).__name__ == "QLinear"}
    assert changed == chosen, variant.name
    with torch.no_grad():
        expected, got = ref.model(**inputs)[0], denoiser(**inputs)[0]
    assert 0 < (expected - got).abs().max() < 0.5 * expected.abs().max()


# Flux and Wan: 4 steps, each peer with a knob at which it skips work that early

FEW = 4


@pytest.fixture(scope="module")
def flux():
    return zoo.load("ref-flux")


@pytest.fixture(scope="module")
def wan():
    """The ref-wan architecture, untrained: weights Wan starts at zero redrawn small and random
    (as `families` does), so every block changes its input and a cache has something to miss."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    model = ref_wan.architecture()
    families._redraw_zero_weights(model, torch.Generator().manual_seed(1))
    model = model.eval().requires_grad_(False)
    embeddings = ref_wan.class_embeddings(model).eval().requires_grad_(False)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return ref_wan.WanReference(
        "untrained-wan", model, scheduler, dict, 10, 2.0, FEW, embeddings=embeddings
    )


FEW_STEP_PEERS = {
    "fbcache": lambda run: peers.first_block_cache(0.5),
    "magcache": lambda run: peers.mag_cache(run, FEW),
    "taylorseer": lambda run: peers.taylorseer_cache(),
    "fastercache": lambda run: peers.faster_cache(),
    "pab": lambda run: peers.pyramid_attention_broadcast(),
    "dbcache": lambda run: peers.db_cache(FEW, threshold=0.55, warmup=2),
}


def _block_work(model):
    """A counter of the calls to linear layers inside `model`'s blocks: the work a cache skips
    (whole blocks, or attention in them). On the layers, not the blocks: a block a diffusers hook
    skips is still called, its layers are not."""
    calls = [0]

    def count(*_):
        calls[0] += 1

    for name in peers.layout(model, "test").blocks:
        for module in getattr(model, name).modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(count)
    return calls


def _cache_few_steps(ref, peer, images):
    """(uncached, cached output, cached output of a second run, block work cached / uncached)."""
    if peer == "dbcache":
        pytest.importorskip("cache_dit")
    labels, seeds = torch.arange(images), list(range(images))

    def run(denoiser):
        return ref.sample(labels, seeds, denoiser=denoiser, steps=FEW)

    model = copy.deepcopy(ref.model)
    base_calls = _block_work(model)
    base = run(model)
    model = copy.deepcopy(ref.model)
    calls = _block_work(model)  # before the peer wraps or patches the blocks
    variant = FEW_STEP_PEERS[peer](run)
    denoiser = variant.build(model, "eager")
    calls[0] = 0  # MagCache calibrated in build
    variant.reset(denoiser)
    out = run(denoiser)
    work = calls[0] / base_calls[0]
    variant.reset(denoiser)
    return base, out, run(denoiser), work


@pytest.mark.parametrize("peer", sorted(FEW_STEP_PEERS))
def test_peers_cache_on_ref_flux(flux, peer):
    base, out, again, work = _cache_few_steps(flux, peer, images=2)
    assert work < 1, f"{peer} skipped no work"
    # one reused step of 4 costs ref-flux ~22 dB (every step after the first reused: 16 dB;
    # a blank image: 6 dB); the digits stay the classes asked for
    assert 18 < metrics.psnr(out, base) < float("inf"), peer
    labels = torch.arange(2)
    assert metrics.class_accuracy(out, labels) == metrics.class_accuracy(base, labels) == 1
    torch.testing.assert_close(again, out, rtol=0, atol=0)  # reset: a cold start every run


@pytest.mark.parametrize("peer", sorted(FEW_STEP_PEERS))
def test_peers_cache_on_wan(wan, peer):
    base, out, again, work = _cache_few_steps(wan, peer, images=1)
    assert work < 1, f"{peer} skipped no work"
    assert 30 < metrics.psnr(out, base) < float("inf"), peer
    torch.testing.assert_close(again, out, rtol=0, atol=0)


@pytest.mark.parametrize(
    "make", [peers.first_block_cache, peers.taylorseer_cache, peers.pyramid_attention_broadcast]
)
def test_peers_refuse_classes_they_do_not_know(make):
    model, _ = zoo.build("tiny-unet")
    variant = make()
    with pytest.raises(TypeError, match=rf"^{re.escape(variant.name)} .*UNet2DConditionModel"):
        variant.build(model, "eager")


def test_cache_dit_refuses_classes_it_has_no_adapter_for():
    pytest.importorskip("cache_dit")
    model, _ = zoo.build("tiny-unet")
    with pytest.raises(TypeError, match=r"DBCache .*UNet2DConditionModel.*no BlockAdapter"):
        peers.db_cache(FEW).build(model, "eager")
